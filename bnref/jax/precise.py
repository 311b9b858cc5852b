"""Precise BatchNorm statistics for any Flax model: :func:`precise_batch_stats`.

The JAX twin of :func:`bnref.torch.precise_bn`: new ``batch_stats`` for every BN layer of a
``flax.linen`` model (``flax.linen.BatchNorm`` and ``bnref.jax.BatchNorm``), recomputed with the
weights fixed over ``batches``, in one of the two variants :mod:`bnref.spec` defines:

- ``"population"`` (:func:`bnref.spec.population_stats`): the exact mean and biased variance of
  each layer's input over all the batches' values, the model applied in evaluation mode with
  the new statistics of the layers below; bottom-up, one pass per layer. Each pass is a jitted
  function returning only the measured layer's input moments, so XLA drops the layers above it.
- ``"batch_average"`` (:func:`bnref.spec.batch_average_stats`): the model in training mode, the
  equally weighted average of each batch's mean and variance, the variance with the layer's own
  estimator (flax.linen: biased; bnref.jax: its convention's); one pass.

The layers' inputs are observed with ``flax.linen.intercept_methods``, so nothing in the model
changes. The algorithm itself (:func:`check_batches`, :func:`recompute`, :func:`moments`) takes
any model API that can say which BN layers one forward pass called and with what input:
``bnref.nnx.precise`` runs it over Flax NNX models. Per-batch moments are computed two-pass on the device, and merged across batches on the
host in float64 with counts (:func:`bnref.spec.merge_stats`). The returned statistics keep each leaf's dtype; ``variables`` is
not modified, on success or error.

A BN layer called more than once per forward (one module shared by two places: the same path
met twice) is refused, as :mod:`bnref.convert` refuses it: its one set of ``batch_stats`` would
have to describe two different inputs, and each variant would silently measure something else.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional

import numpy as np

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bnref import spec
from bnref._progress import bar
from bnref.jax._core import feature_axes
from bnref.jax.layers import BatchNorm as BnrefBatchNorm

__all__ = ["VARIANTS", "precise_batch_stats", "check_batches", "recompute", "moments", "layer_name",
           "shared_layer_error"]

#: the variants, the default first
VARIANTS = spec.PRECISE_VARIANTS
_BN_TYPES = (nn.BatchNorm, BnrefBatchNorm)


def moments(module, x):
    """``(n, mean, M2)`` of ``x`` per feature of the BN layer ``module`` (its ``axis``; two-pass,
    float32 at least)."""
    features = feature_axes(x.ndim, module.axis)
    reduce = tuple(a for a in range(x.ndim) if a not in features)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x.mean(reduce)
    d = x - jnp.expand_dims(mean, reduce)
    n = int(np.prod([x.shape[a] for a in reduce]))
    return n, mean, (d * d).sum(reduce)


def _unbiased(module) -> bool:
    """Whether the layer averages the unbiased batch variance: bnref's layers (linen's and NNX's,
    which have ``resolved_convention``) by their convention; Flax's never."""
    return hasattr(module, "resolved_convention") and module.resolved_convention().running_var == "unbiased"


def layer_name(path) -> str:
    """A layer's path as messages write it (``bn1``, ``block/bn``, an NNX list's ``norms/0``)."""
    return "/".join(map(str, path))


def shared_layer_error(path, per: str) -> ValueError:
    """The refusal of a BN layer met a second time in one forward pass (``per``: "apply", "forward pass")."""
    return ValueError(f"BN layer {layer_name(path)!r} is called more than once per {per} (a shared layer): its one set "
                      "of batch_stats cannot describe each call's input; precise BN refuses shared BN layers, as "
                      "bnref.convert does (give each call its own layer)")  # fmt: skip


def _recording(store: Dict):
    """An interceptor that records each BN layer's ``(module, moments of its input)`` by path;
    ``ValueError`` (at trace time) when a layer is called a second time in one apply."""

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and isinstance(m, _BN_TYPES) and not m.is_initializing():
            path = tuple(m.path)
            if path in store:
                raise shared_layer_error(path, "apply")
            store[path] = (m, moments(m, args[0]))
        return next_fun(*args, **kwargs)

    return interceptor


_ACCEPTED = ("a batch must be an array of inputs (NumPy or JAX), or a tuple/list whose first item is one "
             "(inputs, targets)")  # fmt: skip


def _inputs(batch, k: int):
    """Batch ``k``'s inputs as a JAX array; ``ValueError`` saying what is accepted for anything
    else (a dict of features, a list of numbers): the model is applied as ``apply(variables, inputs)``."""
    x = batch[0] if isinstance(batch, (list, tuple)) and len(batch) > 0 else batch  # (inputs, targets) pairs
    where = f"batch {k}{'[0]' if x is not batch else ''}"
    if not isinstance(x, (np.ndarray, jax.Array)):
        what = "a dict" if isinstance(x, Mapping) else f"a {type(x).__name__}"
        raise ValueError(f"precise_batch_stats: {where} is {what}; {_ACCEPTED}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"precise_batch_stats: {where} is an array of {x.dtype}, not numbers; {_ACCEPTED}")
    return jnp.asarray(x)


def _host(got):
    n, mean, m2 = got
    return n, np.asarray(mean, np.float64), np.asarray(m2, np.float64)


def _set(stats, path, mean, var):
    """``stats`` (a nested dict) with ``path``'s ``mean`` and ``var`` replaced, dtypes kept."""
    stats = flax.core.unfreeze(stats)
    leaf = stats
    for name in path:
        leaf = leaf[name]
    leaf["mean"] = jnp.asarray(mean, leaf["mean"].dtype)
    leaf["var"] = jnp.asarray(var, leaf["var"].dtype)
    return stats


def precise_batch_stats(
    module: nn.Module,
    variables: Dict[str, Any],
    batches: Iterable,
    *,
    variant: str = "population",
    train_kwargs: Optional[Dict[str, Any]] = None,
    eval_kwargs: Optional[Dict[str, Any]] = None,
    progress: bool = False,
):
    """New ``batch_stats`` for every BN layer of ``module`` over ``batches``.

    ``variables``: ``{"params": ..., "batch_stats": ...}``. ``batches``: the inputs (arrays, or
    ``(inputs, ...)`` tuples); ``"population"`` goes over them once per BN layer, so they must be
    re-iterable (a list), not a one-shot iterator. ``train_kwargs`` / ``eval_kwargs``: what
    ``module.apply`` takes to run in training / evaluation mode (default ``{"train": True}`` /
    ``{"train": False}``, as bnref's and Flax's example models; a bare ``flax.linen.BatchNorm``
    wants ``{"use_running_average": False}`` / ``True``). Returns the new ``batch_stats`` (a
    new tree of the same structure); ``ValueError`` for an unknown variant, no batches, a
    one-shot iterator for ``"population"``, a batch that is neither an array nor a tuple/list
    starting with one (a dict of features is refused: the model is applied to one array), a
    model with no BN layer, a BN layer called more than once per apply (a shared layer), a batch
    with fewer than 2 values per feature (``"batch_average"``) or all batches together with fewer
    than 2 (``"population"``). ``variables`` is never modified.
    """
    batches = check_batches(batches, variant)
    train_kwargs = {"train": True} if train_kwargs is None else dict(train_kwargs)
    eval_kwargs = {"train": False} if eval_kwargs is None else dict(eval_kwargs)
    stats = variables.get("batch_stats")
    if not stats:
        raise ValueError("the variables have no batch_stats: the model has no BatchNorm layer")

    def observe(kwargs, mutable):
        def run(variables, x):
            store: Dict = {}
            with nn.intercept_methods(_recording(store)):
                module.apply(variables, x, mutable=mutable, **kwargs)
            return {p: got for p, (_, got) in store.items()}, {p: m for p, (m, _) in store.items()}

        return run

    run = observe(train_kwargs, ["batch_stats"]) if variant == "batch_average" else observe(eval_kwargs, False)
    return recompute(run, variables, batches, variant=variant, progress=progress,
                     none_called="no flax.linen.BatchNorm or bnref.jax.BatchNorm layer was called by the model")  # fmt: skip


def check_batches(batches: Iterable, variant: str):
    """``batches`` checked for ``variant`` before any work (the refusals :func:`precise_batch_stats`
    lists for them), as the variant goes over them: a list for ``"batch_average"``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "population" and iter(batches) is batches:
        raise ValueError("the population variant goes over the batches once per BN layer: pass a list, not a "
                         "one-shot iterator")  # fmt: skip
    batches = list(batches) if variant == "batch_average" else batches
    if not any(True for _ in batches):
        raise ValueError("precise BN needs at least one batch")
    if isinstance(batches, (list, tuple)):  # cheap to check all before any work
        for k, batch in enumerate(batches):
            _inputs(batch, k)
    return batches


def recompute(run, variables: Mapping, batches, *, variant: str, progress: bool, none_called: str):
    """The new ``variables["batch_stats"]`` of ``variant`` over ``batches`` (checked by
    :func:`check_batches`), for any model API: ``run(variables, x) -> (moments, modules)`` applies
    the model to one batch's inputs ``x`` in the variant's mode (``"population"``: evaluation;
    ``"batch_average"``: training) and returns, for each BN layer it called, by path, the
    :func:`moments` of its input and the layer. ``none_called``: the message when it calls none."""
    if variant == "batch_average":
        return _batch_average(run, variables, batches, progress, none_called)
    return _population(run, variables, batches, progress, none_called)


def _layers(run, variables, x, none_called: str):
    """The BN layers ``run`` meets, in call order: ``{path: module}``."""
    _, modules = run(variables, x)  # traced once, eagerly: cheap next to the passes
    if not modules:
        raise ValueError(none_called)
    return modules


def _batch_average(run, variables, batches, progress, none_called):
    modules = _layers(run, variables, _inputs(batches[0], 0), none_called)
    step = jax.jit(lambda v, x: run(v, x)[0])
    sums: Dict = {}
    for k, batch in enumerate(bar(batches, "precise BN (batch average)", progress)):
        for path, got in step(variables, _inputs(batch, k)).items():
            n, mean, m2 = _host(got)
            if n < 2:
                raise ValueError(f"layer {layer_name(path)} got {n} value(s) per feature; a batch variance needs 2")
            var = m2 / (n - 1) if _unbiased(modules[path]) else m2 / n
            c, sm, sv = sums.get(path, (0, 0.0, 0.0))
            sums[path] = (c + 1, sm + mean, sv + var)
    stats = variables["batch_stats"]
    for path, (c, sm, sv) in sums.items():
        stats = _set(stats, path, sm / c, sv / c)
    return stats


def _population(run, variables, batches, progress, none_called):
    modules = _layers(run, variables, _inputs(next(iter(batches)), 0), none_called)
    stats = variables["batch_stats"]
    for k, path in enumerate(modules, start=1):
        # Only this layer's moments are returned: XLA drops everything above it.
        measure = jax.jit(lambda v, x, path=path: run(v, x)[0][path])
        current = {**variables, "batch_stats": stats}
        shown = bar(batches, f"precise BN (layer {k}/{len(modules)}: {layer_name(path)})", progress)
        parts = [_host(measure(current, _inputs(batch, j))) for j, batch in enumerate(shown)]
        total = sum(n for n, _, _ in parts)
        if total < 2:  # one value per feature has no variance: a var of exactly 0 would be made up
            raise ValueError(f"layer {layer_name(path)} got {total} value(s) per feature over all batches; a population "
                             "variance needs at least 2")  # fmt: skip
        _, mean, var = spec.merge_stats(*zip(*parts))  # exact, with counts; biased: the population's variance
        stats = _set(stats, path, mean, var)
    return stats
