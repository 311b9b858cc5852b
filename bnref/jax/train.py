"""Training LeNet-BN with JAX/Flax: ``fit(config, data, on_epoch)`` for ``bnref.train``.

The pieces are public so that other code (the cross-framework trajectory comparison, the
benchmark) can drive the same steps:

- :func:`resolve_device`, :func:`make_model`, :func:`prepare_images`;
- :class:`TrainState`: Flax's ``TrainState`` (params, optax SGD state) plus ``batch_stats``;
- :func:`create_train_state`;
- :func:`train_step` ``(state, X, y) -> (state, loss, correct)``: one jitted SGD step that
  applies the model with ``mutable=["batch_stats"]`` and returns the updated statistics in
  the new state (the state's buffers are donated);
- :func:`eval_step` ``(state, X) -> logits`` with ``train=False`` (running statistics);
- :func:`train_steps`: the training loop itself, one :class:`Step` per SGD step, which
  :func:`fit`, the experiments and the benchmark iterate.

:func:`fit` keeps the whole dataset on the device (float32 in [0, 1], NHWC), shuffles
*examples* each epoch with ``bnref.schedule.epoch_permutation`` (NumPy, the same order as the
torch backend's), and gathers each batch on
the device inside the jitted step from the permutation, so the loop does no per-sample
Python work, moves no data to the device and never waits for it: loss and accuracy are
accumulated on the device and read once per epoch. Same seed, same data -> same history.

Batches are ``bnref.schedule.batch_slices``: full batches only (one compiled step shape); the
remainder of an epoch is left out, and why is said there.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from bnref._progress import bar
from bnref.jax import distributed
from bnref.jax.models import LeNetBN
from bnref.schedule import batch_slices, check_finite_loss, epoch_metrics, epoch_permutation

__all__ = [
    "TrainState",
    "resolve_device",
    "device_name",
    "make_model",
    "matmul_precision",
    "prepare_images",
    "create_train_state",
    "train_step",
    "eval_step",
    "fit",
    "train_steps",
    "Family",
    "LINEN",
]


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, apply_fn, params, tx, opt_state) plus the BN running statistics."""

    batch_stats: Any = None


def resolve_device(name: str = "auto") -> jax.Device:
    """A JAX device from ``--device``: ``auto`` (the first GPU if any, else the CPU), ``cpu``,
    ``gpu``/``cuda`` or ``cuda:1``/``gpu:1``."""
    name = (name or "auto").lower()
    if name == "auto":
        try:
            return jax.devices("gpu")[0]
        except RuntimeError:  # no GPU backend installed or no GPU present
            return jax.devices("cpu")[0]
    kind, _, index = name.partition(":")
    platform = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}.get(kind)
    if platform is None:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, gpu/cuda or cuda:N")
    try:
        devices = jax.devices(platform)
    except RuntimeError as e:
        raise ValueError(f"device {name!r} is not available: {e}") from None
    i = int(index) if index else 0
    if not 0 <= i < len(devices):
        raise ValueError(f"device {name!r} is not available ({len(devices)} {platform} device(s))")
    return devices[i]


def device_name(device: jax.Device) -> str:
    """``cpu`` or ``cuda:N``: the wording of the per-epoch line (as the torch backend)."""
    return "cpu" if device.platform == "cpu" else f"cuda:{device.id}"


def make_model(config, axis_name: Optional[str] = None) -> LeNetBN:
    """The LeNet-BN of ``config`` (``bn``, ``convention`` and ``precision``: with "bfloat16" every
    layer computes in bfloat16, ``dtype=bfloat16``, while parameters stay float32,
    ``param_dtype=float32``, and BN reduces its statistics and keeps its running averages in
    float32, as Flax's ``force_float32_reductions``; ``bnref.spec.PRECISIONS``), its BN
    statistics synchronized over the device axis ``axis_name`` when given (data parallel)."""
    dtype = jnp.bfloat16 if config.precision == "bfloat16" else None
    return LeNetBN(bn=config.bn, convention=config.bn_convention, dtype=dtype, axis_name=axis_name)


def _linen_precise(model, variables, batches, *, variant: str, progress: bool):
    from bnref.jax.precise import precise_batch_stats

    return precise_batch_stats(model, variables, batches, variant=variant, progress=progress)


@dataclasses.dataclass(frozen=True)
class Family:
    """The model API the training loop drives: flax.linen's (:data:`LINEN`, this backend's), or
    another behind the same two calls (``bnref.nnx.train.NNX``: an NNX model).

    ``make(config, axis_name=None)``: the model, an object with linen's ``init(rng, x,
    train=False) -> variables`` and ``apply(variables, x, train=..., mutable=["batch_stats"])``;
    ``precise(model, variables, batches, *, variant, progress) -> batch_stats``: precise BN.
    """

    title: str
    make: Callable[..., Any]
    precise: Callable[..., Any]


LINEN = Family("flax.linen", make_model, _linen_precise)


def matmul_precision(tf32: bool):
    """The context training runs in: float32 matmuls and convolutions computed in float32
    (``"float32"``, JAX's HIGHEST; on GPUs JAX's own default lets them use TF32), or TF32 where
    the GPU has it (``"tensorfloat32"``, ``--tf32``). On a CPU both are float32."""
    return jax.default_matmul_precision("tensorfloat32" if tf32 else "float32")


def prepare_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1] (NHWC)."""
    return (np.asarray(images, dtype=np.float32) / 255.0)[..., None]


def create_train_state(model, rng, lr: float, sample_input) -> TrainState:
    """Initialize parameters and statistics (init leaves the statistics at 0 and 1) and SGD."""
    variables = model.init(rng, sample_input, train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=optax.sgd(lr),
    )


def _loss_and_updates(state: TrainState, X, y):
    """Gradient step on one batch: ``(new_state, mean loss, number correct)``."""

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, X, train=True, mutable=["batch_stats"]
        )
        # bfloat16 logits (--precision bfloat16): the loss in float32, as the gradients it starts
        # (a float64 model's stays float64)
        logits32 = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits32, y).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    correct = (jnp.argmax(logits, -1) == y).sum()
    return state, loss, correct


@functools.partial(jax.jit, donate_argnums=(0,))
def train_step(state: TrainState, X, y):
    """One SGD step on the batch ``X`` (B, 28, 28, 1), ``y`` (B,) int: ``(state, loss, correct)``.

    ``loss`` is the batch's mean cross-entropy, ``correct`` the number of right predictions
    (training mode). ``state`` is donated: do not reuse it after the call. The same numbers as
    :func:`fit`'s steps on the same batch with one step per call.
    """
    return _loss_and_updates(state, X, y)


@jax.jit
def eval_step(state: TrainState, X):
    """Logits of ``X`` with the running statistics (``train=False``): (B, 10)."""
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, X, train=False)


def _batch_step(state: TrainState, totals, X_all, y_all, perm, i, batch_size: int):
    """:func:`train_step` on rows ``perm[i*B:(i+1)*B]`` of the on-device dataset, adding the
    batch's loss sum and number correct to ``totals`` (kept on the device); also returns the
    batch's mean loss."""
    idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)  # (B,) example indices
    X, y = X_all[idx], y_all[idx]  # (B, 28, 28, 1), (B,): gathered on the device
    state, loss, correct = _loss_and_updates(state, X, y)
    return state, totals + jnp.stack([loss * batch_size, correct.astype(jnp.float32)]), loss


@functools.partial(jax.jit, static_argnames=("batch_size",), donate_argnums=(0, 1))
def _fit_step(state: TrainState, totals, X_all, y_all, perm, i, *, batch_size: int):
    """One step (:func:`_batch_step`) per compiled call; ``state`` and ``totals`` are donated.
    Returns the state, the totals and the batch loss as a ``(1,)`` array (as :func:`_fit_steps`)."""
    state, totals, loss = _batch_step(state, totals, X_all, y_all, perm, i, batch_size)
    return state, totals, loss[None]


@functools.partial(jax.jit, static_argnames=("batch_size", "k"), donate_argnums=(0, 1))
def _fit_steps(state: TrainState, totals, X_all, y_all, perm, i0, *, batch_size: int, k: int):
    """``k`` consecutive steps (:func:`_batch_step` on batches ``i0 .. i0 + k - 1``) in one
    compiled call, a ``lax.scan`` (Keras' ``steps_per_execution``): one dispatch instead of
    ``k``. Returns the state, the totals and the ``k`` batch losses ``(k,)``; ``state`` and
    ``totals`` are donated.

    Bit-identical to ``k`` calls of :func:`_fit_step` (``tests/test_jax_train.py``): LeNet-BN's
    convolutions take their gradients from ``bnref.jax.conv``, in the layouts XLA compiles the
    same way inside a loop body as at the top level (with lax's own, a scanned step rounded
    differently, ~2e-7, and ran 4-10x slower on a CPU; ``notes/steps-per-call.md``)."""

    def body(carry, i):
        state, totals, loss = _batch_step(*carry, X_all, y_all, perm, i, batch_size)
        return (state, totals), loss

    (state, totals), losses = jax.lax.scan(body, (state, totals), i0 + jnp.arange(k))
    return state, totals, losses


def _call(k: int, size: int):
    """The compiled call for ``k`` steps of batch ``size``: :func:`_fit_step` for one."""
    if k == 1:
        return functools.partial(_fit_step, batch_size=size)
    return functools.partial(_fit_steps, batch_size=size, k=k)


def compile_steps(state: TrainState, X, y, *, batch_size: int, steps_per_call: int = 1) -> Dict[int, Any]:
    """The step functions :func:`train_steps` calls, compiled ahead of time for these arrays:
    ``{k: fn}`` for every call size an epoch needs (``steps_per_call``, and the epoch's last,
    shorter call when ``steps_per_call`` does not divide its number of batches)."""
    n = int(X.shape[0])
    slices = batch_slices(n, batch_size)
    size = slices[0][1]
    totals, perm = jnp.zeros(2, jnp.float32), jnp.zeros(n, jnp.int32)

    def ahead_of_time(k: int):
        call = _call(k, size)
        return call.func.lower(state, totals, X, y, perm, 0, **call.keywords).compile()

    return {k: ahead_of_time(k) for k in _call_sizes(len(slices), steps_per_call)}


def _call_sizes(steps: int, steps_per_call: int) -> List[int]:
    """The numbers of steps an epoch of ``steps`` steps is called in: ``steps_per_call`` (at most
    ``steps``) and the shorter last call's, when there is one."""
    return sorted({min(steps_per_call, steps), steps % steps_per_call} - {0})


@dataclasses.dataclass(frozen=True)
class Step:
    """One SGD step of :func:`train_steps`: step ``step`` of ``steps`` (1-based) of ``epoch``.

    Steps run K at a time in one compiled call (``steps_per_call``; K = 1: one per call).
    ``state``: the state after the call's last step; ``totals``: the epoch's (loss sum, number
    correct) after it; ``perm``: the epoch's example order (N,); ``call_losses``: the losses of
    every step of the call ``(K,)``, ``index`` this step's place in it. All on the device,
    unread (no sync). ``state`` and ``totals`` are donated to the next call: use them before
    advancing the iterator past :attr:`ends_call` (or copy them)."""

    epoch: int
    step: int
    steps: int
    state: Any
    totals: Any
    perm: Any
    call_losses: Any
    index: int = 0

    @property
    def loss(self):
        """This step's mean batch loss (a device scalar)."""
        return self.call_losses[self.index]

    @property
    def ends_call(self) -> bool:
        """Whether this is the last step of its compiled call (where ``state`` is this step's)."""
        return self.index == self.call_losses.shape[0] - 1


def train_steps(state: TrainState, X, y, *, seed: int, batch_size: int, epochs: Iterable[int], device=None,
                steps_per_call: int = 1, compiled: Optional[Dict[int, Any]] = None) -> Iterator[Step]:
    """The training loop :func:`fit` runs, one :class:`Step` per SGD step: for each epoch of
    ``epochs`` (1-based numbers; ``itertools.count(1)`` for as many as wanted), the examples of
    ``X`` (N, 28, 28, 1), ``y`` (N,) int32 in ``bnref.schedule.epoch_permutation(seed, epoch, N)``'s
    order, in the full batches of ``batch_slices(N, batch_size)``, each gathered on the device
    inside the jitted step. The arrays stay where they are (put them on the device first); the
    permutation and the totals are put on ``device`` (default: JAX's).

    ``steps_per_call``: K steps in one compiled call (``lax.scan``, :func:`_fit_steps`), the last
    call of an epoch taking the rest; the same numbers as K = 1, bit for bit (see
    :func:`_fit_steps`). ``compiled``: the step functions of :func:`compile_steps`
    (:func:`fit` compiles them ahead of time); by default they are jitted on first use."""
    n = int(X.shape[0])
    slices = batch_slices(n, batch_size)
    size = slices[0][1]  # equal sizes: one compiled step
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}")
    if compiled is None:
        compiled = {k: _call(k, size) for k in _call_sizes(len(slices), steps_per_call)}
    for epoch in epochs:
        perm = jax.device_put(epoch_permutation(seed, epoch, n), device)  # (N,) example order
        totals = jax.device_put(jnp.zeros(2, jnp.float32), device)  # loss sum, number correct
        for first in range(0, len(slices), steps_per_call):
            k = min(steps_per_call, len(slices) - first)
            state, totals, losses = compiled[k](state, totals, X, y, perm, first)
            for j in range(k):
                yield Step(epoch, first + j + 1, len(slices), state, totals, perm, losses, j)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _count_correct(state: TrainState, X_all, y_all, start, *, batch_size: int):
    X = jax.lax.dynamic_slice_in_dim(X_all, start, batch_size)
    y = jax.lax.dynamic_slice_in_dim(y_all, start, batch_size)
    return (jnp.argmax(eval_step(state, X), -1) == y).sum()


def evaluate(state: TrainState, X, y, batch_size: int = 1000) -> float:
    """Accuracy on the on-device ``X``, ``y`` with the running statistics."""
    n = int(X.shape[0])
    correct = jnp.zeros((), jnp.int32)
    full = n - n % batch_size
    for start in range(0, full, batch_size):
        correct = correct + _count_correct(state, X, y, start, batch_size=batch_size)
    if full < n:
        correct = correct + _count_correct(state, X[full:], y[full:], 0, batch_size=n - full)
    return float(correct) / n


#: steps per compiled call when ``--steps-per-call`` is not given, per platform. The CPU: 1,
#: measured (``python -m bnref.bench --backend jax --variants "bnref BN,bnref BN fused"
#: --steps-per-call K``: fused / one step per call 1.08 at K = 50, 1.01 at K = 8, 0.90 at K = 200,
#: the machine's noise; a step's ~30 ms of arithmetic dwarfs its dispatch), which keeps the
#: progress bar moving per step.
#: GPUs and TPUs: the whole epoch (None), as Keras' on-device loops do; a launch-bound step on
#: a GPU is where one call per step costs most. Not yet measured on a GPU.
DEFAULT_STEPS_PER_CALL = {"cpu": 1}


def resolve_steps_per_call(steps_per_call: Optional[int], device, steps_per_epoch: int) -> int:
    """``steps_per_call`` (an int >= 1), or the platform's default (:data:`DEFAULT_STEPS_PER_CALL`;
    the whole epoch elsewhere), at most the epoch's number of steps."""
    k = steps_per_call if steps_per_call is not None else DEFAULT_STEPS_PER_CALL.get(device.platform, steps_per_epoch)
    return max(1, min(k, steps_per_epoch))


def fit(config, data, on_epoch: Callable[[Dict], None], run=None, family: Family = LINEN) -> List[Dict]:
    """Train ``family.make(config)`` (default: :func:`make_model`, linen's LeNet-BN) on ``data`` (a ``bnref.data.FashionMNIST``) for
    ``config.epochs`` epochs; ``on_epoch(metrics)`` after each; returns all metrics.
    ``config.replicas > 1``: data parallel over that many devices (:func:`_fit_replicated`).

    ``run`` (a :class:`bnref.runs.RunDir`): a checkpoint after every epoch, and with
    ``run.resuming`` the run starts from its checkpoint. On one device the step is compiled
    ahead of the first epoch: ``compile_seconds`` (epoch 1) is that time, and
    ``examples_per_sec`` excludes it."""
    with matmul_precision(config.tf32):
        if config.replicas > 1:
            distributed.join_processes(config)  # a no-op unless this is one process of several (and has not joined yet)
            return _fit_replicated(config, data, on_epoch, run, family)
        return _fit_one_device(config, data, on_epoch, run, family)


def _fit_one_device(config, data, on_epoch: Callable[[Dict], None], run=None, family: Family = LINEN) -> List[Dict]:
    device = resolve_device(config.device)
    model = family.make(config)
    with jax.default_device(device):
        X_train = jax.device_put(prepare_images(data.train_images), device)  # (N, 28, 28, 1)
        y_train = jax.device_put(np.asarray(data.train_labels, np.int32), device)  # (N,)
        X_test = jax.device_put(prepare_images(data.test_images), device)
        y_test = jax.device_put(np.asarray(data.test_labels, np.int32), device)
        state = create_train_state(model, jax.random.key(config.seed), config.lr, X_train[:1])
        state = jax.device_put(state, device)
    first, past = 1, []
    if run is not None and run.resuming:
        state, done, past = load_checkpoint(run.require_checkpoint(), state)
        state = jax.device_put(state, device)
        run.resumed(past)
        first = done + 1
    n = int(X_train.shape[0])
    batches = batch_slices(n, config.batch_size)
    seen = sum(size for _, size in batches)
    k = resolve_steps_per_call(config.steps_per_call, device, len(batches))
    t_compile = time.perf_counter()
    with jax.default_device(device):  # ahead of time: the first epoch's examples/sec is training only
        compiled = compile_steps(state, X_train, y_train, batch_size=config.batch_size, steps_per_call=k)
    compile_seconds = time.perf_counter() - t_compile
    history = []
    for epoch in range(first, config.epochs + 1):
        steps = train_steps(state, X_train, y_train, seed=config.seed, batch_size=config.batch_size, epochs=(epoch,),
                            device=device, steps_per_call=k, compiled=compiled)  # fmt: skip
        t0 = time.perf_counter()
        calls = []  # each compiled call's losses, read once at the end of the epoch
        for s in bar(steps, f"epoch {epoch}/{config.epochs}", config.progress, total=len(batches)):
            if s.ends_call:
                calls.append(s.call_losses)
        state, perm = s.state, s.perm
        loss_sum, correct = (float(v) for v in np.asarray(s.totals))  # the one sync per epoch
        seconds = time.perf_counter() - t0
        precise, t1 = None, time.perf_counter()
        if config.precise_bn:
            precise = _precise_test_acc(config, family, model, state, X_train, np.asarray(perm), X_test, y_test)
        m = epoch_metrics(config, epoch, loss_sum, correct, seen, seconds, evaluate(state, X_test, y_test),
                          device_name(device), test_acc_precise=precise, precise_seconds=time.perf_counter() - t1)  # fmt: skip
        m["step_losses"] = np.asarray(jnp.concatenate(calls), np.float64).tolist()
        m["compile_seconds"] = compile_seconds if epoch == first else 0.0
        check_finite_loss(epoch, m["step_losses"])
        history.append(m)
        on_epoch(m)
        if run is not None:
            save_checkpoint(run.checkpoint, state, epoch, past + history, run.run_id)
    return history


def save_checkpoint(path: str, state, epoch: int, history: List[Dict], run_id=None) -> None:
    """The run's state after ``epoch`` (a TrainState: ``params``, ``batch_stats``, optimizer
    state and step; or a dict of such trees), with ``flax.serialization``, the metrics so far and
    the id of the run it belongs to, written atomically: a kill leaves the previous checkpoint."""
    import json

    from flax import serialization

    from bnref import _io

    payload = {"epoch": epoch, "state": serialization.to_state_dict(jax.device_get(state)),
               "history": json.dumps(_io.strict_json(history))}  # fmt: skip
    if run_id is not None:  # msgpack has no None leaf that flax restores as such: left out instead
        payload["run_id"] = run_id
    _io.atomic_write_bytes(path, serialization.msgpack_serialize(payload))


def check_checkpoint(path: str, config, run_id, family: Family = LINEN) -> int:
    """The epoch of the checkpoint at ``path`` after checking that it resumes the run ``run_id``
    of ``config``: a readable msgpack checkpoint of bnref's that names that run (one without a
    run id only for a run without one, written before runs had ids), whose arrays have the
    names and shapes of ``config``'s training state (one device's TrainState, or a data-parallel
    run's params, optimizer state and per-device or shared statistics). ``ValueError`` naming the
    file otherwise. Run before any data loads."""
    from flax import serialization

    from bnref.runs import check_run_id

    raw = _read_checkpoint(path)
    check_run_id(path, raw.get("run_id"), run_id)
    model = family.make(config)
    state = create_train_state(model, jax.random.key(0), config.lr, jnp.zeros((1, 28, 28, 1), jnp.float32))
    if config.replicas == 1:
        template = serialization.to_state_dict(state)
    else:
        stats = state.batch_stats
        if not config.sync_bn:  # one set of statistics per device, stacked on a leading axis
            stats = jax.tree.map(lambda a: np.zeros((config.replicas, *a.shape), a.dtype), stats)
        template = serialization.to_state_dict({"params": state.params, "opt_state": state.opt_state, "batch_stats": stats})
    _same_layout(raw["state"], template, path, config)
    return int(raw["epoch"])


def _same_layout(saved, template, path: str, config, where: str = "") -> None:
    """``ValueError`` at the first name or shape in which ``saved`` (a restored state dict) differs
    from ``template``."""
    if isinstance(template, dict):
        if not isinstance(saved, dict) or set(saved) != set(template):
            have = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"{path}: does not fit this run's model (--bn {config.bn}, {config.replicas} replica(s)): "
                             f"state{where} has {have}, expected {sorted(template)}")  # fmt: skip
        for key in template:
            _same_layout(saved[key], template[key], path, config, f"{where}/{key}")
        return
    if np.shape(saved) != np.shape(template):
        raise ValueError(f"{path}: does not fit this run's model: state{where} has shape {np.shape(saved)}, "
                         f"expected {np.shape(template)}")  # fmt: skip


def load_checkpoint(path: str, state):
    """``(state, epoch, history)`` from :func:`save_checkpoint`'s file, ``state`` giving the
    structure (a freshly created TrainState of the same model, or a dict like the one saved)."""
    import json

    from flax import serialization

    raw = _read_checkpoint(path)
    return serialization.from_state_dict(state, raw["state"]), int(raw["epoch"]), json.loads(raw["history"])


def checkpoint_variables(path: str, per_device_stats: bool = False) -> Dict:
    """The model's ``{"params", "batch_stats"}`` from :func:`save_checkpoint`'s file (one
    device's TrainState, or a data-parallel run's state), as evaluation uses them. A
    data-parallel run with local BN keeps one set of statistics per device, stacked on a
    leading axis: with ``per_device_stats`` they are averaged across devices, as that run's
    evaluation does."""
    state = _read_checkpoint(path)["state"]
    stats = state.get("batch_stats", {})
    if per_device_stats:
        stats = jax.tree.map(lambda a: np.mean(a, axis=0), stats)
    return {"params": state["params"], "batch_stats": stats}


def _read_checkpoint(path: str) -> Dict:
    """The checkpoint's contents; ``ValueError`` naming the file when it is not a msgpack
    checkpoint of bnref's (another backend's, corrupt, truncated)."""
    from flax import serialization

    try:
        with open(path, "rb") as f:
            raw = serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001 - msgpack raises many kinds on a file that is not its own
        raise ValueError(f"{path}: not a readable JAX checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict) or not {"epoch", "state", "history"} <= set(raw):
        raise ValueError(f"{path}: not a bnref JAX checkpoint (expected epoch, state, history)")
    return raw


def _precise_test_acc(config, family: Family, model, state: TrainState, X_train, perm: np.ndarray, X_test,
                      y_test) -> float:  # fmt: skip
    """Test accuracy with ``batch_stats`` recomputed over the epoch's training batches
    (``family.precise``: :func:`bnref.jax.precise_batch_stats` for linen); ``state`` keeps its
    running averages, so training goes on exactly as without precise BN."""
    from bnref.schedule import precise_batch_indices

    batches = [X_train[i] for i in precise_batch_indices(config, perm)]  # on the device, or on the host
    stats = family.precise(model, {"params": state.params, "batch_stats": state.batch_stats}, batches,
                           variant=config.precise_variant, progress=config.progress)  # fmt: skip
    return evaluate(state.replace(batch_stats=stats), X_test, y_test)


def _fit_replicated(config, data, on_epoch: Callable[[Dict], None], run=None, family: Family = LINEN) -> List[Dict]:
    """Data-parallel training over ``config.replicas`` devices with a ``Mesh`` and
    ``jax.shard_map``: the same example order and global batches as one device, each split into
    equal consecutive slices. With ``config.sync_bn`` the BN layers take ``axis_name`` (global
    statistics, identical on every device); without, each device keeps its own running
    statistics, averaged across devices before evaluation (``cross_replica_mean``, what Flax's
    examples do)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = distributed.replica_devices(config, resolve_device(config.device).platform)
    mesh = Mesh(np.array(devices), (distributed.AXIS,))
    replicated = NamedSharding(mesh, P())
    sync = bool(config.sync_bn)
    model = family.make(config, axis_name=distributed.AXIS if sync else None)
    sharded = NamedSharding(mesh, P(distributed.AXIS))
    batches_of = distributed.batches_on_mesh(prepare_images(data.train_images), np.asarray(data.train_labels, np.int32),
                                              sharded, devices)  # fmt: skip
    X_test, y_test = jnp.asarray(prepare_images(data.test_images)), jnp.asarray(np.asarray(data.test_labels, np.int32))
    state = create_train_state(family.make(config), jax.random.key(config.seed), config.lr,
                               prepare_images(data.train_images[:1]))  # fmt: skip
    (params, opt_state, stats), step = distributed.data_parallel(state, model, mesh, config.batch_size, sync)
    cross_replica_mean = jax.jit(lambda s: jax.tree.map(lambda a: a.mean(0), s), out_shardings=replicated)
    first, past = 1, []
    if run is not None and run.resuming:  # every process loads the checkpoint process 0 wrote
        template = {"params": state.params, "opt_state": state.opt_state, "batch_stats": jax.tree.map(distributed.gathered, stats)}
        saved, done, past = load_checkpoint(run.require_checkpoint(), template)
        params, opt_state = jax.device_put((saved["params"], saved["opt_state"]), replicated)
        stats = jax.device_put(saved["batch_stats"], NamedSharding(mesh, P() if sync else P(distributed.AXIS)))
        run.resumed(past)
        first = done + 1
    n = len(data.train_labels)
    batches = batch_slices(n, config.batch_size)
    seen = sum(size for _, size in batches)
    X_host = prepare_images(data.train_images) if config.precise_bn else None  # precise BN goes over it
    plain = family.make(config)  # evaluation needs no axis
    t_compile = time.perf_counter()  # ahead of time, as on one device: examples/sec is training only
    sample = batches_of(epoch_permutation(config.seed, first, n))(0, batches[0][1])
    step = step.lower(params, opt_state, stats, jax.device_put(jnp.zeros(2, jnp.float32), replicated), *sample).compile()
    compile_seconds = time.perf_counter() - t_compile
    history = []
    for epoch in range(first, config.epochs + 1):
        perm = epoch_permutation(config.seed, epoch, n)
        global_batch = batches_of(perm)
        totals = jax.device_put(jnp.zeros(2, jnp.float32), replicated)
        losses = []
        t0 = time.perf_counter()
        for start, size in batches:
            Xb, yb = global_batch(start // size, size)  # consecutive slices, one per device
            params, opt_state, stats, totals, loss = step(params, opt_state, stats, totals, Xb, yb)
            losses.append(loss)
            # Bound the steps in flight: on a CPU each device's collective holds a thread of a
            # pool as small as the core count while it waits for the others, and with hundreds
            # of steps queued the devices' threads blocked each other until XLA's 40 s
            # rendezvous limit aborted the process (full Fashion-MNIST, R = 2, 2 cores).
            distributed.wait_for_step(loss, epoch, len(losses))
        loss_sum, correct = (float(v) for v in distributed.local_copy(totals))
        step_losses = [float(distributed.local_copy(v)) for v in losses]
        seconds = time.perf_counter() - t0
        eval_stats = stats if sync else cross_replica_mean(stats)
        eval_state = state.replace(params=jax.tree.map(distributed.local_copy, params), batch_stats=jax.tree.map(distributed.local_copy, eval_stats))
        test_acc = evaluate(eval_state, X_test, y_test)  # every process, on its own first device
        precise, t1 = None, time.perf_counter()
        if config.precise_bn:  # every process, the same batches: the same statistics
            precise = _precise_test_acc(config, family, plain, eval_state, X_host, perm, X_test, y_test)
        where = f"{config.replicas} x {devices[0].platform}"
        if jax.process_count() > 1:
            where += f" in {jax.process_count()} processes"
        m = epoch_metrics(config, epoch, loss_sum, correct, seen, seconds, test_acc, where,
                          test_acc_precise=precise, precise_seconds=time.perf_counter() - t1)  # fmt: skip
        m["step_losses"] = step_losses
        m["compile_seconds"] = compile_seconds if epoch == first else 0.0
        check_finite_loss(epoch, step_losses)
        history.append(m)
        # Every process gathers, checkpoint or not: for local BN across processes the gather is
        # a collective, and only process 0 holds the run directory.
        trained = {"params": eval_state.params, "opt_state": jax.tree.map(distributed.gathered, opt_state),
                   "batch_stats": jax.tree.map(distributed.gathered, stats)}  # fmt: skip
        if jax.process_index() == 0:  # several processes: the first reports (they all hold the same numbers)
            on_epoch(m)
            if run is not None:
                save_checkpoint(run.checkpoint, trained, epoch, past + history, run.run_id)
    return history if jax.process_index() == 0 else []


