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

from typing import Any, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from bnref import spec
from bnref.jax._core import check_mask, check_vector, feature_axes, normalize, output_dtype  # noqa: F401

__all__ = ["batch_norm", "resolve_convention", "feature_axes"]

Axis = Union[int, Sequence[int]]


def resolve_convention(convention: Union[spec.Convention, str, None]) -> spec.Convention:
    """A :class:`bnref.spec.Convention` from itself, a preset name, or ``None`` (Flax's)."""
    return spec.as_convention(convention, spec.FLAX)


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
        check_vector(v, name, fshape)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    # Statistics at least in float32 (Flax's force_float32_reductions): float16/bfloat16
    # sums over thousands of values would lose most of their digits.
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if train and mask is not None:
        check_mask(x, axes, mask)
    y, new_mean, new_var = normalize(
        x, gamma, beta, running_mean, running_var, train=train, convention=convention, axes=axes,
        fast_variance=fast_variance, axis_name=axis_name, axis_index_groups=axis_index_groups,
        stats_dtype=stats_dtype, mask=mask,
    )
    return y.astype(output_dtype(x.dtype, y.dtype)), new_mean, new_var


