"""The convolution bnref's Flax LeNet-BN runs: ``lax.conv_general_dilated`` with its gradients
written as convolutions in the canonical layouts (:func:`conv_general_dilated`, for
``flax.linen.Conv(conv_general_dilated=...)``).

Why: JAX's own transpose rules express a convolution's input and weight gradients as
convolutions with permuted dimension numbers (``b01f_01oi->b01f``, ``f01b_i01o->01bf``). At the
top level of a computation XLA's CPU backend rewrites them into canonical ones with explicit
transposes; inside a loop body (``lax.scan``: ``--steps-per-call``) it does not, and runs them
with a generic loop instead of its fast convolution: other rounding (~2e-7 a step) and 4-10x
slower (``notes/steps-per-call.md``). Written here in the canonical layouts (``NHWC``,
``HWIO``) with the transposes explicit, the gradients are bit for bit what the top level
computed before, and the same inside a scan: K steps per call are then bit-identical to one
step per call, and as fast.

Only the case LeNet uses is rewritten: stride 1, ``VALID`` padding, no dilation, one feature
group, NHWC/HWIO, default precision; any other call goes to ``lax.conv_general_dilated``
unchanged. The rewritten one has a custom VJP, so forward-mode differentiation (``jax.jvp``,
``jax.jacfwd``) through it is refused by JAX; ``LeNetBN(canonical_conv_grads=False)`` uses
lax's convolution throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated", "conv_valid"]

_DN = ("NHWC", "HWIO", "NHWC")


@jax.custom_vjp
def conv_valid(x, w):
    """``x`` (N, H, W, Ci) correlated with ``w`` (kh, kw, Ci, Co): stride 1, VALID padding."""
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=_DN)


def _conv_valid_fwd(x, w):
    return conv_valid(x, w), (x, w)


def _conv_valid_bwd(residuals, g):
    x, w = residuals
    kh, kw = w.shape[0], w.shape[1]
    # dx: the full correlation of g (N, Ho, Wo, Co) with the flipped kernel, its in/out swapped
    w_flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)  # (kh, kw, Co, Ci)
    dx = lax.conv_general_dilated(g, w_flipped, (1, 1), ((kh - 1, kh - 1), (kw - 1, kw - 1)), dimension_numbers=_DN)
    # dw[i, j, ci, co] = sum over n, h, w of x[n, h + i, w + j, ci] * g[n, h, w, co]: a VALID
    # correlation with Ci as the batch and N as the contracted feature
    x_t = x.transpose(3, 1, 2, 0)  # (Ci, H, W, N)
    g_t = g.transpose(1, 2, 0, 3)  # (Ho, Wo, N, Co)
    dw = lax.conv_general_dilated(x_t, g_t, (1, 1), "VALID", dimension_numbers=_DN)  # (Ci, kh, kw, Co)
    return _as_primal(dx.astype(x.dtype), x), _as_primal(dw.transpose(1, 2, 0, 3).astype(w.dtype), w)


def _as_primal(cotangent, primal):
    """``cotangent`` summed over the ``shard_map`` axes it varies along and ``primal`` does not
    (a replicated kernel meeting a sharded batch): what JAX's own transpose of the implicit
    ``pvary`` does, so that data-parallel gradients come out replicated and summed as with lax's
    convolution. A no-op outside ``shard_map`` and on a JAX without varying-axis types."""
    extra = _varying(cotangent) - _varying(primal)
    return lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _varying(x) -> frozenset:
    """The ``shard_map`` axes ``x`` varies along: ``typeof(x).manual_axis_type.varying`` (JAX
    0.10), ``typeof(x).vma`` (JAX 0.6-0.9), none on a JAX without either."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return frozenset()
    aval = typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


def _is_lenet_case(window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                   precision, kwargs) -> bool:  # fmt: skip
    ones = lambda v: v is None or all(int(s) == 1 for s in v)  # noqa: E731
    if not (ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation)):
        return False
    valid = padding == "VALID" or (not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding))
    dims = dimension_numbers
    canonical = isinstance(dims, lax.ConvDimensionNumbers) and tuple(dims) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    canonical = canonical or tuple(dims or ()) == _DN
    # flax.nnx.Conv passes out_sharding=None (and preferred_element_type=None): lax's defaults, so
    # LeNet's case still; any other value goes to lax
    extra = {k: v for k, v in kwargs.items() if v is not None}
    return valid and canonical and feature_group_count == 1 and precision is None and not extra


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):  # fmt: skip
    """``lax.conv_general_dilated``'s signature and result; LeNet's case (2-D, stride 1, VALID,
    NHWC/HWIO, default precision) through :func:`conv_valid`, any other through lax."""
    if lhs.ndim == 4 and _is_lenet_case(window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                        feature_group_count, precision, kwargs):  # fmt: skip
        return conv_valid(lhs, rhs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)  # fmt: skip
