"""Data parallelism in JAX: the twin of :mod:`bnref.torch.distributed`.

What it owns, role by role as in torch's:

- joining the processes of a multi-process run (:func:`join_processes`, ``jax.distributed``;
  torch: ``init_from_env``) after checking the coordinator's port (:func:`check_coordinator`);
- the replicas' devices (:func:`replica_devices`; torch: one process per replica,
  ``launch``) laid out along one mesh axis, :data:`AXIS`, the ``axis_name`` synchronized BN
  reduces over;
- :func:`data_parallel`: a model's state and its SGD step made data parallel (torch: DDP
  around the model, its BN layers made ``SyncBatchNorm``): ``jax.shard_map`` over the mesh, each
  device taking a consecutive slice of every global batch;
- the host side of a sharded run: a global batch laid out on the mesh, waiting for a step
  with an error that names the process, gathering an array's copies.

The training loop over these is ``bnref.jax.train.fit`` (``_fit_replicated``), as torch's is
``bnref.torch.train.fit``. The CPU's host devices must be asked for before JAX starts:
``bnref.backends.provide_host_devices`` (framework-free) does that.
"""

from __future__ import annotations

import functools
from typing import List

import numpy as np

import jax
import jax.numpy as jnp
import optax

__all__ = ["AXIS", "check_coordinator", "join_processes", "replica_devices", "data_parallel", "batches_on_mesh",
           "wait_for_step", "local_copy", "gathered"]

#: the mesh axis replicas are laid out along (the ``axis_name`` of synchronized BN)
AXIS = "batch"


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


def replica_devices(config, platform: str) -> List[jax.Device]:
    """``config.replicas`` devices of ``platform`` (``config.device``'s), or ``ValueError`` saying
    how many there are (on a CPU the CLI provides host devices before JAX starts)."""
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


def _replicate_state(state, mesh, sync: bool):
    """``(params, opt_state, batch_stats)`` of ``state`` laid out on ``mesh`` for the step of
    :func:`data_parallel`: parameters and optimizer state replicated; the statistics
    replicated when ``sync``, else one copy per device along the mesh axis (leading axis R)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    params, opt_state = jax.device_put((state.params, state.opt_state), NamedSharding(mesh, P()))
    stats = state.batch_stats
    if not sync:
        stats = jax.tree.map(lambda a: jnp.broadcast_to(a, (mesh.size,) + a.shape), stats)
    return params, opt_state, jax.device_put(stats, NamedSharding(mesh, P() if sync else P(AXIS)))


def data_parallel(state, model, mesh, batch_size: int, sync_bn: bool):
    """``((params, opt_state, stats), step)``: ``state`` (a ``bnref.jax.train.TrainState``) laid
    out on ``mesh`` (one axis, :data:`AXIS`) and the jitted data-parallel SGD step over it,
    ``step(params, opt_state, stats, totals, X, y) -> (params, opt_state, stats, totals, loss)``
    with ``X``, ``y`` the global batch of ``batch_size`` sharded along the axis, ``loss`` the
    global batch's mean and ``totals`` += (loss sum, number correct); the first four arguments
    are donated. Parameters and optimizer state are replicated; ``model`` has ``axis_name=AXIS``
    when ``sync_bn`` (the statistics replicated, the same on every device), else each device
    keeps its own statistics (leading axis R, laid out along the mesh). The torch twin is
    ``bnref.torch.distributed.data_parallel``."""
    from jax.sharding import PartitionSpec as P

    sync, tx = sync_bn, state.tx
    stats_spec = P() if sync else P(AXIS)
    return _replicate_state(state, mesh, sync), jax.jit(
        jax.shard_map(_replicated_step(model, tx, batch_size, mesh.size, sync), mesh=mesh,
                      in_specs=(P(), P(), stats_spec, P(), P(AXIS), P(AXIS)),
                      out_specs=(P(), P(), stats_spec, P(), P())),
        donate_argnums=(0, 1, 2, 3),
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _gather_batch(X_all, y_all, perm, i, *, batch_size: int):
    idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)  # (B,) example indices
    return X_all[idx], y_all[idx]


def gathered(a) -> np.ndarray:
    """The whole of a global array on this host: its local copy when replicated, else every
    device's part gathered (local BN's per-device statistics, across processes too)."""
    if a.is_fully_replicated:
        return local_copy(a)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def wait_for_step(loss, epoch: int, step: int) -> None:
    """Wait for a step; in a multi-process run, a collective that failed (a peer died: "Connection
    reset by peer") becomes an error naming this process, the epoch and the step."""
    try:
        loss.block_until_ready()
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        raise RuntimeError(f"process {jax.process_index()} of {jax.process_count()}: epoch {epoch}, step {step} failed "
                           f"(did another process die?): {str(e).splitlines()[0]}") from e  # fmt: skip


def local_copy(a) -> np.ndarray:
    """This process's copy of a replicated array (every process of a multi-process run holds one)."""
    return np.asarray(a.addressable_data(0))


def batches_on_mesh(X_host, y_host, sharded, devices):
    """``batches_of(perm) -> global_batch(i, size)``: rows ``perm[i*size:(i+1)*size]`` of the
    training set ``X_host`` (N, 28, 28, 1), ``y_host`` (N,) (``perm``: an epoch's example order)
    as two arrays laid out along the mesh, a consecutive slice per device.

    One process: the dataset stays on the first device (not R copies of 188 MB) and each batch is
    gathered there, then laid out. Several processes: every process holds the dataset on the
    host (it loaded it) and gives each of its devices that device's slice of the batch."""
    if jax.process_count() == 1:
        X_train, y_train = jax.device_put((X_host, y_host), devices[0])

        def batches_of(perm):
            perm = jax.device_put(perm, devices[0])
            return lambda i, size: jax.device_put(_gather_batch(X_train, y_train, perm, i, batch_size=size), sharded)

        return batches_of

    def batches_of(perm):
        def global_batch(i, size):
            idx = perm[i * size : (i + 1) * size]
            Xb, yb = X_host[idx], y_host[idx]
            return (jax.make_array_from_callback(Xb.shape, sharded, lambda index: Xb[index]),
                    jax.make_array_from_callback(yb.shape, sharded, lambda index: yb[index]))  # fmt: skip

        return global_batch

    return batches_of
