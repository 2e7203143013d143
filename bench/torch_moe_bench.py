#!/usr/bin/python3
"""One rank of bench/torch_moe_bench.sh: switchyard.torch.MoE forward,
backward and step_done on moe_layer_bench's shape (1024 tokens of d_model
1024 per step, experts on the cluster), timed after 2 warm-up steps.

usage: torch_moe_bench.py RUN_DIR CONFIG RANK STEPS RESULT_FILE
Writes the seconds of the timed steps to RESULT_FILE.
"""

import sys
import time

import torch

import switchyard.torch as sy

WARMUP = 2
TOKENS = 1024


def x_grad(moe, x, dy):
    """dLoss/dx of one more pass (evaluation mode keeps nothing on the
    workers, so this one runs in training mode and ends with step_done)."""
    x = x.clone().requires_grad_(True)
    y, _ = moe(x)
    y.backward(dy)
    sy.step_done()
    return x.grad


def main():
    run_dir, config, rank, steps, result = sys.argv[1:6]
    rank, steps = int(rank), int(steps)
    torch.manual_seed(1 + rank)
    torch.set_num_threads(1)
    session = sy.connect(config, rank=rank, run_dir=run_dir)
    moe = sy.MoE.from_session(session)
    sy.attach(moe, session)
    with torch.no_grad():
        # moe_layer_bench's router scale: tokens spread over the experts.
        moe.router.normal_(0, 0.001)
    x = torch.randn(TOKENS, session.d_model)
    dy = torch.randn(TOKENS, session.d_model)
    start = None
    for step in range(WARMUP + steps):
        if step == WARMUP:
            start = time.perf_counter()
        y, _ = moe(x)
        y.backward(dy)
        sy.step_done(session)
    seconds = time.perf_counter() - start
    # What was timed produced numbers: the last step's output and input
    # gradient are finite and not all zero.
    for name, t in (("y", y), ("dx", x_grad(moe, x, dy))):
        if not torch.isfinite(t).all() or not t.abs().sum() > 0:
            sys.exit("torch_moe_bench: %s is not finite and non-zero" % name)
    session.close()
    with open(result, "w") as f:
        f.write("%.6f\n" % seconds)


if __name__ == "__main__":
    main()
