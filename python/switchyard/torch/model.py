"""Switchyard's model in plain PyTorch, for exported checkpoints.

The same function as the C++ trainer's evaluation pass
(trainer/model.cc Transformer::Evaluate): no router jitter, no expert
dropout; the module computes that whether in train() or eval() mode.
Per layer l (pre-norm, N = B * L tokens):

    h  = x + Attention(Norm1(x))                      per sequence, causal
    x' = h + Ffn(Norm2(h))                            dense layer, or
    x' = h + sum_j gate_j * Expert_{e_j}(Norm2(h))    MoE layer

then logits = FinalNorm(x) @ lm_head, with x_0 = tok_embed[tokens]
(+ pos_embed[:L] for learned positions; rotary positions turn q and k).
Matrices are stored as Switchyard computes with them, y = x @ W with W
(in_features, out_features).

Parameter names and shapes are exactly those of `switchyard ckpt export`
(cli/checkpoint_tools.cc; dense tensors from common/model_shape.cc
DenseLayout), so that `model.state_dict()` written with `save_file` is a
file `switchyard ckpt import` takes. `tensor_shapes(config)` lists them.

Results match the C++ within floating-point rounding, not bit for bit: the
C++ computes in fp32 with BLAS, and experts use Switchyard's own tanh and
exp (expert_worker/cpu/activation_kernels.cc, within 3.6e-7).
"""

import json
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from .config import (SwitchyardConfig, evaluation_capacity_factor,
                     stored_shape, tensor_shapes)
from .router import route
from .safetensors import read_safetensors

# GELU (tanh form) constants, trainer/layers.cc.
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715


def _parameter(shape, dtype):
    return nn.Parameter(torch.empty(shape, dtype=dtype))


class Norm(nn.Module):
    """RMSNorm, y = x / sqrt(mean(x^2) + eps) * scale, or LayerNorm,
    y = (x - mean) / sqrt(var + eps) * scale + bias (biased variance).
    trainer/layers.cc RmsNormForward, LayerNormForward. x, y: (..., d)."""

    def __init__(self, config, dtype):
        super().__init__()
        self.eps = config.norm_eps
        self.scale = _parameter((config.d_model,), dtype)
        if config.norm == "layernorm":
            self.bias = _parameter((config.d_model,), dtype)
        else:
            self.bias = None

    def forward(self, x):
        if self.bias is None:
            inv = 1 / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)
            return x * inv * self.scale
        centred = x - x.mean(-1, keepdim=True)
        var = (centred * centred).mean(-1, keepdim=True)
        return centred * (1 / torch.sqrt(var + self.eps)) * self.scale + \
            self.bias


def rotary_tables(length, head_dim, theta, dtype):
    """cos and sin (length, head_dim // 2) of the rotary turns: pair
    (2i, 2i+1) of position p turns by p / theta^(2i / head_dim), angles in
    float64 (trainer/layers.cc ApplyRotary; the C++ has theta = 10000)."""
    even = torch.arange(0, head_dim - 1, 2, dtype=torch.float64)  # 2i
    positions = torch.arange(length, dtype=torch.float64)
    angles = positions[:, None] / torch.pow(theta, even / head_dim)[None, :]
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rotary(x, cos, sin):
    """Turns x (B, L, H, hd) by pairs of adjacent dimensions within each
    head, (x[2i], x[2i+1]) -> (a cos - b sin, a sin + b cos); an odd last
    dimension stays. cos, sin: (L, hd // 2)."""
    pairs = cos.shape[1]
    a, b = x[..., 0:2 * pairs:2], x[..., 1:2 * pairs:2]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = x.clone()
    out[..., 0:2 * pairs:2] = a * cos - b * sin
    out[..., 1:2 * pairs:2] = a * sin + b * cos
    return out


class Attention(nn.Module):
    """Causal multi-head self-attention without biases, one sequence per
    row of the batch: q, k, v = x Wq, x Wk, x Wv (q and k rotated for
    rotary positions); per head h (columns h*hd .. (h+1)*hd)
    P = softmax(q_h k_h^T / sqrt(hd)), position i seeing j <= i;
    y = concat_h(P v_h) Wo. trainer/layers.cc AttentionForward.
    x, y: (B, L, d); W*: (d, d)."""

    def __init__(self, config, dtype):
        super().__init__()
        self.heads = config.num_heads
        self.rotary = config.positions == "rotary"
        self.rope_theta = config.rope_theta
        shape = stored_shape(config.d_model, config.d_model)
        self.wq = _parameter(shape, dtype)
        self.wk = _parameter(shape, dtype)
        self.wv = _parameter(shape, dtype)
        self.wo = _parameter(shape, dtype)

    def forward(self, x):
        B, L, d = x.shape
        H, hd = self.heads, d // self.heads
        q = (x @ self.wq.view(d, d)).view(B, L, H, hd)
        k = (x @ self.wk.view(d, d)).view(B, L, H, hd)
        v = (x @ self.wv.view(d, d)).view(B, L, H, hd)
        if self.rotary:
            cos, sin = rotary_tables(L, hd, self.rope_theta, x.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
        scale = 1 / torch.sqrt(torch.tensor(float(hd), dtype=x.dtype))
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, L, L)
        future = torch.ones(L, L, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), -1)
        context = (probs @ v).transpose(1, 2).reshape(B, L, d)
        return context @ self.wo.view(d, d)


class Ffn(nn.Module):
    """y = act(x W1 + b1) W2 + b2 (no biases without expert_bias): a dense
    layer's FFN (trainer/layers.cc FfnForward) and an expert
    (expert_worker/expert_ffn.cc). act: GELU tanh form
    0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))), ReLU, or SwiGLU
    silu(gate) * up with W1's columns [gate | up].
    x, y: (N, d); W1: (d, g*f); W2: (f, d)."""

    def __init__(self, config, dtype, dense):
        super().__init__()
        d, f, g = config.d_model, config.d_ff, config.gates
        shape = stored_shape if dense else (lambda r, c: (r, c))
        self.d_model, self.d_ff = d, f
        self.activation = config.activation
        self.w1 = _parameter(shape(d, g * f), dtype)
        self.b1 = _parameter((g * f,), dtype) if config.expert_bias else None
        self.w2 = _parameter(shape(f, d), dtype)
        self.b2 = _parameter((d,), dtype) if config.expert_bias else None

    def forward(self, x):
        d, f = self.d_model, self.d_ff
        h = x @ self.w1.view(d, -1)
        if self.b1 is not None:
            h = h + self.b1
        if self.activation == "gelu_tanh":
            a = 0.5 * h * (1 + torch.tanh(_GELU_C * (h + _GELU_A * h * h * h)))
        elif self.activation == "relu":
            a = torch.relu(h)
        else:
            gate, up = h[:, :f], h[:, f:]
            a = gate * torch.sigmoid(gate) * up
        y = a @ self.w2.view(f, d)
        return y if self.b2 is None else y + self.b2


class Block(nn.Module):
    """One pre-norm transformer layer (trainer/model.cc Transformer::Forward):
    h = x + Attention(Norm1(x)); x' = h + Ffn(Norm2(h)), the FFN dense or a
    mixture of experts. x, x': (B, L, d)."""

    def __init__(self, config, dtype, moe):
        super().__init__()
        self.norm1 = Norm(config, dtype)
        self.attn = Attention(config, dtype)
        self.norm2 = Norm(config, dtype)
        self.top_k = config.top_k
        self.moe = moe
        if moe:
            self.router = _parameter(
                stored_shape(config.d_model, config.num_experts), dtype)
            self.experts = nn.ModuleList(
                Ffn(config, dtype, dense=False)
                for _ in range(config.num_experts))
        else:
            self.ffn = Ffn(config, dtype, dense=True)

    def forward(self, x, capacity_factor):
        h = x + self.attn(self.norm1(x))
        n2 = self.norm2(h)
        B, L, d = n2.shape
        n2 = n2.reshape(B * L, d)
        y = self.mixture(n2, capacity_factor) if self.moe else self.ffn(n2)
        return h + y.view(B, L, d)

    def mixture(self, x, capacity_factor):
        """y (T, d) = sum_j gate_tj * expert_{e_tj}(x_t) over the kept
        choices, added in choice order (trainer/moe_client.cc Dispatch);
        the capacity counts all T tokens of the call. x: (T, d)."""
        T, d = x.shape
        r = route(x, self.router.view(d, -1), self.top_k, capacity_factor)
        out = torch.zeros(T, self.top_k, d, dtype=x.dtype)
        for e, expert in enumerate(self.experts):
            token, choice = (r.kept & (r.expert == e)).nonzero(as_tuple=True)
            if token.numel() > 0:  # Tokens in order, as the C++ batches them.
                out[token, choice] = expert(x[token])
        y = torch.zeros(T, d, dtype=x.dtype)
        for j in range(self.top_k):
            y = y + r.gate[:, j:j + 1] * out[:, j]
        return y


class SwitchyardModel(nn.Module):
    """The decoder-only MoE transformer (trainer/model.h), evaluation pass.

    config: a SwitchyardConfig or config.json's dict. Parameters are
    initialised at random with DenseLayout's rules (normal std
    sqrt(init_scale / rows), norm scales 1, biases 0) unless `initialize`
    is False (then they are uninitialised memory, for loading).
    `capacity_factor` (an attribute) is the routers' capacity factor,
    evaluation_capacity_factor(config) unless set.
    """

    def __init__(self, config, dtype=torch.float32, initialize=True):
        super().__init__()
        if not isinstance(config, SwitchyardConfig):
            config = SwitchyardConfig.from_dict(config)
        self.config = config
        self.capacity_factor = evaluation_capacity_factor(config)
        d, V = config.d_model, config.vocab_size
        self.tok_embed = _parameter(stored_shape(V, d), dtype)
        if config.positions == "learned":
            self.pos_embed = _parameter(stored_shape(config.seq_len, d), dtype)
        else:
            self.pos_embed = None
        self.layers = nn.ModuleList(
            Block(config, dtype, moe=layer in config.moe_layers)
            for layer in range(config.num_layers))
        self.final_norm = Norm(config, dtype)
        self.lm_head = _parameter(stored_shape(d, V), dtype)
        if initialize:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Random values by common/model_shape.cc DenseLayout's rules (the
        experts: expert_worker/expert_init.h's distributions)."""
        scale = self.config.init_scale
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "scale":
                p.fill_(1)
            elif leaf in ("bias", "b1", "b2"):
                p.zero_()
            elif name in ("tok_embed", "pos_embed"):
                p.normal_(0, 0.02)
            else:  # (rows, cols) matrices: std sqrt(init_scale / rows).
                p.normal_(0, math.sqrt(scale / p.shape[0]))

    def forward(self, tokens):
        """tokens: (B, L) int64 in [0, vocab_size), L <= seq_len.
        Returns logits (B, L, vocab_size)."""
        c = self.config
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= c.seq_len or \
                tokens.shape[0] < 1:
            raise ValueError("tokens of shape %s do not fit the model "
                             "(B, L) with 1 <= L <= seq_len (%d)" %
                             (tuple(tokens.shape), c.seq_len))
        if not (0 <= int(tokens.min()) and int(tokens.max()) < c.vocab_size):
            raise ValueError("a token is outside the vocabulary of %d" %
                             c.vocab_size)
        B, L = tokens.shape
        d, V = c.d_model, c.vocab_size
        x = self.tok_embed.view(V, d)[tokens]
        if self.pos_embed is not None:
            x = x + self.pos_embed.view(c.seq_len, d)[:L]
        for block in self.layers:
            x = block(x, self.capacity_factor)
        return self.final_norm(x) @ self.lm_head.view(d, V)

    def loss(self, inputs, targets):
        """Mean cross-entropy (nats per token) of the next tokens `targets`
        (B, L) after `inputs` (B, L): trainer/layers.cc CrossEntropy, no aux
        or z losses (the C++ validation loss). A 0-dim tensor."""
        if targets.shape != inputs.shape:
            raise ValueError("targets %s and inputs %s differ in shape" %
                             (tuple(targets.shape), tuple(inputs.shape)))
        logits = self.forward(inputs)
        return F.cross_entropy(logits.reshape(-1, self.config.vocab_size),
                               targets.reshape(-1))


def load_export(path, dtype=torch.float32):
    """The model of a `switchyard ckpt export` directory: config.json and
    model.safetensors.index.json with the files it names. Every tensor the
    model has must be there with its shape, and no other; F32 or BF16
    values are converted to `dtype`. Raises ValueError naming the file and
    the tensor."""
    with open(os.path.join(path, "config.json")) as f:
        config = SwitchyardConfig.from_dict(json.load(f))
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(index_path + " has no weight_map object")
    tensors = {}
    for file in sorted(set(weight_map.values())):
        if not isinstance(file, str) or not file or file.startswith("/") or \
                ".." in file:
            raise ValueError("%s names %r, not a file of %s" %
                             (index_path, file, path))
        for name, t in read_safetensors(os.path.join(path, file)).items():
            if weight_map.get(name) != file:
                raise ValueError("%s: tensor %s is not in %s's weight_map "
                                 "for this file" % (file, name, index_path))
            tensors[name] = t
    missing = [n for n in weight_map if n not in tensors]
    if missing:
        raise ValueError("%s names tensors its files lack: %s" %
                         (index_path, ", ".join(missing[:5])))
    shapes = tensor_shapes(config)
    absent = [n for n in shapes if n not in tensors]
    extra = [n for n in tensors if n not in shapes]
    if absent or extra:
        raise ValueError("%s does not hold this config's tensors: missing %s; "
                         "unexpected %s" % (path, absent[:5] or "none",
                                            extra[:5] or "none"))
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError("%s: tensor %s has shape %s; config.json makes "
                             "it %s (y = x @ W, W stored (in, out))" %
                             (weight_map[name], name,
                              tuple(tensors[name].shape), shape))
        if tensors[name].dtype not in (torch.float32, torch.bfloat16):
            raise ValueError("%s: tensor %s is %s; exports are F32 or BF16" %
                             (weight_map[name], name, tensors[name].dtype))
    model = SwitchyardModel(config, dtype=dtype, initialize=False)
    model.load_state_dict({n: t.to(dtype) for n, t in tensors.items()})
    return model.eval()
