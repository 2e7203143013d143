"""A PyTorch trainer's membership of a Switchyard cluster.

`connect` joins a running cluster (`switchyard up --trainers 0 ...`) as one
data-parallel trainer rank through the C++ client switchyard._core.Session
(python/core.cc over trainer/moe_session.h) and makes that session the
current one, which MoE modules and `attach` use when given none.

The extension is imported when first needed, so that `import
switchyard.torch` works without it (for load_export and the model alone).

NOTE: the experts' gradients are summed on the workers over micro-batches
and trainer ranks, as in the C++ trainer (trainer/training.cc
TrainerReplica::Step scales each micro-batch's loss by
1 / (cluster.trainers * training.micro_batches) and sums dense gradients
too). Do the same: scale the loss so, and all-reduce dense gradients with
SUM (tests/python/moe_test.py's determinism mode does). DDP averages
instead, which leaves the dense gradients world-size times smaller than the
experts' (harmless for Adam up to eps, but not the C++ arithmetic).
"""

import os

# The current session: the last one connect() returned and not yet closed.
_current = None
# switchyard._core.SwitchyardError, or the stand-in when it is not built.
_error_class = None


class _StandInSwitchyardError(RuntimeError):
    """SwitchyardError when switchyard._core is not built: nothing raises it
    (no session can exist without the extension)."""


def error_class():
    """switchyard._core.SwitchyardError (a RuntimeError subclass whose text
    is Switchyard's status text), or a stand-in RuntimeError subclass when
    the extension cannot be imported."""
    global _error_class
    if _error_class is None:
        try:
            from .. import _core
            _error_class = _core.SwitchyardError
        except ImportError:
            _error_class = _StandInSwitchyardError
    return _error_class


def __getattr__(name):  # PEP 562: SwitchyardError is resolved when used.
    if name == "SwitchyardError":
        return error_class()
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def _import_core():
    try:
        from .. import _core
    except ImportError as e:
        raise ImportError(
            "switchyard._core is not importable (%s): build the project (it "
            "makes build/python/switchyard/_core*.so) and run with "
            "PYTHONPATH=build/python" % e) from e
    return _core


class Session:
    """One trainer rank's session with the cluster: a thin wrapper of
    switchyard._core.Session (python/core.cc) that keeps `current_session`.

    Attributes read through to the C++ session: step (the step being
    trained), epoch (routing epoch), and the cluster's configuration:
    d_model, num_experts, top_k, num_moe_layers, micro_batches,
    capacity_factor, eval_capacity_factor, aux_loss_alpha, router_z_loss,
    router_jitter. forward, backward and evaluate take and return numpy
    arrays (see MoE, which calls them). Every failure raises
    SwitchyardError; no call waits without a deadline.

    Not thread-safe: one training thread drives a session.
    """

    _ATTRIBUTES = ("step", "epoch", "d_model", "num_experts", "top_k",
                   "num_moe_layers", "micro_batches", "capacity_factor",
                   "eval_capacity_factor", "aux_loss_alpha", "router_z_loss",
                   "router_jitter")

    def __init__(self, core):
        self._core = core
        self.closed = False

    def __getattr__(self, name):
        if name in Session._ATTRIBUTES:
            return getattr(self._core, name)
        raise AttributeError("Session has no attribute %r" % name)

    def forward(self, layer, micro_batch, x, experts, gates, kept):
        """y (T, d) = sum_j kept_tj gates_tj Expert_{e_tj}(x_t); the
        workers keep what backward(layer, micro_batch) needs."""
        return self._core.forward(layer, micro_batch, x, experts, gates, kept)

    def backward(self, layer, micro_batch, dy):
        """(dx (T, d), d_gate (T, k)) for forward(layer, micro_batch);
        the workers accumulate the experts' weight gradients."""
        return self._core.backward(layer, micro_batch, dy)

    def evaluate(self, layer, x, experts, gates, kept):
        """forward's y without training state (no backward follows)."""
        return self._core.evaluate(layer, x, experts, gates, kept)

    def step_done(self):
        """Ends the step for the experts: once every trainer rank has called
        it the workers apply their optimizer to the step's summed
        gradients. step then counts one more, which restarts every MoE
        module's micro-batch count."""
        self._core.step_done()

    def close(self):
        """Leaves the cluster (idempotent)."""
        global _current
        if _current is self:
            _current = None
        if not self.closed:
            self.closed = True
            self._core.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else "step %d" % self.step
        return "<switchyard.torch.Session %s>" % state


def connect(config, rank, run_dir="", overrides=(), name=""):
    """Joins the cluster as trainer `rank` and returns the Session, which
    becomes the current one.

    config: the cluster's YAML file; overrides: "section.field=value"
    strings applied after it (pass those given to `switchyard up`);
    run_dir: the `switchyard up --run-dir` directory, whose
    coordinator.addr and secret are used when given; name: the member name
    (empty: trainer-<rank>). Closes the current session first, if one is
    open. Blocks until every expert shard is reachable, or raises
    SwitchyardError (registration within cluster.call_timeout_ms x 6, then
    a routing table within x 12 more).
    """
    global _current
    core = _import_core()
    if _current is not None and not _current.closed:
        # A session left open would keep its rank's registration: close it
        # first (after a failure it has already left the cluster, and
        # its error was raised then).
        try:
            _current.close()
        except error_class():
            pass
    session = Session(core.Session(os.fspath(config), int(rank),
                                   os.fspath(run_dir),
                                   [str(o) for o in overrides], str(name)))
    _current = session
    return session


def current_session():
    """The last session connect() returned and that is not closed, or
    None."""
    return _current


def resolve(session):
    """`session`, or the current one; raises RuntimeError when neither."""
    if session is None:
        session = _current
    if session is None:
        raise RuntimeError("no Switchyard session: call "
                           "switchyard.torch.connect(config, rank, run_dir) "
                           "first, or pass session=")
    return session


def step_done(session=None):
    """Ends the step on `session` (default: the current one): see
    Session.step_done. MoE modules start counting micro-batches from 0
    again, since they key their count on session.step."""
    resolve(session).step_done()
