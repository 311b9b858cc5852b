"""``bnref.jax.BatchNorm``: a drop-in for ``flax.linen.BatchNorm`` built on :func:`batch_norm`.

Same fields in the same order as ``flax.linen.BatchNorm`` (flax 0.12.8), same variables
(``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``, float32), the same
``use_running_average`` merge (attribute or call argument, exactly one), running statistics
left alone during ``init``, and the same ``flax.errors.ModifyScopeVariableError`` when applied
in training without ``mutable=["batch_stats"]``. Two differences, both deliberate:

- ``use_fast_variance`` defaults to False: the two-pass variance. Flax's default
  ``E[x^2] - E[x]^2`` cancels catastrophically when a feature's mean is large compared with
  its spread (at mean 1e4, std 0.1 in float32 the normalized output has std ~30, not 1).
  ``use_fast_variance=True`` gives Flax's formula exactly.
- an extra field ``convention`` (last, so positional use of Flax's fields is unchanged).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax.linen import dtypes
from jax.nn import initializers

from bnref import spec
from bnref.jax._core import check_mask, check_vector, feature_axes, normalize
from bnref.jax.functional import resolve_convention

__all__ = ["BatchNorm", "flax_convention"]

_FLAX_MOMENTUM = 0.99
_FLAX_EPSILON = 1e-5


def flax_convention(convention, momentum: float, epsilon: float) -> spec.Convention:
    """The convention of a Flax-style layer (linen's here, NNX's in ``bnref.nnx``) given its
    ``convention``, ``momentum`` and ``epsilon``: Flax's (``momentum``, ``epsilon``, biased running
    variance) when ``convention`` is None; else the convention, with ``momentum``/``epsilon`` left
    at Flax's defaults or agreeing with it, otherwise ``ValueError`` (two different answers to one
    question are an error, never silently resolved)."""
    if convention is None:
        return spec.Convention.from_flax(momentum, epsilon)
    conv = resolve_convention(convention)
    if momentum != _FLAX_MOMENTUM and momentum != conv.decay:
        raise ValueError(
            f"momentum={momentum} conflicts with convention decay={conv.decay}; "
            "set one of them (momentum is ignored when a convention is given)"
        )
    if epsilon != _FLAX_EPSILON and epsilon != conv.eps:
        raise ValueError(
            f"epsilon={epsilon} conflicts with convention eps={conv.eps}; "
            "set one of them (epsilon is ignored when a convention is given)"
        )
    return conv


class BatchNorm(nn.Module):
    """BatchNorm Module (a ``flax.linen.BatchNorm`` with bnref's conventions).

    Per feature, over every axis but ``axis``, in training::

        y = (x - mu) / sqrt(sigma2 + eps) * scale + bias       (sigma2 biased, two-pass)
        mean <- decay * mean + (1 - decay) * mu                 (batch_stats, float32)
        var  <- decay * var  + (1 - decay) * s2,   s2 = sigma2 [* n/(n-1) if unbiased]

    and with ``use_running_average=True`` the stored ``mean``/``var`` replace ``mu``/``sigma2``.

    Attributes (Flax's, in Flax's order):
      use_running_average: if True, use the stored statistics (evaluation); may instead be
        passed at call time (exactly one of the two).
      axis: the feature axis or axes (int or tuple); statistics reduce over the others.
      momentum: Flax's momentum = bnref's ``decay``, the weight of the OLD running value.
      epsilon: added to the variance before the square root.
      dtype: the result dtype (default: inferred from input and params, as in Flax).
      param_dtype: dtype of ``scale`` and ``bias`` (default float32).
      use_bias, use_scale: learn a shift / a scale.
      bias_init, scale_init: their initializers (zeros / ones).
      axis_name, axis_index_groups: average the statistics across devices (``lax.pmean``).
      use_fast_variance: False here (Flax: True); see the module docstring.
      force_float32_reductions: statistics and ``batch_stats`` at least float32 (Flax's).
      convention: ``None`` (default) uses ``momentum``/``epsilon`` with Flax's biased running
        variance. A ``bnref.spec.Convention`` or preset name (``"d2l"``, ``"torch"``,
        ``"flax"``, ``"keras"``) supplies decay, eps and the running-variance estimator; then
        ``momentum``/``epsilon`` must be left at Flax's defaults (0.99, 1e-5) or agree with
        it, otherwise ``ValueError`` (two different answers to one question are an error,
        never silently resolved).
    """

    use_running_average: Optional[bool] = None
    axis: Any = -1
    momentum: float = _FLAX_MOMENTUM
    epsilon: float = _FLAX_EPSILON
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: Optional[str] = None
    axis_index_groups: Any = None
    # Deliberate departure from flax.linen.BatchNorm (default True there): the stable
    # two-pass variance. Set True for Flax's one-pass formula, bit for bit.
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    convention: Union[spec.Convention, str, None] = None

    @nn.nowrap  # a plain helper: Flax must not intercept it as a module method (tabulate, flops)
    def resolved_convention(self) -> spec.Convention:
        """The convention this layer applies (see ``convention`` for the precedence rule)."""
        return flax_convention(self.convention, self.momentum, self.epsilon)

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
        """Normalize ``x`` (any rank >= 2); same call signature as ``flax.linen.BatchNorm``."""
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if not isinstance(use_running_average, (bool, np.bool_)):
            raise TypeError(f"use_running_average must be a bool, got {use_running_average!r}")
        convention = self.resolved_convention()
        x = jnp.asarray(x)
        axes = feature_axes(x.ndim, self.axis)
        fshape = tuple(x.shape[a] for a in axes)  # (C,) for an int axis
        state_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype

        # Existing variables built for another feature count: a ValueError naming the variable
        # (Flax raises ScopeParamShapeError for params and nothing at all for batch_stats).
        for col, name in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")):
            if self.has_variable(col, name):
                check_vector(self.get_variable(col, name), f"{col}/{name}", fshape)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, state_dtype), fshape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, state_dtype), fshape)
        scale = self.param("scale", self.scale_init, fshape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, fshape, self.param_dtype) if self.use_bias else None
        if not self.force_float32_reductions:  # Flax's semantics of this switch
            scale = None if scale is None else jnp.asarray(scale, self.param_dtype)
            bias = None if bias is None else jnp.asarray(bias, self.param_dtype)
            stats_dtype = self.dtype or x.dtype
        else:
            stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)

        initializing = self.is_initializing()
        if mask is not None and not use_running_average and not initializing:
            check_mask(x, axes, mask)
        running_mean, running_var = ra_mean.value, ra_var.value
        if use_running_average and not self.force_float32_reductions:
            running_mean = jnp.asarray(running_mean, self.param_dtype)
            running_var = jnp.asarray(running_var, self.param_dtype)
        y, new_mean, new_var = normalize(
            x, scale, bias, running_mean, running_var,
            train=not use_running_average,
            convention=convention,
            axes=axes,
            fast_variance=self.use_fast_variance,
            # during init the device axis need not exist (as in Flax)
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=self.axis_index_groups,
            stats_dtype=stats_dtype,
            mask=mask,
            # init often runs on a dummy batch of one; the statistics are discarded then
            check_batch=not initializing,
        )
        if not use_running_average and not initializing:
            # Raises flax.errors.ModifyScopeVariableError unless batch_stats is mutable.
            ra_mean.value = new_mean
            ra_var.value = new_var
        args = [a for a in (x, scale, bias) if a is not None]
        return jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=self.dtype))
