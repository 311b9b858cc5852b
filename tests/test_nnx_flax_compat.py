"""bnref.nnx.BatchNorm next to flax.nnx.BatchNorm where Flax's own NNX tests look: training,
running statistics and evaluation (every preset flax.nnx can express; NHWC and NCHW via ``axis``;
float32 and float64), the modes (``train()``/``eval()``, ``nnx.view``, the call argument),
``nnx.jit``, ``nnx.vmap`` with ``axis_name``, ``nnx.grad``, masks, complex and integer input, the
state (``nnx.state``, ``nnx.split``/``nnx.merge``), ``nnx.tabulate`` and ``nnx.view_info``.

Each test runs flax.nnx's layer with ``use_fast_variance=False`` (bnref's default, the two-pass
variance) next to bnref's on the same input and compares, so it asserts what Flax's authors
assert without copying their tests (the upstream run: README, "Flax's own BatchNorm tests";
``tools/upstream_flax_nnx_conftest.py``). The deliberate differences (README, "Differences from
the frameworks") are tested as such.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnref.nnx as bx
from bnref import spec, testing
from bnref.jax.compat import x64

#: the presets flax.nnx can express (momentum = decay, epsilon = eps, biased running variance)
FLAX_PRESETS = sorted(name for name, c in spec.PRESETS.items() if c.running_var == "biased")
LAYOUTS = {"NHWC": ((4, 3, 3, 5), -1), "NCHW": ((4, 5, 3, 3), 1)}


def _pair(num_features=5, *, preset=None, **kw):
    """(bnref's layer, flax.nnx's two-pass layer), built alike: bnref's takes the preset by name,
    Flax's as momentum/epsilon; bnref's ``use_fast_variance`` is left at its default."""
    theirs_kw = {"use_fast_variance": False, **kw}
    ours_kw = dict(kw)
    if preset is not None:
        conv = spec.preset(preset)
        theirs_kw.update(momentum=conv.decay, epsilon=conv.eps)
        ours_kw.update(convention=preset)
    ours = bx.BatchNorm(num_features, **ours_kw, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(num_features, **theirs_kw, rngs=nnx.Rngs(0))
    return ours, theirs


def _flax(layer, *args, **kwargs):
    """Call flax.nnx's layer: it writes float64 (or complex) statistics into its float32 BatchStat
    in place (``self.mean[...] = ...``), which JAX warns will be an error one day (FutureWarning,
    and a ComplexWarning as the imaginary part is dropped); bnref casts explicitly (float64) or
    keeps the complex mean, without a warning, which the suite's warnings-as-errors checks."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "scatter inputs have incompatible types", FutureWarning)
        warnings.filterwarnings("ignore", "Casting complex values to real", np.exceptions.ComplexWarning)
        return layer(*args, **kwargs)


def _inputs(shape, axis, dtype, seed=0):
    """bnref.testing's inputs (channels far apart, to catch a wrong axis), as ``dtype``."""
    return jnp.asarray(testing.make_inputs(shape, axis, seed)["x"], dtype)


class _Net(nnx.Module):
    """Linear -> the BatchNorm under test (the Linear's weights the same for every ``bn``)."""

    def __init__(self, bn, din):
        self.linear = nnx.Linear(din, bn.num_features, rngs=nnx.Rngs(1))
        self.bn = bn

    def __call__(self, x, **kw):
        return self.bn(self.linear(x), **kw)


def _stats(layer):
    return np.asarray(layer.mean[...]), np.asarray(layer.var[...])


def _assert_same(ours, theirs, y_ours, y_theirs, label):
    """Outputs and running statistics bit for bit, dtypes included."""
    assert y_ours.dtype == y_theirs.dtype, label
    np.testing.assert_array_equal(np.asarray(y_ours), np.asarray(y_theirs), err_msg=f"y ({label})")
    for name, a, b in zip(("mean", "var"), _stats(ours), _stats(theirs)):
        assert a.dtype == b.dtype, f"{name} dtype ({label})"
        np.testing.assert_array_equal(a, b, err_msg=f"running {name} ({label})")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("preset", FLAX_PRESETS)
def test_training_and_evaluation_equal_flax_two_pass(preset, layout, dtype):
    """Three training steps (outputs and running statistics after each), then evaluation, which
    leaves the state bit-identical: bit for bit flax.nnx.BatchNorm(use_fast_variance=False). The
    statistics stay float32 BatchStats in float64 too, as Flax's (bnref.nnx before this test
    stored float64 ones, changing the state's dtypes)."""
    shape, axis = LAYOUTS[layout]
    with x64(dtype == "float64"):
        ours, theirs = _pair(shape[axis], preset=preset, axis=axis, param_dtype=dtype)
        for step in range(3):
            x = _inputs(shape, axis, dtype, seed=step)
            _assert_same(ours, theirs, ours(x), _flax(theirs, x), f"train step {step}, {preset}, {layout}, {dtype}")
        ours.eval()
        theirs.eval()
        before = _stats(ours)
        x = _inputs(shape, axis, dtype, seed=9)
        _assert_same(ours, theirs, ours(x), theirs(x), f"eval, {preset}, {layout}, {dtype}")
        for a, b in zip(_stats(ours), before):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_unbiased_preset_matches_the_spec(layout, dtype):
    """The torch preset (unbiased running variance) is one flax.nnx cannot express: bnref.nnx is
    checked against bnref.spec instead (y and the running statistics, train then eval)."""
    shape, axis = LAYOUTS[layout]
    inputs = testing.make_inputs(shape, axis)
    with x64(dtype == "float64"):
        layer = bx.BatchNorm(shape[axis], axis=axis, convention="torch", param_dtype=dtype, rngs=nnx.Rngs(0))
        layer.scale[...] = jnp.asarray(inputs["gamma"], dtype)
        layer.bias[...] = jnp.asarray(inputs["beta"], dtype)
        layer.mean[...] = jnp.asarray(inputs["running_mean"], jnp.float32)
        layer.var[...] = jnp.asarray(inputs["running_var"], jnp.float32)
        x = testing.round_to(inputs["x"], dtype)
        args = (inputs["gamma"], inputs["beta"], np.asarray(layer.mean[...], np.float64),
                np.asarray(layer.var[...], np.float64))  # fmt: skip
        y = layer(jnp.asarray(x, dtype))
        y_spec, rm, rv = spec.batch_norm_train(x, *args, "torch", axis=axis)
        context = f"nnx, preset=torch, {layout}, {dtype}"
        testing.assert_close({"y": np.asarray(y)}, {"y": y_spec}, context=f"{context}, train", dtype=dtype)
        # the running statistics are the float32 BatchStat's whatever the input (as flax.nnx's)
        testing.assert_close({"running_mean": np.asarray(layer.mean[...]), "running_var": np.asarray(layer.var[...])},
                             {"running_mean": rm, "running_var": rv}, context=f"{context}, train", dtype="float32")  # fmt: skip
        y = layer(jnp.asarray(x, dtype), use_running_average=True)
        stored = (np.asarray(layer.mean[...], np.float64), np.asarray(layer.var[...], np.float64))
        y_spec = spec.batch_norm_eval(x, inputs["gamma"], inputs["beta"], *stored, "torch", axis=axis)
        testing.assert_close({"y": np.asarray(y)}, {"y": y_spec}, context=f"{context}, eval", dtype=dtype)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16], ids=["params-f32", "params-f16"])
@pytest.mark.parametrize("dtype", [None, jnp.float16], ids=["dtype-None", "dtype-f16"])
def test_dtype_rules_equal_flax(dtype, param_dtype):
    """Flax's own equivalence test varies dtype and param_dtype; the promoted result, the float32
    statistics and their values are the same (here with nnx's default promote_dtype)."""
    ours, theirs = _pair(5, dtype=dtype, param_dtype=param_dtype)
    assert ours.scale[...].dtype == theirs.scale[...].dtype == param_dtype
    x = jax.random.normal(jax.random.key(0), (10, 5))
    _assert_same(ours, theirs, ours(x), theirs(x), f"dtype={dtype}, param_dtype={param_dtype}")


def test_modes_train_eval_view_and_the_call_argument_equal_flax():
    """use_running_average from the constructor, model.train()/model.eval(), nnx.view, and the
    call argument, which wins: the same mode, output and statistics as flax.nnx in each."""
    x = _inputs((8, 5), -1, "float32")
    ours, theirs = (_Net(bn, 5) for bn in _pair(5))
    _assert_same(ours.bn, theirs.bn, ours(x), theirs(x), "constructor default (training)")
    for m in (ours, theirs):
        m.eval()
    assert ours.bn.use_running_average is theirs.bn.use_running_average is True
    _assert_same(ours.bn, theirs.bn, ours(x + 1), theirs(x + 1), "eval()")
    _assert_same(ours.bn, theirs.bn, ours(x + 2, use_running_average=False), theirs(x + 2, use_running_average=False),
                 "eval() overridden by the call")  # fmt: skip
    views = [nnx.view(m, use_running_average=False) for m in (ours, theirs)]
    assert ours.bn.use_running_average is True  # a view leaves the model alone
    _assert_same(views[0].bn, views[1].bn, views[0](x + 3), views[1](x + 3), "nnx.view(use_running_average=False)")
    _assert_same(ours.bn, theirs.bn, ours(x), theirs(x), "the model after the view (eval)")
    for m in (ours, theirs):
        m.train()
    _assert_same(ours.bn, theirs.bn, ours(x - 1), theirs(x - 1), "train()")
    none = bx.BatchNorm(5, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="No `use_running_average`"):
        none(x)  # as flax.nnx's: no mode anywhere is an error


def test_under_nnx_jit_equals_flax():
    """A jitted call updates the BatchStat in place, as eagerly; switching the module to eval
    retraces (use_running_average is static)."""

    @nnx.jit
    def apply(m, x):
        return m(x)

    ours, theirs = _pair(5, preset="d2l")
    for step in range(3):
        x = _inputs((6, 5), -1, "float32", seed=step)
        _assert_same(ours, theirs, apply(ours, x), apply(theirs, x), f"nnx.jit train step {step}")
    ours.eval()
    theirs.eval()
    x = _inputs((6, 5), -1, "float32", seed=7)
    _assert_same(ours, theirs, apply(ours, x), apply(theirs, x), "nnx.jit eval")
    np.testing.assert_array_equal(np.asarray(apply(ours, x)), np.asarray(ours(x)))


def test_under_nnx_vmap_with_axis_name_equals_flax_and_the_whole_batch():
    """nnx.vmap with axis_name and the layer broadcast (in_axes None): the statistics span the
    mapped axis (lax.pmean), as Flax's linen transform test checks, and equal one BatchNorm over
    the concatenated batch."""
    x = jax.random.normal(jax.random.key(3), (4, 6, 3)) * 2 + 1  # 4 mapped groups of 6

    @nnx.vmap(in_axes=(None, 0), out_axes=0, axis_name="batch")
    def apply(m, x):
        return m(x)

    ours, theirs = _pair(3, axis_name="batch")
    y_ours, y_theirs = apply(ours, x), apply(theirs, x)
    np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_theirs), rtol=1e-6, atol=1e-6)
    for a, b in zip(_stats(ours), _stats(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    whole = bx.BatchNorm(3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(y_ours).reshape(24, 3), np.asarray(whole(x.reshape(24, 3))),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    for a, b in zip(_stats(ours), _stats(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_under_nnx_grad_equals_flax(train):
    """nnx.grad of a loss through the layer: d/dscale, d/dbias and d/dx, and (in training) the
    statistics the traced call stored, as flax.nnx's."""
    x = _inputs((8, 4), -1, "float32")
    w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4)), jnp.float32)

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)) * w)

    results = []
    for layer in _pair(4, use_running_average=not train):
        layer.mean[...] = jnp.arange(4.0)
        grads, dx = nnx.grad(loss, argnums=(0, 1))(layer, x)
        results.append((layer, grads, dx))
    (ours, g_ours, dx_ours), (theirs, g_theirs, dx_theirs) = results
    for name in ("scale", "bias"):
        np.testing.assert_allclose(np.asarray(g_ours[name][...]), np.asarray(g_theirs[name][...]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)  # fmt: skip
    assert set(g_ours) == set(g_theirs) == {"scale", "bias"}  # nnx.grad: the Params only
    np.testing.assert_allclose(np.asarray(dx_ours), np.asarray(dx_theirs), rtol=1e-5, atol=1e-6, err_msg="dx")
    for a, b in zip(_stats(ours), _stats(theirs)):
        np.testing.assert_array_equal(a, b)


def test_jitted_training_steps_with_an_optimizer_equal_flax():
    """nnx.jit around nnx.value_and_grad and nnx.Optimizer (Flax's NNX MNIST tutorial's step) on
    Linear -> BatchNorm: the losses, parameters and statistics of three steps agree."""

    @nnx.jit
    def step(model, opt, x, t):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - t) ** 2))(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(2)
    data = [(jnp.asarray(rng.standard_normal((16, 6)), jnp.float32), jnp.asarray(rng.standard_normal((16, 4)), jnp.float32))
            for _ in range(3)]  # fmt: skip
    runs = []
    for bn in _pair(4, preset="d2l"):
        model = _Net(bn, 6)
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        losses = [float(step(model, opt, x, t)) for x, t in data]
        runs.append((losses, nnx.state(model)))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-6)
    flat = [dict(nnx.to_flat_state(s)) for _, s in runs]
    assert flat[0].keys() == flat[1].keys()
    for path in flat[0]:
        np.testing.assert_allclose(np.asarray(flat[0][path][...]), np.asarray(flat[1][path][...]), rtol=1e-5,
                                   atol=1e-6, err_msg=str(path))  # fmt: skip


@pytest.mark.parametrize("mask_dtype", [jnp.bool_, jnp.int32, jnp.float32], ids=["bool", "int32", "float32"])
@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
def test_masks_of_any_dtype_equal_flax(fast, mask_dtype):
    """Flax's mask (any dtype, nonzero selects; every feature keeps at least 2 values here)."""
    x = _inputs((12, 5), -1, "float32", seed=4)
    selected = np.random.default_rng(5).random((12, 5)) > 0.4
    selected[:2] = True
    ours, _ = _pair(5, use_fast_variance=fast)
    theirs = nnx.BatchNorm(5, use_fast_variance=fast, rngs=nnx.Rngs(0))
    mask = jnp.asarray(selected, mask_dtype)
    y_ours, y_theirs = ours(x, mask=mask), theirs(x, mask=jnp.asarray(selected))
    np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_theirs), rtol=1e-6, atol=1e-6)
    for a, b in zip(_stats(ours), _stats(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_feature_left_empty_by_the_mask_keeps_its_statistics_unlike_flax():
    """Deliberate (README): Flax's own equivalence tests mask features 1 and 3 out entirely;
    flax.nnx averages over nothing and stores NaN, bnref keeps their running values. The outputs
    and the other features' statistics are Flax's."""
    x = jax.random.normal(jax.random.key(0), (10, 5))
    mask = np.array([True, False, True, False, True])
    ours, theirs = _pair(5)
    y_ours, y_theirs = ours(x, mask=mask), theirs(x, mask=mask)
    np.testing.assert_array_equal(np.asarray(y_ours), np.asarray(y_theirs))
    (mean, var), (mean_flax, var_flax) = _stats(ours), _stats(theirs)
    assert np.isnan(mean_flax[[1, 3]]).all() and np.isnan(var_flax[[1, 3]]).all()
    np.testing.assert_array_equal(mean[[1, 3]], 0.0)
    np.testing.assert_array_equal(var[[1, 3]], 1.0)
    np.testing.assert_array_equal(mean[[0, 2, 4]], mean_flax[[0, 2, 4]])
    np.testing.assert_array_equal(var[[0, 2, 4]], var_flax[[0, 2, 4]])


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
def test_complex_input_equals_flax_but_keeps_the_complex_mean(fast):
    """The output and the (real) running variance are flax.nnx's. Deliberate (README): flax.nnx
    writes the complex batch mean into its float32 BatchStat, dropping the imaginary part, so
    its evaluation subtracts the wrong mean; bnref keeps it complex, as flax.linen does, and
    evaluates with it."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(3 + 2 * rng.standard_normal((16, 5)) + 1j * (1 - rng.standard_normal((16, 5))), jnp.complex64)
    ours, theirs = _pair(5, use_fast_variance=fast, momentum=0.9)
    y_ours, y_theirs = ours(x), _flax(theirs, x)
    assert y_ours.dtype == y_theirs.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_theirs), rtol=1e-5, atol=1e-5)
    (mean, var), (mean_flax, var_flax) = _stats(ours), _stats(theirs)
    assert var.dtype == var_flax.dtype == np.float32
    np.testing.assert_allclose(var, var_flax, rtol=1e-5, atol=1e-6)
    assert mean.dtype == np.complex64 and mean_flax.dtype == np.float32
    np.testing.assert_allclose(mean.real, mean_flax, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, 0.1 * np.asarray(x).mean(0), rtol=1e-5, atol=1e-6)  # decay 0.9 from 0
    y_eval = np.asarray(ours(x, use_running_average=True))
    np.testing.assert_allclose(y_eval, (np.asarray(x) - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_integer_input_is_promoted_like_flax(dtype, train):
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2 if dtype == jnp.bool_ else 9, (12, 3)), dtype)
    ours, theirs = _pair(3, use_running_average=not train, momentum=0.9)
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype == jnp.float32
    _assert_same(ours, theirs, y_ours, y_theirs, f"{dtype.__name__} input")


def test_fast_variance_true_equals_flax_default_and_the_default_is_two_pass():
    """use_fast_variance=True is flax.nnx's default formula bit for bit; bnref's default is the
    two-pass variance (deliberate, README): at mean 1e4 and std 0.1 in float32 the one-pass
    E[x^2] - E[x]^2 cancels and the output's spread is far from 1, the two-pass one's is not."""
    x = 1e4 + 0.1 * jax.random.normal(jax.random.key(1), (256, 3))
    ours = bx.BatchNorm(3, use_fast_variance=True, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0))  # Flax's default: use_fast_variance=True
    _assert_same(ours, theirs, ours(x), theirs(x), "use_fast_variance=True")
    default = bx.BatchNorm(3, rngs=nnx.Rngs(0))
    assert default.use_fast_variance is False
    std = np.asarray(default(x)).std(0)
    np.testing.assert_allclose(std, 1.0, rtol=1e-2)
    assert np.abs(np.asarray(theirs(x)).std(0) - 1.0).max() > 0.1  # the one-pass formula's error


def test_one_value_per_feature_in_training_raises_unlike_flax():
    """Deliberate (README): Flax trains on one value per feature and outputs the bias (its vmap
    and scan tests do, on (1, 3) slices); bnref refuses, before any state changes. Evaluation
    accepts it, as Flax's."""
    ours, theirs = _pair(3)
    x = jnp.ones((1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(x)
    np.testing.assert_array_equal(np.asarray(theirs(x)), 0.0)  # Flax: the bias
    np.testing.assert_array_equal(_stats(ours)[0], 0.0)
    np.testing.assert_array_equal(_stats(ours)[1], 1.0)
    ours, theirs = _pair(3)
    np.testing.assert_array_equal(np.asarray(ours(x, use_running_average=True)),
                                  np.asarray(theirs(x, use_running_average=True)))  # fmt: skip
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bx.BatchNorm(4, rngs=nnx.Rngs(0))(jnp.ones(4))  # rank 1: every axis a feature


def test_empty_batch_keeps_the_statistics_unlike_flax():
    """Deliberate (README): Flax averages over nothing and stores NaN; bnref returns the empty
    output and leaves the statistics as they were (the spec's rule)."""
    ours, theirs = _pair(3)
    ours.mean[...] = theirs.mean[...] = jnp.asarray([1.0, 2.0, 3.0])
    y = ours(jnp.zeros((0, 3)))
    assert y.shape == (0, 3) and y.dtype == jnp.float32
    np.testing.assert_array_equal(_stats(ours)[0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(_stats(ours)[1], 1.0)
    theirs(jnp.zeros((0, 3)))
    assert np.isnan(_stats(theirs)[0]).all()


def test_refusals_before_any_state_changes():
    """A layer built for another feature count, and momentum/epsilon contradicting a convention,
    are ValueErrors naming the problem (flax.nnx has no convention; its layer fails later or not
    at all on a feature-count mismatch)."""
    layer = bx.BatchNorm(3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="must have shape"):
        layer(jnp.ones((4, 5)))
    np.testing.assert_array_equal(_stats(layer)[0], 0.0)
    with pytest.raises(ValueError, match="momentum=0.5 conflicts with convention decay=0.9"):
        bx.BatchNorm(3, momentum=0.5, convention="torch", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="epsilon=0.1 conflicts"):
        bx.BatchNorm(3, epsilon=0.1, convention="d2l", rngs=nnx.Rngs(0))
    assert bx.BatchNorm(3, momentum=0.9, convention="torch", rngs=nnx.Rngs(0)).resolved_convention() == spec.TORCH
    with pytest.raises(TypeError, match="num_features must be an int"):
        bx.BatchNorm(3.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, True), (True, False), (False, False)])
def test_state_structure_equals_flax(use_scale, use_bias):
    """nnx.state: the same paths, Variable types (Param scale/bias, BatchStat mean/var), shapes and
    dtypes; so Flax's state loads into bnref's layer (nnx.update) and the outputs agree."""
    ours, theirs = _pair(4, use_scale=use_scale, use_bias=use_bias)

    def described(layer):
        return [(path, type(v), v[...].shape, v[...].dtype) for path, v in nnx.to_flat_state(nnx.state(layer))]

    assert described(ours) == described(theirs)
    present = {"mean": True, "var": True, "scale": use_scale, "bias": use_bias}
    assert sorted(p for p, *_ in described(ours)) == sorted((name,) for name, kept in present.items() if kept)
    for layer in (ours, theirs):
        assert (layer.scale is None) is (not use_scale) and (layer.bias is None) is (not use_bias)
    x = _inputs((8, 4), -1, "float32")
    theirs(x)
    nnx.update(ours, nnx.state(theirs))  # Flax's trained state into bnref's layer
    ours.eval()
    theirs.eval()
    _assert_same(ours, theirs, ours(x), theirs(x), "after nnx.update with Flax's state")


def test_split_merge_round_trip():
    ours, _ = _pair(4, preset="keras")
    x = _inputs((8, 4), -1, "float32")
    ours(x)
    graphdef, params, stats = nnx.split(ours, nnx.Param, nnx.BatchStat)
    assert set(params) == {"scale", "bias"} and set(stats) == {"mean", "var"}
    copy = nnx.merge(graphdef, params, stats)
    assert isinstance(copy, bx.BatchNorm) and copy.resolved_convention() == spec.KERAS
    np.testing.assert_array_equal(np.asarray(copy(x + 1)), np.asarray(ours(x + 1)))
    for a, b in zip(_stats(copy), _stats(ours)):
        np.testing.assert_array_equal(a, b)


def test_tabulate_and_view_info_like_flax():
    """nnx.tabulate jit-traces every public method a forward pass calls (bnref.nnx before this
    test called its public resolved_convention there and failed: a Convention is no JAX type);
    nnx.view_info reads set_view's Args section (bnref.nnx's had none: KeyError)."""
    ours, theirs = (_Net(bn, 3) for bn in (bx.BatchNorm(4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0))))
    x = jnp.ones((2, 3))
    kw = {"compute_flops": True, "compute_vjp_flops": True, "console_kwargs": {"width": 250, "force_terminal": False}}
    table = nnx.tabulate(ours, x, **kw)
    assert "BatchNorm" in table and "BatchStat" in table and "resolved_convention" not in table
    assert table.count("\n") == nnx.tabulate(theirs, x, **kw).count("\n")
    assert nnx.view_info(ours) == nnx.view_info(theirs)


OLDER_FLAX = r"""
import builtins
from flax import nnx  # Flax itself first: only bnref's import of first_from is made to fail
real = builtins.__import__
def without_first_from(name, globals=None, locals=None, fromlist=(), level=0):
    if name == "flax.nnx.module" and fromlist and "first_from" in fromlist:
        raise ImportError("cannot import name 'first_from'")
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = without_first_from
import bnref.nnx.layers as layers
builtins.__import__ = real
import jax.numpy as jnp
assert layers.first_from.__module__ == "bnref.nnx.layers"
layer = layers.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
try:
    layer(jnp.ones((4, 3)))
    raise SystemExit("no mode given, and the layer ran")
except ValueError as e:
    assert "use_running_average" in str(e)
print(float(layer(jnp.arange(12.0).reshape(4, 3), use_running_average=False).std()))
"""


def test_a_flax_without_first_from_gets_the_same_mode_rule():
    """The device machine's Flax may be older: bnref.nnx imports flax.nnx.module.first_from where it
    exists and writes the same rule out where it does not (a version check, not a crash)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", OLDER_FLAX], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert abs(float(proc.stdout.strip()) - 1.0) < 1e-3
