"""Switchyard's model in plain PyTorch (see model.py), safetensors I/O with
the standard library and torch only (see safetensors.py), and MoE, a
PyTorch layer whose experts live on a running Switchyard cluster (see
moe.py and session.py; they need the switchyard._core extension, imported
only when a session is made).

NOTE: this subpackage is named `torch`; inside it `import torch` is the
top-level PyTorch (absolute imports). Do not put python/switchyard itself
on sys.path, or `import torch` would find this package instead.
"""

from .config import SwitchyardConfig, tensor_shapes
from .model import SwitchyardModel, load_export
from .moe import MoE, attach
from .router import Route, route, route_logits, router_losses
from .safetensors import read_header, read_safetensors, save_file
from .session import Session, connect, current_session, step_done

__all__ = ["SwitchyardConfig", "SwitchyardModel", "load_export", "Route",
           "route", "route_logits", "router_losses", "tensor_shapes",
           "read_header", "read_safetensors", "save_file", "MoE", "attach",
           "Session", "connect", "current_session", "step_done",
           "SwitchyardError"]


def __getattr__(name):  # PEP 562: keeps `import switchyard.torch` from
    if name == "SwitchyardError":  # importing switchyard._core.
        from .session import error_class
        return error_class()
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
