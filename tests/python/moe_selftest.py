#!/usr/bin/python3
"""Unit test of switchyard.torch.MoE's Python side (no cluster, no
switchyard._core needed).

usage: moe_selftest.py [unittest options]

- the router path: aux and z losses against a hand computation, top-k
  gates and ties, capacity in training vs evaluation, jitter;
- the autograd plumbing: outputs and gradients (x, router, experts) against
  moe_reference.ReferenceMoE, micro-batch numbering, evaluation passes,
  bf16 inputs, errors raised in backward;
- attach's numbering and its mismatch errors; importing switchyard.torch
  does not import switchyard._core.

The experts are computed in this process by InProcessExpertsTestDouble, a
test double of switchyard._core.Session. It exists only to test the Python
layer here; tests/python/moe_test.py tests MoE against a live cluster.
"""

import math
import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.join(HERE, "..", "..", "python")
sys.path.insert(0, PYTHON_DIR)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from switchyard.torch import (MoE, SwitchyardConfig, attach,  # noqa: E402
                              step_done)
from moe_reference import ReferenceMoE  # noqa: E402


def expert_config(d=6, d_ff=10, num_experts=4, top_k=1,
                  activation="gelu_tanh"):
    return SwitchyardConfig(num_layers=2, d_model=d, d_ff=d_ff, num_heads=1,
                            vocab_size=16, seq_len=8, num_experts=num_experts,
                            top_k=top_k, moe_layers=(1,),
                            activation=activation)


class DoubleError(RuntimeError):
    """What InProcessExpertsTestDouble raises when told to fail (stands for
    switchyard._core.SwitchyardError)."""


class InProcessExpertsTestDouble:
    """TEST DOUBLE of switchyard._core.Session, for this unit test only: the
    experts of each MoE layer are ReferenceMoE experts computed here in
    PyTorch (their weight gradients accumulate in their .grad), so that
    MoE's Python side can be tested without a cluster. It checks the wire
    contract of python/core.cc (dtypes, shapes, C order, one backward per
    forward, micro-batches in [0, micro_batches)), records every call in
    `calls`, and keeps the arrays of the last forward or evaluate in
    `last_route` (layer, x, experts, gates, kept). It is not a model of
    the cluster's behaviour under faults.
    """

    def __init__(self, references, micro_batches=1, fail_backward=False):
        first = references[0]
        self.references = references  # One ReferenceMoE per MoE layer.
        self.step, self.epoch = 0, 1
        self.d_model = first.router.shape[0]
        self.num_experts = first.router.shape[1]
        self.top_k = first.top_k
        self.num_moe_layers = len(references)
        self.micro_batches = micro_batches
        self.capacity_factor, self.eval_capacity_factor = 1.25, 0.0
        self.aux_loss_alpha, self.router_z_loss = 0.01, 0.001
        self.router_jitter = 0.0
        self.fail_backward = fail_backward
        self.calls, self.inputs, self.saved = [], [], {}

    def _check(self, layer, x, experts, gates, kept):
        """Checks the arrays and keeps them as last_route."""
        self.last_route = (layer, x.copy(), experts.copy(), gates.copy(),
                           kept.copy())
        T, k = experts.shape
        for name, a, dtype, shape in (
                ("x", x, np.float32, (T, self.d_model)),
                ("experts", experts, np.int32, (T, k)),
                ("gates", gates, np.float32, (T, k)),
                ("kept", kept, np.uint8, (T, k))):
            assert a.dtype == dtype, "%s is %s, not %s" % (name, a.dtype,
                                                           dtype)
            assert a.shape == shape, "%s is %s, not %s" % (name, a.shape,
                                                           shape)
            assert a.flags["C_CONTIGUOUS"], name + " is not C-contiguous"

    def _experts(self, layer, x, experts, kept):
        """(T, k, d) expert outputs, 0 where not kept; x: (T, d) tensor."""
        T, k = experts.shape
        out = torch.zeros(T, k, self.d_model)
        ffns = self.references[layer].experts
        for t in range(T):
            for j in range(k):
                if kept[t, j]:
                    out[t, j] = ffns[int(experts[t, j])](x[t:t + 1])[0]
        return out

    def forward(self, layer, micro_batch, x, experts, gates, kept):
        self._check(layer, x, experts, gates, kept)
        assert 0 <= micro_batch < self.micro_batches
        assert (layer, micro_batch) not in self.saved, "forward twice"
        self.calls.append(("forward", layer, micro_batch))
        self.inputs.append(x.copy())
        with torch.enable_grad():  # Function.forward runs without grad.
            xt = torch.from_numpy(x.copy()).requires_grad_()
            out = self._experts(layer, xt, experts, kept)
        g = torch.from_numpy(gates * kept)
        self.saved[(layer, micro_batch)] = (xt, out, g)
        return (g[:, :, None] * out).sum(1).detach().numpy()

    def backward(self, layer, micro_batch, dy):
        assert dy.dtype == np.float32 and dy.flags["C_CONTIGUOUS"]
        self.calls.append(("backward", layer, micro_batch))
        if self.fail_backward:
            raise DoubleError("UNAVAILABLE: data-plane peer lost: worker-1")
        xt, out, g = self.saved.pop((layer, micro_batch))
        dyt = torch.from_numpy(dy)
        d_gate = (dyt[:, None, :] * out.detach()).sum(-1) * (g != 0)
        torch.autograd.backward(out, g[:, :, None] * dyt[:, None, :])
        return xt.grad.numpy(), d_gate.numpy()

    def evaluate(self, layer, x, experts, gates, kept):
        self._check(layer, x, experts, gates, kept)
        self.calls.append(("evaluate", layer))
        self.inputs.append(x.copy())
        with torch.no_grad():
            out = self._experts(layer, torch.from_numpy(x), experts, kept)
            return (torch.from_numpy(gates * kept)[:, :, None] *
                    out).sum(1).numpy()

    def step_done(self):
        self.calls.append(("step_done",))
        self.saved.clear()  # Forwards without a backward are dropped.
        self.step += 1


def seeded_reference(config, seed, aux=0.01, z=0.001):
    torch.manual_seed(seed)
    ref = ReferenceMoE(config, aux, z)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    return ref


def moe_like(ref, session, **kwargs):
    """An MoE with ref's router, on `session`, layer 0."""
    d, E = ref.router.shape
    args = dict(top_k=ref.top_k, aux_loss_coeff=ref.aux_loss_coeff,
                z_loss_coeff=ref.z_loss_coeff, session=session, layer=0)
    args.update(kwargs)
    moe = MoE(d, E, **args)
    with torch.no_grad():
        moe.router.copy_(ref.router)
    return moe


def assert_close(test, got, want, what, rtol=1e-5):
    err = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    test.assertLessEqual(err, rtol * max(scale, 1e-30),
                         "%s: max |diff| %.3g, max |reference| %.3g" %
                         (what, err, scale))


class RouterPathTest(unittest.TestCase):

    def test_losses_match_hand_computation(self):
        # d = E = 3, W = I: the logits are x itself.
        x = [[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0],
             [0.5, 0.0, 2.5]]
        T, E = 4, 3
        probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row]
                 for row in x]
        first = [max(range(E), key=lambda e: (p[e], -e)) for p in probs]
        f = [first.count(e) / T for e in range(E)]
        P = [sum(p[e] for p in probs) / T for e in range(E)]
        aux_want = 0.01 * E * sum(f[e] * P[e] for e in range(E))
        lse = [math.log(sum(math.exp(v) for v in row)) for row in x]
        z_want = 0.001 * sum(v * v for v in lse) / T
        config = expert_config(d=3, num_experts=3)
        ref = seeded_reference(config, 1)
        with torch.no_grad():
            ref.router.copy_(torch.eye(3))
        session = InProcessExpertsTestDouble([ref])
        moe = moe_like(ref, session, aux_loss_coeff=0.01, z_loss_coeff=0.001)
        _, total = moe(torch.tensor(x))
        self.assertAlmostEqual(float(moe.last_aux_loss), aux_want, places=6)
        self.assertAlmostEqual(float(moe.last_z_loss), z_want, places=6)
        self.assertAlmostEqual(float(total), aux_want + z_want, places=6)
        self.assertEqual(moe.tokens_per_expert.tolist(),
                         [first.count(e) for e in range(E)])

    def test_top_k_gates_and_ties(self):
        config = expert_config(d=4, num_experts=4, top_k=2)
        ref = seeded_reference(config, 2)
        with torch.no_grad():
            ref.router.copy_(torch.eye(4))
        session = InProcessExpertsTestDouble([ref])
        moe = moe_like(ref, session).eval()
        # Token 0: experts 1 and 3 tie for first; token 1: 0 and 2 for second.
        x = torch.tensor([[0.0, 2.0, 0.0, 2.0], [3.0, 0.0, 1.0, 1.0]])
        moe(x)
        _, _, experts, gates, _ = session.last_route
        self.assertEqual(experts.tolist(), [[1, 3], [0, 2]])
        np.testing.assert_allclose(gates, [[0.5, 0.5],
                                           [math.e ** 2 / (math.e ** 2 + 1),
                                            1 / (math.e ** 2 + 1)]],
                                   rtol=1e-6)
        moe1 = moe_like(ref, InProcessExpertsTestDouble([ref]), top_k=1)
        moe1.eval()
        moe1(x)
        p = torch.softmax(x, -1)
        self.assertEqual(moe1.session.last_route[2][:, 0].tolist(), [1, 0])
        np.testing.assert_allclose(moe1.session.last_route[3][:, 0],
                                   [p[0, 1], p[1, 0]], rtol=1e-6)

    def test_capacity_in_training_and_evaluation(self):
        config = expert_config(d=4, num_experts=4)
        ref = seeded_reference(config, 3)
        with torch.no_grad():
            ref.router.copy_(torch.eye(4))
        session = InProcessExpertsTestDouble([ref])
        moe = moe_like(ref, session, capacity_factor=1.0,
                       eval_capacity_factor=0.0)
        x = torch.zeros(8, 4)
        x[:, 0] = 5.0  # Every token's first choice is expert 0.
        # Training: C = ceil(1.0 * 8 * 1 / 4) = 2; tokens 0 and 1 are kept.
        y, _ = moe(x)
        self.assertEqual(moe.tokens_per_expert.tolist(), [2, 0, 0, 0])
        self.assertEqual(session.last_route[4][:, 0].tolist(),
                         [1, 1, 0, 0, 0, 0, 0, 0])
        self.assertTrue(bool((y[2:] == 0).all()))  # Dropped: no output.
        self.assertTrue(bool((y[:2] != 0).any()))
        # Evaluation: eval_capacity_factor 0 is dropless.
        moe.eval()
        moe(x)
        self.assertEqual(moe.tokens_per_expert.tolist(), [8, 0, 0, 0])
        # A training module under no_grad is an evaluation too.
        moe.train()
        with torch.no_grad():
            moe(x)
        self.assertEqual(moe.tokens_per_expert.tolist(), [8, 0, 0, 0])
        self.assertEqual([c[0] for c in session.calls],
                         ["forward", "evaluate", "evaluate"])

    def test_jitter_touches_the_router_input_only(self):
        config = expert_config(d=6, num_experts=4)
        ref = seeded_reference(config, 4)
        session = InProcessExpertsTestDouble([ref], micro_batches=4)
        moe = moe_like(ref, session, jitter_eps=0.5)
        x = torch.randn(32, 6)
        plain = moe_like(ref, InProcessExpertsTestDouble([ref]))
        plain(x)
        routes = []
        for seed in (7, 7, 8):
            torch.manual_seed(seed)
            moe(x)
            routes.append(session.last_route[2].copy())
            np.testing.assert_array_equal(session.inputs[-1], x.numpy())
        np.testing.assert_array_equal(routes[0], routes[1])
        self.assertFalse(np.array_equal(routes[0],
                                        plain.session.last_route[2]))
        self.assertFalse(np.array_equal(routes[0], routes[2]))
        moe.eval()  # No jitter in evaluation.
        moe(x)
        np.testing.assert_array_equal(session.last_route[2],
                                      plain.session.last_route[2])


class PlumbingTest(unittest.TestCase):

    def check_against_reference(self, top_k, capacity_factor, micro_batches):
        config = expert_config(d=6, d_ff=10, num_experts=4, top_k=top_k)
        ref = seeded_reference(config, 10 + top_k)
        session = InProcessExpertsTestDouble([seeded_reference(config, 0)],
                                             micro_batches=micro_batches)
        session.references[0].load_state_dict(ref.state_dict())
        moe = moe_like(ref, session, capacity_factor=capacity_factor)
        torch.manual_seed(5)
        xs = [torch.randn(2, 12, 6) for _ in range(micro_batches)]
        probes = [torch.randn(2, 12, 6) for _ in range(micro_batches)]
        got_x, want_x = [], []
        losses = []
        for x, probe in zip(xs, probes):
            xg = x.clone().requires_grad_()
            y, aux = moe(xg)
            self.assertEqual(y.shape, x.shape)
            losses.append((y * probe).sum() + aux)
            got_x.append(xg)
            xr = x.reshape(-1, 6).clone().requires_grad_()
            yr, auxr = ref(xr, capacity_factor)
            assert_close(self, y.detach().reshape(-1, 6), yr.detach(), "y")
            assert_close(self, aux.detach(), auxr.detach(), "aux")
            ((yr * probe.reshape(-1, 6)).sum() + auxr).backward()
            want_x.append(xr)
        # Backward in reverse micro-batch order: each pairs with its forward.
        for loss in reversed(losses):
            loss.backward()
        self.assertEqual(
            [c for c in session.calls if c[0] != "forward"],
            [("backward", 0, m) for m in reversed(range(micro_batches))])
        for xg, xr in zip(got_x, want_x):
            assert_close(self, xg.grad.reshape(-1, 6), xr.grad, "x.grad")
        assert_close(self, moe.router.grad, ref.router.grad, "router.grad")
        for (name, got), want in zip(
                session.references[0].experts.named_parameters(),
                ref.experts.parameters()):
            assert_close(self, got.grad, want.grad, "experts." + name)

    def test_top1_dropless(self):
        self.check_against_reference(top_k=1, capacity_factor=0.0,
                                     micro_batches=1)

    def test_top2_with_drops_and_micro_batches(self):
        self.check_against_reference(top_k=2, capacity_factor=0.5,
                                     micro_batches=3)

    def test_micro_batches_count_per_step(self):
        config = expert_config()
        ref = seeded_reference(config, 6)
        session = InProcessExpertsTestDouble([ref], micro_batches=2)
        moe = moe_like(ref, session)
        x = torch.randn(5, 6)
        for _ in range(2):
            moe(x)[0].sum().backward()
        with self.assertRaisesRegex(RuntimeError,
                                    "forward 3 of step 0.*micro_batches = 2"):
            moe(x)
        step_done(session)
        moe(x)[0].sum().backward()
        self.assertEqual(session.calls, [
            ("forward", 0, 0), ("backward", 0, 0),
            ("forward", 0, 1), ("backward", 0, 1),
            ("step_done",), ("forward", 0, 0), ("backward", 0, 0)])

    def test_bf16_input_travels_as_fp32(self):
        config = expert_config()
        ref = seeded_reference(config, 7)
        session = InProcessExpertsTestDouble([ref])
        moe = moe_like(ref, session)
        x = torch.randn(3, 4, 6).to(torch.bfloat16).requires_grad_()
        y, aux = moe(x)
        self.assertEqual(y.dtype, torch.bfloat16)
        self.assertEqual(aux.dtype, torch.float32)
        (y.float().sum() + aux).backward()
        self.assertEqual(x.grad.dtype, torch.bfloat16)
        self.assertEqual(session.inputs[0].dtype, np.float32)

    def test_error_in_backward_keeps_its_type_and_text(self):
        config = expert_config()
        ref = seeded_reference(config, 8)
        moe = moe_like(ref, InProcessExpertsTestDouble([ref],
                                                       fail_backward=True))
        y, _ = moe(torch.randn(4, 6))
        with self.assertRaisesRegex(DoubleError, "worker-1"):
            y.sum().backward()

    def test_attach_numbers_and_checks(self):
        config = expert_config()
        refs = [seeded_reference(config, 9), seeded_reference(config, 10)]
        session = InProcessExpertsTestDouble(refs)
        model = nn.Sequential(nn.Linear(6, 6), MoE(6, 4), nn.Linear(6, 6),
                              MoE(6, 4))
        moes = attach(model, session)
        self.assertEqual([m.layer for m in moes], [0, 1])
        self.assertTrue(all(m.session is session for m in moes))
        self.assertIs(moes[1], model[3])
        with self.assertRaisesRegex(ValueError, "1 MoE modules but the "
                                    "cluster's model has 2 MoE layers"):
            attach(nn.Sequential(MoE(6, 4)), session)
        bad = nn.Sequential(MoE(6, 4), MoE(6, 4, top_k=2))
        with self.assertRaisesRegex(ValueError, r"MoE 1 \(layer 1\): top_k 2 "
                                    r"does not match the cluster's "
                                    r"model.top_k \(1\)"):
            attach(bad, session)
        self.assertIsNone(bad[0].layer)  # A failed attach changes nothing.
        with self.assertRaisesRegex(ValueError, "hidden_size 5 does not "
                                    "match the cluster's model.d_model"):
            attach(nn.Sequential(MoE(5, 4), MoE(6, 4)), session)

    def test_from_session_takes_the_cluster_settings(self):
        config = expert_config(top_k=2)
        session = InProcessExpertsTestDouble([seeded_reference(config, 11)])
        moe = MoE.from_session(session, jitter_eps=0.25)
        self.assertEqual((moe.hidden_size, moe.num_experts, moe.top_k),
                         (6, 4, 2))
        self.assertEqual((moe.capacity_factor, moe.eval_capacity_factor,
                          moe.aux_loss_coeff, moe.z_loss_coeff,
                          moe.jitter_eps), (1.25, 0.0, 0.01, 0.001, 0.25))
        self.assertIs(moe.session, session)

    def test_bad_arguments_name_the_field(self):
        with self.assertRaisesRegex(ValueError, r"top_k \(5\) must be an "
                                    r"integer in \[1, num_experts \(4\)\]"):
            MoE(6, 4, top_k=5)
        with self.assertRaisesRegex(ValueError, r"jitter_eps \(1.0\)"):
            MoE(6, 4, jitter_eps=1.0)
        with self.assertRaisesRegex(RuntimeError, "MoE has no layer"):
            MoE(6, 4, session=object())(torch.zeros(1, 6))

    def test_import_does_not_load_the_extension(self):
        code = ("import sys, switchyard.torch as t; "
                "assert 'switchyard._core' not in sys.modules; "
                "assert issubclass(t.SwitchyardError, RuntimeError)")
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        subprocess.run([sys.executable, "-c", code], check=True, env=env)


if __name__ == "__main__":
    unittest.main()
