"""``bnref.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm`` on bnref's functional core.

flax.nnx.BatchNorm's constructor (flax 0.12.8: the same arguments, defaults and keyword-only
rule, ``rngs`` required), its state (``scale``/``bias`` as ``nnx.Param``, ``mean``/``var`` as
``nnx.BatchStat``, float32), its mode (``use_running_average`` given to the constructor, set by
``model.train()``/``model.eval()`` or ``nnx.view``, or passed to the call, which wins) and its
dtype rule (``promote_dtype`` over the input, the statistics and the parameters; the batch
statistics reduced in float32 at least). The normalization is ``bnref.jax._core.normalize``, the
code ``bnref.jax.BatchNorm`` (linen) and ``bnref.jax.batch_norm`` run: no second copy of the math.

Differences from flax.nnx.BatchNorm, each deliberate and the same as ``bnref.jax.BatchNorm``'s:

- ``use_fast_variance`` defaults to False, the two-pass variance (Flax's one-pass
  ``E[x^2] - E[x]^2`` cancels when a feature's mean is large compared with its spread);
  ``use_fast_variance=True`` gives Flax's formula exactly.
- an extra keyword ``convention`` (a ``bnref.spec.Convention`` or preset name: decay, eps and the
  running-variance estimator), with linen's precedence rule (``bnref.jax.layers.flax_convention``).
- the refusals of bnref.jax: one value per feature in training, a concrete mask selecting one value
  of a feature, statistics built for another feature count (each a ``ValueError`` before any state
  changes); an empty batch leaves the statistics as they were (Flax stores NaN), and so does a
  feature a traced mask leaves with fewer than two values.
- complex input: the running mean becomes complex, as flax.linen's (flax.nnx casts it into the
  float32 BatchStat and so drops its imaginary part).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from bnref import spec
from bnref.jax._core import check_mask, check_vector, feature_axes, normalize
from bnref.jax.layers import flax_convention

try:
    from flax.nnx.module import first_from
except ImportError:  # a Flax that keeps it elsewhere (or not at all): the same rule, written out

    def first_from(*values, error_msg: str):
        """The first of ``values`` that is not None; ``ValueError(error_msg)`` if all are."""
        for value in values:
            if value is not None:
                return value
        raise ValueError(error_msg)


__all__ = ["BatchNorm", "read", "write"]


def read(variable):
    """A variable's array (``variable[...]``; ``.value`` on a Flax that predates it)."""
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def write(variable, value) -> None:
    """Set a variable's array (``set_value``; ``.value =`` on a Flax that predates it)."""
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


def _stored_as(new, old):
    """A new running statistic in the stored one's dtype: flax.nnx writes it in place
    (``self.mean[...] = ...``), so float64 statistics (float64 input) are kept as the float32
    BatchStat, and the state's dtypes never change (an ``nnx.scan`` carry or a jitted step's state
    keeps its type). A complex mean (complex input) stays complex, as flax.linen stores it:
    flax.nnx's write into the float32 BatchStat discards its imaginary part (a ComplexWarning),
    and evaluation would then subtract the wrong mean (deliberate, README)."""
    if jnp.iscomplexobj(new) and not jnp.iscomplexobj(old):
        return new
    return new.astype(old.dtype)


class BatchNorm(nnx.Module):
    """BatchNorm Module (a ``flax.nnx.BatchNorm`` with bnref's conventions).

    Per feature, over every axis but ``axis``, in training::

        y = (x - mu) / sqrt(sigma2 + eps) * scale + bias       (sigma2 biased, two-pass)
        mean <- decay * mean + (1 - decay) * mu                 (nnx.BatchStat, float32)
        var  <- decay * var  + (1 - decay) * s2,   s2 = sigma2 [* n/(n-1) if unbiased]

    and in evaluation the stored ``mean``/``var`` replace ``mu``/``sigma2``.

    Args (flax.nnx.BatchNorm's, in its order, then bnref's):
      num_features: the number of input features (the size of ``axis``).
      use_running_average: True: the stored statistics (evaluation); False (default): the batch's
        (training). ``model.train()``/``model.eval()`` set it; a value passed to the call wins.
      axis: the feature axis (-1: NHWC; 1: NCHW).
      momentum: Flax's momentum = bnref's ``decay``, the weight of the OLD running value.
      epsilon: added to the variance before the square root.
      dtype: the computation and result dtype (default: promoted from the input and the state).
      param_dtype: dtype of ``scale`` and ``bias`` (default float32).
      use_bias, use_scale: learn a shift / a scale.
      bias_init, scale_init: their initializers (zeros / ones).
      axis_name, axis_index_groups: average the statistics over a device axis (``lax.pmean``).
      use_fast_variance: False here (Flax: True); see the module docstring.
      promote_dtype: Flax's dtype promotion of ``(x, mean, var, scale, bias)``.
      rngs: an ``nnx.Rngs`` (its ``params`` stream initializes ``scale`` and ``bias``).
      bias_metadata, scale_metadata: metadata of the two ``nnx.Param``s.
      convention: None (Flax's: ``momentum``, ``epsilon``, biased running variance), or a
        ``bnref.spec.Convention`` / preset name; ``momentum``/``epsilon`` must then be left at
        Flax's defaults or agree with it (``ValueError`` otherwise).
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: Optional[bool] = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        axis_name: Optional[str] = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        convention: Union[spec.Convention, str, None] = None,
    ):
        if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {num_features!r}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        flax_convention(convention, momentum, epsilon)  # a conflict is an error now, not at the first call
        shape = (int(num_features),)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata) if use_scale else None
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata) if use_bias else None
        settings = dict(num_features=int(num_features), use_running_average=use_running_average, axis=axis,
                        momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
                        use_scale=use_scale, axis_name=axis_name, axis_index_groups=axis_index_groups,
                        use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, convention=convention)
        for name, value in settings.items():  # flax.nnx.BatchNorm's attributes, by the same names
            setattr(self, name, value)

    def resolved_convention(self) -> spec.Convention:
        """The convention this layer applies (see ``convention`` for the precedence rule)."""
        return flax_convention(self.convention, self.momentum, self.epsilon)

    def __call__(self, x, use_running_average: Optional[bool] = None, *, mask: Optional[jax.Array] = None):
        """Normalize ``x``; flax.nnx.BatchNorm's call signature. In training the stored statistics
        are updated in place (``nnx.BatchStat``), as Flax's are."""
        use_running_average = first_from(
            use_running_average, self.use_running_average,
            error_msg="No `use_running_average` argument was provided to BatchNorm: pass it to the constructor or "
                      "the call, or use model.train() / model.eval()",
        )  # fmt: skip
        if not isinstance(use_running_average, (bool, np.bool_)):
            raise TypeError(f"use_running_average must be a bool, got {use_running_average!r}")
        # not self.resolved_convention(): nnx.tabulate jit-traces every public method a forward pass
        # calls, and a Convention is no JAX type
        convention = flax_convention(self.convention, self.momentum, self.epsilon)
        x = jnp.asarray(x)
        axes = feature_axes(x.ndim, self.axis)
        fshape = tuple(x.shape[a] for a in axes)
        stored = {"mean": read(self.mean), "var": read(self.var)}
        scale = None if self.scale is None else read(self.scale)
        bias = None if self.bias is None else read(self.bias)
        for name, v in (("scale", scale), ("bias", bias), ("mean", stored["mean"]), ("var", stored["var"])):
            check_vector(v, name, fshape)  # a layer built for another feature count: a ValueError naming it
        x, mean, var, scale, bias = self.promote_dtype((x, stored["mean"], stored["var"], scale, bias),
                                                       dtype=self.dtype)  # fmt: skip
        train = not use_running_average
        if train and mask is not None:
            check_mask(x, axes, mask)
        stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)  # Flax's _compute_stats
        y, new_mean, new_var = normalize(
            x, scale, bias,
            # training updates the stored (float32) statistics, as Flax's; evaluation uses them promoted
            stored["mean"] if train else mean, stored["var"] if train else var,
            train=train, convention=convention, axes=axes, fast_variance=self.use_fast_variance,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, stats_dtype=stats_dtype, mask=mask,
        )  # fmt: skip
        if train:
            write(self.mean, _stored_as(new_mean, stored["mean"]))
            write(self.var, _stored_as(new_var, stored["var"]))
        args = [a for a in (x, scale, bias) if a is not None]
        return jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=self.dtype))

    def set_view(self, use_running_average: bool | None = None):
        """Class method used by ``nnx.view`` (as flax.nnx.BatchNorm's; ``nnx.view_info`` reads the
        Args section below).

        Args:
          use_running_average: if True, the stored batch statistics will be
            used instead of computing the batch statistics on the input.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average
