#!/usr/bin/python3
"""Self-test of python/switchyard (no C++ build needed).

usage: model_selftest.py [unittest options]

- safetensors: round trips (F32, BF16, empty file), the exact bytes of a
  small file, header checks;
- SwitchyardModel: state_dict names and shapes are the export's
  (common/model_shape.cc, cli/checkpoint_tools.cc), save_file/read back and
  load_export of an export-shaped directory give the same model;
- the router's top-k, tie and capacity rules (trainer/router.cc) on a
  hand-made example and against a loop-for-loop translation of
  RouteForward;
- the model for every activation, norm, positions and top_k, against a
  loop-for-loop translation of trainer/layers.cc and trainer/model.cc
  (float64, tiny sizes);
- tests/python/export_loss.py's windows and batches.
"""

import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.join(HERE, "..", "..", "python")
sys.path.insert(0, PYTHON_DIR)
sys.path.insert(0, HERE)

import torch  # noqa: E402

from switchyard.torch import (SwitchyardModel, load_export,  # noqa: E402
                              read_header, read_safetensors, route,
                              save_file, tensor_shapes)

import export_loss  # noqa: E402


def tiny_config(**overrides):
    """A small model: layers 0 and 2 dense, 1 and 3 MoE."""
    config = {"model_type": "switchyard", "format_version": 1, "step": 7,
              "num_layers": 4, "d_model": 8, "d_ff": 12, "num_heads": 2,
              "vocab_size": 11, "seq_len": 6, "moe_layers": [1, 3],
              "num_experts": 4, "top_k": 1, "activation": "gelu_tanh",
              "norm": "rmsnorm", "norm_eps": 1e-05, "positions": "learned",
              "rope_theta": 10000.0, "expert_bias": True,
              "capacity_factor": 0.0, "eval_capacity_factor": 0.0,
              "aux_loss_alpha": 0.01, "router_z_loss": 0.001,
              "router_jitter": 0.0, "weight_layout": "in_out",
              "ffn_w1_layout": "gate_up"}
    config.update(overrides)
    return config


def random_model(config, seed=1, dtype=torch.float64):
    """A model with random values everywhere (norm scales and biases too,
    so that every parameter matters)."""
    torch.manual_seed(seed)
    model = SwitchyardModel(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".scale", ".bias", ".b1", ".b2")):
                p.copy_(1 + 0.3 * torch.randn_like(p) if
                        name.endswith(".scale") else 0.1 * torch.randn_like(p))
    return model


def write_export(model, config, directory):
    """What `switchyard ckpt export` writes of `model` (built from the dict
    `config`): config.json, dense.safetensors, experts-layer<L>.safetensors
    per MoE layer and the index, F32."""
    state = {n: t.detach().float() for n, t in model.state_dict().items()}
    files = {}
    for name in state:
        file = "dense.safetensors"
        if ".experts." in name:
            file = "experts-layer%s.safetensors" % name.split(".")[1]
        files.setdefault(file, {})[name] = state[name]
    for file, tensors in files.items():
        save_file(tensors, os.path.join(directory, file),
                  {"format": "pt", "source": "switchyard", "step": "7"})
    weight_map = {n: f for f, ts in files.items() for n in ts}
    with open(os.path.join(directory, "model.safetensors.index.json"),
              "w") as f:
        json.dump({"metadata": {"step": 7, "source": "switchyard"},
                   "weight_map": dict(sorted(weight_map.items()))}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


class SafetensorsTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "t.safetensors")

    def tearDown(self):
        self.dir.cleanup()

    def test_round_trip_f32_bf16(self):
        torch.manual_seed(0)
        tensors = {"w": torch.randn(3, 5), "b": torch.randn(7),
                   "h": torch.randn(2, 3).to(torch.bfloat16),
                   "s": torch.tensor(2.5), "e": torch.zeros(0, 4),
                   "d": torch.randn(4, 4).t()}  # Not contiguous.
        save_file(tensors, self.path, {"step": "3"})
        back = read_safetensors(self.path)
        self.assertEqual(list(back), sorted(tensors))
        for name, t in tensors.items():
            self.assertEqual(back[name].dtype, t.dtype, name)
            self.assertEqual(back[name].shape, t.shape, name)
            self.assertTrue(torch.equal(back[name], t), name)
        header, data_start = read_header(self.path)
        self.assertEqual(header["__metadata__"], {"step": "3"})
        self.assertEqual(data_start % 8, 0)
        self.assertEqual(header["h"]["dtype"], "BF16")
        # Contiguous data_offsets in name order, covering the data.
        at = 0
        for name in sorted(tensors):
            begin, end = header[name]["data_offsets"]
            self.assertEqual(begin, at, name)
            at = end
        self.assertEqual(data_start + at, os.path.getsize(self.path))

    def test_exact_bytes(self):
        save_file({"b": torch.tensor([1.0, -2.0]),
                   "a": torch.tensor([1.0]).to(torch.bfloat16)}, self.path)
        text = (b'{"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},'
                b'"b":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}}')
        text += b" " * (-len(text) % 8)
        expected = (struct.pack("<Q", len(text)) + text + b"\x80\x3f" +
                    struct.pack("<2f", 1.0, -2.0))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), expected)

    def test_empty_file(self):
        save_file({}, self.path)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), struct.pack("<Q", 8) + b"{}      ")
        self.assertEqual(read_safetensors(self.path), {})
        save_file({}, self.path, {"k": "v"})
        self.assertEqual(read_header(self.path)[0], {"__metadata__":
                                                     {"k": "v"}})

    def write_raw(self, header_text, data=b""):
        text = header_text.encode()
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text + data)

    def test_refuses_bad_files(self):
        cases = {
            "gap": ('{"a":{"dtype":"F32","shape":[1],'
                    '"data_offsets":[4,8]}}', b"\0" * 8),
            "size": ('{"a":{"dtype":"F32","shape":[2],'
                     '"data_offsets":[0,4]}}', b"\0" * 4),
            "trailing data": ('{"a":{"dtype":"F32","shape":[1],'
                              '"data_offsets":[0,4]}}', b"\0" * 8),
            "dtype": ('{"a":{"dtype":"X9","shape":[1],'
                      '"data_offsets":[0,4]}}', b"\0" * 4),
            "repeat": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]'
                       '},"a":{"dtype":"F32","shape":[1],"data_offsets":'
                       '[4,8]}}', b"\0" * 8),
            "not json": ("{nope", b""),
        }
        for what, (header, data) in cases.items():
            self.write_raw(header, data)
            with self.assertRaises(ValueError, msg=what):
                read_safetensors(self.path)
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", 1000) + b"{}")
        with self.assertRaises(ValueError):
            read_safetensors(self.path)


class ModelStateTest(unittest.TestCase):

    def test_names_and_shapes_are_the_exports(self):
        for overrides in ({}, {"activation": "swiglu", "norm": "layernorm",
                               "positions": "rotary", "expert_bias": False},
                          {"num_experts": 1}):
            config = tiny_config(**overrides)
            model = SwitchyardModel(config)
            state = model.state_dict()
            shapes = tensor_shapes(model.config)
            self.assertEqual(sorted(state), sorted(shapes), overrides)
            for name, shape in shapes.items():
                self.assertEqual(tuple(state[name].shape), shape, name)
        # Spot checks against common/model_shape.cc DenseLayout by hand.
        shapes = tensor_shapes(SwitchyardModel(tiny_config(
            activation="swiglu", norm="layernorm")).config)
        self.assertEqual(shapes["layers.0.ffn.w1"], (8, 24))
        self.assertEqual(shapes["layers.0.ffn.b1"], (24,))
        self.assertEqual(shapes["layers.1.router"], (8, 4))
        self.assertEqual(shapes["layers.3.experts.2.w1"], (8, 24))
        self.assertEqual(shapes["layers.3.experts.2.w2"], (12, 8))
        self.assertEqual(shapes["pos_embed"], (6, 8))
        self.assertEqual(shapes["final_norm.bias"], (8,))
        self.assertEqual(shapes["lm_head"], (8, 11))
        self.assertNotIn("layers.1.ffn.w1", shapes)
        self.assertNotIn("layers.0.router", shapes)
        # One expert: a (d, 1) router is stored as a vector (d,).
        self.assertEqual(tensor_shapes(SwitchyardModel(tiny_config(
            num_experts=1)).config)["layers.1.router"], (8,))

    def test_save_and_read_back(self):
        model = random_model(tiny_config(activation="swiglu"),
                             dtype=torch.float32)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.safetensors")
            save_file(model.state_dict(), path)
            back = read_safetensors(path)
            state = model.state_dict()
            self.assertEqual(sorted(back), sorted(state))
            for name, t in state.items():
                self.assertTrue(torch.equal(back[name], t), name)

    def test_load_export(self):
        config = tiny_config(top_k=2, activation="swiglu",
                             positions="rotary")
        model = random_model(config, dtype=torch.float32)
        tokens = torch.randint(0, 11, (3, 6))
        with tempfile.TemporaryDirectory() as d:
            write_export(model, config, d)
            loaded = load_export(d)
            for name, t in model.state_dict().items():
                self.assertTrue(torch.equal(loaded.state_dict()[name], t))
            self.assertTrue(torch.equal(loaded(tokens), model(tokens)))
            loaded64 = load_export(d, dtype=torch.float64)
            self.assertEqual(loaded64.lm_head.dtype, torch.float64)
            # A tensor of the wrong shape is refused, naming it.
            state = read_safetensors(os.path.join(d, "dense.safetensors"))
            state["lm_head"] = state["lm_head"].t().contiguous()
            save_file(state, os.path.join(d, "dense.safetensors"))
            with self.assertRaisesRegex(ValueError, "lm_head"):
                load_export(d)

    def test_bad_config_names_the_field(self):
        with self.assertRaisesRegex(ValueError, "num_heads"):
            SwitchyardModel(tiny_config(d_model=9))
        with self.assertRaisesRegex(ValueError, "activation"):
            SwitchyardModel(tiny_config(activation="tanh"))
        with self.assertRaisesRegex(ValueError, "top_k"):
            SwitchyardModel(tiny_config(top_k=5))

    def test_import_without_torch(self):
        code = ("import sys; sys.path.insert(0, %r); import switchyard; "
                "assert 'torch' not in sys.modules; "
                "print(switchyard.__version__)" % PYTHON_DIR)
        out = subprocess.run([sys.executable, "-c", code], check=True,
                             capture_output=True, text=True).stdout
        self.assertEqual(out.strip(), "0.1.0")


def route_loops(x, w, top_k, capacity_factor):
    """trainer/router.cc RouteForward, loop for loop: (expert, gate, kept,
    capacity) as nested lists."""
    T, d = len(x), len(x[0])
    E = len(w[0])
    expert, gate = [], []
    for t in range(T):
        logits = [sum(x[t][i] * w[i][e] for i in range(d)) for e in range(E)]
        m = max(logits)
        p = [math.exp(v - m) for v in logits]
        s = sum(p)
        p = [v / s for v in p]
        order = sorted(range(E), key=lambda e: (-p[e], e))[:top_k]
        chosen = sum(p[e] for e in order)
        expert.append(order)
        gate.append([p[e] if top_k == 1 else p[e] / chosen for e in order])
    capacity = 0
    if capacity_factor > 0:
        capacity = int(min(math.ceil(capacity_factor * T * top_k / float(E)),
                           T * top_k))
    load = [0] * E
    kept = [[True] * top_k for _ in range(T)]
    for j in range(top_k):
        for t in range(T):
            e = expert[t][j]
            if capacity > 0 and load[e] >= capacity:
                kept[t][j] = False
                gate[t][j] = 0.0
            else:
                load[e] += 1
    return expert, gate, kept, capacity


class RouterTest(unittest.TestCase):

    def route_logits(self, logits, top_k, capacity_factor):
        """route() with x = logits and W = I: logits chosen by hand."""
        x = torch.tensor(logits, dtype=torch.float64)
        return route(x, torch.eye(x.shape[1], dtype=torch.float64), top_k,
                     capacity_factor)

    def test_ties_go_to_the_lower_index(self):
        r = self.route_logits([[1, 3, 3, 0], [0, 0, 0, 0], [5, 1, 5, 5]], 2, 0)
        self.assertEqual(r.expert.tolist(), [[1, 2], [0, 1], [0, 2]])
        self.assertEqual(r.gate[1].tolist(), [0.5, 0.5])  # Renormalised.
        r = self.route_logits([[2, 2, 1]], 1, 0)
        self.assertEqual(r.expert.tolist(), [[0]])

    def test_gate_is_the_probability_for_top_1(self):
        r = self.route_logits([[0, math.log(3)]], 1, 0)
        self.assertAlmostEqual(r.gate.item(), 0.75, places=15)

    def test_capacity_takes_first_choices_first(self):
        # C = ceil(0.5 * 4 * 2 / 2) = 2. First choices 0, 0, 1, 0: t3's is
        # dropped (expert 0 full); then t0's second choice (1) is kept,
        # t1's (1) dropped (full), t2's (0) and t3's (1) dropped. Token
        # order instead of choice order would have dropped t2's first.
        r = self.route_logits([[2, 0], [2, 0], [0, 2], [2, 0]], 2, 0.5)
        self.assertEqual(r.capacity, 2)
        self.assertEqual(r.expert.tolist(), [[0, 1], [0, 1], [1, 0], [0, 1]])
        self.assertEqual(r.kept.tolist(), [[True, True], [True, False],
                                           [True, False], [False, False]])
        self.assertEqual(r.load.tolist(), [2, 2])
        self.assertEqual(r.dropped, 4)
        self.assertEqual(r.gate[3].tolist(), [0.0, 0.0])
        self.assertGreater(r.gate[0, 1].item(), 0)

    def test_capacity_rounds_up_to_at_most_t_k_and_0_is_dropless(self):
        r = self.route_logits([[1, 0]] * 3, 1, 1.0)  # ceil(1.5) = 2
        self.assertEqual((r.capacity, r.kept[:, 0].tolist()),
                         (2, [True, True, False]))
        r = self.route_logits([[1, 0]] * 3, 1, 0.0)
        self.assertEqual((r.capacity, r.dropped), (0, 0))
        self.assertEqual(r.load.tolist(), [3, 0])
        # At most T * k, whatever the (finite) factor.
        r = self.route_logits([[1, 0]] * 3, 2, 1e308)
        self.assertEqual((r.capacity, r.dropped), (6, 0))

    def test_matches_the_loops(self):
        torch.manual_seed(3)
        for top_k, cf in ((1, 0.0), (1, 1.0), (2, 0.75), (3, 1.25), (2, 0.0)):
            # Rounded inputs make exact ties common.
            x = torch.randint(-2, 3, (40, 5)).double()
            w = torch.randint(-1, 2, (5, 6)).double() / 2
            r = route(x, w, top_k, cf)
            expert, gate, kept, capacity = route_loops(
                x.tolist(), w.tolist(), top_k, cf)
            self.assertEqual(r.expert.tolist(), expert)
            self.assertEqual(r.kept.tolist(), kept)
            self.assertEqual(r.capacity, capacity)
            self.assertTrue(torch.allclose(r.gate, torch.tensor(gate,
                            dtype=torch.float64), rtol=0, atol=1e-15))


class LoopReference:
    """trainer/layers.cc and trainer/model.cc translated loop for loop, in
    Python floats (double), on flat row-major lists as the C++ has them."""

    def __init__(self, model):
        self.c = model.config
        self.p = {n: t.double().reshape(-1).tolist()
                  for n, t in model.state_dict().items()}

    @staticmethod
    def matmul(a, b, m, n, k):
        return [sum(a[i * k + p] * b[p * n + j] for p in range(k))
                for i in range(m) for j in range(n)]

    def norm(self, prefix, x, n):
        d, eps = self.c.d_model, self.c.norm_eps
        g, b = self.p[prefix + ".scale"], self.p.get(prefix + ".bias")
        y = []
        for r in range(n):
            row = x[r * d:(r + 1) * d]
            if b is None:
                inv = 1 / math.sqrt(sum(v * v for v in row) / d + eps)
                y += [row[i] * inv * g[i] for i in range(d)]
            else:
                mean = sum(row) / d
                var = sum((v - mean) ** 2 for v in row) / d
                inv = 1 / math.sqrt(var + eps)
                y += [(row[i] - mean) * inv * g[i] + b[i] for i in range(d)]
        return y

    def rotate(self, rows, length):
        d, heads = self.c.d_model, self.c.num_heads
        hd = d // heads
        for p in range(length):
            for h in range(heads):
                i = 0
                while i + 1 < hd:
                    theta = p / math.pow(self.c.rope_theta, i / hd)
                    at = p * d + h * hd + i
                    a, b = rows[at], rows[at + 1]
                    rows[at] = a * math.cos(theta) - b * math.sin(theta)
                    rows[at + 1] = a * math.sin(theta) + b * math.cos(theta)
                    i += 2

    def attention(self, prefix, x, length):
        d, heads = self.c.d_model, self.c.num_heads
        hd = d // heads
        q, k, v = (self.matmul(x, self.p[prefix + w], length, d, d)
                   for w in (".wq", ".wk", ".wv"))
        if self.c.positions == "rotary":
            self.rotate(q, length)
            self.rotate(k, length)
        context = [0.0] * (length * d)
        for h in range(heads):
            for i in range(length):
                s = [sum(q[i * d + h * hd + e] * k[j * d + h * hd + e]
                         for e in range(hd)) / math.sqrt(hd)
                     for j in range(i + 1)]
                m = max(s)
                p = [math.exp(v - m) for v in s]
                total = sum(p)
                for e in range(hd):
                    context[i * d + h * hd + e] = sum(
                        p[j] / total * v[j * d + h * hd + e]
                        for j in range(i + 1))
        return self.matmul(context, self.p[prefix + ".wo"], length, d, d)

    def ffn(self, prefix, x, n):
        d, f, g = self.c.d_model, self.c.d_ff, self.c.gates
        h = self.matmul(x, self.p[prefix + "w1"], n, g * f, d)
        b1 = self.p.get(prefix + "b1")
        a = []
        for r in range(n):
            row = h[r * g * f:(r + 1) * g * f]
            if b1 is not None:
                row = [row[j] + b1[j] for j in range(g * f)]
            for j in range(f):
                v = row[j]
                if self.c.activation == "gelu_tanh":
                    a.append(0.5 * v * (1 + math.tanh(
                        0.7978845608028654 * (v + 0.044715 * v * v * v))))
                elif self.c.activation == "relu":
                    a.append(v if v > 0 else 0.0)
                else:
                    a.append(v / (1 + math.exp(-v)) * row[f + j])
        y = self.matmul(a, self.p[prefix + "w2"], n, d, f)
        b2 = self.p.get(prefix + "b2")
        if b2 is not None:
            y = [y[r * d + i] + b2[i] for r in range(n) for i in range(d)]
        return y

    def logits(self, tokens, capacity_factor):
        c, d, V = self.c, self.c.d_model, self.c.vocab_size
        B, L = len(tokens), len(tokens[0])
        N = B * L
        x = []
        pos = self.p.get("pos_embed")
        for b in range(B):
            for t in range(L):
                token = tokens[b][t]
                e = self.p["tok_embed"][token * d:(token + 1) * d]
                x += [e[i] + (pos[t * d + i] if pos else 0.0)
                      for i in range(d)]
        for layer in range(c.num_layers):
            p = "layers.%d" % layer
            n1 = self.norm(p + ".norm1", x, N)
            h = list(x)
            for b in range(B):  # One sequence at a time.
                at = b * L * d
                out = self.attention(p + ".attn", n1[at:at + L * d], L)
                for i in range(L * d):
                    h[at + i] += out[i]
            n2 = self.norm(p + ".norm2", h, N)
            if layer in c.moe_layers:
                w = self.p[p + ".router"]
                E = c.num_experts
                expert, gate, kept, _ = route_loops(
                    [n2[t * d:(t + 1) * d] for t in range(N)],
                    [w[i * E:(i + 1) * E] for i in range(d)], c.top_k,
                    capacity_factor)
                y = [0.0] * (N * d)
                for t in range(N):
                    for j in range(c.top_k):
                        if not kept[t][j]:
                            continue
                        out = self.ffn("%s.experts.%d." % (p, expert[t][j]),
                                       n2[t * d:(t + 1) * d], 1)
                        for i in range(d):
                            y[t * d + i] += gate[t][j] * out[i]
            else:
                y = self.ffn(p + ".ffn.", n2, N)
            x = [h[i] + y[i] for i in range(N * d)]
        return self.matmul(self.norm("final_norm", x, N), self.p["lm_head"],
                           N, V, d)


class ForwardTest(unittest.TestCase):

    def test_every_variant_matches_the_loops(self):
        tokens = torch.tensor([[1, 4, 10, 0, 3], [7, 7, 2, 9, 5]])
        for activation in ("gelu_tanh", "relu", "swiglu"):
            for norm in ("rmsnorm", "layernorm"):
                for positions in ("learned", "rotary"):
                    for top_k in (1, 2):
                        config = tiny_config(
                            activation=activation, norm=norm,
                            positions=positions, top_k=top_k,
                            num_layers=2, moe_layers=[1], d_model=8,
                            num_heads=2, d_ff=5, expert_bias=top_k == 1,
                            eval_capacity_factor=1.0 if norm == "rmsnorm"
                            else 0.0)
                        what = (activation, norm, positions, top_k)
                        model = random_model(config)
                        logits = model(tokens)
                        self.assertEqual(logits.shape, (2, 5, 11), what)
                        self.assertTrue(torch.isfinite(logits).all(), what)
                        expected = torch.tensor(
                            LoopReference(model).logits(
                                tokens.tolist(), model.capacity_factor),
                            dtype=torch.float64).view(2, 5, 11)
                        err = (logits - expected).abs().max().item()
                        self.assertLess(err, 1e-12, what)
                        model32 = model.float()  # Runs in fp32 too.
                        self.assertLess((model32(tokens).double() -
                                         expected).abs().max().item(), 1e-4)

    def test_odd_head_dim_keeps_its_last_dimension(self):
        config = tiny_config(d_model=10, num_heads=2, positions="rotary",
                             num_layers=1, moe_layers=[0])  # hd = 5
        model = random_model(config)
        tokens = torch.tensor([[1, 2, 3, 4]])
        expected = LoopReference(model).logits(tokens.tolist(), 0.0)
        got = model(tokens).reshape(-1).tolist()
        self.assertLess(max(abs(a - b) for a, b in zip(got, expected)), 1e-12)

    def test_loss_is_mean_cross_entropy(self):
        model = random_model(tiny_config(capacity_factor=0.5))
        inputs = torch.tensor([[1, 2, 3], [4, 5, 6]])
        targets = torch.tensor([[2, 3, 4], [5, 6, 0]])
        logits = model(inputs).reshape(6, 11)
        nll = torch.logsumexp(logits, -1) - \
            logits.gather(1, targets.reshape(6, 1))[:, 0]
        self.assertAlmostEqual(model.loss(inputs, targets).item(),
                               nll.mean().item(), places=12)

    def test_refuses_tokens_that_do_not_fit(self):
        model = random_model(tiny_config())
        with self.assertRaises(ValueError):
            model(torch.zeros(1, 7, dtype=torch.int64))  # L > seq_len
        with self.assertRaises(ValueError):
            model(torch.tensor([[11]]))  # Outside the vocabulary.


class ExportLossTest(unittest.TestCase):

    def test_windows_batches_and_cli(self):
        config = tiny_config(eval_capacity_factor=1.0, num_experts=3)
        model = random_model(config, dtype=torch.float32)
        text = bytes(range(40)) * 2  # 80 bytes, seq_len 6: 13 windows
        with tempfile.TemporaryDirectory() as d:
            write_export(model, config, d)
            text_path = os.path.join(d, "text.bin")
            with open(text_path, "wb") as f:
                f.write(text)
            loaded = load_export(d, dtype=torch.float64)
            loss, n, tokens = export_loss.export_loss(loaded, text, batch=4)
            self.assertEqual((n, tokens), (13, 78))
            # By hand: windows 0-3, 4-7, 8-11, 12, each one forward call.
            total = 0.0
            for start, count in ((0, 4), (4, 4), (8, 4), (12, 1)):
                ids = [[text[(start + w) * 6 + t] % 11 for t in range(7)]
                       for w in range(count)]
                x = torch.tensor([row[:6] for row in ids])
                y = torch.tensor([row[1:] for row in ids])
                total += loaded.loss(x, y).item() * y.numel()
            self.assertAlmostEqual(loss, total / 78, places=14)
            # Capacity counts a call's tokens: the batching matters.
            self.assertNotEqual(loss, export_loss.export_loss(
                loaded, text, batch=1)[0])
            self.assertEqual(export_loss.export_loss(
                loaded, text, batch=2, max_windows=5)[1:], (5, 30))
            out = subprocess.run(
                [sys.executable, os.path.join(HERE, "export_loss.py"), d,
                 text_path, "--batch", "4"],
                check=True, capture_output=True, text=True).stdout
            line = json.loads(out)
            self.assertEqual(line, {"loss": loss, "windows": 13,
                                    "tokens": 78})


if __name__ == "__main__":
    unittest.main()
