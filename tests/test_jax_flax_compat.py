"""bnref.jax.BatchNorm where Flax's own BatchNorm tests look: complex input, integer input, rank-1
input, masks, ``tabulate``/``summary``, ``nn.vmap`` with ``axis_name``, equivalence with
``flax.nnx.BatchNorm``, and bad modes.

Each test runs flax.linen's layer (or nnx's) next to bnref's on the same input and compares, so
it asserts what the frameworks' authors assert without copying their tests. The deliberate
differences (README, "Differences from the frameworks") are tested as such.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import bnref.jax as bj
from bnref import spec, testing

KEY = jax.random.key(0)


def _complex(shape, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(3 + 2 * rng.standard_normal(shape) + 1j * (1 - rng.standard_normal(shape)), jnp.complex64)


def _apply(module, x, **kw):
    variables = module.init(KEY, x, **kw)
    y, updates = module.apply(variables, x, mutable=["batch_stats"], **kw)
    return np.asarray(y), jax.tree.map(np.asarray, updates["batch_stats"])


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
def test_complex_input_equals_flax(fast, mask):
    """On main at 7b1ede4 the variance came from x**2 (complex) instead of |x|**2."""
    x = _complex((16, 5))
    m = jnp.asarray(np.random.default_rng(1).random((16, 5)) > 0.3) if mask else None
    kw = dict(use_running_average=False, momentum=0.9, use_fast_variance=fast)
    y, stats = _apply(bj.BatchNorm(**kw), x, mask=m)
    y_flax, stats_flax = _apply(nn.BatchNorm(**kw), x, mask=m)
    assert y.dtype == y_flax.dtype == np.complex64
    assert stats["var"].dtype == stats_flax["var"].dtype == np.float32  # the variance is real
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["mean"], stats_flax["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], stats_flax["var"], rtol=1e-5, atol=1e-6)
    if not mask:  # standardized: each feature's output has unit variance E|y - E y|^2
        np.testing.assert_allclose(np.mean(np.abs(y - y.mean(0)) ** 2, axis=0), 1.0, rtol=1e-3)


def test_complex_functional_matches_numpy():
    x = np.asarray(_complex((32, 3), seed=2)).astype(np.complex128)
    y, rm, rv = bj.batch_norm(jnp.asarray(x, jnp.complex64), None, None, jnp.zeros(3), jnp.ones(3), train=True,
                              convention=spec.Convention(decay=0.5, eps=1e-5))  # fmt: skip
    mu = x.mean(0)
    var = np.mean(np.abs(x - mu) ** 2, 0)
    np.testing.assert_allclose(np.asarray(y), (x - mu) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rm), 0.5 * mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rv), 0.5 + 0.5 * var, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_integer_input_is_promoted_like_flax_never_truncated(dtype, train):
    """On main at 7b1ede4 bnref.jax.batch_norm returned a truncated integer array."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2 if dtype == jnp.bool_ else 9, (12, 3)), dtype)
    kw = dict(use_running_average=not train, momentum=0.9)
    y, _ = _apply(bj.BatchNorm(**kw), x)
    y_flax, _ = _apply(nn.BatchNorm(**kw), x)
    assert y.dtype == y_flax.dtype == np.float32
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
    y_fn, _, _ = bj.batch_norm(x, None, None, jnp.zeros(3), jnp.ones(3), train=train)
    assert y_fn.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y_fn), y if train else np.asarray(x, np.float32) / np.sqrt(1 + 1e-5),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_rank_one_input_inits_and_evaluates_like_flax():
    """flax.linen accepts rank-1 input (every axis a feature); main at 7b1ede4 rejected it."""
    x = jnp.arange(4.0) - 1.5
    for module in (bj.BatchNorm(use_running_average=True), nn.BatchNorm(use_running_average=True)):
        variables = module.init(KEY, x)
        assert variables["batch_stats"]["mean"].shape == (4,)
    ours = bj.BatchNorm(use_running_average=True)
    theirs = nn.BatchNorm(use_running_average=True)
    np.testing.assert_array_equal(ours.apply(ours.init(KEY, x), x), theirs.apply(theirs.init(KEY, x), x))
    # init in training mode too (init leaves the statistics alone, as in Flax)
    bj.BatchNorm(use_running_average=False).init(KEY, x)


def test_rank_one_input_in_training_raises_one_value_per_feature():
    # Deliberate (README): Flax outputs the bias here; bnref refuses a batch of one value.
    module = bj.BatchNorm(use_running_average=False)
    variables = module.init(KEY, jnp.ones(4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module.apply(variables, jnp.ones(4), mutable=["batch_stats"])


@pytest.mark.parametrize("model", ["layer", "lenet"])
def test_tabulate_with_repeated_calls_and_flops(model):
    """On main at 7b1ede4 tabulate(show_repeated=True, compute_flops=True) crashed on
    BatchNorm.resolved_convention, a public module method returning a Convention."""
    if model == "layer":
        module, x, kw = bj.BatchNorm(use_running_average=False), jnp.ones((4, 3)), {}
    else:
        module, x, kw = bj.LeNetBN(), jnp.ones((2, 28, 28, 1)), {"train": True}
    table = module.tabulate(KEY, x, **kw, show_repeated=True, compute_flops=True, compute_vjp_flops=True,
                            console_kwargs={"width": 250})  # fmt: skip
    assert "BatchNorm" in table and "resolved_convention" not in table and "batch_stats" in table


def test_module_summary_rows_match_flax():
    """The rows of flax's own summary table (paths, modules, variables) are the same for bnref's
    LeNet-BN and the one with flax.linen.BatchNorm."""
    from flax.linen import summary

    x = jnp.ones((2, 28, 28, 1))
    rows = {}
    for bn in ("bnref", "builtin"):
        table = summary._get_module_table(bj.LeNetBN(bn=bn), depth=None, show_repeated=True,
                                          compute_flops=False, compute_vjp_flops=False)(KEY, x, train=True)  # fmt: skip
        rows[bn] = [(r.path, r.method, jax.tree.map(lambda a: a.shape, r.module_variables)) for r in table]
    assert rows["bnref"] == rows["builtin"]
    assert ("bn3",) in [path for path, _, _ in rows["bnref"]]


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
@pytest.mark.parametrize("dtype", [None, jnp.float16], ids=["f32", "f16"])
def test_equivalent_to_nnx_batch_norm_bit_for_bit(fast, dtype):
    """flax.nnx.BatchNorm is tested for bit-for-bit equivalence with flax.linen.BatchNorm; bnref's
    layer passes the same comparison with the variance formula set explicitly."""
    x = jax.random.normal(jax.random.key(0), (10, 5))
    ours = bj.BatchNorm(use_running_average=False, dtype=dtype, use_fast_variance=fast)
    variables = ours.init(KEY, x)
    y, updates = ours.apply(variables, x, mutable=["batch_stats"])
    layer = nnx.BatchNorm(5, use_running_average=False, dtype=dtype, use_fast_variance=fast,
                          promote_dtype=lambda x, **kwargs: x, rngs=nnx.Rngs(0))  # fmt: skip
    y_nnx = layer(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_nnx))
    np.testing.assert_array_equal(np.asarray(updates["batch_stats"]["mean"]), np.asarray(layer.mean[...]))
    np.testing.assert_array_equal(np.asarray(updates["batch_stats"]["var"]), np.asarray(layer.var[...]))


def test_feature_left_empty_by_the_mask_keeps_its_statistics_unlike_flax():
    """Deliberate (README): a feature the mask leaves empty has no statistics; Flax (and nnx)
    average over nothing and store NaN, bnref keeps the running values (the spec's rule for an
    empty batch). The outputs are the same."""
    x = jax.random.normal(jax.random.key(0), (10, 5))
    mask = np.array([True, False, True, False, True])
    y, stats = _apply(bj.BatchNorm(use_running_average=False), x, mask=mask)
    y_flax, stats_flax = _apply(nn.BatchNorm(use_running_average=False), x, mask=mask)
    np.testing.assert_allclose(y, y_flax, rtol=1e-6, equal_nan=True)
    assert np.isnan(stats_flax["mean"][[1, 3]]).all()
    np.testing.assert_array_equal(stats["mean"][[1, 3]], 0.0)
    np.testing.assert_array_equal(stats["var"][[1, 3]], 1.0)
    np.testing.assert_allclose(stats["mean"][[0, 2, 4]], stats_flax["mean"][[0, 2, 4]], rtol=1e-6)


def test_mask_selecting_one_value_raises_when_concrete_and_keeps_statistics_when_traced():
    """On main at 7b1ede4 a mask selecting one value per feature gave NaN running variance with
    the unbiased convention."""
    x = jnp.arange(32.0).reshape(8, 4)
    mask = np.zeros((8, 4), bool)
    mask[0] = True
    mask[1:4, :3] = True  # feature 3: one value
    args = (None, None, jnp.zeros(4), jnp.ones(4))
    with pytest.raises(ValueError, match="selects a single value for 1 feature"):
        bj.batch_norm(x, *args, train=True, mask=mask, convention="torch")
    f = jax.jit(lambda x, m: bj.batch_norm(x, *args, train=True, mask=m, convention="torch"))
    _, rm, rv = f(x, mask)
    assert np.isfinite(np.asarray(rv)).all()
    assert float(rm[3]) == 0.0 and float(rv[3]) == 1.0  # kept
    n = 4  # features 0..2: 4 selected values (rows 0..3)
    np.testing.assert_allclose(np.asarray(rv[:3]), 0.9 + 0.1 * np.var(np.asarray(x)[:4, :3], 0) * n / (n - 1), rtol=1e-6)


def test_vmap_with_axis_name_matches_the_whole_batch_like_flax():
    """nn.vmap over a BatchNorm with axis_name: the statistics span the mapped axis, as Flax's
    own transform test checks, and equal one BatchNorm over the concatenated batch."""
    x = jax.random.normal(jax.random.key(3), (4, 6, 3)) * 2 + 1  # 4 mapped groups of 6

    def vmapped(cls):
        return nn.vmap(cls, variable_axes={"params": None, "batch_stats": None}, split_rngs={"params": False},
                       in_axes=0, out_axes=0, axis_name="batch")(use_running_average=False, axis_name="batch")  # fmt: skip

    results = []
    for cls in (bj.BatchNorm, nn.BatchNorm):
        module = vmapped(cls)
        variables = module.init(KEY, x)
        y, updates = module.apply(variables, x, mutable=["batch_stats"])
        results.append((np.asarray(y), jax.tree.map(np.asarray, updates)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    whole, _ = _apply(bj.BatchNorm(use_running_average=False), x.reshape(24, 3))
    np.testing.assert_allclose(results[0][0].reshape(24, 3), whole, rtol=1e-5, atol=1e-5)


def test_empty_batch_matches_the_spec():
    rm, rv = np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 2.0])
    y, new_rm, new_rv = bj.batch_norm(jnp.zeros((0, 3)), jnp.ones(3), jnp.zeros(3), jnp.asarray(rm), jnp.asarray(rv),
                                      train=True)  # fmt: skip
    y_spec, rm_spec, rv_spec = spec.batch_norm_train(np.zeros((0, 3)), np.ones(3), np.zeros(3), rm, rv, "flax")
    testing.assert_close({"y": np.asarray(y, np.float64), "running_mean": np.asarray(new_rm, np.float64),
                          "running_var": np.asarray(new_rv, np.float64)},
                         {"y": y_spec, "running_mean": rm_spec, "running_var": rv_spec},
                         context="jax, empty batch", dtype="float64", check_dtype=False)  # fmt: skip


@pytest.mark.parametrize("train", ["False", 0, None, 1.0])
def test_mode_must_be_a_bool(train):
    with pytest.raises(TypeError, match="train must be a bool"):
        bj.batch_norm(jnp.ones((4, 3)), None, None, jnp.zeros(3), jnp.ones(3), train=train)
    module = bj.BatchNorm(use_running_average="False" if train == "False" else 0)
    with pytest.raises(TypeError, match="use_running_average must be a bool"):
        module.init(KEY, jnp.ones((4, 3)))


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
@pytest.mark.parametrize("mask_dtype", [jnp.bool_, jnp.int32, jnp.float32, jnp.uint8], ids=["bool", "int32", "float32", "uint8"])
def test_mask_of_any_dtype_is_accepted_like_flax(mask_dtype, fast, traced):
    """At b02e4a9 an int32 or float32 0/1 mask raised ValueError (jnp.mean's where= takes only
    bool); flax.linen converts any mask with jnp.asarray(mask, bool). Same outputs and running
    statistics as flax.linen, and as the bool mask."""
    x = jax.random.normal(jax.random.key(4), (12, 5)) * 3 + 2
    selected = np.random.default_rng(5).random((12, 5)) > 0.4
    selected[:2] = True  # every feature selects at least 2 values
    mask = jnp.asarray(selected, mask_dtype)
    kw = dict(use_running_average=False, momentum=0.9, use_fast_variance=fast)

    def run(module, m):
        variables = module.init(KEY, x, mask=m)
        apply = lambda v, x, m: module.apply(v, x, mask=m, mutable=["batch_stats"])  # noqa: E731
        y, updates = (jax.jit(apply) if traced else apply)(variables, x, m)
        return np.asarray(y), jax.tree.map(np.asarray, updates["batch_stats"])

    y, stats = run(bj.BatchNorm(**kw), mask)
    y_flax, stats_flax = run(nn.BatchNorm(**kw), mask)
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(stats[name], stats_flax[name], rtol=1e-6, atol=1e-7, err_msg=name)
    y_bool, stats_bool = run(bj.BatchNorm(**kw), jnp.asarray(selected))
    np.testing.assert_array_equal(y, y_bool)
    for name in ("mean", "var"):
        np.testing.assert_array_equal(stats[name], stats_bool[name], err_msg=name)


@pytest.mark.parametrize("mask_dtype", [np.int32, np.float32], ids=["int32", "float32"])
def test_functional_mask_of_any_dtype_equals_the_bool_mask(mask_dtype):
    """bnref.jax.batch_norm takes the same masks as the layer (b02e4a9 refused non-bool ones)."""
    x = jnp.asarray(np.random.default_rng(6).standard_normal((10, 3)), jnp.float32)
    selected = np.random.default_rng(7).random((10, 3)) > 0.3
    selected[:2] = True
    args = (None, None, jnp.zeros(3), jnp.ones(3))
    want = bj.batch_norm(x, *args, train=True, mask=selected, convention="torch")
    got = bj.batch_norm(x, *args, train=True, mask=selected.astype(mask_dtype), convention="torch")
    for name, a, b in zip(("y", "running_mean", "running_var"), got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
