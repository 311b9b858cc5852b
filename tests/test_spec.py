"""The NumPy specification against a straightforward re-derivation, finite differences,
and the properties any correct BatchNorm has; its data-parallel functions (synchronized BN
equals one device on the concatenated batch, the stable merge of shard statistics, local BN)
with NumPy only (the frameworks' data-parallel BN against them: tests/test_torch_distributed.py,
tests/test_jax_distributed.py)."""

import math

import numpy as np
import pytest
from _helpers import make_shards
from hypothesis import given, settings
from hypothesis import strategies as st

from bnref import spec, testing
from bnref.testing import layout_name, make_inputs

PRESETS = sorted(spec.PRESETS)
SHAPES = {2: (6, 3), 3: (4, 3, 5), 4: (3, 2, 4, 5), 5: (2, 3, 2, 3, 2)}
AXES = (1, -1)


def _shape(rank, axis):
    """A shape of this rank whose channel axis (``axis``) has 3 channels."""
    s = list(SHAPES[rank])
    s[axis] = 3
    return tuple(s)


def _case_id(rank, axis):
    return layout_name(rank, axis)


def reference(x, gamma, beta, rm, rv, conv, axis, train):
    """The textbook algorithm, one channel at a time, with math.fsum sums."""
    x = np.asarray(x, dtype=np.float64)
    ax = axis % x.ndim
    y = np.empty_like(x)
    new_m, new_v = np.empty(x.shape[ax]), np.empty(x.shape[ax])
    for c in range(x.shape[ax]):
        vals = np.take(x, c, axis=ax).ravel().tolist()
        n = len(vals)
        if train:
            mu = math.fsum(vals) / n
            var = math.fsum((v - mu) ** 2 for v in vals) / n
            s2 = var * n / (n - 1) if conv.running_var == "unbiased" else var
            new_m[c] = conv.decay * rm[c] + (1 - conv.decay) * mu
            new_v[c] = conv.decay * rv[c] + (1 - conv.decay) * s2
        else:
            mu, var = rm[c], rv[c]
            new_m[c], new_v[c] = rm[c], rv[c]
        idx = [slice(None)] * x.ndim
        idx[ax] = c
        y[tuple(idx)] = gamma[c] * (np.take(x, c, axis=ax) - mu) / math.sqrt(var + conv.eps) + beta[c]
    return y, new_m, new_v


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("axis", AXES, ids=["axis1", "axis-1"])
@pytest.mark.parametrize("rank", sorted(SHAPES))
@pytest.mark.parametrize("preset", PRESETS)
def test_matches_reference(preset, rank, axis, train):
    conv = spec.PRESETS[preset]
    i = make_inputs(_shape(rank, axis), axis, seed=rank)
    args = (i["x"], i["gamma"], i["beta"], i["running_mean"], i["running_var"], conv)
    ry, rm, rv = reference(*args, axis=axis, train=train)
    if train:
        y, m, v = spec.batch_norm_train(*args, axis=axis)
    else:
        y, m, v = spec.batch_norm_eval(*args, axis=axis), i["running_mean"], i["running_var"]
    np.testing.assert_allclose(y, ry, rtol=1e-12, atol=1e-12, err_msg=f"y ({preset}, {_case_id(rank, axis)})")
    np.testing.assert_allclose(m, rm, rtol=1e-12, atol=1e-13, err_msg="running_mean")
    np.testing.assert_allclose(v, rv, rtol=1e-12, atol=1e-13, err_msg="running_var")
    assert y.dtype == np.float64 and y.shape == i["x"].shape


def _loss(x, gamma, beta, dy, conv, axis):
    y, _, _ = spec.batch_norm_train(x, gamma, beta, None, None, conv, axis=axis)
    return float(np.sum(y * dy))


def _central_difference(f, a, h=1e-6):
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        plus, minus = a.copy(), a.copy()
        plus[idx] += h
        minus[idx] -= h
        g[idx] = (f(plus) - f(minus)) / (2 * h)
    return g


@pytest.mark.parametrize("axis", AXES, ids=["axis1", "axis-1"])
@pytest.mark.parametrize("rank", sorted(SHAPES))
def test_backward_matches_finite_differences(rank, axis):
    conv = spec.TORCH
    i = make_inputs(_shape(rank, axis), axis, seed=10 + rank)
    x, gamma, beta, dy = i["x"], i["gamma"], i["beta"], i["dy"]
    dx, dgamma, dbeta = spec.batch_norm_grad(x, gamma, dy, conv, axis=axis)
    layout = _case_id(rank, axis)
    fd_x = _central_difference(lambda a: _loss(a, gamma, beta, dy, conv, axis), x)
    fd_g = _central_difference(lambda a: _loss(x, a, beta, dy, conv, axis), gamma)
    fd_b = _central_difference(lambda a: _loss(x, gamma, a, dy, conv, axis), beta)
    np.testing.assert_allclose(dx, fd_x, rtol=1e-5, atol=1e-7, err_msg=f"backward/dx ({layout})")
    np.testing.assert_allclose(dgamma, fd_g, rtol=1e-6, atol=1e-7, err_msg=f"backward/dgamma ({layout})")
    np.testing.assert_allclose(dbeta, fd_b, rtol=1e-6, atol=1e-7, err_msg=f"backward/dbeta ({layout})")


def test_backward_without_gamma_equals_unit_gamma():
    i = make_inputs((5, 3, 2), 1)
    a = spec.batch_norm_grad(i["x"], None, i["dy"], spec.D2L)
    b = spec.batch_norm_grad(i["x"], np.ones(3), i["dy"], spec.D2L)
    for got, want in zip(a, b):
        np.testing.assert_array_equal(got, want)


# --- properties ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    rank=st.integers(2, 4),
    channels=st.integers(1, 4),
    batch=st.integers(2, 6),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_output_is_standardized_per_channel(rank, channels, batch, offset, scale, seed):
    rng = np.random.default_rng(seed)
    shape = (batch, channels) + (3,) * (rank - 2)
    x = offset + scale * rng.standard_normal(shape)
    y, _, _ = spec.batch_norm_train(x, None, None, None, None, spec.Convention(0.9, eps=0.0))
    axes = tuple(i for i in range(rank) if i != 1)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-9)
    np.testing.assert_allclose(y.var(axis=axes), 1.0, rtol=1e-9)


@pytest.mark.parametrize("running_var", ["biased", "unbiased"])
def test_running_update_closed_form_after_one_step(running_var):
    conv = spec.Convention(decay=0.7, eps=1e-5, running_var=running_var)
    x = np.array([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0], [5.0, 50.0]])  # (N=4, C=2)
    rm, rv = np.array([0.5, -1.0]), np.array([2.0, 3.0])
    _, m, v = spec.batch_norm_train(x, None, None, rm, rv, conv)
    mean = np.array([3.0, 30.0])
    biased = np.array([2.5, 250.0])  # mean squared deviation: (4 + 1 + 1 + 4) / 4, times 100
    s2 = biased * 4 / 3 if running_var == "unbiased" else biased
    np.testing.assert_allclose(m, 0.7 * rm + 0.3 * mean, rtol=1e-15)
    np.testing.assert_allclose(v, 0.7 * rv + 0.3 * s2, rtol=1e-15)


def test_eval_leaves_state_identical():
    i = make_inputs((4, 3, 5), 1)
    before = {k: v.copy() for k, v in i.items()}
    for v in i.values():
        v.flags.writeable = False  # any in-place write now raises
    spec.batch_norm_eval(i["x"], i["gamma"], i["beta"], i["running_mean"], i["running_var"], spec.TORCH)
    spec.batch_norm_train(i["x"], i["gamma"], i["beta"], i["running_mean"], i["running_var"], spec.TORCH)
    spec.batch_norm_grad(i["x"], i["gamma"], i["dy"], spec.TORCH)
    for k, v in i.items():
        assert v.tobytes() == before[k].tobytes(), k


def test_decay_zero_makes_eval_equal_train():
    conv = spec.Convention(decay=0.0, eps=1e-5, running_var="biased")
    i = make_inputs((8, 3, 4, 4), 1)
    args = (i["x"], i["gamma"], i["beta"])
    y_train, m, v = spec.batch_norm_train(*args, i["running_mean"], i["running_var"], conv)
    y_eval = spec.batch_norm_eval(*args, m, v, conv)
    np.testing.assert_allclose(y_eval, y_train, rtol=1e-12, atol=1e-12)


def test_wrong_reduction_axis_is_caught():
    """Channels sit at 0, 100, 200 with tiny spread: the running mean must find exactly them.
    Reducing NHWC data over NCHW axes (the d2l JAX bug) would mix the channels."""
    rng = np.random.default_rng(0)
    x = np.array([0.0, 100.0, 200.0]) + 0.01 * rng.standard_normal((4, 5, 5, 3))  # NHWC
    conv = spec.Convention(decay=0.0, running_var="biased")
    _, m, v = spec.batch_norm_train(x, None, None, np.zeros(3), np.ones(3), conv, axis=-1)
    np.testing.assert_allclose(m, [0.0, 100.0, 200.0], atol=0.01)
    assert np.all(v < 1e-3)
    _, m_wrong, _ = spec.batch_norm_train(x, None, None, np.zeros(5), np.ones(5), conv, axis=1)
    assert np.allclose(m_wrong, 100.0, atol=0.1)  # what the wrong axis yields: the channels averaged


def test_nchw_and_nhwc_agree_after_transpose():
    i = make_inputs((4, 3, 5, 6), 1)
    rest = (i["gamma"], i["beta"], i["running_mean"], i["running_var"], spec.FLAX)
    y1, m1, v1 = spec.batch_norm_train(i["x"], *rest, axis=1)
    y2, m2, v2 = spec.batch_norm_train(i["x"].transpose(0, 2, 3, 1), *rest, axis=-1)
    np.testing.assert_allclose(y2, y1.transpose(0, 2, 3, 1), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(m2, m1, rtol=1e-13)
    np.testing.assert_allclose(v2, v1, rtol=1e-13)
    dx1, dg1, db1 = spec.batch_norm_grad(i["x"], i["gamma"], i["dy"], spec.FLAX, axis=1)
    dx2, dg2, db2 = spec.batch_norm_grad(
        i["x"].transpose(0, 2, 3, 1), i["gamma"], i["dy"].transpose(0, 2, 3, 1), spec.FLAX, axis=-1
    )
    np.testing.assert_allclose(dx2, dx1.transpose(0, 2, 3, 1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dg2, dg1, rtol=1e-12)
    np.testing.assert_allclose(db2, db1, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_mean_small_spread_is_stable(dtype):
    rng = np.random.default_rng(0)
    x = (1e4 + 0.1 * rng.standard_normal((64, 4, 8, 8))).astype(dtype)
    y, _, _ = spec.batch_norm_train(x, None, None, None, None, spec.FLAX)
    std = y.std(axis=(0, 2, 3))
    assert np.all(np.abs(std - 1.0) < 1e-3), std


def test_conventions_translate_at_the_boundaries():
    assert spec.Convention.from_torch(0.1).decay == pytest.approx(0.9)
    assert spec.Convention.from_torch(0.1) == spec.TORCH
    assert spec.Convention.from_flax(0.99) == spec.FLAX
    assert spec.Convention.from_flax(0.99, eps=1e-3) == spec.KERAS
    assert spec.TORCH.torch_momentum == pytest.approx(0.1)
    assert spec.D2L.flax_momentum == 0.9
    assert spec.D2L != spec.TORCH  # same decay and eps, but d2l's running variance is biased
    with pytest.raises(ValueError, match="momentum=None"):
        spec.Convention.from_torch(None)
    with pytest.raises(ValueError, match="unknown convention preset 'pytorch'"):
        spec.preset("pytorch")


# --- bad input ---------------------------------------------------------------------------------


def _readonly_inputs():
    i = make_inputs((4, 3, 2), 1)
    for v in i.values():
        v.flags.writeable = False
    return i


BAD_CALLS = {
    "rank<2": (lambda i: spec.batch_norm_train(i["x"][0, 0], None, None, None, None, spec.TORCH), "rank >= 2"),
    "axis out of range": (
        lambda i: spec.batch_norm_train(i["x"], None, None, None, None, spec.TORCH, axis=3),
        "axis 3 is out of range",
    ),
    "gamma shape": (
        lambda i: spec.batch_norm_train(i["x"], i["gamma"][:2], i["beta"], None, None, spec.TORCH),
        r"gamma must have shape \(3,\)",
    ),
    "beta shape eval": (
        lambda i: spec.batch_norm_eval(i["x"], i["gamma"], i["beta"][:1], i["running_mean"], i["running_var"], spec.TORCH),
        r"beta must have shape \(3,\)",
    ),
    "running_var shape": (
        lambda i: spec.batch_norm_train(i["x"], i["gamma"], i["beta"], i["running_mean"], np.ones(4), spec.TORCH),
        r"running_var must have shape \(3,\)",
    ),
    "running_mean shape eval": (
        lambda i: spec.batch_norm_eval(i["x"], None, None, np.zeros((3, 1)), i["running_var"], spec.TORCH),
        r"running_mean must have shape \(3,\)",
    ),
    "one value per channel": (
        lambda i: spec.batch_norm_train(i["x"][:1, :, :1], None, None, i["running_mean"], i["running_var"], spec.TORCH),
        "more than 1 value per channel",
    ),
    "one value per channel (grad)": (
        lambda i: spec.batch_norm_grad(i["x"][:1, :, :1], i["gamma"], i["dy"][:1, :, :1], spec.TORCH),
        "more than 1 value per channel",
    ),
    "dy shape": (lambda i: spec.batch_norm_grad(i["x"], i["gamma"], i["dy"][:2], spec.TORCH), "dy must have the shape"),
    "only one running stat": (
        lambda i: spec.batch_norm_train(i["x"], None, None, i["running_mean"], None, spec.TORCH),
        "both be given or both be None",
    ),
    "eval without stats": (
        lambda i: spec.batch_norm_eval(i["x"], None, None, None, None, spec.TORCH),
        "evaluation mode needs",
    ),
    "negative eps": (lambda i: spec.Convention(decay=0.9, eps=-1e-5), "eps must be >= 0"),
    "decay > 1": (lambda i: spec.Convention(decay=1.1), r"decay must be in \[0, 1\]"),
    "decay < 0": (lambda i: spec.Convention(decay=-0.1), r"decay must be in \[0, 1\]"),
    "decay nan": (lambda i: spec.Convention(decay=float("nan")), r"decay must be in \[0, 1\]"),
    "running_var name": (lambda i: spec.Convention(decay=0.9, running_var="bessel"), "running_var must be"),
    "replace validates": (lambda i: spec.TORCH.replace(eps=-1.0), "eps must be >= 0"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_raises_and_mutates_nothing(name):
    call, message = BAD_CALLS[name]
    i = _readonly_inputs()  # read-only: a write before the error would raise a different error
    before = {k: v.copy() for k, v in i.items()}
    with pytest.raises(ValueError, match=message):
        call(i)
    for k, v in i.items():
        np.testing.assert_array_equal(v, before[k])


def test_as_convention_accepts_conventions_names_and_none():
    assert spec.as_convention(None, spec.FLAX) is spec.FLAX
    assert spec.as_convention("keras", spec.TORCH) is spec.KERAS
    custom = spec.Convention(decay=0.5)
    assert spec.as_convention(custom, spec.TORCH) is custom
    with pytest.raises(ValueError, match="convention must be"):
        spec.as_convention(0.9, spec.TORCH)


def test_torch_momentum_reads_as_written():
    assert spec.TORCH.torch_momentum == 0.1  # not 0.09999999999999998
    assert spec.FLAX.torch_momentum == 0.01


def test_functions_take_preset_names_like_the_backends():
    """On main at 7b1ede4 spec.batch_norm_train(..., "torch") raised AttributeError."""
    x, g, b = np.random.default_rng(0).normal(size=(8, 3)), np.ones(3), np.zeros(3)
    rm, rv = np.zeros(3), np.ones(3)
    for name, conv in spec.PRESETS.items():
        by_name = spec.batch_norm_train(x, g, b, rm, rv, name)
        by_object = spec.batch_norm_train(x, g, b, rm, rv, conv)
        for a, c in zip(by_name, by_object):
            np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(spec.batch_norm_eval(x, g, b, rm, rv, name), spec.batch_norm_eval(x, g, b, rm, rv, conv))
        np.testing.assert_array_equal(spec.batch_norm_grad(x, g, x, name)[0], spec.batch_norm_grad(x, g, x, conv)[0])
    with pytest.raises(ValueError, match="unknown convention preset"):
        spec.batch_norm_train(x, g, b, rm, rv, "pytorch")
    with pytest.raises(ValueError, match="convention is required"):
        spec.batch_norm_eval(x, g, b, rm, rv, None)


@pytest.mark.parametrize("where", ["x", "gamma", "dy"])
def test_complex_input_is_refused_not_silently_made_real(where):
    x = np.random.default_rng(0).normal(size=(8, 3))
    args = {"x": x, "gamma": np.ones(3), "dy": x}
    args[where] = args[where] + 1j
    with pytest.raises(TypeError, match=f"{where} is complex"):
        spec.batch_norm_grad(args["x"], args["gamma"], args["dy"], spec.TORCH)


def test_empty_batch_normalizes_nothing_and_keeps_the_running_statistics():
    x = np.zeros((0, 3, 4))
    rm, rv = np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 1.5])
    y, new_rm, new_rv = spec.batch_norm_train(x, np.full(3, 2.0), np.ones(3), rm, rv, spec.TORCH)
    assert y.shape == x.shape
    np.testing.assert_array_equal(new_rm, rm) and np.testing.assert_array_equal(new_rv, rv)
    assert new_rm is not rm  # new arrays, as always
    dx, dgamma, dbeta = spec.batch_norm_grad(x, np.ones(3), x, spec.TORCH)
    assert dx.shape == x.shape and not dgamma.any() and not dbeta.any()
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # one value stays an error
        spec.batch_norm_train(np.zeros((1, 3)), None, None, rm, rv, spec.TORCH)


# --- precise BN: the two population-statistics variants ----------------------------------------


def _precise_batches(sizes=(5, 7, 3), c=3, offset=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [offset + np.arange(c).reshape(1, c, 1) + rng.standard_normal((n, c, 4)) * (1 + np.arange(c)).reshape(1, c, 1)
            for n in sizes]  # fmt: skip


@pytest.mark.parametrize("preset", ["d2l", "torch"])
def test_batch_average_stats_is_the_mean_of_the_batch_statistics(preset):
    batches = _precise_batches()
    mean, var = spec.batch_average_stats(batches, preset)
    ddof = 1 if spec.preset(preset).running_var == "unbiased" else 0
    per_batch = [b.transpose(1, 0, 2).reshape(3, -1) for b in batches]  # (C, n) each
    np.testing.assert_allclose(mean, np.mean([p.mean(1) for p in per_batch], axis=0), rtol=1e-13)
    np.testing.assert_allclose(var, np.mean([p.var(1, ddof=ddof) for p in per_batch], axis=0), rtol=1e-13)


def test_population_stats_are_those_of_the_concatenated_values_even_far_from_zero():
    for offset in (0.0, 1e8):
        batches = _precise_batches(offset=offset)
        allv = np.concatenate(batches).transpose(1, 0, 2).reshape(3, -1)
        mean, var = spec.population_stats(batches)
        np.testing.assert_allclose(mean, allv.mean(1), rtol=1e-14)
        np.testing.assert_allclose(var, ((allv - allv.mean(1, keepdims=True)) ** 2).mean(1), rtol=1e-7)
    one_pass = (allv**2).mean(1) - allv.mean(1) ** 2  # what a sum-of-squares accumulator would give at 1e8
    assert np.max(np.abs(one_pass - var) / var) > 1e-2
    nhwc = [np.moveaxis(b, 1, -1) for b in _precise_batches()]
    np.testing.assert_allclose(spec.population_stats(nhwc, axis=-1), spec.population_stats(_precise_batches()))


def test_the_variants_differ_by_the_variance_of_the_batch_means():
    """Law of total variance, equal batch sizes: population var = mean biased batch var + var of means."""
    batches = _precise_batches(sizes=(6, 6, 6, 6))
    pop_mean, pop_var = spec.population_stats(batches)
    avg_mean, avg_var = spec.batch_average_stats(batches, "d2l")  # biased
    means = np.array([spec.batch_stats(b)[0] for b in batches])  # (K, C)
    np.testing.assert_allclose(pop_mean, avg_mean, rtol=1e-13)
    np.testing.assert_allclose(pop_var, avg_var + means.var(0), rtol=1e-12)
    assert np.all(avg_var < pop_var)


def test_precise_stats_bad_input():
    with pytest.raises(ValueError, match="at least one batch"):
        spec.population_stats([])
    with pytest.raises(ValueError, match="batch 1 has shape"):
        spec.population_stats([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="batch 0 has 1 value"):
        spec.batch_average_stats([np.zeros((1, 3))], "d2l")
    with pytest.raises(TypeError):
        spec.population_stats([np.zeros((2, 3), complex)])


def test_rescaling_the_input_is_rescaling_eps():
    """y(a x; eps) = y(x; eps / a^2): invariance to the input's scale holds exactly only at eps = 0."""
    rng = np.random.default_rng(5)
    x, g, b = 0.05 * rng.standard_normal((8, 3)), np.ones(3), np.zeros(3)
    run = lambda x, eps: spec.batch_norm_train(x, g, b, np.zeros(3), np.ones(3), spec.Convention(0.9, eps, "biased"))[0]  # noqa: E731
    np.testing.assert_allclose(run(10.0 * x, 1e-3), run(x, 1e-5), rtol=1e-12)
    assert np.max(np.abs(run(10.0 * x, 1e-3) - run(x, 1e-3))) > 1e-2  # at eps 1e-3 and std 0.05 the scale matters


# --- the axis rule, shared with both backends (tests/test_torch.py, tests/test_jax.py) --------

AXIS_ACCEPTED = {"np.int64(1)": np.int64(1), "np.int32(-1)": np.int32(-1), "np.intp(1)": np.intp(1)}
AXIS_REFUSED = {"True": True, "np.bool_(True)": np.bool_(True), "1.0": 1.0, "'1'": "1", "array(1)": np.array(1)}


@pytest.mark.parametrize("name", sorted(AXIS_ACCEPTED))
def test_axis_accepts_numpy_integers_like_an_int(name):
    """One rule for the spec and both backends: a Python or NumPy integer (b02e4a9: the spec took
    np.int64, both backends refused it)."""
    axis = AXIS_ACCEPTED[name]
    i = make_inputs((4, 3, 5) if int(axis) == 1 else (4, 5, 3), int(axis), seed=3)
    args = (i["x"], i["gamma"], i["beta"], i["running_mean"], i["running_var"], "torch")
    for got, want in zip(spec.batch_norm_train(*args, axis=axis), spec.batch_norm_train(*args, axis=int(axis))):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", sorted(AXIS_REFUSED))
def test_axis_refuses_bools_floats_strings_and_arrays(name):
    i = make_inputs((4, 3, 5), 1, seed=3)
    with pytest.raises(ValueError, match="axis must be an int"):
        spec.batch_norm_train(i["x"], None, None, None, None, "torch", axis=AXIS_REFUSED[name])


# --- data parallelism: the sharded semantics (sync BN = one device on the concatenation) --------------

SHARD_SIZES = {"equal": (4, 4), "unequal": (5, 2, 1), "empty-shard": (3, 0, 4)}


@pytest.mark.parametrize("sizes", SHARD_SIZES.values(), ids=SHARD_SIZES.keys())
@pytest.mark.parametrize("preset", ["torch", "d2l"])
def test_spec_sync_equals_single_device_on_the_concatenation(sizes, preset):
    shards = make_shards(sizes)
    rng = np.random.default_rng(1)
    g, b, rm, rv = rng.random(3) + 0.5, rng.standard_normal(3), rng.standard_normal(3), rng.random(3) + 0.5
    dys = [rng.standard_normal(s.shape) for s in shards]
    ys, new_rm, new_rv = spec.sync_batch_norm_train(shards, g, b, rm, rv, preset)
    dxs, dg, db = spec.sync_batch_norm_grad(shards, g, dys, preset)
    whole = np.concatenate(shards)
    y, rm1, rv1 = spec.batch_norm_train(whole, g, b, rm, rv, preset)
    dx, dg1, db1 = spec.batch_norm_grad(whole, g, np.concatenate(dys), preset)
    testing.assert_close({"y": np.concatenate(ys), "running_mean": new_rm, "running_var": new_rv, "dx": np.concatenate(dxs),
                          "dgamma": dg, "dbeta": db},
                         {"y": y, "running_mean": rm1, "running_var": rv1, "dx": dx, "dgamma": dg1, "dbeta": db1},
                         context=f"spec sync vs concatenation, {preset}", dtype="float64")  # fmt: skip


def test_spec_merge_is_stable_where_one_pass_is_not():
    shards = [1e8 + 0.01 * np.random.default_rng(r).standard_normal((50, 2)) for r in range(3)]
    stats = [spec.shard_stats(s) for s in shards]
    n, mean, var = spec.merge_stats(*zip(*stats))
    whole = np.concatenate(shards)
    np.testing.assert_allclose(var, whole.var(0), rtol=1e-6)  # two-pass per shard, exact merge
    one_pass = np.mean(whole**2, 0) - np.mean(whole, 0) ** 2
    assert np.abs(one_pass - whole.var(0)).max() > 1e-3  # the formula bnref avoids is far off here


def test_spec_local_keeps_one_running_average_per_replica():
    shards = make_shards((4, 4), offset=0.0)
    shards[1] = shards[1] + 10.0  # replicas see different data
    ys, rms, rvs = spec.local_batch_norm_train(shards, None, None, [np.zeros(3)] * 2, [np.ones(3)] * 2, "d2l")
    for s, y, m in zip(shards, ys, rms):
        np.testing.assert_allclose(y, spec.batch_norm_train(s, None, None, None, None, "d2l")[0])
        np.testing.assert_allclose(m, 0.1 * s.mean((0, 2)))
    assert np.abs(rms[0] - rms[1]).min() > 0.5  # the running statistics drift apart


def test_spec_bad_shards_raise():
    with pytest.raises(ValueError, match="shard 1 has shape"):
        spec.sync_batch_norm_train([np.ones((2, 3)), np.ones((2, 4))], None, None, None, None, "torch")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        spec.sync_batch_norm_train([np.ones((1, 3)), np.ones((0, 3))], None, None, None, None, "torch")


# --- the synchronized backward, on its own terms -------------------------------------------------

SYNC_SIZES = {"equal": (3, 3), "unequal": (4, 1, 2), "empty-shard": (2, 0, 3)}


@pytest.mark.parametrize("sizes", SYNC_SIZES.values(), ids=SYNC_SIZES.keys())
def test_sync_backward_matches_finite_differences_of_the_sync_forward(sizes):
    """dgamma, dbeta and each shard's dx of sync_batch_norm_grad against central differences of
    sum_r sum(y_r * dy_r) through sync_batch_norm_train. (Swapping dgamma and dbeta in its return
    passed this file before, when the spec's sync functions were tested only with SyncBatchNorm's tests.)"""
    rng = np.random.default_rng(11)
    shards = [4.0 + (1 + np.arange(3)).reshape(1, 3, 1) * rng.standard_normal((n, 3, 2)) for n in sizes]
    gamma, beta = 1.0 + 0.5 * rng.standard_normal(3), rng.standard_normal(3)
    dys = [rng.standard_normal(s.shape) for s in shards]
    conv = spec.TORCH

    def loss(shards, gamma, beta):
        ys, _, _ = spec.sync_batch_norm_train(shards, gamma, beta, None, None, conv)
        return sum(float(np.sum(y * d)) for y, d in zip(ys, dys))

    dxs, dgamma, dbeta = spec.sync_batch_norm_grad(shards, gamma, dys, conv)
    np.testing.assert_allclose(dgamma, _central_difference(lambda a: loss(shards, a, beta), gamma), rtol=1e-6,
                               atol=1e-7, err_msg="sync backward/dgamma")  # fmt: skip
    np.testing.assert_allclose(dbeta, _central_difference(lambda a: loss(shards, gamma, a), beta), rtol=1e-6,
                               atol=1e-7, err_msg="sync backward/dbeta")  # fmt: skip
    for r, s in enumerate(shards):
        def loss_r(a, r=r):
            return loss([a if k == r else t for k, t in enumerate(shards)], gamma, beta)

        np.testing.assert_allclose(dxs[r], _central_difference(loss_r, s), rtol=1e-5, atol=1e-7,
                                   err_msg=f"sync backward/dx shard {r}")  # fmt: skip
