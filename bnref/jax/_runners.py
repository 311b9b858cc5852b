"""Runners that plug the JAX backend into ``bnref.testing`` (the one parity helper).

Each runner is ``run(inputs, convention, axis, dtype, train) -> dict`` of NumPy arrays: ``y``,
``running_mean``, ``running_var`` and, in training, ``dx``, ``dgamma``, ``dbeta``, the
gradients of ``sum(y * dy)`` computed with ``jax.grad`` under ``jax.jit``.

Dtypes: ``y`` and ``dx`` come back in the backend dtype ``dtype``. The running statistics are
fed in and returned in the statistics dtype (float32 for float32/float16/bfloat16 inputs, as
Flax's ``batch_stats``; float64 for float64) and then cast to ``dtype`` for the comparison, so
for half types the reported error includes that final rounding. ``gamma``/``beta`` (and so
``dgamma``/``dbeta``) are in ``dtype``.

float64 needs x64: each runner enables it for its own duration with the ``bnref.jax.compat.x64``
context manager (never globally: the rest of a test session trains in float32).
"""

from __future__ import annotations

import functools

import numpy as np

from bnref import spec
from bnref.jax.compat import x64
from bnref.testing import NotExpressible

__all__ = ["run_functional", "run_layer", "run_builtin", "RUNNERS"]


def _prepare(inputs, dtype: str, param_dtype=None):
    import jax.numpy as jnp

    jdt, pdt = jnp.dtype(dtype), jnp.dtype(param_dtype or dtype)
    sdt = jnp.promote_types(jdt, jnp.float32)  # statistics dtype
    x, dy = (jnp.asarray(np.asarray(inputs[k]), jdt) for k in ("x", "dy"))
    gamma, beta = (jnp.asarray(np.asarray(inputs[k]), pdt) for k in ("gamma", "beta"))
    rm = jnp.asarray(np.asarray(inputs["running_mean"]), sdt)
    rv = jnp.asarray(np.asarray(inputs["running_var"]), sdt)
    return x, gamma, beta, rm, rv, dy


def _to_numpy(out, dtype: str):
    return {k: np.asarray(v.astype(dtype)) for k, v in out.items()}


def _run(forward, inputs, dtype, train, param_dtype=None):
    """``forward(x, gamma, beta, rm, rv) -> (y, new_rm, new_rv)``, jitted with its gradients;
    gamma and beta in ``param_dtype`` (default ``dtype``)."""
    import jax

    with x64(dtype == "float64"):
        x, gamma, beta, rm, rv, dy = _prepare(inputs, dtype, param_dtype)
        if not train:
            y, nrm, nrv = jax.jit(forward)(x, gamma, beta, rm, rv)
            return _to_numpy({"y": y, "running_mean": nrm, "running_var": nrv}, dtype)

        def loss(x, gamma, beta, rm, rv, dy):
            y, nrm, nrv = forward(x, gamma, beta, rm, rv)
            return (y * dy).sum(dtype=jax.numpy.promote_types(y.dtype, "float32")), (y, nrm, nrv)

        grads, (y, nrm, nrv) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, gamma, beta, rm, rv, dy)
        out = {"y": y, "running_mean": nrm, "running_var": nrv, "dx": grads[0], "dgamma": grads[1], "dbeta": grads[2]}
        return _to_numpy(out, dtype)


def run_functional(inputs, convention: spec.Convention, axis: int, dtype: str, train: bool, param_dtype=None):
    """``bnref.jax.batch_norm`` (``scale``/``bias`` in ``param_dtype``, default ``dtype``)."""
    from bnref.jax.functional import batch_norm

    fwd = functools.partial(batch_norm, train=train, convention=convention, axis=axis)
    return _run(fwd, inputs, dtype, train, param_dtype)


def _module_forward(module, train):
    """A ``forward`` for a Flax BN module: variables from the inputs, ``mutable=["batch_stats"]``."""

    def forward(x, gamma, beta, rm, rv):
        variables = {"params": {"scale": gamma, "bias": beta}, "batch_stats": {"mean": rm, "var": rv}}
        y, state = module.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])
        return y, state["batch_stats"]["mean"], state["batch_stats"]["var"]

    return forward


def run_layer(inputs, convention: spec.Convention, axis: int, dtype: str, train: bool, param_dtype=None):
    """``bnref.jax.BatchNorm`` via ``apply(..., mutable=["batch_stats"])`` with the given variables
    (``dtype=dtype, param_dtype=param_dtype``, default ``dtype``)."""
    import jax.numpy as jnp

    from bnref.jax.layers import BatchNorm

    pd = jnp.dtype(param_dtype or dtype)
    module = BatchNorm(axis=axis, convention=convention, dtype=jnp.dtype(dtype), param_dtype=pd)
    return _run(_module_forward(module, train), inputs, dtype, train, param_dtype)


def run_builtin(inputs, convention: spec.Convention, axis: int, dtype: str, train: bool, param_dtype=None):
    """``flax.linen.BatchNorm`` configured to ``convention`` (two-pass variance)."""
    import flax.linen as nn
    import jax.numpy as jnp

    if convention.running_var == "unbiased":
        raise NotExpressible("flax.linen always uses the biased variance in its running average")
    module = nn.BatchNorm(
        axis=axis,
        momentum=convention.decay,
        epsilon=convention.eps,
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(param_dtype or dtype),
        use_fast_variance=False,
    )
    return _run(_module_forward(module, train), inputs, dtype, train, param_dtype)


RUNNERS = {"functional": run_functional, "layer": run_layer, "builtin": run_builtin}


# --- data parallel: BN with axis_name over R devices (shard_map) ---------------------------------------


def run_sync_bn(shards, dys, gamma, beta, running_mean, running_var, convention: spec.Convention, dtype: str,
                builtin: bool = False, steps: int = 2, make_module=None, framework: str = "flax.linen"):
    """``bnref.jax.BatchNorm`` (or ``flax.linen.BatchNorm``) with ``axis_name``, one shard per device
    under ``shard_map``: ``steps`` training steps (gradients of ``sum(y * dy)``) then eval; the twin
    of ``bnref.torch._runners.run_sync_bn``.

    Shards are ``(n, C, L)`` NumPy arrays (channels first, as the spec's); the layer runs on
    ``(n, L, C)``. Returns, per step, each replica's ``y`` and ``dx`` and the running statistics,
    and the parameter gradients (global: shard_map's transpose sums them over devices).

    ``make_module(dtype, axis_name)``: another layer to run, with linen's ``apply`` (what
    ``bnref.nnx._runners`` gives for an NNX layer), built in the run's x64 setting; ``framework``
    names the built-in layer a ``builtin`` cell cannot express a preset in.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    sizes = {s.shape[0] for s in shards}
    if len(sizes) != 1 or 0 in sizes:
        raise NotExpressible("shard_map splits a batch into equal, non-empty shards")
    if builtin and convention.running_var == "unbiased":
        raise NotExpressible(f"{framework} always uses the biased variance in its running average")
    replicas = len(shards)
    devices = jax.devices("cpu")
    if len(devices) < replicas:
        raise NotExpressible(f"needs {replicas} JAX devices, this process has {len(devices)}")
    with x64(dtype == "float64"):
        jdt = jnp.dtype(dtype)
        sdt = jnp.promote_types(jdt, jnp.float32)
        if make_module is not None:
            module = make_module(jdt, "r")
        elif builtin:
            import flax.linen as nn

            module = nn.BatchNorm(axis=-1, momentum=convention.decay, epsilon=convention.eps, dtype=jdt, param_dtype=jdt,
                                  use_fast_variance=False, axis_name="r")  # fmt: skip
        else:
            from bnref.jax.layers import BatchNorm

            module = BatchNorm(axis=-1, convention=convention, dtype=jdt, param_dtype=jdt, axis_name="r")
        mesh = Mesh(np.array(devices[:replicas]), ("r",))

        def local(x, dy, params, stats):
            def loss(x, params):
                y, upd = module.apply({"params": params, "batch_stats": stats}, x, use_running_average=False,
                                      mutable=["batch_stats"])  # fmt: skip
                return (y * dy).sum(), (y, upd["batch_stats"])

            (dx, dparams), (y, new_stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, params)
            return y, dx, dparams, new_stats

        step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("r"), P("r"), P(), P()),
                                     out_specs=(P("r"), P("r"), P(), P())))  # fmt: skip
        to_nlc = lambda a: jnp.asarray(np.moveaxis(np.concatenate(a), 1, -1), jdt)  # noqa: E731
        x, dy = to_nlc(shards), to_nlc(dys)
        params = {"scale": jnp.asarray(gamma, jdt), "bias": jnp.asarray(beta, jdt)}
        stats = {"mean": jnp.asarray(running_mean, sdt), "var": jnp.asarray(running_var, sdt)}
        n = shards[0].shape[0]
        back = lambda a: np.moveaxis(np.asarray(a, np.float64), -1, 1)  # noqa: E731
        out = []
        for _ in range(steps):
            y, dx, dparams, stats = step(x, dy, params, stats)
            y, dx = back(y), back(dx)
            out.append({"ys": [y[r * n:(r + 1) * n] for r in range(replicas)],
                        "dxs": [dx[r * n:(r + 1) * n] for r in range(replicas)],
                        "dgamma": np.asarray(dparams["scale"], np.float64), "dbeta": np.asarray(dparams["bias"], np.float64),
                        "running_mean": np.asarray(stats["mean"], np.float64),
                        "running_var": np.asarray(stats["var"], np.float64)})  # fmt: skip
        eval_y = back(module.apply({"params": params, "batch_stats": stats}, x, use_running_average=True))
        return {"steps": out, "eval_ys": [eval_y[r * n:(r + 1) * n] for r in range(replicas)]}


# --- data parallel: LeNet-BN trained on R devices (python -m bnref.parity --trajectory --replicas R) ------


def run_data_parallel_trajectory(variables, batches, lr: float, dtype: str, convention: spec.Convention, replicas: int,
                                 sync_bn: bool = True):
    """bnref.jax's LeNet-BN trained data-parallel on ``replicas`` CPU devices (``Mesh`` +
    ``jax.shard_map``, :func:`bnref.jax.distributed.data_parallel`) from Flax ``variables``, SGD
    (``lr``) in ``dtype``, on ``batches`` (uint8 images (B, 28, 28), labels (B,); ``replicas``
    divides B), BN statistics synchronized with ``axis_name`` or each device's own.

    Returns ``{"losses": (steps,) global mean loss per step, "variables"}``; with local BN the
    returned statistics are the cross-replica mean (what Flax's examples evaluate with).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from bnref.jax import distributed, train as jtrain
    from bnref.jax.models import LeNetBN

    devices = jax.devices("cpu")
    if len(devices) < replicas:
        raise ValueError(f"{replicas} replicas need {replicas} JAX CPU devices; this process has {len(devices)} "
                         "(set XLA_FLAGS=--xla_force_host_platform_device_count before JAX starts)")  # fmt: skip
    with x64(dtype == "float64"):
        jdt = jnp.dtype(dtype)
        mesh = Mesh(np.array(devices[:replicas]), (distributed.AXIS,))
        model = LeNetBN(bn="bnref", convention=convention, dtype=jdt, param_dtype=jdt,
                        axis_name=distributed.AXIS if sync_bn else None)  # fmt: skip
        cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jdt), tree)  # noqa: E731
        state = jtrain.TrainState.create(apply_fn=model.apply, params=cast(variables["params"]),
                                         batch_stats=cast(variables["batch_stats"]), tx=optax.sgd(lr))  # fmt: skip
        (params, opt_state, stats), step = distributed.data_parallel(state, model, mesh, len(batches[0][0]), sync_bn)
        sharded, replicated = NamedSharding(mesh, P(distributed.AXIS)), NamedSharding(mesh, P())
        totals = jax.device_put(jnp.zeros(2, jdt), replicated)
        losses = []
        for images, labels in batches:
            X = jax.device_put(jnp.asarray(jtrain.prepare_images(images), jdt), sharded)
            y = jax.device_put(jnp.asarray(labels, jnp.int32), sharded)
            params, opt_state, stats, totals, loss = step(params, opt_state, stats, totals, X, y)
            losses.append(float(loss))  # one step in flight (see bnref.jax.train._fit_replicated)
        if not sync_bn:
            stats = jax.tree.map(lambda a: a.mean(0), stats)
        return {"losses": np.array(losses), "variables": jax.device_get({"params": params, "batch_stats": stats})}
