r"""Functional BatchNorm in JAX: a pure, ``jax.jit``-compatible implementation of ``bnref.spec``.

:func:`batch_norm` is the JAX twin of ``bnref.spec.batch_norm_train`` / ``batch_norm_eval``
(and of ``bnref.torch.batch_norm``): it takes the running statistics as arguments and
returns the NEW ones instead of mutating anything, so it can live inside ``jax.jit``,
``jax.grad``, ``jax.vmap`` or a ``lax.scan`` carry. The Flax module ``bnref.jax.BatchNorm``
is a thin wrapper that keeps those statistics in Flax's mutable ``batch_stats`` collection.

Math (per feature ``c`` over the ``n`` values reduced, see ``bnref.spec``)::

    mu     = mean(x)                              (float32 at least, as in Flax)
    sigma2 = mean((x - mu)^2)                     two-pass, biased
    y      = (x - mu) * gamma / sqrt(sigma2 + eps) + beta
    running_mean <- decay * running_mean + (1 - decay) * mu
    running_var  <- decay * running_var  + (1 - decay) * s2,  s2 = sigma2 [* n/(n-1)]

Shapes: ``x`` has rank >= 2; ``axis`` (an int or a tuple of ints, Flax's ``axis``) names the
feature axes, every other axis is reduced. ``gamma``, ``beta``, ``running_mean`` and
``running_var`` have the shape of the feature axes, ``(C,)`` for the usual int ``axis``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnref import spec

__all__ = ["batch_norm", "resolve_convention", "feature_axes"]

Axis = Union[int, Sequence[int]]


def resolve_convention(convention: Union[spec.Convention, str, None]) -> spec.Convention:
    """A :class:`bnref.spec.Convention` from itself, a preset name, or ``None`` (Flax's)."""
    return spec.as_convention(convention, spec.FLAX)


def feature_axes(ndim: int, axis: Axis) -> Tuple[int, ...]:
    """Flax's ``axis`` (int or tuple of ints) as sorted, non-negative, distinct feature axes.

    Every axis may be a feature axis (a rank-1 input with ``axis=-1``, as flax.linen allows):
    nothing is reduced then, which initialization and evaluation accept and training refuses
    (one value per feature).
    """
    if ndim < 1:
        raise ValueError(f"x must have rank >= 1, got rank {ndim}")
    axes = (axis,) if not isinstance(axis, (tuple, list)) else tuple(axis)
    if not axes:
        raise ValueError("axis must name at least one feature axis")
    out = set()
    for a in axes:
        # The spec's rule: a Python or NumPy integer (flax.linen accepts np.int64 too), never a
        # bool, a float or an array.
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise ValueError(f"axis must be an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for x of rank {ndim}")
        out.add(int(a) % ndim)
    return tuple(sorted(out))


def _check_vector(v, name: str, shape: Tuple[int, ...]) -> None:
    if v is not None and tuple(jnp.shape(v)) != shape:
        raise ValueError(
            f"{name} must have shape {shape} to match the feature axes of x, got {tuple(jnp.shape(v))}"
        )


def _mean(xs, axes, axis_name, axis_index_groups, mask):
    """Per-feature means of each array in ``xs``; one ``lax.pmean`` across devices (like Flax).

    ``x.mean`` as Flax takes it, so both variance formulas are bit-for-bit Flax's. (A float32
    feature near 1e35 overflows the sum here, in Flax too: the output is NaN, not silently
    wrong; the torch backend takes its means level by level instead.)
    """
    mus = [x.mean(axes, where=mask) for x in xs]
    if axis_name is None:
        return mus
    if len(mus) == 1:
        return [lax.pmean(mus[0], axis_name, axis_index_groups=axis_index_groups)]
    stacked = lax.pmean(jnp.stack(mus), axis_name, axis_index_groups=axis_index_groups)  # one collective
    return [stacked[i] for i in range(len(mus))]


def _abs_sq(x):
    """``|x|^2`` elementwise, real: the variance of complex values is ``E|x - mu|^2`` (Flax's)."""
    if jnp.iscomplexobj(x):
        return lax.square(lax.real(x)) + lax.square(lax.imag(x))
    return lax.square(x)


def _stats(x, axes, *, fast_variance, axis_name, axis_index_groups, mask):
    """Batch mean and biased variance over ``axes`` (``x`` already in the statistics dtype).

    For complex ``x`` the mean is complex and the variance real, ``E|x - mu|^2``, as in Flax.
    """
    if fast_variance:
        # Flax's default formula: one fused pass, E[|x|^2] - |E[x]|^2, clipped at 0 because
        # round-off can make it negative. Cancels catastrophically when |mean| >> std.
        mu, mu2 = _mean([x, _abs_sq(x)], axes, axis_name, axis_index_groups, mask)
        if jnp.iscomplexobj(mu2):  # stacked with a complex mean for one pmean; its imaginary part is 0
            mu2 = lax.real(mu2)
        return mu, jnp.maximum(0.0, mu2 - _abs_sq(mu))
    (mu,) = _mean([x], axes, axis_name, axis_index_groups, mask)
    centered = x - jnp.expand_dims(mu, axes)  # subtract first: no cancellation
    (var,) = _mean([_abs_sq(centered)], axes, axis_name, axis_index_groups, mask)
    return mu, var


def _count(x, axes, n_static, axis_name, axis_index_groups, mask, dtype):
    """Values per feature behind the statistics (over all devices with ``axis_name``)."""
    if mask is None:
        n = jnp.asarray(n_static, dtype)
    else:
        n = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape).sum(axes).astype(dtype)
    if axis_name is not None:
        n = lax.psum(n, axis_name, axis_index_groups=axis_index_groups)
    return n


def _batch_norm(
    x,
    gamma,
    beta,
    running_mean,
    running_var,
    *,
    train: bool,
    convention: spec.Convention,
    axes: Tuple[int, ...],
    fast_variance: bool,
    axis_name: Optional[str],
    axis_index_groups: Any,
    stats_dtype,
    mask=None,
    check_batch: bool = True,
):
    """The shared core (no validation of argument shapes, no output cast).

    Returns ``(y, new_running_mean, new_running_var)``; ``y`` in the promoted dtype of
    ``x``, the statistics and the parameters (the caller casts it).
    """
    reduce_axes = tuple(i for i in range(x.ndim) if i not in axes)  # e.g. (0, 1, 2) for NHWC, axis -1
    if mask is not None:
        # Any dtype, nonzero selects: flax.linen's jnp.asarray(mask, dtype=bool) (an int32 or a
        # float32 0/1 mask is common); jnp.mean(where=) itself takes only bool.
        mask = jnp.asarray(mask, bool)
    n_static = 1
    for i in reduce_axes:
        n_static *= x.shape[i]
    if train and n_static == 0 and axis_name is None:
        # An empty batch normalizes nothing: an empty output and the running statistics as they
        # were (the spec's rule, as torch.nn; Flax would average over nothing and store NaN).
        y = x.astype(stats_dtype)
        fshape = tuple(1 if i in reduce_axes else x.shape[i] for i in range(x.ndim))
        if gamma is not None:
            y = y * jnp.reshape(gamma, fshape)
        if beta is not None:
            y = y + jnp.reshape(beta, fshape)
        return y, running_mean, running_var
    if train:
        if check_batch and axis_name is None:
            # Static shapes, so this raises at trace time (like PyTorch's "Expected more than
            # 1 value per channel when training"; Flax silently outputs beta here). With
            # axis_name the count spans devices and is checked by the caller's batch.
            spec.check_training_batch(n_static)
        xs = x.astype(stats_dtype)
        mean, var = _stats(
            xs, reduce_axes, fast_variance=fast_variance, axis_name=axis_name, axis_index_groups=axis_index_groups,
            mask=mask,
        )
        if running_mean is None:
            new_mean = new_var = None
        else:
            d = convention.decay
            s2 = var
            n = None
            if convention.running_var == "unbiased" or mask is not None:
                n = _count(x, reduce_axes, n_static, axis_name, axis_index_groups, mask, var.dtype)
            if convention.running_var == "unbiased":  # Bessel: n/(n-1) (torch.nn's convention)
                s2 = var * (n / jnp.maximum(n - 1, 1))
            # The running statistics are state, not a function of the loss.
            new_mean = lax.stop_gradient(d * running_mean + (1 - d) * mean)  # old value weighted by decay
            new_var = lax.stop_gradient(d * running_var + (1 - d) * s2)
            if mask is not None:
                # A feature whose mask selects fewer than 2 values has no variance to estimate
                # (and 0 values no mean): its running statistics stay as they were, instead of
                # becoming NaN. (A concrete mask is checked up front; see batch_norm.)
                ok = n >= 2
                new_mean = jnp.where(ok, new_mean, running_mean)
                new_var = jnp.where(ok, new_var, running_var)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("evaluation mode needs running_mean and running_var")
        mean, var = lax.stop_gradient(running_mean), lax.stop_gradient(running_var)
        new_mean, new_var = mean, var  # unchanged values, still behind stop_gradient
    # Flax's _normalize, step by step: (x - mu) * (rsqrt(var + eps) * gamma) + beta.
    mean = jnp.expand_dims(mean, reduce_axes)  # broadcasts against x
    var = jnp.expand_dims(var, reduce_axes)
    mul = lax.rsqrt(var + convention.eps)
    if gamma is not None:
        mul = mul * jnp.reshape(gamma, mul.shape)  # learned scale folded into 1/std
    y = (x - mean) * mul
    if beta is not None:
        y = y + jnp.reshape(beta, mul.shape)  # learned shift
    return y, new_mean, new_var


def batch_norm(
    x,
    gamma,
    beta,
    running_mean,
    running_var,
    *,
    train: bool,
    convention: Union[spec.Convention, str] = spec.FLAX,
    axis: Axis = -1,
    fast_variance: bool = False,
    axis_name: Optional[str] = None,
    axis_index_groups: Any = None,
    mask=None,
):
    """BatchNorm as a pure function: ``(y, new_running_mean, new_running_var)``.

    Args:
      x: input of rank >= 2; NHWC is natural in JAX, hence ``axis=-1`` by default.
      gamma, beta: scale and shift with the shape of the feature axes (``(C,)``), or
        ``None`` for 1 and 0.
      running_mean, running_var: running statistics (feature shape). In training they may
        both be ``None`` (no running statistics kept; ``None``s come back).
      train: static. True: normalize with the batch statistics and return updated running
        statistics; False: normalize with the running statistics, returned unchanged.
      convention: a ``bnref.spec.Convention`` or preset name (static): ``decay`` (weight of
        the OLD running value, Flax's ``momentum``), ``eps``, and which batch variance enters
        the running average. Default: Flax's (decay 0.99, eps 1e-5, biased).
      axis: feature axis or axes (static); statistics are reduced over all the others.
      fast_variance: False (default): stable two-pass variance, ``mean((x - mu)^2)``.
        True: Flax's one-pass ``max(0, E[x^2] - E[x]^2)``, bit-for-bit its formula.
      axis_name, axis_index_groups: average the statistics across devices with
        ``lax.pmean`` (inside ``pmap``/``shard_map``), exactly as Flax does.
      mask: optional array broadcastable to ``x``: only the selected values enter the
        statistics (Flax's ``mask``). Any dtype; nonzero selects (bool, or an int/float 0/1
        mask, converted with ``jnp.asarray(mask, bool)`` as flax.linen does).

    Returns:
      ``y`` with ``x``'s shape, in ``x``'s dtype when that is floating or complex (integer
      and bool inputs are promoted, as flax.linen does: float32 by default, never
      truncated back); the new running statistics in the promotion of their own dtype and
      the statistics dtype (float32 for float16/bfloat16/float32 inputs with float32 state;
      float64 for float64 inputs under x64), behind ``stop_gradient``. Gradients flow to
      ``x``, ``gamma`` and ``beta`` only. Complex input gives flax.linen's results: a
      complex mean and the real variance ``E|x - mu|^2``. An empty training batch gives an
      empty output and the running statistics unchanged. With a ``mask``, a feature that
      selects fewer than 2 values keeps its running statistics.

    Raises:
      TypeError: ``train`` not a bool.
      ValueError (at trace time): shapes that do not match the feature axes, a training
      batch with exactly 1 value per feature (or a concrete ``mask`` selecting a single
      value of some feature), eval without running statistics.
    """
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(f"train must be a bool (True: batch statistics, False: running statistics), got {train!r}")
    train = bool(train)
    convention = resolve_convention(convention)
    x = jnp.asarray(x)
    axes = feature_axes(x.ndim, axis)
    fshape = tuple(x.shape[a] for a in axes)
    for name, v in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(v, name, fshape)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    # Statistics at least in float32 (Flax's force_float32_reductions): float16/bfloat16
    # sums over thousands of values would lose most of their digits.
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if train and mask is not None:
        check_mask(x, axes, mask)
    y, new_mean, new_var = _batch_norm(
        x, gamma, beta, running_mean, running_var, train=train, convention=convention, axes=axes,
        fast_variance=fast_variance, axis_name=axis_name, axis_index_groups=axis_index_groups,
        stats_dtype=stats_dtype, mask=mask,
    )
    return y.astype(output_dtype(x.dtype, y.dtype)), new_mean, new_var


def output_dtype(x_dtype, computed_dtype):
    """``x``'s dtype when it is floating or complex, else the computation's (integers and bools
    are promoted, never truncated)."""
    return x_dtype if jnp.issubdtype(x_dtype, jnp.inexact) else computed_dtype


def check_mask(x, axes, mask) -> None:
    """A concrete (not traced) training mask must select at least 2 values of every feature
    (1 is an error, as for an unmasked batch; 0 selects nothing). A traced mask cannot be
    checked: such features keep their running statistics instead."""
    try:
        concrete = np.asarray(mask, bool)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: checked per feature inside, where fewer than 2 values keep the statistics
    reduce_axes = tuple(i for i in range(x.ndim) if i not in axes)
    counts = np.broadcast_to(concrete, x.shape).sum(reduce_axes)
    if np.any(counts == 1):
        raise ValueError(
            "expected more than 1 value per channel when training: the mask selects a single value "
            f"for {int(np.sum(counts == 1))} feature(s)"
        )
