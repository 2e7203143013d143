"""Python tools for Switchyard, the distributed MoE expert server.

`switchyard.torch` is a pure-PyTorch re-implementation of the model that
loads a `switchyard ckpt export` directory and computes the same forward
pass as the C++ trainer in evaluation mode. Importing this package alone
does not import torch.
"""

__version__ = "0.1.0"
