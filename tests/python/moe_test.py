#!/usr/bin/python3
"""switchyard.torch.MoE against a live Switchyard cluster.

usage:
  moe_test.py write-weights CONFIG WEIGHTS_FILE [--set S.F=V]...
  moe_test.py gradcheck RUN_DIR CONFIG WEIGHTS_FILE --updated OUT_FILE
              [--set S.F=V]...
  moe_test.py determinism RUN_DIR CONFIG RANK WORLD OUT_JSON [--steps N]
      [--set S.F=V]...
  moe_test.py killed RUN_DIR CONFIG [--timeout-s S] [--set S.F=V]...

Run with PYTHONPATH=build/python (switchyard with its _core extension, as
the build lays them out). CONFIG is the cluster's YAML and --set repeats
the overrides `switchyard up` was given: they reach the session and the
fields read here (model.*, training.*; proto/config.proto's defaults
otherwise). The C++ test harness starts the cluster with
`switchyard up --workers 2 --trainers 0 --run-dir RUN_DIR --config CONFIG
--set cluster.trainers=N ...`.

write-weights: seeded random experts (normal, std 0.1, biases too) for
  every MoE layer of CONFIG, named as checkpoint.init_from reads them:
  layers.<L>.experts.<E>.w1 (d, g*d_ff), b1 (g*d_ff), w2 (d_ff, d), b2 (d),
  L the transformer layer ((L + 1) % moe_every == 0, common/model_shape.cc
  IsMoeLayer), g 2 for swiglu else 1, biases only with model.expert_bias.
gradcheck (rank 0, cluster.trainers=1 added before --set; a fresh run at
  step 0, started with checkpoint.init_from=WEIGHTS_FILE): for every MoE
  layer, an MoE and
  moe_reference.ReferenceMoE with the same router and expert weights, fp32;
  an evaluation, then for each micro-batch T=64 random tokens: y, x.grad,
  router.grad and the aux loss agree within 1e-5 x max |reference|. Then
  step_done and the reference experts' torch.optim.AdamW step with
  training.* (learning rate as expert_worker/optimizer.cc LearningRate at
  step 0); the updated expert tensors of every MoE layer go to OUT_FILE
  (safetensors, the names above), to compare with the cluster's export of
  checkpoint 1. Last line: `moe_test gradcheck ok`.
  NOTE: AdamW's first step is lr * g / (|g| + eps). With eps = 1e-8 that
  is about lr * sign(g): it cannot see a wrong overall gradient scale, and
  a gradient within rounding of 0 may move by up to lr either way (rare:
  gradcheck prints a note when one is below 1e-6 x max |g|). An eps near
  the gradients' size (training.eps=1; they are O(1) here) makes the
  comparison smooth and scale-sensitive.
determinism: trainer RANK of WORLD (cluster.trainers=WORLD added before
  --set; torch.distributed gloo with the init file RUN_DIR/torch-gloo-init,
  which must not exist yet): a seeded tiny model
  (byte embedding, num_moe_layers blocks x + MoE(LayerNorm(x)), LayerNorm,
  head), --steps steps (default 5) of training.micro_batches micro-batches
  of 4 x 16 bytes
  of a fixed text (windows by rank, step, micro-batch); each micro-batch's
  loss scaled by 1 / (WORLD * micro_batches), dense gradients all-reduced
  with SUM (the C++ trainer's arithmetic), torch AdamW on the dense part.
  Writes OUT_JSON {"rank", "world", "steps", "loss" (mean over ranks and
  micro-batches, per step), "dense_checksum"}. Checks the dense parameters
  agree across ranks. Last line: `moe_test determinism ok`.
killed: rank 0; trains steps until a call fails, printing `step N` (the
  step just completed, flushed) after each. A SwitchyardError prints
  `error: <its text>` and exits 0; any other exception, or no error
  within --timeout-s (default 300), exits 1.
"""

import argparse
import datetime
import json
import math
import os
import sys
import time

import numpy as np
import torch
import yaml  # Debian's python3-yaml, a dependency of python3-torch.
from torch import nn
from torch.nn import functional as F

import switchyard.torch as sy  # From PYTHONPATH: build/python.
from switchyard.torch import MoE, SwitchyardConfig
from switchyard.torch import read_safetensors, save_file

from moe_reference import ReferenceMoE  # This script's directory.

TOKENS = 64  # Per micro-batch and layer, in gradcheck.
RTOL = 1e-5  # Of max |reference|.
WEIGHTS_SEED = 20240601
GRADCHECK_SEED = 7
DETERMINISM_SEED = 1234
DETERMINISM_STEPS = 5

# proto/config.proto's defaults of the fields read here.
DEFAULTS = {
    "model": {"num_layers": 4, "d_model": 64, "d_ff": 256, "num_heads": 4,
              "vocab_size": 256, "seq_len": 64, "moe_every": 2,
              "num_experts": 8, "top_k": 1, "activation": "gelu",
              "expert_bias": True, "norm": "rmsnorm",
              "positions": "learned"},
    "training": {"steps": 100, "micro_batches": 1, "optimizer": "adamw",
                 "learning_rate": 0.001, "lr_schedule": "cosine",
                 "warmup_steps": 10, "weight_decay": 0.0, "beta1": 0.9,
                 "beta2": 0.999, "eps": 1e-8},
}

TEXT = (b"Switchyard serves the experts of a mixture-of-experts model from "
        b"a cluster of workers; trainers route tokens to them, and the "
        b"workers apply the optimizer when every trainer has finished its "
        b"step. A lost worker is an error that names it, never a hang. ")


def load_config(path, sets):
    """{"model": {...}, "training": {...}} of the fields in DEFAULTS: the
    YAML file's values, then the "section.field=value" overrides, each
    converted to its default's type (PyYAML reads 1e-8 as a string)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    config = {section: dict(fields) for section, fields in DEFAULTS.items()}

    def put(section, field, value):
        if field not in config.get(section, {}):
            return  # Not read here.
        default = config[section][field]
        if isinstance(default, bool):
            value = value if isinstance(value, bool) else \
                str(value).lower() in ("true", "1", "yes")
        elif isinstance(default, (int, float)):
            value = type(default)(value)
        else:
            value = str(value)
        config[section][field] = value

    for section, fields in raw.items():
        if isinstance(fields, dict):
            for field, value in fields.items():
                put(section, field, value)
    for override in sets:
        key, eq, value = override.partition("=")
        section, dot, field = key.partition(".")
        if not eq or not dot:
            raise ValueError("--set %r is not section.field=value" % override)
        put(section, field, value)
    return config


def model_config(config):
    """The model section as a SwitchyardConfig (validated; gelu is
    gelu_tanh, as in the C++)."""
    return SwitchyardConfig.from_dict(config["model"])


def learning_rate(t, step):
    """expert_worker/optimizer.cc LearningRate."""
    peak, warmup = t["learning_rate"], t["warmup_steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    if t["lr_schedule"] == "cosine":
        span = max(1, t["steps"] - warmup)
        progress = min(max((step - warmup) / span, 0.0), 1.0)
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if t["lr_schedule"] == "inverse_sqrt":
        w = float(max(warmup, 1))
        return peak * math.sqrt(w / max(step + 1.0, w))
    return peak


def check(ok, message, *args):
    if not ok:
        raise AssertionError(message % args)


def max_error(got, want):
    """(max |got - want|, max |want|)."""
    return float((got - want).abs().max()), float(want.abs().max())


def assert_close(got, want, what, errors):
    err, scale = max_error(got, want)
    errors[what] = max(errors.get(what, 0.0), err / max(scale, 1e-30))
    check(err <= RTOL * scale, "%s: max |cluster - reference| %.3g > %g x "
          "max |reference| %.3g", what, err, RTOL, scale)


def check_session(session, model):
    """The session's cluster has the model this script read."""
    for field, mine in (("d_model", model.d_model),
                        ("num_experts", model.num_experts),
                        ("top_k", model.top_k),
                        ("num_moe_layers", len(model.moe_layers))):
        check(getattr(session, field) == mine,
              "the cluster's %s is %s but CONFIG and --set make it %s: pass "
              "moe_test.py the --set flags `switchyard up` got", field,
              getattr(session, field), mine)


def write_weights(args):
    model = model_config(load_config(args.config, args.set))
    d, f, g = model.d_model, model.d_ff, model.gates
    gen = torch.Generator().manual_seed(WEIGHTS_SEED)
    shapes = {"w1": (d, g * f), "w2": (f, d)}
    if model.expert_bias:
        shapes.update(b1=(g * f,), b2=(d,))
    tensors = {}
    for layer in model.moe_layers:
        for e in range(model.num_experts):
            for name, shape in shapes.items():
                tensors["layers.%d.experts.%d.%s" % (layer, e, name)] = \
                    0.1 * torch.randn(shape, generator=gen)
    save_file(tensors, args.weights)
    print("moe_test write-weights: %d tensors of MoE layers %s to %s" %
          (len(tensors), list(model.moe_layers), args.weights))
    return 0


def check_refusals(session):
    """Bad calls through the binding are SwitchyardErrors naming what is
    wrong, and leave the session usable (trainer/moe_session.cc checks)."""
    core = session._core  # The binding itself, below the wrapper.
    d, k, E = session.d_model, session.top_k, session.num_experts
    x = np.zeros((4, d), np.float32)
    experts = np.zeros((4, k), np.int32)
    gates = np.ones((4, k), np.float32)
    kept = np.ones((4, k), np.uint8)
    bad_expert = experts.copy()
    bad_expert[2, 0] = E + 5
    for what, call, want in (
            ("an unknown expert",
             lambda: core.forward(0, 0, x, bad_expert, gates, kept),
             "outside [0, %d)" % E),
            ("a layer the model lacks",
             lambda: core.forward(session.num_moe_layers, 0, x, experts,
                                  gates, kept), "MoE layer"),
            ("a micro-batch beyond training.micro_batches",
             lambda: core.forward(0, session.micro_batches, x, experts, gates,
                                  kept), "micro-batch"),
            ("x of the wrong width",
             lambda: core.forward(0, 0, np.zeros((4, d + 1), np.float32),
                                  experts, gates, kept), "d_model"),
            ("route arrays of another length",
             lambda: core.forward(0, 0, x, experts[:3], gates, kept),
             "(tokens, k)")):
        try:
            call()
        except sy.SwitchyardError as e:
            check(want in str(e), "%s: the error %r does not say %r", what,
                  str(e), want)
        else:
            check(False, "%s was accepted", what)
    print("refusals ok", flush=True)


def gradcheck(args):
    config = load_config(args.config, args.set)
    model, training = model_config(config), config["training"]
    check(training["optimizer"] == "adamw", "gradcheck reproduces AdamW "
          "only; training.optimizer is %s", training["optimizer"])
    weights = read_safetensors(args.weights)
    # A session whose model differs from the cluster's is refused, naming
    # the field, and leaves (the real session below joins after it).
    other_k = 1 if model.top_k != 1 else 2
    try:
        sy.connect(args.config, 0, args.run_dir,
                   ["cluster.trainers=1", "model.top_k=%d" % other_k] +
                   args.set, name="moe-test-mismatch")
    except sy.SwitchyardError as e:
        check("top_k" in str(e) and "differs from the cluster" in str(e),
              "the refusal does not name model.top_k: %s", e)
    else:
        check(False, "a session with another model.top_k was accepted")
    print("configuration mismatch refused", flush=True)
    session = sy.connect(args.config, 0, args.run_dir,
                         ["cluster.trainers=1"] + args.set,
                         name="moe-test-gradcheck")
    check_session(session, model)
    check_refusals(session)
    step = session.step
    check(step == 0, "gradcheck needs a fresh run at step 0 (AdamW's bias "
          "correction starts there); the cluster is at step %d", step)
    torch.manual_seed(GRADCHECK_SEED)
    moes = nn.ModuleList(MoE.from_session(session, jitter_eps=0.0)
                         for _ in range(session.num_moe_layers))
    sy.attach(moes, session)
    refs = []
    for moe, layer in zip(moes, model.moe_layers):
        ref = ReferenceMoE(model, moe.aux_loss_coeff, moe.z_loss_coeff)
        with torch.no_grad():
            ref.router.copy_(moe.router)
        ref.load_experts(weights, layer)
        refs.append(ref)
    errors = {}
    d, M = session.d_model, session.micro_batches

    # Evaluation: the experts as initialised, nothing kept on the workers.
    moes.eval()
    with torch.no_grad():
        for moe, ref in zip(moes, refs):
            x = torch.randn(TOKENS, d)
            y, aux = moe(x)
            y_ref, aux_ref = ref(x, moe.eval_capacity_factor)
            assert_close(y, y_ref, "evaluate y", errors)
            assert_close(aux, aux_ref, "evaluate aux", errors)
    moes.train()

    # Training: every micro-batch of every layer, losses scaled by 1 / M.
    for m in range(M):
        for layer, (moe, ref) in enumerate(zip(moes, refs)):
            x = torch.randn(TOKENS, d)
            probe = torch.randn(TOKENS, d)
            x_got = x.clone().requires_grad_()
            y, aux = moe(x_got)
            ((y * probe).sum() + aux).div(M).backward()
            x_ref = x.clone().requires_grad_()
            y_ref, aux_ref = ref(x_ref, moe.capacity_factor)
            ((y_ref * probe).sum() + aux_ref).div(M).backward()
            where = " (layer %d, micro-batch %d)" % (layer, m)
            assert_close(y.detach(), y_ref.detach(), "y" + where, errors)
            assert_close(aux.detach(), aux_ref.detach(), "aux" + where,
                         errors)
            assert_close(x_got.grad, x_ref.grad, "x.grad" + where, errors)
    for layer, (moe, ref) in enumerate(zip(moes, refs)):
        assert_close(moe.router.grad, ref.router.grad,
                     "router.grad (layer %d)" % layer, errors)

    sy.step_done(session)
    check(session.step == step + 1, "step_done left the session at step %d",
          session.step)

    # The workers update every expert with its summed gradient (0 for an
    # expert no token reached), so the reference does too.
    params = [p for ref in refs for p in ref.experts.parameters()]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # NOTE: AdamW's first update is lr * g / (|g| + eps): with a small eps
    # about lr * sign(g), blind to a wrong gradient scale and off by up to
    # lr for a gradient within rounding of 0. See the usage (training.eps).
    grads = torch.cat([p.grad.flatten() for p in params]).abs()
    rounding = 1e-6 * float(grads.max())  # fp32 sums of ~T terms.
    fragile = int(((grads > 0) & (grads < rounding)).sum())
    if fragile and training["eps"] < rounding:
        print("moe_test gradcheck: note: %d expert gradients are below "
              "1e-6 x max |g| (%.3g) and training.eps is %g: their updates "
              "may differ by up to the learning rate" %
              (fragile, float(grads.max()), training["eps"]))
    lr = learning_rate(training, step)
    torch.optim.AdamW(params, lr=lr,
                      betas=(training["beta1"], training["beta2"]),
                      eps=training["eps"],
                      weight_decay=training["weight_decay"]).step()
    updated = {}
    for ref, layer in zip(refs, model.moe_layers):
        updated.update(ref.expert_tensors(layer))
    save_file(updated, args.updated)
    session.close()
    print("moe_test gradcheck: AdamW lr %.9g betas (%g, %g) eps %g "
          "weight_decay %g; %d updated tensors to %s" %
          (lr, training["beta1"], training["beta2"], training["eps"],
           training["weight_decay"], len(updated), args.updated))
    print("moe_test gradcheck: max relative errors " +
          json.dumps({k: float("%.3g" % v) for k, v in errors.items()}))
    print("moe_test gradcheck ok", flush=True)
    return 0


class TinyModel(nn.Module):
    """Bytes -> embedding (256, d) -> blocks x + MoE(LayerNorm(x)) ->
    LayerNorm -> head (d, 256). forward(tokens (B, L)) returns
    (logits (B, L, 256), the summed aux losses)."""

    def __init__(self, session):
        super().__init__()
        d = session.d_model
        self.embed = nn.Embedding(256, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d)
                                   for _ in range(session.num_moe_layers))
        self.moes = nn.ModuleList(MoE.from_session(session)
                                  for _ in range(session.num_moe_layers))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        aux_total = torch.zeros(())
        for norm, moe in zip(self.norms, self.moes):
            y, aux = moe(norm(x))
            x = x + y
            aux_total = aux_total + aux
        return self.head(self.final_norm(x)), aux_total


def windows(rank, world, step, micro_batch, micro_batches, batch=4,
            length=16):
    """(inputs, targets) (batch, length) int64: windows of TEXT repeated,
    at an offset fixed by (rank, step, micro-batch)."""
    data = torch.tensor(list(TEXT * 8), dtype=torch.int64)
    index = (step * world + rank) * micro_batches + micro_batch
    starts = [(index * batch + b) * 37 % (data.numel() - length - 1)
              for b in range(batch)]
    inputs = torch.stack([data[s:s + length] for s in starts])
    targets = torch.stack([data[s + 1:s + length + 1] for s in starts])
    return inputs, targets


def determinism(args):
    import torch.distributed as dist
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    init_file = os.path.abspath(os.path.join(args.run_dir, "torch-gloo-init"))
    dist.init_process_group("gloo", init_method="file://" + init_file,
                            world_size=args.world, rank=args.rank,
                            timeout=datetime.timedelta(seconds=120))
    session = sy.connect(args.config, args.rank, args.run_dir,
                         ["cluster.trainers=%d" % args.world] + args.set,
                         name="moe-test-rank%d" % args.rank)
    torch.manual_seed(DETERMINISM_SEED)  # The same model on every rank.
    model = TinyModel(session)
    sy.attach(model, session)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    M, W = session.micro_batches, args.world
    steps, losses = [], []
    for step in range(args.steps):
        steps.append(session.step)
        total = torch.zeros(())
        for m in range(M):
            inputs, targets = windows(args.rank, W, step, m, M)
            logits, aux = model(inputs)
            loss = F.cross_entropy(logits.reshape(-1, 256),
                                   targets.reshape(-1))
            (loss + aux).div(W * M).backward()
            total += loss.detach() / (W * M)
        for p in model.parameters():  # Dense: summed over ranks.
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        optimizer.step()
        optimizer.zero_grad()
        sy.step_done(session)
        losses.append(float(total))
        print("step %d loss %.6f" % (steps[-1], losses[-1]), flush=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    highest = flat.clone()
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    check(torch.equal(highest, flat), "rank %d: the dense parameters differ "
          "between ranks", args.rank)
    with open(args.out_json, "w") as f:
        json.dump({"rank": args.rank, "world": W, "steps": steps,
                   "loss": losses,
                   "dense_checksum": float(flat.double().abs().sum())}, f)
    dist.barrier()
    session.close()
    dist.destroy_process_group()
    print("moe_test determinism ok", flush=True)
    return 0


def killed(args):
    """Trains until a SwitchyardError (the harness kills a worker), prints
    it, then does what docs/pytorch.md tells a user to: connect again (the
    old session has left the cluster), attach, and train 3 more steps from
    the cluster's resume step. Exit 0 when all of that worked."""
    error_class = sy.SwitchyardError
    deadline = time.monotonic() + args.timeout_s
    torch.manual_seed(GRADCHECK_SEED)

    def train(session, moes, steps):
        for _ in range(steps):
            step = session.step
            for _ in range(session.micro_batches):
                x = torch.randn(TOKENS, session.d_model)
                loss = torch.zeros(())
                for moe in moes:
                    y, aux = moe(x)
                    x = x + y
                    loss = loss + aux
                (loss + x.square().mean()).backward()
            sy.step_done(session)
            print("step %d" % step, flush=True)
            if time.monotonic() > deadline:
                raise TimeoutError("no SwitchyardError within %g s" %
                                   args.timeout_s)

    try:
        session = sy.connect(args.config, 0, args.run_dir, args.set,
                             name="moe-test-killed")
        moes = nn.ModuleList(MoE.from_session(session)
                             for _ in range(session.num_moe_layers))
        sy.attach(moes, session)
        try:
            train(session, moes, 1 << 30)
        except error_class as e:
            print("error: %s" % e, flush=True)
        # The cluster recovers by itself; this trainer joins it again.
        session = sy.connect(args.config, 0, args.run_dir, args.set,
                             name="moe-test-killed")
        sy.attach(moes, session)
        print("reconnected at step %d under epoch %d" %
              (session.step, session.epoch), flush=True)
        train(session, moes, 3)
        session.close()
        print("moe_test killed ok", flush=True)
        return 0
    except Exception as e:  # noqa: BLE001 - reported, then exit 1.
        print("error (%s): %s" % (type(e).__name__, e), flush=True)
        return 1


def parse(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)

    def mode(name, *positional):
        p = modes.add_parser(name)
        for arg, kind in positional:
            p.add_argument(arg, type=kind)
        p.add_argument("--set", action="append", default=[],
                       metavar="SECTION.FIELD=VALUE",
                       help="an override `switchyard up` was given")
        return p

    mode("write-weights", ("config", str), ("weights", str))
    mode("gradcheck", ("run_dir", str), ("config", str), ("weights", str)) \
        .add_argument("--updated", required=True,
                      help="safetensors file for the updated experts")
    mode("determinism", ("run_dir", str), ("config", str), ("rank", int),
         ("world", int), ("out_json", str)) \
        .add_argument("--steps", type=int, default=DETERMINISM_STEPS)
    mode("killed", ("run_dir", str), ("config", str)) \
        .add_argument("--timeout-s", type=float, default=300.0)
    return parser.parse_args(argv)


def main(argv):
    args = parse(argv)
    return {"write-weights": write_weights, "gradcheck": gradcheck,
            "determinism": determinism, "killed": killed}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
