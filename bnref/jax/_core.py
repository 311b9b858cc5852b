"""The kernels of bnref's JAX BatchNorm, shared by the functional form
(:mod:`bnref.jax.functional`) and the Flax layer (:mod:`bnref.jax.layers`): the statistics over
the reduced axes (two-pass or Flax's one-pass ``fast_variance``, masked, synchronized over an
``axis_name``), :func:`normalize` (the normalization and the new running statistics, on
checked arguments), the dtype rules and the checks both callers make, Flax's ``axis`` rule
(:func:`feature_axes`, which precise BN and diagnose use too) among them.

Public names are what the other modules import; underscored ones are this module's own.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnref import spec

__all__ = ["feature_axes", "check_vector", "normalize", "output_dtype", "check_mask"]


def feature_axes(ndim: int, axis) -> Tuple[int, ...]:
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


def check_vector(v, name: str, shape: Tuple[int, ...]) -> None:
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


def normalize(
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
