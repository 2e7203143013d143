"""The model's configuration as an export's config.json gives it, and the
names and shapes of the tensors that follow from it.

config.json is written by `switchyard ckpt export` (cli/checkpoint_tools.cc)
from proto/config.proto's ModelConfig; tensor names and shapes are
common/model_shape.cc DenseLayout's and the export's expert tensors.
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class SwitchyardConfig:
    """The model fields of an export's config.json, validated.

    Defaults are those of proto/config.proto where config.json may omit a
    field; moe_layers defaults to every moe_every-th layer
    (common/model_shape.cc IsMoeLayer).
    """
    num_layers: int
    d_model: int
    d_ff: int
    num_heads: int
    vocab_size: int
    seq_len: int
    num_experts: int
    top_k: int = 1
    moe_layers: tuple = ()
    activation: str = "gelu_tanh"  # gelu_tanh (or gelu), relu, swiglu
    norm: str = "rmsnorm"  # rmsnorm or layernorm
    norm_eps: float = 1e-5  # trainer/layers.h kNormEps
    positions: str = "learned"  # learned or rotary
    rope_theta: float = 10000.0  # trainer/layers.cc ApplyRotary
    expert_bias: bool = True
    capacity_factor: float = 0.0  # training's; 0 is dropless
    eval_capacity_factor: float = 0.0  # evaluation's; 0 is dropless
    init_scale: float = 1.0
    step: int = 0

    @property
    def gates(self):
        """Column blocks of an FFN's w1: 2 for SwiGLU ([gate | up]), else 1."""
        return 2 if self.activation == "swiglu" else 1

    @staticmethod
    def from_dict(raw):
        """Validates config.json's object; raises ValueError naming the field,
        the value and the rule."""
        def fail(field, rule):
            raise ValueError("config.json: %s (%r) %s" %
                             (field, raw.get(field), rule))

        if raw.get("model_type", "switchyard") != "switchyard":
            fail("model_type", "must be 'switchyard'")
        if raw.get("format_version", 1) != 1:
            fail("format_version", "must be 1")
        if raw.get("weight_layout", "in_out") != "in_out":
            fail("weight_layout", "must be 'in_out' (y = x @ W)")
        if raw.get("ffn_w1_layout", "gate_up") != "gate_up":
            fail("ffn_w1_layout", "must be 'gate_up'")
        names = {f.name for f in dataclasses.fields(SwitchyardConfig)}
        args = {k: v for k, v in raw.items() if k in names}
        for field in ("num_layers", "d_model", "d_ff", "num_heads",
                      "vocab_size", "seq_len", "num_experts"):
            if field not in raw:
                fail(field, "is missing")
        for field in ("num_layers", "d_model", "d_ff", "num_heads",
                      "vocab_size", "seq_len", "num_experts", "top_k"):
            value = args.get(field, 1)
            if not isinstance(value, int) or isinstance(value, bool) or \
                    value < 1:
                fail(field, "must be an integer >= 1")
        if args["d_model"] % args["num_heads"] != 0:
            fail("d_model", "must be divisible by num_heads (%d)" %
                 args["num_heads"])
        if args.get("top_k", 1) > args["num_experts"]:
            fail("top_k", "must be in [1, num_experts (%d)]" %
                 args["num_experts"])
        if "moe_layers" in raw:
            layers = raw["moe_layers"]
            if (not isinstance(layers, list) or
                    not all(isinstance(n, int) and 0 <= n < args["num_layers"]
                            for n in layers) or
                    sorted(set(layers)) != layers):
                fail("moe_layers", "must be increasing layer numbers in "
                     "[0, num_layers (%d))" % args["num_layers"])
        else:
            every = raw.get("moe_every", 2)
            if not isinstance(every, int) or not 1 <= every <= \
                    args["num_layers"]:
                fail("moe_every", "must be in [1, num_layers]")
            layers = [n for n in range(args["num_layers"])
                      if (n + 1) % every == 0]
        args["moe_layers"] = tuple(layers)
        if args.get("activation", "gelu_tanh") == "gelu":
            args["activation"] = "gelu_tanh"  # The C++ config's name.
        for field, allowed in (("activation", ("gelu_tanh", "relu", "swiglu")),
                               ("norm", ("rmsnorm", "layernorm")),
                               ("positions", ("learned", "rotary"))):
            if args.get(field, allowed[0]) not in allowed:
                fail(field, "must be one of " + ", ".join(allowed))
        for field in ("capacity_factor", "eval_capacity_factor"):
            value = args.get(field, 0.0)
            if not isinstance(value, (int, float)) or not \
                    math.isfinite(value) or value < 0:
                fail(field, "must be finite and >= 0 (0 means dropless)")
        for field in ("norm_eps", "rope_theta", "init_scale"):
            if field in args and not args[field] > 0:
                fail(field, "must be > 0")
        if not isinstance(args.get("expert_bias", True), bool):
            fail("expert_bias", "must be true or false")
        return SwitchyardConfig(**args)


def evaluation_capacity_factor(config):
    """The capacity factor of the routers when evaluating: config.json's
    eval_capacity_factor (training.eval_capacity_factor) itself, as
    trainer/router.cc RouterOptions::ForEvaluation.
    NOTE: there is no fallback to capacity_factor: 0 is dropless whatever
    the training capacity factor (docs/configuration.md).
    """
    return config.eval_capacity_factor


def stored_shape(rows, cols):
    """A dense tensor's shape in exports: (rows, cols), or (rows,) for cols 1
    (common/model_shape.h DenseTensor::shape)."""
    return (rows, cols) if cols > 1 else (rows,)


def tensor_shapes(config):
    """{name: shape} of every exported tensor: DenseLayout's order
    (common/model_shape.cc), then each MoE layer's experts in order with
    w1, [b1], w2, [b2] (cli/checkpoint_tools.cc ExportCheckpoint)."""
    c = config
    d, g, f = c.d_model, c.gates, c.d_ff
    shapes = {"tok_embed": stored_shape(c.vocab_size, d)}
    if c.positions == "learned":
        shapes["pos_embed"] = stored_shape(c.seq_len, d)

    def norm(prefix):
        shapes[prefix + ".scale"] = (d,)
        if c.norm == "layernorm":
            shapes[prefix + ".bias"] = (d,)

    for layer in range(c.num_layers):
        p = "layers.%d." % layer
        norm(p + "norm1")
        for w in ("wq", "wk", "wv", "wo"):
            shapes[p + "attn." + w] = stored_shape(d, d)
        norm(p + "norm2")
        if layer in c.moe_layers:
            shapes[p + "router"] = stored_shape(d, c.num_experts)
        else:
            shapes[p + "ffn.w1"] = stored_shape(d, g * f)
            if c.expert_bias:
                shapes[p + "ffn.b1"] = (g * f,)
            shapes[p + "ffn.w2"] = stored_shape(f, d)
            if c.expert_bias:
                shapes[p + "ffn.b2"] = (d,)
    norm("final_norm")
    shapes["lm_head"] = stored_shape(d, c.vocab_size)
    for layer in c.moe_layers:
        for e in range(c.num_experts):
            p = "layers.%d.experts.%d." % (layer, e)
            shapes[p + "w1"] = (d, g * f)  # Always 2-D (FfnTensorShapes).
            if c.expert_bias:
                shapes[p + "b1"] = (g * f,)
            shapes[p + "w2"] = (f, d)
            if c.expert_bias:
                shapes[p + "b2"] = (d,)
    return shapes
