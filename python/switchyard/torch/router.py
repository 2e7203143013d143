"""The MoE router of one layer (trainer/router.h, router.cc RouteForward
without jitter): the routing decisions and gates, and the router's
load-balancing and z losses."""

import dataclasses
import math

import torch
from torch.nn import functional as F


@dataclasses.dataclass
class Route:
    """Where the tokens of one MoE layer go (trainer/router.h RouterState).
    T tokens, k choices, E experts."""
    probs: torch.Tensor  # (T, E) softmax of the router logits
    expert: torch.Tensor  # (T, k) int64 choices, best first
    gate: torch.Tensor  # (T, k) combine weights, 0 where dropped
    kept: torch.Tensor  # (T, k) bool, within capacity
    capacity: int  # 0: dropless
    load: torch.Tensor  # (E) int64 kept assignments per expert
    dropped: int  # assignments beyond capacity
    logits: torch.Tensor = None  # (T, E) x W, before the softmax


def route(x, w, top_k, capacity_factor):
    """Routes x (T, d) with W (d, E) as trainer/router.cc RouteForward
    without jitter.

    probs = softmax(x W); each token's top_k experts, best first, ties to
    the lower index; gate = prob for k = 1, prob renormalised over the k
    choices for k > 1. With capacity_factor > 0 every expert keeps at most
    C = min(ceil(capacity_factor * T * k / E), T * k) assignments, choice
    rank j of all tokens before rank j + 1, tokens in order; later ones are
    dropped (gate 0).
    """
    return route_logits(x @ w, top_k, capacity_factor)


def route_logits(logits, top_k, capacity_factor):
    """route() from the router logits (T, E) = x W, differentiable in them
    through probs and gate."""
    T, E = logits.shape
    probs = torch.softmax(logits, dim=-1)
    # A stable descending sort keeps equal probabilities in index order.
    expert = torch.sort(probs, dim=-1, descending=True,
                        stable=True).indices[:, :top_k]
    chosen = probs.gather(1, expert)
    if top_k == 1:
        gate = chosen
    else:
        total = chosen[:, 0]
        for j in range(1, top_k):  # The C++ order of the sum.
            total = total + chosen[:, j]
        gate = chosen / total[:, None]
    capacity = 0
    if capacity_factor > 0 and T > 0:
        share = capacity_factor * T * top_k / float(E)  # The C++ order.
        capacity = T * top_k if share >= T * top_k else math.ceil(share)
    kept = torch.ones(T, top_k, dtype=torch.bool, device=logits.device)
    load = torch.zeros(E, dtype=torch.int64, device=logits.device)
    for j in range(top_k):
        onehot = F.one_hot(expert[:, j], E)  # (T, E)
        if capacity > 0:
            # 1-based place of token t in its expert's queue for rank j.
            place = load[expert[:, j]] + \
                onehot.cumsum(0).gather(1, expert[:, j:j + 1])[:, 0]
            kept[:, j] = place <= capacity
        load += onehot[kept[:, j]].sum(0)
    gate = torch.where(kept, gate, torch.zeros_like(gate))
    dropped = int((~kept).sum())
    return Route(probs, expert, gate, kept, capacity, load, dropped, logits)


def router_losses(r, aux_loss_coeff, z_loss_coeff):
    """(aux, z) of a Route, as trainer/router.cc RouteForward computes them:

        aux = aux_loss_coeff * E * sum_i f_i * P_i
        z   = z_loss_coeff * mean_t logsumexp(logits_t)^2

    f_i: the fraction of tokens whose first choice is expert i (a constant);
    P_i: the mean probability of i. 0-dim tensors of the logits' dtype,
    differentiable in r.probs and r.logits; both 0 for T = 0 tokens.
    """
    T, E = r.probs.shape
    zero = r.probs.new_zeros(())
    if T == 0:
        return zero, zero
    f = torch.bincount(r.expert[:, 0], minlength=E).to(r.probs.dtype) / T
    aux = aux_loss_coeff * E * (f * r.probs.mean(0)).sum() \
        if aux_loss_coeff > 0 else zero
    z = z_loss_coeff * torch.logsumexp(r.logits, -1).square().mean() \
        if z_loss_coeff > 0 else zero
    return aux, z
