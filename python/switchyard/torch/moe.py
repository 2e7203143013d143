"""A mixture-of-experts layer for PyTorch models whose experts live on a
Switchyard cluster.

The router is a PyTorch parameter, computed in fp32 on the trainer as the
C++ trainer does (trainer/router.h: Switch's selective precision); the
experts are the cluster's, y_t = sum_j gate_tj * Expert_{e_tj}(x_t) over the
kept choices with Expert(x) = act(x W1 + b1) W2 + b2 (model.py Ffn,
expert_worker/expert_ffn.cc). Gradients reach the router through the gates
(d_gate_tj = dy_t . Expert_{e_tj}(x_t), from the workers) and the aux and z
losses; the experts' own gradients stay on the workers, which apply their
optimizer at step_done (session.py).
"""

import math

import numpy as np
import torch
from torch import nn

from .router import route_logits, router_losses
from .session import resolve


def _numpy(t):
    """t as a C-contiguous fp32 numpy array on the CPU (no copy when it is
    one already)."""
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _tensor(a, shape, device, what):
    """The session's fp32 array `a` as a tensor of `shape` on `device`."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if t.numel() != math.prod(shape):
        raise RuntimeError("the Switchyard session returned %s of shape %s; "
                           "expected %s" % (what, tuple(t.shape),
                                            tuple(shape)))
    return t.reshape(shape).to(device)


class _RemoteExperts(torch.autograd.Function):
    """y (T, d) = sum_j kept_tj gates_tj Expert_{e_tj}(x_t) on the cluster
    (session.forward; trainer/moe_client.h MoeLayerClient::Forward).
    backward calls session.backward for the same (layer, micro_batch) and
    returns dLoss/dx and dLoss/dgates; the workers keep the experts'
    gradients. x: (T, d) fp32; gates: (T, k) fp32; experts: numpy int32
    (T, k); kept: numpy uint8 (T, k).

    NOTE: one backward per forward: the workers free what they kept at
    backward, so retain_graph=True with a second backward fails there.
    """

    @staticmethod
    def forward(ctx, x, gates, session, layer, micro_batch, experts, kept):
        y = session.forward(layer, micro_batch, _numpy(x), experts,
                            _numpy(gates), kept)
        ctx.session, ctx.layer, ctx.micro_batch = session, layer, micro_batch
        ctx.x_shape, ctx.gates_shape, ctx.device = \
            tuple(x.shape), tuple(gates.shape), x.device
        return _tensor(y, x.shape, x.device, "y")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        dx, d_gate = ctx.session.backward(ctx.layer, ctx.micro_batch,
                                          _numpy(dy))
        return (_tensor(dx, ctx.x_shape, ctx.device, "dx"),
                _tensor(d_gate, ctx.gates_shape, ctx.device, "d_gate"),
                None, None, None, None, None)


class MoE(nn.Module):
    """A mixture-of-experts layer: router here, experts on the cluster.

    forward(x) takes x (..., hidden_size) of any float dtype and returns
    (y, aux_loss): y like x (computed in fp32, cast back to x.dtype) and
    aux_loss, a 0-dim fp32 tensor to add to the training loss, the sum of
    the Switch load-balancing loss and the router z-loss
    (router.py router_losses, trainer/router.h):

        aux = aux_loss_coeff * E * sum_i f_i * P_i
        z   = z_loss_coeff * mean_t logsumexp(logits_t)^2

    with logits = x.float() @ router, router (hidden_size, num_experts)
    (Switchyard's y = x @ W layout, the export's layers.<l>.router). Routing
    is router.py's: softmax in fp32, top_k experts best first with ties to
    the lower index, gate = prob (k = 1) or prob renormalised over the k
    choices (k > 1), capacity min(ceil(cf * T * k / E), T * k) per expert
    over the T tokens of the call (cf 0: dropless).

    A training pass (train() mode with grad enabled) uses capacity_factor,
    jitter and session.forward (the workers keep state for backward, and
    its backward must run before step_done; it runs only if x or the
    router needs a gradient, else the experts get none). Any other pass is
    an evaluation: eval_capacity_factor, no jitter, session.evaluate, and
    no gradient to x or the router through y.

    Jitter (training only) multiplies the router's input, not the experts',
    by U(1 - jitter_eps, 1 + jitter_eps) drawn from torch's RNG.
    NOTE: this is not Switchyard's jitter, which the C++ trainer draws
    deterministically from (seed, step, rank, micro-batch, layer, token,
    dim) (trainer/router.cc JitterMultipliers); seed torch for repeatable
    runs.

    Micro-batches: the k-th training forward of a module within a step is
    micro-batch k (0-based); the count restarts when session.step changes
    (step_done) and a forward beyond session.micro_batches raises.
    NOTE: so a module runs once per micro-batch: activation checkpointing
    (which runs forward again) is not supported.

    After each forward: tokens_per_expert, a LongTensor (E,) of the kept
    assignments per expert; last_aux_loss and last_z_loss (detached).

    session: a switchyard.torch Session (default: the current one when
    forward runs); layer: the cluster's MoE layer ordinal (0-based),
    usually set by attach(). Not thread-safe.
    """

    def __init__(self, hidden_size, num_experts, top_k=1, capacity_factor=0.0,
                 eval_capacity_factor=0.0, aux_loss_coeff=0.01,
                 z_loss_coeff=0.001, jitter_eps=0.0, session=None, layer=None):
        super().__init__()

        def check(name, value, ok, rule):
            if not ok:
                raise ValueError("MoE: %s (%r) %s" % (name, value, rule))

        for name, value in (("hidden_size", hidden_size),
                            ("num_experts", num_experts)):
            check(name, value, isinstance(value, int) and value >= 1,
                  "must be an integer >= 1")
        check("top_k", top_k,
              isinstance(top_k, int) and 1 <= top_k <= num_experts,
              "must be an integer in [1, num_experts (%d)]" % num_experts)
        for name, value in (("capacity_factor", capacity_factor),
                            ("eval_capacity_factor", eval_capacity_factor),
                            ("aux_loss_coeff", aux_loss_coeff),
                            ("z_loss_coeff", z_loss_coeff)):
            check(name, value, math.isfinite(value) and value >= 0,
                  "must be finite and >= 0")
        check("jitter_eps", jitter_eps, 0 <= jitter_eps < 1,
              "must be in [0, 1)")
        check("layer", layer, layer is None or
              (isinstance(layer, int) and layer >= 0),
              "must be None or an integer >= 0")
        self.hidden_size, self.num_experts, self.top_k = \
            hidden_size, num_experts, top_k
        self.capacity_factor = float(capacity_factor)
        self.eval_capacity_factor = float(eval_capacity_factor)
        self.aux_loss_coeff = float(aux_loss_coeff)
        self.z_loss_coeff = float(z_loss_coeff)
        self.jitter_eps = float(jitter_eps)
        self.session, self.layer = session, layer
        self.router = nn.Parameter(torch.empty(hidden_size, num_experts))
        self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64)
        self.last_aux_loss = self.last_z_loss = torch.zeros(())
        self._count_step, self._forwards = None, 0
        self.reset_parameters()

    @classmethod
    def from_session(cls, session=None, **overrides):
        """An MoE with the cluster's model and router settings (model.d_model,
        num_experts, top_k, capacity_factor, aux_loss_alpha, router_z_loss,
        router_jitter; training.eval_capacity_factor), any of which
        `overrides` replaces by MoE's argument name."""
        s = resolve(session)
        args = dict(hidden_size=s.d_model, num_experts=s.num_experts,
                    top_k=s.top_k, capacity_factor=s.capacity_factor,
                    eval_capacity_factor=s.eval_capacity_factor,
                    aux_loss_coeff=s.aux_loss_alpha,
                    z_loss_coeff=s.router_z_loss, jitter_eps=s.router_jitter,
                    session=session)
        args.update(overrides)
        return cls(**args)

    @torch.no_grad()
    def reset_parameters(self):
        """router ~ N(0, 1 / hidden_size): the C++ trainer's initialisation
        of layers.<l>.router at model.init_scale 1 (common/model_shape.cc
        DenseLayout, std sqrt(init_scale / rows))."""
        self.router.normal_(0, 1 / math.sqrt(self.hidden_size))

    def extra_repr(self):
        return ("hidden_size=%d, num_experts=%d, top_k=%d, layer=%s, "
                "capacity_factor=%g, eval_capacity_factor=%g" %
                (self.hidden_size, self.num_experts, self.top_k, self.layer,
                 self.capacity_factor, self.eval_capacity_factor))

    def _next_micro_batch(self, session):
        step = session.step
        # Per session, epoch and step: after a reconnect the cluster may
        # continue at the same step number, whose forwards start again.
        key = (id(session), session.epoch, step)
        if self._count_step != key:
            self._count_step, self._forwards = key, 0
        if self._forwards >= session.micro_batches:
            raise RuntimeError(
                "MoE layer %d: training forward %d of step %d, but the "
                "cluster has training.micro_batches = %d; call "
                "switchyard.torch.step_done() after each step's backward "
                "passes, and run each MoE once per micro-batch" %
                (self.layer, self._forwards + 1, step, session.micro_batches))
        self._forwards += 1
        return self._forwards - 1

    def forward(self, x):
        if x.shape[-1] != self.hidden_size:
            raise ValueError("MoE: input of shape %s does not end in "
                             "hidden_size (%d)" %
                             (tuple(x.shape), self.hidden_size))
        session = resolve(self.session)
        if self.layer is None:
            raise RuntimeError("MoE has no layer: call switchyard.torch."
                               "attach(model, session) or pass layer=")
        train = self.training and torch.is_grad_enabled()
        x32 = x.reshape(-1, self.hidden_size).float()  # (T, d)
        router_in = x32
        if train and self.jitter_eps > 0:
            router_in = x32 * torch.empty_like(x32).uniform_(
                1 - self.jitter_eps, 1 + self.jitter_eps)
        r = route_logits(router_in @ self.router.float(), self.top_k,
                         self.capacity_factor if train
                         else self.eval_capacity_factor)
        aux, z = router_losses(r, self.aux_loss_coeff, self.z_loss_coeff)
        experts = r.expert.to("cpu", torch.int32).numpy()
        kept = r.kept.to("cpu", torch.uint8).numpy()
        if train:
            micro_batch = self._next_micro_batch(session)
            y = _RemoteExperts.apply(x32, r.gate, session, self.layer,
                                     micro_batch, experts, kept)
        else:
            y = _tensor(session.evaluate(self.layer, _numpy(x32), experts,
                                         _numpy(r.gate), kept),
                        x32.shape, x32.device, "y")
        self.tokens_per_expert = r.load
        self.last_aux_loss, self.last_z_loss = aux.detach(), z.detach()
        return y.to(x.dtype).reshape(x.shape), aux + z


def attach(model, session=None):
    """Numbers the MoE modules of `model` in model.modules() order as the
    cluster's MoE layers 0, 1, ... and gives them `session` (default: the
    current one). Returns them in layer order.

    Raises ValueError, changing nothing, when their count is not
    session.num_moe_layers (model.num_layers / model.moe_every) or one's
    hidden_size, num_experts or top_k is not the cluster's.
    """
    session = resolve(session)
    named = [(name or "<model>", m) for name, m in model.named_modules()
             if isinstance(m, MoE)]
    if len(named) != session.num_moe_layers:
        raise ValueError(
            "the model has %d MoE modules but the cluster's model has %d MoE "
            "layers (model.num_layers / model.moe_every)" %
            (len(named), session.num_moe_layers))
    for layer, (name, m) in enumerate(named):
        for field, cluster_field, theirs in (
                ("hidden_size", "model.d_model", session.d_model),
                ("num_experts", "model.num_experts", session.num_experts),
                ("top_k", "model.top_k", session.top_k)):
            if getattr(m, field) != theirs:
                raise ValueError(
                    "MoE %s (layer %d): %s %d does not match the cluster's "
                    "%s (%d)" % (name, layer, field, getattr(m, field),
                                 cluster_field, theirs))
    for layer, (_, m) in enumerate(named):
        m.layer, m.session = layer, session
        m._count_step, m._forwards = None, 0  # A new session counts anew.
    return [m for _, m in named]
