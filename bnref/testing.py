"""The one parity helper: generate inputs once in NumPy, compare any backend with the spec.

Every comparison in bnref (the unit tests of each backend, the cross-backend matrix of
``python -m bnref.parity``) goes through :func:`compare`, so a failure always reads the
same way, e.g. ``backward/dgamma (torch, preset=flax, NHWC, float32): max abs err ...``.

A backend plugs in with a *runner*: ``run(inputs, convention, axis, dtype, train)``
taking the float64 NumPy inputs of :func:`make_inputs` and returning NumPy arrays in the
backend's own dtype for the quantities of :data:`QUANTITIES` (``dx``, ``dgamma``,
``dbeta`` only in training: the gradients of ``sum(y * dy)``).

NumPy only: importing this module imports no framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from bnref import spec

#: name of each compared quantity -> the label's stage prefix
QUANTITIES = {
    "y": "forward/y",
    "running_mean": "state/running_mean",
    "running_var": "state/running_var",
    "dx": "backward/dx",
    "dgamma": "backward/dgamma",
    "dbeta": "backward/dbeta",
    "eval_y": "eval/y",
}


class NotExpressible(Exception):
    """A framework's built-in layer cannot be configured to a convention; ``str()`` says why.

    Example: torch.nn.BatchNorm always feeds the unbiased variance into its running
    average, so it cannot express a biased-running-variance preset such as ``d2l``.
    """


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def allows(self, actual: np.ndarray, expected: np.ndarray) -> bool:
        return bool(np.all(np.abs(actual - expected) <= self.atol + self.rtol * np.abs(expected)))


#: per dtype: |actual - expected| <= atol + rtol * |expected|, elementwise. float32 leaves
#: room for reductions over ~1e4 values and different summation orders; float64 is tight.
TOLERANCES = {
    "float64": Tolerance(rtol=1e-9, atol=1e-10),
    "float32": Tolerance(rtol=1e-4, atol=2e-5),
    "bfloat16": Tolerance(rtol=spec.BF16_TOLERANCE, atol=spec.BF16_TOLERANCE),  # why: bnref.spec
    "float16": Tolerance(rtol=5e-3, atol=5e-3),
}


def layout_name(ndim: int, axis: int) -> str:
    """A readable name for a layout: NC, NCL, NCHW, NCDHW for axis 1; NLC, NHWC, ... for -1."""
    spatial = {0: "", 1: "L", 2: "HW", 3: "DHW"}.get(ndim - 2, f"{ndim - 2}D")
    return f"NC{spatial}" if axis % ndim == 1 else f"N{spatial}C"


def make_inputs(shape: Sequence[int], axis: int = 1, seed: int = 0) -> Dict[str, np.ndarray]:
    """Float64 inputs for one case: ``x, gamma, beta, running_mean, running_var, dy``.

    Channels get very different offsets and scales (``x_c ~ 10 c + (0.5 + c) N(0, 1)``)
    so that statistics reduced over the wrong axis are visibly wrong.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    ax = axis % len(shape)
    c = shape[ax]
    bshape = tuple(c if i == ax else 1 for i in range(len(shape)))
    offsets = (10.0 * np.arange(c)).reshape(bshape)
    scales = (0.5 + np.arange(c)).reshape(bshape)
    return {
        "x": offsets + scales * rng.standard_normal(shape),  # shape
        "gamma": 1.0 + 0.5 * rng.standard_normal(c),  # (C,)
        "beta": rng.standard_normal(c),  # (C,)
        "running_mean": rng.standard_normal(c),  # (C,)
        "running_var": rng.uniform(0.5, 2.0, c),  # (C,)
        "dy": rng.standard_normal(shape),  # shape
    }


def spec_run(inputs: Mapping[str, np.ndarray], convention: spec.Convention, axis: int, train: bool):
    """The spec's answer for ``inputs``: the reference runner (float64)."""
    args = (inputs["x"], inputs["gamma"], inputs["beta"], inputs["running_mean"], inputs["running_var"])
    if not train:
        y = spec.batch_norm_eval(*args, convention, axis=axis)
        return {"y": y, "running_mean": inputs["running_mean"], "running_var": inputs["running_var"]}
    y, rm, rv = spec.batch_norm_train(*args, convention, axis=axis)
    dx, dgamma, dbeta = spec.batch_norm_grad(inputs["x"], inputs["gamma"], inputs["dy"], convention, axis=axis)
    return {"y": y, "running_mean": rm, "running_var": rv, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}


@dataclass(frozen=True)
class Cell:
    """One compared quantity: its label, the errors, and whether it passed."""

    label: str
    max_abs: float
    max_rel: float
    passed: bool
    problem: Optional[str] = None  # shape/dtype/missing: why it failed before any number

    def __str__(self) -> str:
        if self.problem:
            return f"{self.label}: {self.problem}"
        verdict = "ok" if self.passed else "FAIL"
        return f"{self.label}: max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g} [{verdict}]"


def compare(
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    *,
    context: str,
    dtype: str,
    tolerance: Optional[Tolerance] = None,
    check_dtype: bool = True,
) -> List[Cell]:
    """Compare every quantity present in ``expected``; one labelled :class:`Cell` each.

    ``context`` names the case, e.g. ``"torch, preset=flax, NHWC, float32"``; a cell's label
    is ``"<stage>/<quantity> (<context>)"``. Arrays of ``actual`` must have the expected
    shape and, when ``check_dtype``, the dtype ``dtype`` (a backend keeps its input dtype).
    """
    tol = tolerance or TOLERANCES[dtype]
    cells = []
    for name, exp in expected.items():
        label = f"{QUANTITIES.get(name, name)} ({context})"
        if name not in actual or actual[name] is None:
            cells.append(Cell(label, np.inf, np.inf, False, "missing from the backend's result"))
            continue
        act = np.asarray(actual[name])
        exp = np.asarray(exp, dtype=np.float64)
        if act.shape != exp.shape:
            cells.append(Cell(label, np.inf, np.inf, False, f"shape {act.shape} != expected {exp.shape}"))
            continue
        if check_dtype and act.dtype.name != dtype:
            cells.append(Cell(label, np.inf, np.inf, False, f"dtype {act.dtype.name} != expected {dtype}"))
            continue
        act64 = act.astype(np.float64)
        err = np.abs(act64 - exp)
        max_abs = float(err.max()) if err.size else 0.0
        max_rel = float((err / np.maximum(np.abs(exp), tol.atol)).max()) if err.size else 0.0
        passed = bool(np.all(np.isfinite(act64))) and tol.allows(act64, exp)
        cells.append(Cell(label, max_abs, max_rel, passed))
    return cells


def assert_close(
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    *,
    context: str,
    dtype: str,
    tolerance: Optional[Tolerance] = None,
    check_dtype: bool = True,
) -> None:
    """:func:`compare`, raising ``AssertionError`` that lists every failing labelled cell."""
    cells = compare(actual, expected, context=context, dtype=dtype, tolerance=tolerance, check_dtype=check_dtype)
    failures = [str(c) for c in cells if not c.passed]
    if failures:
        raise AssertionError("parity failure:\n  " + "\n  ".join(failures))


def assert_matches_spec(runner, backend: str, preset: str, shape, axis: int, dtype: str, train: bool, seed: int = 0):
    """Run ``runner`` and the spec on the same inputs and assert they agree, labelled."""
    convention = spec.preset(preset)
    inputs = make_inputs(shape, axis, seed)
    # The oracle sees the inputs rounded to the backend's dtype, as the backend does.
    expected = spec_run({k: round_to(v, dtype) for k, v in inputs.items()}, convention, axis, train)
    actual = runner(inputs, convention, axis, dtype, train)
    mode = "train" if train else "eval"
    context = f"{backend}, preset={preset}, {layout_name(len(shape), axis)}, {dtype}, {mode}"
    assert_close(actual, expected, context=context, dtype=dtype)


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype`` and back to float64: what a backend of that dtype sees."""
    if dtype == "bfloat16":  # NumPy has no bfloat16: round-to-nearest-even on the top 16 bits
        bits = np.asarray(a, dtype=np.float32).view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return np.asarray(a).astype(dtype).astype(np.float64)
