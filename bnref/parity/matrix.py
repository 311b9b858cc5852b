"""The parity matrix: one cell (:func:`run_cell`: several training steps and one eval step of one
implementation against the NumPy spec, for one preset, layout and dtype), the matrix of them
(:func:`matrix`), its fixed-width table (:func:`format_table`), and the README's conventions table
(:func:`conventions_table`), generated from the presets like the cells; the shared pieces the
replicas matrix builds on too (:class:`CellResult`, :data:`DTYPES`, :data:`STEPS`, :func:`_tally`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np

from bnref import backends, spec
from bnref.testing import TOLERANCES, NotExpressible, compare, make_inputs, round_to, spec_run

#: implementation -> (backend, runner name in its ``_runners``, channels_last): the registry's
IMPLEMENTATIONS = backends.parity_implementations()
#: torch-side layout -> (shape with 3 channels on axis 1, the JAX-side layout's name)
LAYOUTS = {"NC": ((16, 3), "NC"), "NCL": ((6, 3, 7), "NLC"), "NCHW": ((4, 3, 5, 6), "NHWC")}
DTYPES = ("float32", "float64", "bfloat16")
#: the parameters' and running statistics' dtype per matrix dtype, where it is not the dtype itself:
#: a bfloat16 cell is BN as ``--precision bfloat16`` trains it (bfloat16 activations, float32
#: gamma, beta and statistics: torch.autocast, Flax ``param_dtype=float32``), judged by
#: ``bnref.spec.BF16_TOLERANCE``
PARAM_DTYPES = {"bfloat16": "float32"}
#: the dtypes a whole-model run (the trajectory, the replicas) trains in; bfloat16 is its
#: ``precision`` (``bnref.spec.PRECISIONS``), on float32 parameters
FULL_DTYPES = ("float32", "float64")
STEPS = 3


@dataclass
class CellResult:
    preset: str
    layout: str  # e.g. "NCHW/NHWC": the torch-side and JAX-side layouts
    dtype: str
    impl: str
    status: str  # "pass", "FAIL" or "not expressible"
    reason: str = ""  # why not expressible, or which labels failed
    errors: Dict[str, List[float]] = field(default_factory=dict)  # quantity -> [max abs, max rel]

    @property
    def passed(self) -> bool:
        return self.status != "FAIL"


def _channels_last(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 1, -1)


def _channels_first(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, -1, 1)


def _tally(cells, worst: Dict[str, List[float]], failures: List[str]) -> None:
    """Fold compared cells into the per-quantity worst ``[max abs, max rel]`` and the failures."""
    for cell in cells:
        w = worst.setdefault(cell.label.split(" (")[0], [0.0, 0.0])
        # np.max, not max(): a NaN must propagate into the report, never be skipped
        w[0], w[1] = float(np.max([w[0], cell.max_abs])), float(np.max([w[1], cell.max_rel]))
        if not cell.passed:
            failures.append(str(cell))


def run_cell(preset: str, layout: str, dtype: str, impl: str, steps: int = STEPS) -> CellResult:
    """One cell of the matrix: ``steps`` training steps then one eval step, vs the spec."""
    convention = spec.preset(preset)
    shape, jax_layout = LAYOUTS[layout]
    _, _, channels_last = IMPLEMENTATIONS[impl]
    runner = backends.parity_runner(impl)
    axis = -1 if channels_last else 1
    label_layout = jax_layout if channels_last else layout
    result = CellResult(preset, f"{layout}/{jax_layout}", dtype, impl, "pass")
    worst: Dict[str, List[float]] = {}
    failures: List[str] = []
    pdtype = PARAM_DTYPES.get(dtype, dtype)
    extra = {"param_dtype": pdtype} if pdtype != dtype else {}

    def run_step(step: int, train: bool, spec_state, impl_state):
        base = make_inputs(shape, 1, seed=100 * step + 1)
        # The oracle sees the inputs rounded to the backend's dtypes, as the backend does.
        ref_in = {k: round_to(v, dtype if k in ("x", "dy") else pdtype) for k, v in base.items()}
        ref_in["running_mean"], ref_in["running_var"] = spec_state
        expected = spec_run(ref_in, convention, 1, train)
        impl_in = dict(ref_in, running_mean=impl_state[0], running_var=impl_state[1])
        if channels_last:
            impl_in["x"], impl_in["dy"] = _channels_last(impl_in["x"]), _channels_last(impl_in["dy"])
        actual = dict(runner(impl_in, convention, axis, dtype, train, **extra))
        if channels_last:
            for k in ("y", "dx"):
                if k in actual:
                    actual[k] = _channels_first(np.asarray(actual[k]))
        if not train:
            expected = {"eval_y": expected["y"]}
            actual = {"eval_y": actual["y"]}
        context = f"{impl}, preset={preset}, {label_layout}, {dtype}, step {step}"
        # Running statistics keep their own dtype (float32 buffers for half inputs in torch,
        # float32 batch_stats in flax), so only outputs and gradients must match dtype.
        _tally(compare(actual, expected, context=context, dtype=dtype, check_dtype=False), worst, failures)
        if not train:
            return spec_state, impl_state
        as64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        return (expected["running_mean"], expected["running_var"]), (as64(actual["running_mean"]), as64(actual["running_var"]))

    init = make_inputs(shape, 1, seed=0)
    state0 = (round_to(init["running_mean"], pdtype), round_to(init["running_var"], pdtype))
    spec_state, impl_state = state0, state0
    try:
        for step in range(steps):
            spec_state, impl_state = run_step(step, True, spec_state, impl_state)
        run_step(steps, False, spec_state, impl_state)
    except NotExpressible as e:
        return CellResult(preset, result.layout, dtype, impl, "not expressible", str(e))
    result.errors = worst
    if failures:
        result.status, result.reason = "FAIL", "; ".join(failures)
    return result


def matrix(
    presets: Sequence[str] = tuple(spec.PRESETS),
    layouts: Sequence[str] = tuple(LAYOUTS),
    dtypes: Sequence[str] = DTYPES,
    impls: Sequence[str] = tuple(IMPLEMENTATIONS),
    steps: int = STEPS,
) -> List[CellResult]:
    return [run_cell(p, l, d, i, steps) for p in presets for l in layouts for d in dtypes for i in impls]


_COLUMNS = [("y", "forward/y"), ("mean", "state/running_mean"), ("var", "state/running_var"),
            ("dx", "backward/dx"), ("dgamma", "backward/dgamma"), ("dbeta", "backward/dbeta"), ("eval y", "eval/y")]  # fmt: skip


def format_table(results: Sequence[CellResult]) -> str:
    """A fixed-width table: one row per (preset, layout, dtype, implementation); each
    quantity shows ``max abs err / max rel err``."""
    head = ["preset", "layout", "dtype", "impl"] + [c for c, _ in _COLUMNS] + ["result"]
    rows = []
    for r in results:
        cells = []
        for _, key in _COLUMNS:
            e = r.errors.get(key)
            cells.append(f"{e[0]:.1e}/{e[1]:.1e}" if e else "-")
        verdict = r.status if r.status != "not expressible" else f"not expressible: {r.reason}"
        rows.append([r.preset, r.layout, r.dtype, r.impl] + cells + [verdict])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    widths[-1] = 0  # last column is not padded
    line = lambda cols: "  ".join(str(c).ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths[:-1]] + ["------"])] + [line(r) for r in rows]
    tol = ", ".join(f"{d} {TOLERANCES[d].atol:g} + {TOLERANCES[d].rtol:g}" for d in DTYPES)
    out.append(f"cells: max abs err / max rel err over {STEPS} training steps and 1 eval step, rel err = |err| / "
               "max(|expected|, atol)")  # fmt: skip
    out.append(f"pass: every element's |err| <= atol + rtol * |expected| (atol + rtol: {tol}), so an element near 0 "
               "may show a rel err above rtol and pass; no NaN or inf passes")  # fmt: skip
    if any(r.dtype in PARAM_DTYPES for r in results):
        out.append("bfloat16 cells: bfloat16 x and dy, float32 gamma, beta and running statistics (--precision bfloat16 "
                   "training); the bound is bnref.spec.BF16_TOLERANCE, why is stated there")  # fmt: skip
    return "\n".join(out)


def conventions_table() -> str:
    """The README's conventions table, generated from ``bnref.spec.PRESETS``.

    ``decay`` and the Flax/Keras/d2l-zh v2/d2l-en 0.17 ``momentum`` are the same number (both weight the old
    value), so they share one column; PyTorch's ``momentum`` is ``1 - decay``."""
    lines = [
        "| preset | decay (weight of the old value) = Flax/Keras/d2l-zh v2/d2l-en 0.17 `momentum` | PyTorch `momentum` = 1 - decay (and d2l-en 1.x's) | eps | running variance | torch.nn can express | flax.linen and flax.nnx can express |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in spec.PRESETS.items():
        torch_ok = "yes" if c.running_var == "unbiased" else "no (always unbiased)"
        flax_ok = "yes" if c.running_var == "biased" else "no (always biased)"
        lines.append(
            f"| `{name}` | {c.decay:g} | {c.torch_momentum:g} | {c.eps:g} | "
            f"{c.running_var} | {torch_ok} | {flax_ok} |"
        )
    return "\n".join(lines)
