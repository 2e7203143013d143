"""The demo job written in plain PyTorch, as a PyTorch user would on one
machine: the baseline of bench/demo_vs_torch.sh (issue 23's whole-job
target: Switchyard's demo at least as fast).

The model of the YAML config (switchyard.torch.SwitchyardModel: the same
layers, shapes and initialisation as the C++ trainer), every expert local
on every rank, data-parallel over `trainers` processes
(DistributedDataParallel over gloo, 1 thread each), AdamW with the
config's betas, eps, weight decay and linear warmup, training's capacity
factor. Each step each rank trains on batch_size windows of seq_len + 1
bytes of the corpus. Router aux and z losses are left out (they cost
nothing measurable at this size). Prints "torch_demo: N tokens/s" counted
as Switchyard's trainers count theirs: every rank's tokens over the time
from the first step to the last.

usage: torch_demo_bench.py CONFIG.yaml CORPUS_DIR STEPS
"""

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from switchyard.torch import model as sy_model  # noqa: E402


def fused_ffn_forward(self, x):
    """Ffn.forward with the GELU a PyTorch user writes: one fused op."""
    if self.activation != "gelu_tanh":
        return plain_ffn_forward(self, x)
    h = x @ self.w1.view(self.d_model, -1)
    if self.b1 is not None:
        h = h + self.b1
    y = F.gelu(h, approximate="tanh") @ self.w2.view(self.d_ff, self.d_model)
    return y if self.b2 is None else y + self.b2


plain_ffn_forward = sy_model.Ffn.forward
sy_model.Ffn.forward = fused_ffn_forward


def corpus_bytes(path):
    data = bytearray()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            data += f.read()
    return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)


def train(rank, world, config, corpus_dir, steps, port, result):
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # proto/config.proto's default where the YAML leaves a field out.
    model_cfg = {"vocab_size": 256, **config["model"]}
    training = config.get("training", {})
    torch.manual_seed(training.get("seed", 1))
    model = sy_model.SwitchyardModel(model_cfg)
    model.capacity_factor = model_cfg.get("capacity_factor", 0.0)
    # An expert that no token of a batch chose gets no gradient.
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    lr = training.get("learning_rate", 1e-3)
    warmup = training.get("warmup_steps", 10)
    opt = torch.optim.AdamW(ddp.parameters(), lr=lr,
                            betas=(training.get("beta1", 0.9),
                                   training.get("beta2", 0.999)),
                            eps=training.get("eps", 1e-8),
                            weight_decay=training.get("weight_decay", 0.0))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    data = corpus_bytes(corpus_dir)
    B = training.get("batch_size", 8)
    L = model_cfg["seq_len"]
    gen = torch.Generator().manual_seed(1000 + rank)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        at = torch.randint(0, data.numel() - L - 1, (B,), generator=gen)
        windows = torch.stack([data[a:a + L + 1] for a in at.tolist()])
        logits = ddp(windows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                               windows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        result.put((elapsed, float(loss)))
    dist.destroy_process_group()


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        config = yaml.safe_load(f)
    corpus_dir, steps = sys.argv[2], int(sys.argv[3])
    world = config.get("cluster", {}).get("trainers", 1)
    port = 29500 + os.getpid() % 1000
    ctx = mp.get_context("spawn")
    result = ctx.SimpleQueue()
    mp.start_processes(train, args=(world, config, corpus_dir, steps, port,
                                    result),
                       nprocs=world, start_method="spawn")
    elapsed, loss = result.get()
    tokens = steps * world * config["training"]["batch_size"] * \
        config["model"]["seq_len"]
    print("torch_demo: %d steps, %d ranks, loss %.3f, %.1f s, %d tokens/s" %
          (steps, world, loss, elapsed, tokens / elapsed))


if __name__ == "__main__":
    main()
