"""The JAX/Flax backend: spec parity, drop-in parity with flax.linen.BatchNorm, properties, LeNetBN.

float64 cases enable x64 only inside the runners (``jax.enable_x64`` context), never for the
whole session. Every jitted function here sees few shapes, to keep compile time down.
"""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax
import flax.linen as nn

import bnref.jax as bj
from bnref import spec, testing
from bnref.jax import _runners

PRESETS = sorted(spec.PRESETS)
SHAPES = {2: (16, 5), 3: (6, 4, 5), 4: (4, 3, 5, 6)}  # rank -> shape; the channel axis varies


def _ids(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


# --- spec parity (the one parity helper) --------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("preset", PRESETS)
def test_functional_matches_spec(preset, dtype, rank, axis, train):
    testing.assert_matches_spec(_runners.run_functional, "jax", preset, SHAPES[rank], axis, dtype, train)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset", ["d2l", "torch"])
def test_functional_half_precision_matches_spec(preset, dtype):
    # statistics in float32 (as Flax), so half inputs stay within half-precision tolerance
    testing.assert_matches_spec(_runners.run_functional, "jax", preset, (32, 4, 4, 3), -1, dtype, True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("preset", PRESETS)
def test_layer_matches_spec(preset, dtype, train):
    testing.assert_matches_spec(_runners.run_layer, "jax-layer", preset, (4, 5, 5, 3), -1, dtype, train)


@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 5), 1), ((16, 5), -1), ((6, 5, 4), 1)], ids=_ids)
def test_layer_matches_spec_layouts(shape, axis):
    testing.assert_matches_spec(_runners.run_layer, "jax-layer", "torch", shape, axis, "float64", True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("preset", ["d2l", "flax", "keras"])
def test_builtin_matches_spec(preset, dtype, train):
    testing.assert_matches_spec(_runners.run_builtin, "flax.linen", preset, (4, 5, 5, 3), -1, dtype, train)


def test_builtin_cannot_express_unbiased_running_var():
    inputs = testing.make_inputs((4, 3), -1)
    with pytest.raises(testing.NotExpressible, match="biased variance"):
        _runners.run_builtin(inputs, spec.TORCH, -1, "float32", True)


# --- drop-in parity with flax.linen.BatchNorm ------------------------------------------------

LAYER_CONFIGS = {  # name -> (momentum, use_bias, use_scale)
    "m0.9": (0.9, True, True),
    "m0.99-nobias": (0.99, False, True),
    "m0.5-noscale": (0.5, True, False),
    "m0-noaffine": (0.0, False, False),
}
AXES = {"-1": (-1, (4, 5, 6, 3)), "1": (1, (4, 3, 5, 6)), "(1,2)": ((1, 2), (4, 3, 5, 2))}


def _tree_meta(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _flax_vs_bnref_run(module, shape, steps=3):
    """init, ``steps`` training applies (outputs, grads, stats), then eval; all as NumPy."""
    rng = np.random.default_rng(1)
    xs = [jnp.asarray(3.0 + 2.0 * rng.standard_normal(shape), jnp.float32) for _ in range(steps + 1)]
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    variables = module.init(jax.random.key(0), xs[0], use_running_average=False)
    out = {"variables": variables}

    def loss(params, x, stats):
        y, upd = module.apply({"params": params, "batch_stats": stats}, x, use_running_average=False, mutable=["batch_stats"])
        return (y * dy).sum(), (y, upd["batch_stats"])

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    params, stats = variables.get("params", {}), variables["batch_stats"]
    for i, x in enumerate(xs[:steps]):
        (dparams, dx), (y, stats) = grad(params, x, stats)
        out[f"step{i}"] = {"y": y, "dx": dx, "dparams": dparams, "stats": stats}
    out["eval"] = module.apply({"params": params, "batch_stats": stats}, xs[steps], use_running_average=True)
    return jax.tree.map(np.asarray, out)


# every axis choice with the first config, every config with axis -1; both variance formulas
FLAX_CASES = [(c, a) for c in LAYER_CONFIGS for a in AXES if c == "m0.9" or a == "-1"]


@pytest.mark.parametrize("config,axis_name", FLAX_CASES, ids=[f"{c}-axis{a}" for c, a in FLAX_CASES])
@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
def test_layer_matches_flax(fast, config, axis_name):
    momentum, use_bias, use_scale = LAYER_CONFIGS[config]
    axis, shape = AXES[axis_name]
    kw = dict(axis=axis, momentum=momentum, use_bias=use_bias, use_scale=use_scale, use_fast_variance=fast)
    ours = _flax_vs_bnref_run(bj.BatchNorm(**kw), shape)
    theirs = _flax_vs_bnref_run(nn.BatchNorm(**kw), shape)
    assert _tree_meta(ours["variables"]) == _tree_meta(theirs["variables"])
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    flat_ours = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
    flat_theirs = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
    actual = {jax.tree_util.keystr(k): v for k, v in flat_ours.items()}
    expected = {jax.tree_util.keystr(k): v for k, v in flat_theirs.items()}
    testing.assert_close(actual, expected, context=f"jax vs flax.linen, {config}, axis={axis_name}, fast={fast}", dtype="float32")


def test_default_differs_from_flax_only_in_fast_variance():
    ours = {f.name: f.default for f in dataclasses.fields(bj.BatchNorm)}
    theirs = {f.name: f.default for f in dataclasses.fields(nn.BatchNorm)}
    assert list(ours)[: len(theirs) - 2] == list(theirs)[:-2]  # same fields, same order (then parent, name)
    assert set(ours) - set(theirs) == {"convention"}
    differing = {k for k in theirs if k not in ("parent", "name") and ours[k] != theirs[k]}
    assert differing == {"use_fast_variance"}
    assert ours["use_fast_variance"] is False and theirs["use_fast_variance"] is True


# --- state handling ------------------------------------------------------------------------


X_NHWC = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (8, 4, 4, 3)), jnp.float32)


def test_init_leaves_stats_at_zero_and_one():
    variables = bj.BatchNorm().init(jax.random.key(0), X_NHWC, use_running_average=False)
    assert _tree_meta(variables) == {
        "params": {"scale": ((3,), jnp.float32), "bias": ((3,), jnp.float32)},
        "batch_stats": {"mean": ((3,), jnp.float32), "var": ((3,), jnp.float32)},
    }
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))


def test_eval_leaves_stats_bit_identical():
    bn = bj.BatchNorm(convention="d2l")
    variables = bn.init(jax.random.key(0), X_NHWC, use_running_average=False)
    _, upd = bn.apply(variables, X_NHWC, use_running_average=False, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
    _, after = bn.apply(variables, X_NHWC + 5.0, use_running_average=True, mutable=["batch_stats"])
    for k in ("mean", "var"):
        before = np.asarray(variables["batch_stats"][k])
        assert np.asarray(after["batch_stats"][k]).tobytes() == before.tobytes()


@pytest.mark.parametrize("module", [bj.BatchNorm, nn.BatchNorm], ids=["bnref", "flax"])
def test_training_without_mutable_raises_like_flax(module):
    bn = module()
    variables = bn.init(jax.random.key(0), X_NHWC, use_running_average=False)
    with pytest.raises(flax.errors.ModifyScopeVariableError, match="batch_stats"):
        bn.apply(variables, X_NHWC, use_running_average=False)


def test_use_running_average_attribute_or_call_argument():
    variables = bj.BatchNorm().init(jax.random.key(0), X_NHWC, use_running_average=False)
    by_attr = bj.BatchNorm(use_running_average=True).apply(variables, X_NHWC)
    by_arg = bj.BatchNorm().apply(variables, X_NHWC, use_running_average=True)
    np.testing.assert_array_equal(by_attr, by_arg)
    with pytest.raises(ValueError, match="passed to the constructor and at call time"):
        bj.BatchNorm(use_running_average=True).apply(variables, X_NHWC, use_running_average=True)
    with pytest.raises(ValueError, match="must be passed"):
        bj.BatchNorm().apply(variables, X_NHWC)


def _one_step_stats(bn, x):
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    _, upd = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return np.asarray(upd["batch_stats"]["mean"], np.float64), np.asarray(upd["batch_stats"]["var"], np.float64)


@pytest.mark.parametrize(
    "kwargs,decay,unbiased",
    [
        ({}, 0.99, False),  # no convention: Flax's momentum/epsilon fields
        ({"momentum": 0.8}, 0.8, False),
        ({"convention": "d2l"}, 0.9, False),  # a preset: its decay, momentum left at Flax's default
        ({"convention": spec.TORCH}, 0.9, True),  # unbiased running variance
        ({"convention": "d2l", "momentum": 0.9}, 0.9, False),  # agreeing fields are fine
    ],
    ids=["flax-default", "momentum", "preset-name", "torch-convention", "agreeing-momentum"],
)
def test_running_update_closed_form(kwargs, decay, unbiased):
    x = np.asarray(X_NHWC, np.float64)
    mean, var = _one_step_stats(bj.BatchNorm(**kwargs), X_NHWC)
    n = x.size // 3
    mu, sigma2 = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).var(0)
    s2 = sigma2 * n / (n - 1) if unbiased else sigma2
    np.testing.assert_allclose(mean, (1 - decay) * mu, rtol=1e-5)
    np.testing.assert_allclose(var, decay + (1 - decay) * s2, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{"convention": "d2l", "momentum": 0.5}, {"convention": "keras", "epsilon": 1e-4}], ids=["momentum", "epsilon"])
def test_convention_conflicting_with_fields_raises(kwargs):
    with pytest.raises(ValueError, match="conflicts with convention"):
        bj.BatchNorm(**kwargs).init(jax.random.key(0), X_NHWC, use_running_average=False)


def test_no_gradient_reaches_running_stats():
    rm, rv = jnp.ones(3), jnp.full(3, 2.0)

    def f(x, rm, rv, train):
        y, nrm, nrv = bj.batch_norm(x, None, None, rm, rv, train=train)
        return (y**2).sum() + nrm.sum() + nrv.sum()

    for_train = jax.grad(f, argnums=(1, 2))(X_NHWC, rm, rv, True)
    for_eval = jax.grad(f, argnums=(1, 2))(X_NHWC, rm, rv, False)
    for g in (*for_train, *for_eval):
        np.testing.assert_array_equal(g, np.zeros(3))


def test_eval_returns_running_stats_unchanged():
    rm, rv = jnp.arange(3.0), jnp.full(3, 2.0)
    _, nrm, nrv = jax.jit(bj.batch_norm, static_argnames=("train",))(X_NHWC, None, None, rm, rv, train=False)
    assert np.asarray(nrm).tobytes() == np.asarray(rm).tobytes()
    assert np.asarray(nrv).tobytes() == np.asarray(rv).tobytes()


# --- numerics and layout traps --------------------------------------------------------------


def _large_mean_input():
    rng = np.random.default_rng(0)
    return jnp.asarray((1e4 + 0.1 * rng.standard_normal((64, 4, 4, 8))).astype(np.float32))  # NHWC


def _output_std(module):
    x = _large_mean_input()
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    y, _ = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return np.asarray(y, np.float64).reshape(-1, 8).std(axis=0)  # per channel


def test_two_pass_default_is_stable_at_large_mean():
    np.testing.assert_allclose(_output_std(bj.BatchNorm()), 1.0, atol=1e-2)


@pytest.mark.parametrize("module", [nn.BatchNorm(), bj.BatchNorm(use_fast_variance=True)], ids=["flax-default", "bnref-fast"])
def test_fast_variance_is_unstable_at_large_mean(module):
    # E[x^2] - E[x]^2 at mean 1e4, std 0.1 in float32: measured per-channel output std
    # [30.6, 30.9, 0.035, 32.9, 0.037, 30.7, 32.4, 31.1] instead of 1 (the difference of two
    # ~1e8 numbers is below float32's resolution; clipped at 0 or overestimated).
    std = _output_std(module)
    assert np.all(np.abs(std - 1.0) > 0.5), std
    assert std.max() > 20.0, std


@pytest.mark.parametrize("impl", ["functional", "layer"])
def test_wrong_axis_trap_nhwc(impl):
    # d2l's JAX BN reduced over NCHW axes (0, 2, 3) of NHWC data; here channel c of an NHWC
    # input sits near 100 c, so anything but a reduction over (0, 1, 2) misses the means.
    rng = np.random.default_rng(2)
    offsets = 100.0 * np.arange(4)
    x = (offsets + rng.standard_normal((8, 5, 5, 4))).astype(np.float32)  # (N, H, W, C)
    expected = x.reshape(-1, 4).astype(np.float64).mean(0)
    conv = spec.Convention(decay=0.0)  # running mean = last batch mean
    if impl == "functional":
        _, mean, _ = bj.batch_norm(jnp.asarray(x), None, None, jnp.zeros(4), jnp.ones(4), train=True, convention=conv)
    else:
        mean, _ = _one_step_stats(bj.BatchNorm(convention=conv), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(mean), expected, rtol=1e-5)


def test_cross_device_mean_matches_whole_batch():
    # axis_name: statistics averaged over the mapped axis (lax.pmean), as if one batch.
    x = np.asarray(X_NHWC).reshape(2, 4, 4, 4, 3)  # two "devices" of 4 examples
    g, b = jnp.full(3, 1.5), jnp.full(3, 0.5)

    def f(x):
        return bj.batch_norm(x, g, b, jnp.zeros(3), jnp.ones(3), train=True, convention="torch", axis_name="d")

    y, rm, rv = jax.vmap(f, axis_name="d")(x)
    y_all, rm_all, rv_all = bj.batch_norm(X_NHWC, g, b, jnp.zeros(3), jnp.ones(3), train=True, convention="torch")
    np.testing.assert_allclose(np.asarray(y).reshape(X_NHWC.shape), y_all, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm[0], rm_all, rtol=1e-5)
    np.testing.assert_allclose(rv[0], rv_all, rtol=1e-5)  # Bessel's n counts both devices


def test_mask_matches_flax():
    mask = jnp.asarray(np.random.default_rng(3).random((8, 4, 4, 1)) > 0.3)
    results = []
    for module in (bj.BatchNorm(), nn.BatchNorm(use_fast_variance=False)):
        variables = module.init(jax.random.key(0), X_NHWC, use_running_average=False)
        results.append(module.apply(variables, X_NHWC, use_running_average=False, mask=mask, mutable=["batch_stats"]))
    testing.assert_close(jax.tree.map(np.asarray, {"y": results[0][0], **results[0][1]["batch_stats"]}),
                         jax.tree.map(np.asarray, {"y": results[1][0], **results[1][1]["batch_stats"]}),
                         context="jax vs flax.linen, mask", dtype="float32")  # fmt: skip


# --- bad input ---------------------------------------------------------------------------------


def test_wrong_gamma_shape_raises():
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\)"):
        bj.batch_norm(X_NHWC, jnp.ones(4), None, None, None, train=True)


def test_layer_params_for_other_channel_count_raise():
    bn = bj.BatchNorm()
    variables = bn.init(jax.random.key(0), X_NHWC, use_running_average=False)  # 3 channels
    x4 = jnp.ones((8, 4, 4, 4))
    with pytest.raises(ValueError, match=r"params/scale must have shape \(4,\)"):
        bn.apply(variables, x4, use_running_average=True)


def test_one_value_per_channel_in_training_raises_at_trace_time():
    f = jax.jit(bj.batch_norm, static_argnames=("train",))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        f(jnp.ones((1, 3)), None, None, jnp.zeros(3), jnp.ones(3), train=True)


def test_layer_batch_of_one_inits_but_does_not_train():
    bn = bj.BatchNorm()
    x = jnp.ones((1, 3))
    variables = bn.init(jax.random.key(0), x, use_running_average=False)  # init on a dummy batch: fine
    bn.apply(variables, x, use_running_average=True)  # eval: fine
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


def test_bad_convention_raises():
    with pytest.raises(ValueError, match="unknown convention preset"):
        bj.batch_norm(X_NHWC, None, None, None, None, train=True, convention="pytorch")


# --- LeNetBN --------------------------------------------------------------------------------

LENET_PARAMS = {
    "conv1": {"kernel": (5, 5, 1, 6), "bias": (6,)},
    "conv2": {"kernel": (5, 5, 6, 16), "bias": (16,)},
    "fc1": {"kernel": (256, 120), "bias": (120,)},  # 16 * 4 * 4 = 256: 'VALID' like torch
    "fc2": {"kernel": (120, 84), "bias": (84,)},
    "fc3": {"kernel": (84, 10), "bias": (10,)},
}
LENET_BN = {"bn1": 6, "bn2": 16, "bn3": 120, "bn4": 84}


@pytest.mark.parametrize("bn", ["bnref", "builtin", "none"])
def test_lenet_variables_and_output(bn):
    model = bj.LeNetBN(bn=bn)
    x = jnp.zeros((2, 28, 28, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    shapes = jax.tree.map(jnp.shape, variables)
    expected_params = dict(LENET_PARAMS)
    expected = {"params": expected_params}
    if bn != "none":
        expected_params.update({k: {"scale": (c,), "bias": (c,)} for k, c in LENET_BN.items()})
        expected["batch_stats"] = {k: {"mean": (c,), "var": (c,)} for k, c in LENET_BN.items()}
    assert shapes == expected
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 10)
    np.testing.assert_array_equal(variables["params"]["conv1"]["bias"], np.zeros(6))


def test_lenet_builtin_rejects_unbiased_convention():
    with pytest.raises(ValueError, match="biased variance"):
        bj.LeNetBN(bn="builtin", convention="torch").init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False)


# --- imports -------------------------------------------------------------------------------------


def test_subpackage_named_jax_does_not_shadow_jax():
    assert bj.__name__ == "bnref.jax" and jax.__name__ == "jax"
    assert "site-packages" in jax.__file__ and jnp.ones(1).dtype == jnp.float32


# --- the axis rule, shared with the spec and the torch backend --------------------------------


@pytest.mark.parametrize("axis", [np.int64(-1), np.int32(1), (np.int64(0), np.intp(2))],
                         ids=["np.int64(-1)", "np.int32(1)", "(np.int64(0),np.intp(2))"])
def test_axis_accepts_numpy_integers_like_the_spec_and_flax(axis):
    """b02e4a9: spec.batch_norm_train took axis=np.int64(1), bnref.jax refused it (flax.linen
    takes it). The functional and the layer give the int axis's results, and the layer flax.linen's."""
    x = jnp.asarray(np.random.default_rng(8).standard_normal((6, 4, 3)) * 2 + 1, jnp.float32)
    as_int = tuple(int(a) for a in axis) if isinstance(axis, tuple) else int(axis)
    fshape = tuple(x.shape[a] for a in (as_int if isinstance(as_int, tuple) else (as_int,)))
    stats = (None, None, jnp.zeros(fshape), jnp.ones(fshape))
    got = bj.batch_norm(x, *stats, train=True, axis=axis)
    want = bj.batch_norm(x, *stats, train=True, axis=as_int)
    for name, a, b in zip(("y", "running_mean", "running_var"), got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    results = []
    for module in (bj.BatchNorm(use_running_average=False, axis=axis), nn.BatchNorm(use_running_average=False, axis=axis),
                   bj.BatchNorm(use_running_average=False, axis=as_int)):  # fmt: skip
        variables = module.init(jax.random.key(0), x)
        y, updates = module.apply(variables, x, mutable=["batch_stats"])
        results.append((np.asarray(y), np.asarray(updates["batch_stats"]["var"])))
    np.testing.assert_array_equal(results[0][0], results[2][0])
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)


@pytest.mark.parametrize("axis", [True, np.bool_(True), 1.0, "1"], ids=["True", "np.bool_(True)", "1.0", "'1'"])
def test_axis_refuses_what_the_spec_refuses(axis):
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="axis must be an int"):
        bj.batch_norm(x, None, None, jnp.zeros(3), jnp.ones(3), train=True, axis=axis)
    with pytest.raises(ValueError, match="axis must be an int"):
        bj.BatchNorm(use_running_average=False, axis=axis).init(jax.random.key(0), x)


# --- eps on the layer's default path -------------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("epsilon", [None, 1e-3, 0.5], ids=["default-1e-5", "1e-3", "0.5"])
def test_layer_epsilon_on_the_default_path_matches_flax_and_the_spec(epsilon, train, fast):
    """The layer's default path (convention=None: Flax's momentum and epsilon fields) with a
    variance small enough that eps moves the output (std 0.01: eps 1e-5 is 10% of the variance).
    A layer ignoring its epsilon passed every layer test before (their data has variance ~4)."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(0.01 * rng.standard_normal((32, 4)), jnp.float32)  # mean ~0: no cancellation in fast-variance
    kw = {} if epsilon is None else {"epsilon": epsilon}
    eps = 1e-5 if epsilon is None else epsilon
    stats = {"mean": jnp.asarray([0.0, 0.001, -0.001, 0.0005], jnp.float32),
             "var": jnp.asarray([1e-4, 2e-4, 5e-5, 1.5e-4], jnp.float32)}  # fmt: skip
    outs = []
    for cls in (bj.BatchNorm, nn.BatchNorm):
        module = cls(use_running_average=not train, momentum=0.9, use_fast_variance=fast, **kw)
        params = module.init(jax.random.key(0), x)["params"]
        y, _ = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        outs.append(np.asarray(y, np.float64))
    xd = np.asarray(x, np.float64)
    if train:
        want = spec.batch_norm_train(xd, None, None, None, None, spec.Convention(decay=0.9, eps=eps), axis=-1)[0]
    else:
        want = spec.batch_norm_eval(xd, None, None, np.asarray(stats["mean"], np.float64),
                                    np.asarray(stats["var"], np.float64), spec.Convention(decay=0.9, eps=eps), axis=-1)  # fmt: skip
    # float32: 1e-5 relative; ignoring eps = 1e-5 here moves the output by ~4%
    np.testing.assert_allclose(outs[0], want, rtol=1e-4, atol=1e-4, err_msg="bnref vs spec")
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4, err_msg="bnref vs flax.linen")
