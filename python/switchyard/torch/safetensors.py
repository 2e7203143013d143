"""safetensors files with the standard library and torch only.

The format (https://github.com/huggingface/safetensors): an 8-byte
little-endian header size n, n bytes of JSON header, then the tensors' bytes
(row-major, little-endian). The header maps each tensor name to {"dtype",
"shape", "data_offsets": [begin, end)} (offsets relative to the end of the
header) and may hold "__metadata__": {str: str}.

`save_file` writes as the reference implementation does: compact JSON,
padded with spaces to a multiple of 8 bytes, no "__metadata__" when there
is none; tensors laid out contiguously in name order. `read_safetensors`
checks a file as storage/safetensors.cc's SafetensorsReader does (known
dtypes, sizes that match dtype x shape, byte ranges that tile the data
section, no repeated names) and raises ValueError naming the file and the
tensor.

`switchyard ckpt import` (checkpoint.init_from) reads F32 and BF16 only;
the other dtypes here are for round trips in Python.
"""

import json
import math
import struct
import sys

import torch

# safetensors dtype names <-> torch dtypes.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# A header larger than this is refused before it is read (as in C++).
MAX_HEADER_BYTES = 100 << 20


def _check_little_endian():
    # NOTE: tensors are written and read with the machine's byte order.
    if sys.byteorder != "little":
        raise NotImplementedError("safetensors I/O needs a little-endian host")


def _unique_keys(pairs):
    """object_pairs_hook for json: a dict, refusing repeated keys."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("key %r appears twice" % key)
        out[key] = value
    return out


def read_header(path):
    """Reads and checks the header of the safetensors file at `path`.

    Returns (header, data_start): header is the JSON object (tensor name ->
    {"dtype", "shape", "data_offsets"}, and "__metadata__" when present);
    data_start is the file offset of the data section (8 + header size).
    """
    with open(path, "rb") as f:
        f.seek(0, 2)
        file_bytes = f.tell()
        f.seek(0)
        if file_bytes < 8:
            raise ValueError("%s is too short for a safetensors header" % path)
        (n,) = struct.unpack("<Q", f.read(8))
        if n > file_bytes - 8 or n > MAX_HEADER_BYTES:
            raise ValueError("%s: header size %d does not fit the file (%d "
                             "bytes; at most %d are read)" %
                             (path, n, file_bytes, MAX_HEADER_BYTES))
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"),
                            object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError("%s: the header is not valid JSON (%s)" %
                         (path, e)) from None
    if not isinstance(header, dict):
        raise ValueError("%s: the header is not a JSON object" % path)
    data_bytes = file_bytes - 8 - n
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = "%s: tensor %s" % (path, name)
        if not isinstance(info, dict):
            raise ValueError(where + " is not described by an object")
        dtype = info.get("dtype")
        if dtype not in DTYPES:
            raise ValueError("%s has dtype %r; known: %s" %
                             (where, dtype, ", ".join(DTYPES)))
        shape = info.get("shape")
        if (not isinstance(shape, list) or
                not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError("%s has shape %r, not a list of non-negative "
                             "integers" % (where, shape))
        offsets = info.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2 or
                not all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise ValueError(where + " has no data_offsets [begin, end]")
        begin, end = offsets
        if begin > end or end > data_bytes:
            raise ValueError("%s has data_offsets [%d, %d] outside the %d "
                             "data bytes" % (where, begin, end, data_bytes))
        needed = math.prod(shape) * _itemsize(DTYPES[dtype])
        if end - begin != needed:
            raise ValueError("%s has %d bytes; shape %s of %s needs %d" %
                             (where, end - begin, shape, dtype, needed))
        ranges.append((begin, end, name))
    # The tensors' bytes tile the data section: no gap, no overlap.
    at, previous = 0, "the start of the data"
    for begin, end, name in sorted(ranges):
        if begin != at:
            raise ValueError("%s: tensor %s begins at %d; %s ends at %d" %
                             (path, name, begin, previous, at))
        at, previous = end, name
    if at != data_bytes:
        raise ValueError("%s: the tensors' data ends at byte %d of %d" %
                         (path, at, data_bytes))
    return header, 8 + n


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def read_safetensors(path):
    """Every tensor of the file at `path`: {name: Tensor} in name order.

    Tensors keep the file's dtype and shape, on the CPU, each in memory of
    its own.
    """
    _check_little_endian()
    header, data_start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name in sorted(header):
            if name == "__metadata__":
                continue
            info = header[name]
            dtype = DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            if begin == end:
                tensors[name] = torch.empty(info["shape"], dtype=dtype)
                continue
            buffer = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ValueError("%s: cannot read tensor %s" % (path, name))
            tensors[name] = torch.frombuffer(buffer, dtype=dtype).reshape(
                info["shape"])
    return tensors


def _tensor_bytes(tensor):
    """The row-major bytes of `tensor` (any device, any strides)."""
    t = tensor.detach().to("cpu").contiguous()
    out = bytearray(t.numel() * t.element_size())
    if out:
        torch.frombuffer(out, dtype=t.dtype).copy_(t.reshape(-1))
    return out


def save_file(tensors, path, metadata=None):
    """Writes `tensors` ({name: Tensor}) to a safetensors file at `path`.

    metadata: {str: str} stored as "__metadata__", or None for none.
    Tensors are laid out in name order; dtypes must be among DTYPES (F32
    and BF16 for `switchyard ckpt import`).
    """
    _check_little_endian()
    header = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str)
                   for k, v in metadata.items()):
            raise ValueError("metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    names = sorted(tensors)
    offset = 0
    for name in names:
        if name == "__metadata__":
            raise ValueError("'__metadata__' cannot name a tensor")
        t = tensors[name]
        if t.dtype not in _NAMES:
            raise ValueError("tensor %s has dtype %s; safetensors dtypes "
                             "here: %s" % (name, t.dtype, ", ".join(DTYPES)))
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            f.write(_tensor_bytes(tensors[name]))
