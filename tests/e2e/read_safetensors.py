#!/usr/bin/env python3
"""An independent safetensors reader (Python's standard library only).

usage: read_safetensors.py EXPORT_DIR

Reads model.safetensors.index.json and every file it names, checks the
format (header size, JSON header, contiguous data_offsets covering the
data, sizes matching dtype x shape), and prints one JSON object:
{tensor name: {"shape": [...], "sum": float, "first": float}} for F32
tensors. Exits 1 with a message on any format error.
"""
import json
import math
import os
import struct
import sys


def fail(msg):
    print("read_safetensors: " + msg, file=sys.stderr)
    sys.exit(1)


def read_file(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        fail(path + ": shorter than the header size")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        fail(path + ": header size past the end")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    body = data[8 + n:]
    tensors = {}
    end = 0
    for name, info in sorted(header.items(),
                             key=lambda kv: kv[1]["data_offsets"][0]
                             if kv[0] != "__metadata__" else -1):
        if name == "__metadata__":
            continue
        begin, stop = info["data_offsets"]
        if begin != end:
            fail(path + ": " + name + " does not start where the last ended")
        if info["dtype"] != "F32":
            fail(path + ": " + name + " is " + info["dtype"])
        count = math.prod(info["shape"])
        if stop - begin != 4 * count:
            fail(path + ": " + name + " has " + str(stop - begin) +
                 " bytes for shape " + str(info["shape"]))
        values = struct.unpack("<%df" % count, body[begin:stop])
        tensors[name] = {"shape": info["shape"], "sum": math.fsum(values),
                         "first": values[0] if values else 0.0}
        end = stop
    if end != len(body):
        fail(path + ": data does not end where the last tensor ends")
    return tensors


def main():
    if len(sys.argv) != 2:
        fail("usage: read_safetensors.py EXPORT_DIR")
    root = sys.argv[1]
    with open(os.path.join(root, "model.safetensors.index.json")) as f:
        index = json.load(f)
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        for name, t in read_file(os.path.join(root, file)).items():
            if index["weight_map"].get(name) != file:
                fail(name + " is in " + file + " but the index says otherwise")
            out[name] = t
    if set(out) != set(index["weight_map"]):
        fail("the index and the files name different tensors")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
