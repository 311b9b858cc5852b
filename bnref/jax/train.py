"""Training LeNet-BN with JAX/Flax: ``fit(config, data, on_epoch)`` for ``bnref.train``.

The pieces are public so that other code (the cross-framework trajectory comparison, the
benchmark) can drive the same steps:

- :func:`resolve_device`, :func:`make_model`, :func:`prepare_images`;
- :class:`TrainState`: Flax's ``TrainState`` (params, optax SGD state) plus ``batch_stats``;
- :func:`create_train_state`;
- :func:`train_step` ``(state, X, y) -> (state, loss, correct)``: one jitted SGD step that
  applies the model with ``mutable=["batch_stats"]`` and returns the updated statistics in
  the new state (the state's buffers are donated);
- :func:`eval_step` ``(state, X) -> logits`` with ``train=False`` (running statistics).

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

import functools
import time
from typing import Any, Callable, Dict, List

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from bnref._progress import bar
from bnref.jax.models import LeNetBN
from bnref.schedule import batch_slices, check_finite_loss, epoch_metrics, epoch_permutation

__all__ = [
    "TrainState",
    "resolve_device",
    "device_name",
    "make_model",
    "prepare_images",
    "create_train_state",
    "train_step",
    "eval_step",
    "fit",
    "replica_devices",
    "join_processes",
    "check_coordinator",
    "replicate_state",
    "data_parallel_step",
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


def make_model(config) -> LeNetBN:
    """The LeNet-BN of ``config`` (``bn`` and ``convention``)."""
    return LeNetBN(bn=config.bn, convention=config.bn_convention)


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
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    correct = (jnp.argmax(logits, -1) == y).sum()
    return state, loss, correct


@functools.partial(jax.jit, donate_argnums=(0,))
def train_step(state: TrainState, X, y):
    """One SGD step on the batch ``X`` (B, 28, 28, 1), ``y`` (B,) int: ``(state, loss, correct)``.

    ``loss`` is the batch's mean cross-entropy, ``correct`` the number of right predictions
    (training mode). ``state`` is donated: do not reuse it after the call.
    """
    return _loss_and_updates(state, X, y)


@jax.jit
def eval_step(state: TrainState, X):
    """Logits of ``X`` with the running statistics (``train=False``): (B, 10)."""
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, X, train=False)


@functools.partial(jax.jit, static_argnames=("batch_size",), donate_argnums=(0, 1))
def _fit_step(state: TrainState, totals, X_all, y_all, perm, i, *, batch_size: int):
    """:func:`train_step` on rows ``perm[i*B:(i+1)*B]`` of the on-device dataset, adding the
    batch's loss sum and number correct to ``totals`` (both donated, kept on the device);
    also returns the batch's mean loss."""
    idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)  # (B,) example indices
    X, y = X_all[idx], y_all[idx]  # (B, 28, 28, 1), (B,): gathered on the device
    state, loss, correct = _loss_and_updates(state, X, y)
    return state, totals + jnp.stack([loss * batch_size, correct.astype(jnp.float32)]), loss


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


def fit(config, data, on_epoch: Callable[[Dict], None], run=None) -> List[Dict]:
    """Train ``make_model(config)`` on ``data`` (a ``bnref.data.FashionMNIST``) for
    ``config.epochs`` epochs; ``on_epoch(metrics)`` after each; returns all metrics.
    ``config.replicas > 1``: data parallel over that many devices (:func:`_fit_replicated`).

    ``run`` (a :class:`bnref.runs.RunDir`): a checkpoint after every epoch, and with
    ``run.resuming`` the run starts from its checkpoint. On one device the step is compiled
    ahead of the first epoch: ``compile_seconds`` (epoch 1) is that time, and
    ``examples_per_sec`` excludes it."""
    if config.replicas > 1:
        join_processes(config)  # a no-op unless this is one process of several (and has not joined yet)
        return _fit_replicated(config, data, on_epoch, run)
    device = resolve_device(config.device)
    model = make_model(config)
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
    t_compile = time.perf_counter()
    with jax.default_device(device):  # ahead of time: the first epoch's examples/sec is training only
        step = _fit_step.lower(state, jnp.zeros(2, jnp.float32), X_train, y_train, jnp.zeros(n, jnp.int32), 0,
                               batch_size=batches[0][1]).compile()  # fmt: skip
    compile_seconds = time.perf_counter() - t_compile
    history = []
    for epoch in range(first, config.epochs + 1):
        perm = jax.device_put(epoch_permutation(config.seed, epoch, n), device)  # (N,) example order
        totals = jax.device_put(jnp.zeros(2, jnp.float32), device)  # loss sum, number correct
        steps = bar(batches, f"epoch {epoch}/{config.epochs}", config.progress)
        t0 = time.perf_counter()
        losses = []
        for start, size in steps:  # equal sizes: one compiled step
            state, totals, loss = step(state, totals, X_train, y_train, perm, start // size)
            losses.append(loss)
        loss_sum, correct = (float(v) for v in np.asarray(totals))  # the one sync per epoch
        seconds = time.perf_counter() - t0
        precise, t1 = None, time.perf_counter()
        if config.precise_bn:
            precise = _precise_test_acc(config, model, state, X_train, np.asarray(perm), X_test, y_test)
        m = epoch_metrics(config, epoch, loss_sum, correct, seen, seconds, evaluate(state, X_test, y_test),
                          device_name(device), test_acc_precise=precise, precise_seconds=time.perf_counter() - t1)  # fmt: skip
        m["step_losses"] = np.asarray(jnp.stack(losses), np.float64).tolist()
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


def check_checkpoint(path: str, config, run_id) -> int:
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
    model = make_model(config)
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


def _precise_test_acc(config, model, state: TrainState, X_train, perm: np.ndarray, X_test, y_test) -> float:
    """Test accuracy with ``batch_stats`` recomputed over the epoch's training batches
    (:func:`bnref.jax.precise_batch_stats`); ``state`` keeps its running averages, so training
    goes on exactly as without precise BN."""
    from bnref.jax.precise import precise_batch_stats
    from bnref.schedule import precise_batch_indices

    batches = [X_train[i] for i in precise_batch_indices(config, perm)]  # on the device, or on the host
    stats = precise_batch_stats(model, {"params": state.params, "batch_stats": state.batch_stats}, batches,
                                variant=config.precise_variant, progress=config.progress)  # fmt: skip
    return evaluate(state.replace(batch_stats=stats), X_test, y_test)


AXIS = "batch"  # the mesh axis replicas are laid out along

def check_coordinator(config) -> None:
    """Process 0 of a multi-process run: ``ValueError`` if the ``--coordinator`` port cannot be
    listened on (another program has it), checked before JAX is asked to.

    Process 0 runs JAX's coordination service, which listens on every interface at that port
    (``[::]:PORT``); when that fails, JAX 0.10 crashes the process (SIGSEGV, within a second)
    instead of raising. The other processes connect to the port: for them it being taken is
    the point, and there is nothing to check. (A port taken between this check and JAX's bind
    still crashes; that window is milliseconds.)"""
    if config.num_processes == 1 or config.process_id != 0:
        return
    import errno
    import socket

    port = int(config.coordinator.rpartition(":")[2])
    # As JAX binds: every interface, IPv6 with IPv4 mapped; IPv4 alone where the host has no IPv6.
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no such address family here
            continue
        with s:
            # SO_REUSEADDR as gRPC sets it: a port whose earlier connections linger in TIME_WAIT
            # is free for JAX, so it must be free here; one somebody listens on is refused anyway.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                s.bind((address, port))
                return
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    why = "is already in use" if e.errno == errno.EADDRINUSE else "needs privileges to listen on"
                    raise ValueError(f"--coordinator {config.coordinator}: port {port} {why}; process 0 listens "
                                     "there (pick a free port for the whole run)") from None  # fmt: skip
                # another error (IPv6 present but unusable): try IPv4, as JAX's server would


def join_processes(config) -> None:
    """Join a multi-process JAX run (``config.coordinator``, ``num_processes``, ``process_id``):
    ``jax.distributed.initialize``, with CPU collectives across processes over gloo (the CPU's
    only cross-process implementation; GPUs use NCCL regardless). Must run before anything
    starts JAX's backends. A process whose peers do not join within ``config.join_timeout_s``
    is aborted by JAX (DEADLINE_EXCEEDED, exit status 134): it never hangs."""
    if config.num_processes == 1 or jax.distributed.is_initialized():
        return
    check_coordinator(config)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=config.coordinator, num_processes=config.num_processes,
                               process_id=config.process_id, initialization_timeout=config.join_timeout_s)  # fmt: skip


def replica_devices(config) -> List[jax.Device]:
    """``config.replicas`` devices of ``config.device``'s platform, or ``ValueError`` saying how
    many there are (on a CPU the CLI provides host devices before JAX starts)."""
    platform = resolve_device(config.device).platform
    devices = jax.devices(platform)  # every process's, in a multi-process run
    if jax.process_count() > 1 and len(devices) != config.replicas:
        raise ValueError(f"--replicas {config.replicas} must be every device of the {jax.process_count()} processes: "
                         f"they have {len(devices)} {platform} devices")  # fmt: skip
    if len(devices) < config.replicas:
        hint = (" (on a CPU, `python -m bnref.train --replicas R` provides R host devices itself, as long as "
                "JAX has not started in that process yet)") if platform == "cpu" else ""  # fmt: skip
        raise ValueError(f"--replicas {config.replicas} needs {config.replicas} {platform} devices; JAX has "
                         f"{len(devices)}{hint}")  # fmt: skip
    return devices[: config.replicas]


def _replicated_step(model, tx, batch_size: int, replicas: int, sync: bool):
    """One data-parallel SGD step under ``shard_map``: parameters replicated, each device gathering
    its slice of the global batch, BN statistics synchronized through ``axis_name`` (or each
    device's own), the gradient that of the global mean loss (averaged over devices)."""
    local = batch_size // replicas

    def step(params, opt_state, stats, totals, X, y):  # X, y: this device's slice of the global batch
        own = stats if sync else jax.tree.map(lambda a: a[0], stats)  # (1, C) per device -> (C,)

        def loss_fn(p):
            logits, updates = model.apply({"params": p, "batch_stats": own}, X, train=True, mutable=["batch_stats"])
            local_loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            # The global batch's mean loss (equal slices). Differentiated with respect to the
            # replicated parameters, shard_map's transpose sums over devices itself: the
            # gradients come out replicated, with no explicit pmean (one would count R times).
            return jax.lax.pmean(local_loss, AXIS), (local_loss, logits, updates["batch_stats"])

        (_, (loss, logits, new)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        new = new if sync else jax.tree.map(lambda a: a[None], new)
        correct = (jnp.argmax(logits, -1) == y).sum().astype(jnp.float32)
        totals = totals + jax.lax.psum(jnp.stack([loss * local, correct]), AXIS)
        return params, opt_state, new, totals, jax.lax.pmean(loss, AXIS)

    return step


def replicate_state(state: TrainState, mesh, sync: bool):
    """``(params, opt_state, batch_stats)`` of ``state`` laid out on ``mesh`` for
    :func:`data_parallel_step`: parameters and optimizer state replicated; the statistics
    replicated when ``sync``, else one copy per device along the mesh axis (leading axis R)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    params, opt_state = jax.device_put((state.params, state.opt_state), NamedSharding(mesh, P()))
    stats = state.batch_stats
    if not sync:
        stats = jax.tree.map(lambda a: jnp.broadcast_to(a, (mesh.size,) + a.shape), stats)
    return params, opt_state, jax.device_put(stats, NamedSharding(mesh, P() if sync else P(AXIS)))


def data_parallel_step(model, tx, mesh, batch_size: int, sync: bool):
    """The jitted data-parallel SGD step over ``mesh`` (one axis, :data:`AXIS`):
    ``step(params, opt_state, stats, totals, X, y) -> (params, opt_state, stats, totals, loss)``
    with ``X``, ``y`` the global batch sharded along the axis, ``loss`` the global batch's mean
    and ``totals`` += (loss sum, number correct). ``model`` has ``axis_name=AXIS`` when ``sync``;
    the state comes from :func:`replicate_state`; the first four arguments are donated."""
    from jax.sharding import PartitionSpec as P

    stats_spec = P() if sync else P(AXIS)
    return jax.jit(
        jax.shard_map(_replicated_step(model, tx, batch_size, mesh.size, sync), mesh=mesh,
                      in_specs=(P(), P(), stats_spec, P(), P(AXIS), P(AXIS)),
                      out_specs=(P(), P(), stats_spec, P(), P())),
        donate_argnums=(0, 1, 2, 3),
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _gather_batch(X_all, y_all, perm, i, *, batch_size: int):
    idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)  # (B,) example indices
    return X_all[idx], y_all[idx]


def _fit_replicated(config, data, on_epoch: Callable[[Dict], None], run=None) -> List[Dict]:
    """Data-parallel training over ``config.replicas`` devices with a ``Mesh`` and
    ``jax.shard_map``: the same example order and global batches as one device, each split into
    equal consecutive slices. With ``config.sync_bn`` the BN layers take ``axis_name`` (global
    statistics, identical on every device); without, each device keeps its own running
    statistics, averaged across devices before evaluation (``cross_replica_mean``, what Flax's
    examples do)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = replica_devices(config)
    mesh = Mesh(np.array(devices), (AXIS,))
    replicated = NamedSharding(mesh, P())
    sync = bool(config.sync_bn)
    model = LeNetBN(bn=config.bn, convention=config.bn_convention, axis_name=AXIS if sync else None)
    sharded = NamedSharding(mesh, P(AXIS))
    batches_of = _batches_on_mesh(data, sharded, devices)
    X_test, y_test = jnp.asarray(prepare_images(data.test_images)), jnp.asarray(np.asarray(data.test_labels, np.int32))
    state = create_train_state(LeNetBN(bn=config.bn, convention=config.bn_convention), jax.random.key(config.seed),
                               config.lr, prepare_images(data.train_images[:1]))  # fmt: skip
    params, opt_state, stats = replicate_state(state, mesh, sync)
    step = data_parallel_step(model, state.tx, mesh, config.batch_size, sync)
    cross_replica_mean = jax.jit(lambda s: jax.tree.map(lambda a: a.mean(0), s), out_shardings=replicated)
    first, past = 1, []
    if run is not None and run.resuming:  # every process loads the checkpoint process 0 wrote
        template = {"params": state.params, "opt_state": state.opt_state, "batch_stats": jax.tree.map(_gathered, stats)}
        saved, done, past = load_checkpoint(run.require_checkpoint(), template)
        params, opt_state = jax.device_put((saved["params"], saved["opt_state"]), replicated)
        stats = jax.device_put(saved["batch_stats"], NamedSharding(mesh, P() if sync else P(AXIS)))
        run.resumed(past)
        first = done + 1
    n = len(data.train_labels)
    batches = batch_slices(n, config.batch_size)
    seen = sum(size for _, size in batches)
    X_host = prepare_images(data.train_images) if config.precise_bn else None  # precise BN goes over it
    plain = LeNetBN(bn=config.bn, convention=config.bn_convention)  # evaluation needs no axis
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
            _wait(loss, epoch, len(losses))
        loss_sum, correct = (float(v) for v in _local_copy(totals))
        step_losses = [float(_local_copy(v)) for v in losses]
        seconds = time.perf_counter() - t0
        eval_stats = stats if sync else cross_replica_mean(stats)
        eval_state = state.replace(params=jax.tree.map(_local_copy, params), batch_stats=jax.tree.map(_local_copy, eval_stats))
        test_acc = evaluate(eval_state, X_test, y_test)  # every process, on its own first device
        precise, t1 = None, time.perf_counter()
        if config.precise_bn:  # every process, the same batches: the same statistics
            precise = _precise_test_acc(config, plain, eval_state, X_host, perm, X_test, y_test)
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
        trained = {"params": eval_state.params, "opt_state": jax.tree.map(_gathered, opt_state),
                   "batch_stats": jax.tree.map(_gathered, stats)}  # fmt: skip
        if jax.process_index() == 0:  # several processes: the first reports (they all hold the same numbers)
            on_epoch(m)
            if run is not None:
                save_checkpoint(run.checkpoint, trained, epoch, past + history, run.run_id)
    return history if jax.process_index() == 0 else []


def _gathered(a) -> np.ndarray:
    """The whole of a global array on this host: its local copy when replicated, else every
    device's part gathered (local BN's per-device statistics, across processes too)."""
    if a.is_fully_replicated:
        return _local_copy(a)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def _wait(loss, epoch: int, step: int) -> None:
    """Wait for a step; in a multi-process run, a collective that failed (a peer died: "Connection
    reset by peer") becomes an error naming this process, the epoch and the step."""
    try:
        loss.block_until_ready()
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        raise RuntimeError(f"process {jax.process_index()} of {jax.process_count()}: epoch {epoch}, step {step} failed "
                           f"(did another process die?): {str(e).splitlines()[0]}") from e  # fmt: skip


def _local_copy(a) -> np.ndarray:
    """This process's copy of a replicated array (every process of a multi-process run holds one)."""
    return np.asarray(a.addressable_data(0))


def _batches_on_mesh(data, sharded, devices):
    """``batches_of(perm) -> global_batch(i, size)``: rows ``perm[i*size:(i+1)*size]`` of the
    training set (``perm``: an epoch's example order) as two arrays laid out along the mesh, a
    consecutive slice per device.

    One process: the dataset stays on the first device (not R copies of 188 MB) and each batch is
    gathered there, then laid out. Several processes: every process holds the dataset on the
    host (it loaded it) and gives each of its devices that device's slice of the batch."""
    if jax.process_count() == 1:
        X_train = jax.device_put(prepare_images(data.train_images), devices[0])
        y_train = jax.device_put(np.asarray(data.train_labels, np.int32), devices[0])

        def batches_of(perm):
            perm = jax.device_put(perm, devices[0])
            return lambda i, size: jax.device_put(_gather_batch(X_train, y_train, perm, i, batch_size=size), sharded)

        return batches_of
    X_host, y_host = prepare_images(data.train_images), np.asarray(data.train_labels, np.int32)

    def batches_of(perm):
        def global_batch(i, size):
            idx = perm[i * size : (i + 1) * size]
            Xb, yb = X_host[idx], y_host[idx]
            return (jax.make_array_from_callback(Xb.shape, sharded, lambda index: Xb[index]),
                    jax.make_array_from_callback(yb.shape, sharded, lambda index: yb[index]))  # fmt: skip

        return global_batch

    return batches_of
