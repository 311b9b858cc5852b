"""Runners that plug the Flax NNX backend into ``bnref.testing`` (the one parity helper): the
``bnref.nnx`` and ``flax.nnx`` columns of ``python -m bnref.parity``.

Each runner is ``run(inputs, convention, axis, dtype, train, param_dtype=None) -> dict`` of NumPy
arrays, with the meaning and dtypes of ``bnref.jax._runners``' (whose input and output helpers
these share): ``y``, ``running_mean``, ``running_var`` and, in training, ``dx``, ``dgamma``,
``dbeta``, the gradients of ``sum(y * dy)``; float64 under ``bnref.jax.compat.x64`` for the
runner's duration only.

What differs is how the layer is driven: as NNX code drives it. The module is built, its
``nnx.Param``s (``scale``, ``bias``) and ``nnx.BatchStat``s (``mean``, ``var``) are set from the
inputs, and one ``nnx.jit`` call runs it, with ``nnx.grad`` over the module's parameters and the
input; the new running statistics are read back from the module, which the call updated in place
(NNX's state propagation through its transforms is part of what is checked).
"""

from __future__ import annotations

import functools

import numpy as np

from bnref import spec
from bnref.jax._runners import _prepare, _to_numpy
from bnref.jax.compat import x64
from bnref.testing import NotExpressible

__all__ = ["run_layer", "run_builtin", "RUNNERS", "run_sync_bn"]

_BUILTIN = "flax.nnx"  # the built-in layer's name in the reasons a cell is not expressible


def _loss(module, x, dy):
    import jax.numpy as jnp

    y = module(x, use_running_average=False)
    return (y * dy).sum(dtype=jnp.promote_types(y.dtype, jnp.float32)), y


def _train(module, x, dy):
    """``(y, dx, grads)``: one training call; ``grads`` is the ``nnx.State`` of the parameters'."""
    from flax import nnx

    (grads, dx), y = nnx.grad(_loss, argnums=(0, 1), has_aux=True)(module, x, dy)
    return y, dx, grads


def _evaluate(module, x):
    return module(x, use_running_average=True)


@functools.lru_cache(maxsize=None)
def _jitted(fn):
    """``nnx.jit(fn)``, made once: its cache then serves every step of a cell (and every cell of the
    same module, shapes and dtypes) instead of one compilation per call. A test that patches a
    layer's code clears it (``_jitted.cache_clear()``), before and after."""
    from flax import nnx

    return nnx.jit(fn)


def _run(make, inputs, dtype: str, train: bool, param_dtype=None):
    """``make()`` -> an NNX BN module (built under x64 when ``dtype`` is float64), its variables
    set from ``inputs`` (gamma and beta in ``param_dtype``, default ``dtype``), run once."""
    from bnref.nnx.layers import read, write

    with x64(dtype == "float64"):
        x, gamma, beta, rm, rv, dy = _prepare(inputs, dtype, param_dtype)
        module = make()
        for variable, value in ((module.scale, gamma), (module.bias, beta), (module.mean, rm), (module.var, rv)):
            write(variable, value)
        out = {}
        if train:
            y, dx, grads = _jitted(_train)(module, x, dy)
            out.update(dx=dx, dgamma=read(grads["scale"]), dbeta=read(grads["bias"]))
        else:
            y = _jitted(_evaluate)(module, x)
        out.update(y=y, running_mean=read(module.mean), running_var=read(module.var))  # updated in place in training
        return _to_numpy(out, dtype)


def _layer(channels: int, axis: int, convention: spec.Convention, dtype, param_dtype, axis_name=None):
    from flax import nnx

    from bnref.nnx.layers import BatchNorm

    return BatchNorm(channels, axis=axis, convention=convention, dtype=dtype, param_dtype=param_dtype,
                     axis_name=axis_name, rngs=nnx.Rngs(0))  # fmt: skip


def _builtin(channels: int, axis: int, convention: spec.Convention, dtype, param_dtype, axis_name=None):
    from flax import nnx

    return nnx.BatchNorm(channels, axis=axis, momentum=convention.decay, epsilon=convention.eps, dtype=dtype,
                         param_dtype=param_dtype, use_fast_variance=False, axis_name=axis_name, rngs=nnx.Rngs(0))  # fmt: skip


def _check_builtin(convention: spec.Convention) -> None:
    if convention.running_var == "unbiased":
        raise NotExpressible(f"{_BUILTIN} always uses the biased variance in its running average")


def _dtypes(dtype: str, param_dtype):
    import jax.numpy as jnp

    return jnp.dtype(dtype), jnp.dtype(param_dtype or dtype)


def run_layer(inputs, convention: spec.Convention, axis: int, dtype: str, train: bool, param_dtype=None):
    """``bnref.nnx.BatchNorm(convention=convention)`` (``dtype=dtype, param_dtype=param_dtype``,
    default ``dtype``)."""
    jdt, pdt = _dtypes(dtype, param_dtype)
    return _run(lambda: _layer(np.shape(inputs["gamma"])[0], axis, convention, jdt, pdt), inputs, dtype, train,
                param_dtype)  # fmt: skip


def run_builtin(inputs, convention: spec.Convention, axis: int, dtype: str, train: bool, param_dtype=None):
    """``flax.nnx.BatchNorm`` configured to ``convention`` (two-pass variance, as the
    ``flax.linen`` column: the matrix compares the conventions, not the variance formulas)."""
    _check_builtin(convention)
    jdt, pdt = _dtypes(dtype, param_dtype)
    return _run(lambda: _builtin(np.shape(inputs["gamma"])[0], axis, convention, jdt, pdt), inputs, dtype, train,
                param_dtype)  # fmt: skip


RUNNERS = {"layer": run_layer, "builtin": run_builtin}


# --- data parallel: BN with axis_name over R devices (shard_map) ---------------------------------------


class _LinenApply:
    """An NNX BN layer behind linen's ``apply(variables, x, use_running_average=..., mutable=...)``:
    each call merges the layer's graph with ``variables`` into a fresh module (``nnx.merge``) and
    reads the updated ``nnx.BatchStat``s back: the functional form NNX takes
    under ``jax.shard_map``, so the JAX runner's data-parallel harness drives it unchanged."""

    def __init__(self, module):
        from flax import nnx

        self.graphdef, self.state = nnx.split(module)

    def apply(self, variables, x, use_running_average: bool, mutable=False):
        import jax
        from flax import nnx

        from bnref.nnx.layers import read

        state = jax.tree.map(lambda a: a, self.state)  # fresh variables, of this trace (as bnref.nnx.observe.LinenView's copies)
        nnx.replace_by_pure_dict(state, {**variables["params"], **variables["batch_stats"]})
        module = nnx.merge(self.graphdef, state)
        y = module(x, use_running_average=use_running_average)
        if not mutable:
            return y
        return y, {"batch_stats": {"mean": read(module.mean), "var": read(module.var)}}


def run_sync_bn(shards, dys, gamma, beta, running_mean, running_var, convention: spec.Convention, dtype: str,
                builtin: bool = False, steps: int = 2):
    """``bnref.nnx.BatchNorm`` (or ``flax.nnx.BatchNorm``) with ``axis_name`` on one device per
    shard: ``bnref.jax._runners.run_sync_bn``'s harness (its arguments and results) over the NNX
    layer (:class:`_LinenApply`)."""
    from bnref.jax._runners import run_sync_bn as run_jax

    build = _builtin if builtin else _layer

    def make(dt, axis_name):  # the layer on (n, L, C) shards, everything in the run's dtype
        return _LinenApply(build(np.shape(gamma)[0], -1, convention, dt, dt, axis_name))

    return run_jax(shards, dys, gamma, beta, running_mean, running_var, convention, dtype, builtin=builtin, steps=steps,
                   make_module=make, framework=_BUILTIN)  # fmt: skip
