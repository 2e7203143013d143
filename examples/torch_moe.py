#!/usr/bin/python3
"""A small PyTorch transformer whose MoE layers are switchyard.torch.MoE,
trained on text files against a local Switchyard cluster.

The experts live on the cluster's workers and are trained there (their
AdamW runs on the workers at each step's end); the embeddings, attention,
dense FFNs, routers and the head are PyTorch's, trained by torch.optim.AdamW
here. The cluster's configuration gives the MoE layers' shape (d_model,
num_experts, top_k, how many MoE layers); this model puts one after every
dense block.

    build/bin/switchyard up --workers 2 --trainers 0 --run-dir run \\
        --config examples/demo.yaml --set cluster.trainers=1 &
    PYTHONPATH=build/python /usr/bin/python3 examples/torch_moe.py \\
        --run-dir run --config examples/demo.yaml \\
        --set cluster.trainers=1 --data build/demo-corpus --steps 200

Several data-parallel processes: start `up` with cluster.trainers=N and
run N copies with --rank R --world N (torch.distributed over gloo, which
meets in RUN_DIR/torch-rendezvous: remove it before a new run). Each
rank's loss is scaled by 1/N: the workers sum the ranks' expert gradients,
and the dense gradients are summed with all_reduce, so both are the mean
over the ranks (as trainer/training.cc does).
"""

import argparse
import math
import os
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import switchyard.torch as sy


class Block(nn.Module):
    """Pre-norm block: x + Attention(LN(x)), then x + FFN(LN(x)); the FFN is
    a dense MLP or a switchyard.torch.MoE (which returns (y, aux_loss))."""

    def __init__(self, d, heads, ffn):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = ffn

    def forward(self, x, mask):
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + a
        out = self.ffn(self.norm2(x))
        aux = x.new_zeros(())
        if isinstance(out, tuple):
            out, aux = out
        return x + out, aux


class MoETransformer(nn.Module):
    """Byte-level decoder: dense and MoE blocks alternating, as many MoE
    blocks as the cluster's model has MoE layers."""

    def __init__(self, session, seq_len, heads):
        super().__init__()
        d = session.d_model
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        blocks = []
        for _ in range(session.num_moe_layers):
            blocks.append(Block(d, heads, nn.Sequential(
                nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))))
            blocks.append(Block(d, heads, sy.MoE(
                d, session.num_experts, top_k=session.top_k,
                capacity_factor=session.capacity_factor,
                eval_capacity_factor=session.eval_capacity_factor,
                aux_loss_coeff=session.aux_loss_alpha,
                z_loss_coeff=session.router_z_loss)))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, tokens):
        L = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:L]
        mask = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
        aux = x.new_zeros(())
        for block in self.blocks:
            x, a = block(x, mask)
            aux = aux + a
        return self.head(self.norm(x)), aux


def read_corpus(path):
    """Every file under `path` (or the file), as one byte string."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path)
        for f in names)
    data = b"\n".join(open(f, "rb").read() for f in files)
    if len(data) < 1024:
        sys.exit(f"torch_moe: {path} holds {len(data)} bytes: too little text")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batch(text, step, rank, batch_size, seq_len, seed):
    """Random windows, a pure function of (seed, step, rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    starts = torch.randint(0, len(text) - seq_len - 1, (batch_size,),
                           generator=g)
    windows = torch.stack([text[s:s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the cluster's YAML")
    p.add_argument("--run-dir", required=True,
                   help="the `switchyard up --run-dir` directory")
    p.add_argument("--set", action="append", default=[],
                   help="section.field=value, as given to `up`")
    p.add_argument("--data", required=True, help="a text file or directory")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=20)
    args = p.parse_args()

    torch.manual_seed(args.seed)  # The same dense init on every rank.
    torch.set_num_threads(1)
    if args.world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method="file://" + os.path.abspath(
                os.path.join(args.run_dir, "torch-rendezvous")),
            rank=args.rank, world_size=args.world)
    session = sy.connect(args.config, rank=args.rank, run_dir=args.run_dir,
                         overrides=args.set)
    model = MoETransformer(session, args.seq_len, args.heads)
    sy.attach(model, session)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr,
                                  weight_decay=0.0)
    text = read_corpus(args.data)
    start, tokens, loss = time.time(), 0, None
    if session.step >= args.steps:
        sys.exit(f"torch_moe: the cluster is at step {session.step}, "
                 f"at or past --steps {args.steps}")
    for step in range(session.step, args.steps):
        inputs, targets = batch(text, step, args.rank, args.batch_size,
                                args.seq_len, args.seed)
        logits, aux = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
        optimizer.zero_grad()
        ((loss + aux) / args.world).backward()
        if args.world > 1:
            for q in model.parameters():
                if q.grad is not None:
                    torch.distributed.all_reduce(q.grad)
        optimizer.step()
        sy.step_done(session)
        tokens += inputs.numel() * args.world
        if args.rank == 0 and ((step + 1) % args.log_every == 0 or
                               step + 1 == args.steps):
            rate = tokens / max(time.time() - start, 1e-9)
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} "
                  f"aux {float(aux):.4f} {rate:.0f} tok/s", flush=True)
    session.close()
    if args.rank == 0:
        print(f"done: loss {loss.item():.3f} (ln 256 = {math.log(256):.3f} "
              f"at the start)", flush=True)


if __name__ == "__main__":
    main()
