"""Switchyard's model in plain PyTorch (see model.py), and safetensors I/O
with the standard library and torch only (see safetensors.py).

NOTE: this subpackage is named `torch`; inside it `import torch` is the
top-level PyTorch (absolute imports). Do not put python/switchyard itself
on sys.path, or `import torch` would find this package instead.
"""

from .config import SwitchyardConfig, tensor_shapes
from .model import SwitchyardModel, load_export
from .router import Route, route
from .safetensors import read_header, read_safetensors, save_file

__all__ = ["SwitchyardConfig", "SwitchyardModel", "load_export", "Route",
           "route", "tensor_shapes", "read_header", "read_safetensors",
           "save_file"]
