#!/usr/bin/python3
"""Mean cross-entropy of an exported model over a text file's byte windows.

usage: export_loss.py EXPORT_DIR TEXT_FILE --batch B [--max-windows N]
                      [--dtype float64|float32]

Prints one JSON line {"loss": <17 significant digits>, "windows": n,
"tokens": t}, computed with switchyard.torch (python/) from the export
that `switchyard ckpt export` wrote. The C++ side computes the same with the
same windows, so the two can be compared.

Windows, with L = config.json's seq_len and the file's bytes b: window i
has inputs b[i*L : i*L + L] and targets b[i*L + 1 : i*L + L + 1], each
byte % vocab_size; n = min(N, (len(b) - 1) // L). Batches of B consecutive
windows (the last may be smaller), one forward call each: expert capacity
counts the B*L tokens of a call. loss = sum over batches of batch mean
loss * batch tokens / all tokens.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "python"))

import torch  # noqa: E402

from switchyard.torch import load_export  # noqa: E402


def windows(data, seq_len, vocab_size, count):
    """(inputs, targets), each (count, seq_len) int64, of the first `count`
    windows of `data` (bytes)."""
    span = count * seq_len + 1
    raw = torch.frombuffer(bytearray(data[:span]), dtype=torch.uint8)
    tokens = raw.to(torch.int64) % vocab_size
    inputs = tokens[:count * seq_len].view(count, seq_len)
    targets = tokens[1:count * seq_len + 1].view(count, seq_len)
    return inputs, targets


def export_loss(model, data, batch, max_windows=None):
    """(loss, windows, tokens) of `model` over `data` (bytes)."""
    c = model.config
    count = (len(data) - 1) // c.seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError("the text has %d bytes: no window of seq_len %d + 1" %
                         (len(data), c.seq_len))
    inputs, targets = windows(data, c.seq_len, c.vocab_size, count)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, count, batch):
            x, y = inputs[start:start + batch], targets[start:start + batch]
            total += float(model.loss(x, y)) * y.numel()
            tokens += y.numel()
    return total / tokens, count, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("text_file")
    parser.add_argument("--batch", type=int, required=True,
                        help="windows per forward call (>= 1)")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="at most this many windows (>= 1; default all)")
    parser.add_argument("--dtype", choices=("float64", "float32"),
                        default="float64", help="compute dtype")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error("--batch (%d) must be >= 1" % args.batch)
    if args.max_windows is not None and args.max_windows < 1:
        parser.error("--max-windows (%d) must be >= 1" % args.max_windows)
    model = load_export(args.export_dir, dtype=getattr(torch, args.dtype))
    with open(args.text_file, "rb") as f:
        data = f.read()
    try:
        loss, count, tokens = export_loss(model, data, args.batch,
                                          args.max_windows)
    except ValueError as e:
        print("export_loss: %s" % e, file=sys.stderr)
        return 1
    print('{"loss": %.17g, "windows": %d, "tokens": %d}' %
          (loss, count, tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
