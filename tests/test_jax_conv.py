"""bnref.jax.conv: LeNet-BN's convolution, lax's values and gradients exactly, in any dtype, and
lax's own for every case it does not rewrite."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

from bnref.jax import conv
from bnref.jax.compat import x64

DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shape", [((8, 28, 28, 1), (5, 5, 1, 6)), ((8, 12, 12, 6), (5, 5, 6, 16)),
                                   ((3, 7, 9, 2), (3, 2, 2, 4))])  # fmt: skip
def test_values_and_gradients_equal_lax_s(dtype, shape):
    rng = np.random.default_rng(0)
    with x64(dtype == "float64"):
        x = jnp.asarray(rng.standard_normal(shape[0]), dtype)
        w = jnp.asarray(rng.standard_normal(shape[1]), dtype)
        g = jnp.asarray(rng.standard_normal(_lax(x, w).shape), dtype)
        grads = lambda f: jax.jit(lambda x, w, g: (f(x, w), jax.vjp(f, x, w)[1](g)))(x, w, g)  # noqa: E731
        (y, (dx, dw)), (y_ref, (dx_ref, dw_ref)) = grads(conv.conv_valid), grads(_lax)
        # jitted, as training runs them: what XLA's canonicalization makes of lax's gradients
        for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))

def test_the_lenet_case_is_rewritten_and_every_other_goes_to_lax(monkeypatch):
    calls = []
    monkeypatch.setattr(conv, "conv_valid", lambda x, w: calls.append("ours") or _lax(x, w))
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    conv.conv_general_dilated(x, w, (1, 1), "VALID", lhs_dilation=(1, 1), rhs_dilation=(1, 1), dimension_numbers=dn)
    assert calls == ["ours"]
    # flax.nnx.Conv's call: out_sharding=None (lax's default) is still LeNet's case; with it
    # missed, NNX's scanned steps rounded differently from one step per call (2e-7, tests/test_nnx_train.py)
    conv.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dn, out_sharding=None)
    assert calls == ["ours", "ours"]
    calls.clear()
    calls.append("ours")
    for kwargs in ({"window_strides": (2, 2)}, {"padding": "SAME"}, {"precision": lax.Precision.HIGHEST},
                   {"feature_group_count": 1, "rhs_dilation": (2, 2)}):  # fmt: skip
        args = {"window_strides": (1, 1), "padding": "VALID", "dimension_numbers": dn, **kwargs}
        y = conv.conv_general_dilated(x, w, **args)
        np.testing.assert_array_equal(y, lax.conv_general_dilated(x, w, **args))
    assert calls == ["ours"]


def test_forward_mode_through_the_rewritten_convolution_is_refused_and_lax_s_takes_it():
    from bnref.jax.models import LeNetBN

    x = jnp.ones((4, 28, 28, 1))
    for model, works in ((LeNetBN(), False), (LeNetBN(canonical_conv_grads=False), True)):
        variables = model.init(jax.random.key(0), x, train=False)
        f = lambda x: model.apply(variables, x, train=False)  # noqa: E731
        if works:
            assert jax.jvp(f, (x,), (x,))[1].shape == (4, 10)
        else:
            with pytest.raises(TypeError, match="custom_vjp"):
                jax.jvp(f, (x,), (x,))


def test_a_flax_whose_conv_takes_no_function_gets_lax_s_convolution(monkeypatch):
    """Older Flax (before Conv's conv_general_dilated field): the model still builds, with lax's
    convolution (a version check, not a crash); this Flax has the field."""
    from bnref.jax import models

    assert models.CONV_TAKES_A_FUNCTION
    monkeypatch.setattr(models, "CONV_TAKES_A_FUNCTION", False)
    x = jnp.ones((2, 28, 28, 1))
    model = models.LeNetBN()
    variables = model.init(jax.random.key(0), x, train=False)
    assert jax.jvp(lambda x: model.apply(variables, x, train=False), (x,), (x,))[1].shape == (2, 10)
