"""The one parity helper must itself catch what it is for: wrong values, shapes, dtypes, NaNs."""

import numpy as np
import pytest

from bnref import spec
from bnref.testing import assert_close, assert_matches_spec, compare, layout_name, make_inputs, round_to

EXPECTED = {"y": np.array([1.0, 2.0, 3.0]), "dgamma": np.array([0.5])}


def _cells(actual, dtype="float64"):
    return {c.label: c for c in compare(actual, EXPECTED, context="ctx", dtype=dtype)}


def test_identical_results_pass_with_zero_error():
    cells = _cells({k: v.copy() for k, v in EXPECTED.items()})
    assert all(c.passed and c.max_abs == 0 for c in cells.values())
    assert set(cells) == {"forward/y (ctx)", "backward/dgamma (ctx)"}


@pytest.mark.parametrize(
    "actual,problem",
    [
        ({"y": np.array([1.0, 2.0, 3.001]), "dgamma": np.array([0.5])}, "FAIL"),
        ({"y": np.array([1.0, 2.0]), "dgamma": np.array([0.5])}, "shape (2,) != expected (3,)"),
        ({"y": np.array([1.0, 2.0, 3.0], np.float32), "dgamma": np.array([0.5])}, "dtype float32 != expected float64"),
        ({"y": np.array([1.0, np.nan, 3.0]), "dgamma": np.array([0.5])}, "FAIL"),
        ({"dgamma": np.array([0.5])}, "missing from the backend's result"),
    ],
    ids=["value", "shape", "dtype", "nan", "missing"],
)
def test_each_kind_of_mismatch_fails_with_its_label(actual, problem):
    with pytest.raises(AssertionError) as e:
        assert_close(actual, EXPECTED, context="torch, preset=d2l, NC, float64", dtype="float64")
    message = str(e.value)
    assert "forward/y (torch, preset=d2l, NC, float64)" in message and problem in message
    assert "dgamma" not in message  # only the failing cell is reported


def test_a_wrong_backend_is_caught_by_assert_matches_spec():
    def forgets_beta(inputs, convention, axis, dtype, train):
        y, rm, rv = spec.batch_norm_train(inputs["x"], inputs["gamma"], None, inputs["running_mean"],
                                          inputs["running_var"], convention, axis=axis)  # fmt: skip
        dx, dg, db = spec.batch_norm_grad(inputs["x"], inputs["gamma"], inputs["dy"], convention, axis=axis)
        return {"y": y, "running_mean": rm, "running_var": rv, "dx": dx, "dgamma": dg, "dbeta": db}

    with pytest.raises(AssertionError, match=r"forward/y \(fake, preset=torch, NCHW, float64, train\)"):
        assert_matches_spec(forgets_beta, "fake", "torch", (4, 3, 2, 2), 1, "float64", True)


def test_round_to_matches_the_dtypes():
    a = np.array([1.0 + 2**-10, 3.14159265])
    np.testing.assert_array_equal(round_to(a, "float32"), a.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(round_to(a, "bfloat16"), [1.0, 3.140625])  # 8 significant bits
    np.testing.assert_array_equal(round_to(a, "float64"), a)


def test_inputs_put_channels_at_different_offsets():
    x = make_inputs((64, 3, 4), axis=1)["x"]
    means = x.mean(axis=(0, 2))
    assert np.all(np.diff(means) > 5)  # channel c sits near 10 c
    assert layout_name(4, 1) == "NCHW" and layout_name(4, -1) == "NHWC" and layout_name(3, -1) == "NLC"
