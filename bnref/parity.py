"""Proof that PyTorch and JAX compute the same BatchNorm: ``python -m bnref.parity``.

The parity matrix: for every preset of ``bnref.spec`` (d2l, torch, flax, keras), every
layout (NC, NCL, NCHW on the torch side; NC, NLC, NHWC on the JAX side), float32 and
float64, it runs several consecutive training steps (each implementation carrying its own
running statistics) and then one evaluation step, and compares every implementation with
the NumPy spec:

- ``bnref.torch``: bnref's PyTorch functional core;
- ``torch.nn``: ``torch.nn.BatchNorm*d`` configured to the preset (it cannot express a
  biased running variance: such cells say "not expressible" and why);
- ``bnref.jax``: bnref's JAX functional core, jit-compiled;
- ``flax.linen``: ``flax.linen.BatchNorm`` configured to the preset (it cannot express an
  unbiased running variance).

Quantities: y, new running mean, new running var, dx, dgamma, dbeta (gradients of
``sum(y * dy)``) and the eval output; each cell shows the max abs / max rel error over the
steps, judged by the per-dtype tolerances of ``bnref.testing.TOLERANCES``. The exit
status is non-zero on any failure. ``--json`` prints machine-readable results.

``--trajectory`` trains the same LeNet-BN in both frameworks instead (see
:func:`trajectory`), and ``--conventions-table`` prints the README's conventions table,
generated from the presets so it cannot drift.

``--replicas R`` is the data-parallel proof: the matrix becomes spec vs bnref's
SyncBatchNorm on R processes vs bnref.jax / flax.linen with ``axis_name`` on R devices, with
equal, unequal and empty shards (:func:`replicas_matrix`); ``--trajectory --replicas R`` also
trains LeNet-BN data-parallel in both frameworks and checks that R synchronized replicas
train like one device (:func:`replica_trajectories`).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from bnref import _cli, _io, spec
from bnref._cli import finite_positive_float, int_at_least, positive_int
from bnref.testing import TOLERANCES, NotExpressible, compare, make_inputs, round_to, spec_run

#: implementation -> (backend module, runner name, channels_last)
IMPLEMENTATIONS = {
    "bnref.torch": ("bnref.torch._runners", "run_functional", False),
    "torch.nn": ("bnref.torch._runners", "run_builtin", False),
    "bnref.jax": ("bnref.jax._runners", "run_functional", True),
    "flax.linen": ("bnref.jax._runners", "run_builtin", True),
}
#: torch-side layout -> (shape with 3 channels on axis 1, the JAX-side layout's name)
LAYOUTS = {"NC": ((16, 3), "NC"), "NCL": ((6, 3, 7), "NLC"), "NCHW": ((4, 3, 5, 6), "NHWC")}
DTYPES = ("float32", "float64")
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
    module, runner_name, channels_last = IMPLEMENTATIONS[impl]
    runner = getattr(importlib.import_module(module), runner_name)
    axis = -1 if channels_last else 1
    label_layout = jax_layout if channels_last else layout
    result = CellResult(preset, f"{layout}/{jax_layout}", dtype, impl, "pass")
    worst: Dict[str, List[float]] = {}
    failures: List[str] = []

    def run_step(step: int, train: bool, spec_state, impl_state):
        base = make_inputs(shape, 1, seed=100 * step + 1)
        # The oracle sees the inputs rounded to the backend's dtype, as the backend does.
        ref_in = {k: round_to(v, dtype) for k, v in base.items()}
        ref_in["running_mean"], ref_in["running_var"] = spec_state
        expected = spec_run(ref_in, convention, 1, train)
        impl_in = dict(ref_in, running_mean=impl_state[0], running_var=impl_state[1])
        if channels_last:
            impl_in["x"], impl_in["dy"] = _channels_last(impl_in["x"]), _channels_last(impl_in["dy"])
        actual = dict(runner(impl_in, convention, axis, dtype, train))
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
    state0 = (round_to(init["running_mean"], dtype), round_to(init["running_var"], dtype))
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
    return "\n".join(out)


def conventions_table() -> str:
    """The README's conventions table, generated from ``bnref.spec.PRESETS``.

    ``decay`` and the Flax/Keras/d2l-zh v2/d2l-en 0.17 ``momentum`` are the same number (both weight the old
    value), so they share one column; PyTorch's ``momentum`` is ``1 - decay``."""
    lines = [
        "| preset | decay (weight of the old value) = Flax/Keras/d2l-zh v2/d2l-en 0.17 `momentum` | PyTorch `momentum` = 1 - decay (and d2l-en 1.x's) | eps | running variance | torch.nn can express | flax.linen can express |",
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


#: trajectory pass criterion: max |loss_torch - loss_jax| over all steps, per dtype
TRAJECTORY_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


def _trajectory_batches(steps: int, batch_size: int, ds, seed: int):
    """``steps`` batches (uint8 images (B, 28, 28), int64 labels (B,)) from the training split
    of ``ds`` (a ``bnref.data.FashionMNIST``); example-level shuffling, reshuffled at each
    pass, from one seeded NumPy generator so both frameworks get the identical sequence."""
    images, labels = ds.train_images, ds.train_labels
    if len(images) < batch_size:
        raise ValueError(f"--batch-size {batch_size} exceeds the {len(images)} training examples of {ds.source}")
    rng = np.random.default_rng(seed)
    perm, pos = rng.permutation(len(images)), 0
    batches = []
    for _ in range(steps):
        if pos + batch_size > len(perm):
            perm, pos = rng.permutation(len(images)), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        batches.append((images[idx], labels[idx]))
    return batches, ds.source


def trajectory_data(data_dir: Optional[str] = None, synthetic: bool = False, batch_size: int = 256, seed: int = 0):
    """The data :func:`trajectory` trains on: Fashion-MNIST (from ``data_dir`` or the default
    places; missing files are an error), or with ``synthetic`` the synthetic stand-in, large
    enough for 4 batches."""
    from bnref.data import load_or_synthetic

    return load_or_synthetic(data_dir, synthetic_data=synthetic, **_stand_in_sizes(batch_size, seed))


def _stand_in_sizes(batch_size: int, seed: int) -> Dict:
    """The synthetic stand-in's sizes for a trajectory at ``batch_size``: 4 batches (at least 1024)."""
    return {"n_train": max(batch_size * 4, 1024), "n_test": 16, "seed": seed}


def trajectory(
    steps: int = 100,
    *,
    dtype: str = "float32",
    lr: float = 1.0,
    batch_size: int = 256,
    convention: str = "d2l",
    data_dir: Optional[str] = None,
    seed: int = 0,
    replicas: Optional[int] = None,
    data=None,
) -> Dict:
    """Train one LeNet-BN in both frameworks and compare them step by step.

    The torch model (bnref's BN, ``convention``) is initialised from ``seed``; its weights and
    BN state are converted to Flax variables with :mod:`bnref.convert`; both take the same
    batches and SGD steps (``lr``) in ``dtype`` on the CPU. Per step the report has both
    losses, their difference, the max abs difference of all weights (Flax's converted back to
    torch layout) and of the running statistics. ``passed`` when the max loss difference is
    within :data:`TRAJECTORY_TOLERANCE`.

    ``data``: a ``bnref.data.FashionMNIST`` to take the batches from (default:
    :func:`trajectory_data` of ``data_dir``: Fashion-MNIST, an error when absent).

    ``replicas=R`` also trains the same model data-parallel from the same initial state on the
    same global batches, each split into R equal slices: torch DDP on R gloo processes and
    bnref.jax under ``shard_map`` on R devices, once with synchronized BN and once without. See
    :func:`replica_trajectories` for what is compared and what must pass.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm needs two values per channel), got {batch_size}")
    if replicas is not None:
        if replicas < 2:
            raise ValueError(f"replicas must be >= 2, got {replicas}")
        if batch_size % replicas or batch_size // replicas < 2:
            raise ValueError(f"batch_size {batch_size} must split into {replicas} equal slices of at least 2 examples "
                             "(unsynchronized BN normalizes each slice alone)")  # fmt: skip
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    from bnref import convert
    from bnref.jax import train as jtrain
    from bnref.jax.models import LeNetBN as FlaxLeNetBN
    from bnref.torch import train as ttrain
    from bnref.torch.models import LeNetBN as TorchLeNetBN

    conv = spec.preset(convention)
    batches, source = _trajectory_batches(steps, batch_size, data if data is not None else trajectory_data(data_dir), seed)
    tdtype = getattr(torch, dtype)
    cpu = torch.device("cpu")
    torch.manual_seed(seed)
    tmodel = TorchLeNetBN(bn="bnref", convention=conv).to(tdtype)
    opt = torch.optim.SGD(tmodel.parameters(), lr=lr)
    initial = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
    stat_keys = [k for k in tmodel.state_dict() if k.endswith(("running_mean", "running_var"))]
    weight_keys = [k for k, _ in tmodel.named_parameters()]
    rows = []
    with jax.enable_x64(dtype == "float64"), jax.default_device(jax.devices("cpu")[0]):
        jdtype = jnp.dtype(dtype)
        fmodel = FlaxLeNetBN(bn="bnref", convention=conv, dtype=jdtype, param_dtype=jdtype)
        variables = convert.torch_to_flax(tmodel.state_dict())
        cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jdtype), tree)  # noqa: E731
        state = jtrain.TrainState.create(
            apply_fn=fmodel.apply, params=cast(variables["params"]),
            batch_stats=cast(variables["batch_stats"]), tx=optax.sgd(lr),
        )  # fmt: skip
        for step, (images, labels) in enumerate(batches, start=1):
            tX, ty = ttrain.load_tensors(images, labels, cpu)
            t_loss = float(ttrain.train_step(tmodel, opt, tX.to(tdtype), ty))
            jX = jnp.asarray(jtrain.prepare_images(images), jdtype)
            state, j_loss, _ = jtrain.train_step(state, jX, jnp.asarray(labels))
            back = convert.flax_to_torch({"params": state.params, "batch_stats": state.batch_stats})
            sd = tmodel.state_dict()
            diff = lambda keys: max(float(np.max(np.abs(back[k] - sd[k].numpy()))) for k in keys)  # noqa: E731
            j_loss = float(j_loss)
            rows.append({"step": step, "loss_torch": t_loss, "loss_jax": j_loss, "loss_diff": abs(t_loss - j_loss),
                         "weight_diff": diff(weight_keys), "stat_diff": diff(stat_keys)})  # fmt: skip
    report = {
        "steps": steps, "dtype": dtype, "lr": lr, "batch_size": batch_size, "convention": convention,
        "data": source, "tolerance": TRAJECTORY_TOLERANCE[dtype], **trajectory_verdict(rows, TRAJECTORY_TOLERANCE[dtype]),
        "rows": rows,
    }  # fmt: skip
    if replicas is not None:
        single = {"torch": {k: v.detach().numpy() for k, v in tmodel.state_dict().items()},
                  "jax": convert.flax_to_torch({"params": state.params, "batch_stats": state.batch_stats})}  # fmt: skip
        report["replicas"] = replica_trajectories(initial, batches, rows, single, replicas, dtype=dtype, lr=lr,
                                                  convention=conv, weight_keys=weight_keys, stat_keys=stat_keys)  # fmt: skip
        report["passed"] = report["passed"] and report["replicas"]["passed"]
    return report


#: data-parallel trajectory criterion: max |loss_R - loss_1| within one framework, synchronized BN.
#: float64: the same training to rounding (measured 1e-14 over 100 steps at lr 1.0). float32: R
#: replicas add up the batch in another order; at lr 1.0 and batch 256 that rounding grows to
#: ~3e-4 over 100 steps, as much as torch vs JAX on one device (1.4e-4), so the bound is that one.
REPLICA_TOLERANCE = {"float32": TRAJECTORY_TOLERANCE["float32"], "float64": 1e-10}


def replica_trajectories(initial, batches, rows, single, replicas: int, *, dtype: str, lr: float,
                         convention: spec.Convention, weight_keys, stat_keys) -> Dict:
    """The data-parallel half of ``trajectory(..., replicas=R)``.

    Four runs from the torch-layout ``initial`` state on the same global ``batches``: torch DDP
    with :class:`bnref.torch.SyncBatchNorm` and with local BN (R gloo processes), bnref.jax under
    ``shard_map`` with ``axis_name`` and without (R devices). Each run's per-step global mean
    loss is added to ``rows`` (``loss_torch_sync``, ``loss_jax_sync``, ``loss_torch_local``,
    ``loss_jax_local``). The comparisons, each with the max loss difference over the steps and
    the final weights' and running statistics' max difference:

    - synchronized R replicas vs one device, in each framework: must agree within
      :data:`REPLICA_TOLERANCE` (the data-parallel invariant);
    - torch R vs JAX R, synchronized: within :data:`TRAJECTORY_TOLERANCE`, as one device;
    - local BN vs one device, in each framework: reported, no criterion (they differ; how much
      is the point). Local runs' final statistics: rank 0's in torch (DDP's
      ``broadcast_buffers``), the cross-replica mean in JAX (Flax's examples).

    Any NaN or infinite loss fails a criterion, as in :func:`trajectory_verdict`.
    """
    from bnref import convert
    from bnref.jax._runners import run_shard_map_trajectory
    from bnref.torch._runners import run_ddp_trajectory

    variables = convert.torch_to_flax(initial)
    finals = dict(single)
    torch_runs = run_ddp_trajectory(initial, batches, lr, dtype, convention, replicas, modes=(True, False))
    for t, sync, kind in zip(torch_runs, (True, False), ("sync", "local")):
        j = run_shard_map_trajectory(variables, batches, lr, dtype, convention, replicas, sync_bn=sync)
        finals[f"torch_{kind}"], finals[f"jax_{kind}"] = t["state"], convert.flax_to_torch(j["variables"])
        for row, lt, lj in zip(rows, t["losses"], j["losses"]):
            row[f"loss_torch_{kind}"], row[f"loss_jax_{kind}"] = float(lt), float(lj)
    plan = [("torch_sync", "torch", REPLICA_TOLERANCE[dtype]), ("jax_sync", "jax", REPLICA_TOLERANCE[dtype]),
            ("torch_sync", "jax_sync", TRAJECTORY_TOLERANCE[dtype]), ("torch_local", "torch", None),
            ("jax_local", "jax", None)]  # fmt: skip
    comparisons = []
    for left, right, tolerance in plan:
        a = np.array([r[f"loss_{left}"] for r in rows], np.float64)
        b = np.array([r[f"loss_{right}"] for r in rows], np.float64)
        diff = lambda keys: max(float(np.max(np.abs(finals[left][k] - finals[right][k]))) for k in keys)  # noqa: E731
        verdict = loss_verdict(a, b, tolerance if tolerance is not None else math.inf)
        if tolerance is None:
            verdict["passed"] = None  # reported, not checked
        comparisons.append({"left": left, "right": right, "tolerance": tolerance, **verdict,
                            "weight_diff": diff(weight_keys), "stat_diff": diff(stat_keys)})  # fmt: skip
    return {"replicas": replicas, "comparisons": comparisons,
            "passed": all(c["passed"] for c in comparisons if c["tolerance"] is not None)}  # fmt: skip


def trajectory_verdict(rows: Sequence[Dict], tolerance: float) -> Dict:
    """``max_loss_diff`` and ``passed`` for a trajectory's rows.

    A NaN or infinite loss on either side is a failure, whatever the other side did: two
    diverged runs do not "agree", and ``max()`` must not skip a NaN (Python's does, unless it
    comes first). ``nonfinite_steps`` lists the steps where either loss is not finite.
    """
    losses = np.array([[r["loss_torch"], r["loss_jax"]] for r in rows], dtype=np.float64).reshape(-1, 2)
    return loss_verdict(losses[:, 0], losses[:, 1], tolerance, steps=[r["step"] for r in rows])


def loss_verdict(a: np.ndarray, b: np.ndarray, tolerance: float, steps: Optional[Sequence[int]] = None) -> Dict:
    """``max_loss_diff``, ``passed`` and ``nonfinite_steps`` (1-based unless ``steps`` names
    them) for two runs' per-step losses: NaN or inf on either side fails; no steps fails."""
    steps = list(range(1, len(a) + 1)) if steps is None else list(steps)
    bad = [s for s, x, y in zip(steps, a, b) if not (math.isfinite(x) and math.isfinite(y))]
    max_loss_diff = float(np.max(np.abs(a - b))) if len(a) else float("nan")
    passed = not bad and bool(max_loss_diff <= tolerance)
    return {"max_loss_diff": max_loss_diff, "passed": passed, "nonfinite_steps": bad}


def format_trajectory(report: Dict) -> str:
    """Per-step rows at a readable stride, then how the drift grows (max per tenth of the run)."""
    rows = report["rows"]
    out = [
        f"LeNet-BN trajectory: {report['steps']} SGD steps, lr {report['lr']}, batch {report['batch_size']}, "
        f"{report['dtype']}, convention {report['convention']}, data {report['data']}",
        f"{'step':>5}  {'loss torch':>12}  {'loss jax':>12}  {'|loss diff|':>11}  {'max |dW|':>9}  {'max |d stats|':>13}",
    ]
    stride = max(1, len(rows) // 20)
    for r in rows:
        if r["step"] % stride == 0 or r["step"] in (1, len(rows)):
            out.append(f"{r['step']:>5}  {r['loss_torch']:>12.6f}  {r['loss_jax']:>12.6f}  {r['loss_diff']:>11.2e}  "
                       f"{r['weight_diff']:>9.2e}  {r['stat_diff']:>13.2e}")  # fmt: skip
    chunk = max(1, len(rows) // 10)
    growth = [
        f"steps {rows[i]['step']}-{rows[min(i + chunk, len(rows)) - 1]['step']}: "
        f"{np.max([r['loss_diff'] for r in rows[i:i + chunk]]):.1e} / "
        f"{np.max([r['weight_diff'] for r in rows[i:i + chunk]]):.1e}"
        for i in range(0, len(rows), chunk)
    ]
    out.append("drift (max |loss diff| / max |dW|): " + "; ".join(growth))
    one_device = not report["nonfinite_steps"] and report["max_loss_diff"] <= report["tolerance"]
    line = f"{'PASS' if one_device else 'FAIL'}: max |loss diff| {report['max_loss_diff']:.2e} (tolerance {report['tolerance']:g})"
    if report.get("nonfinite_steps"):
        steps = report["nonfinite_steps"]
        line += f"; a loss is NaN or infinite at {len(steps)} step(s), first at step {steps[0]}"
    out.append(line)
    if "replicas" in report:
        out.extend(_format_replicas(report["replicas"], rows, stride))
        checks = 1 + sum(c["passed"] is not None for c in report["replicas"]["comparisons"])
        out.append(f"{'PASS' if report['passed'] else 'FAIL'}: all {checks} checks")
    return "\n".join(out)


#: how the report names each run of a data-parallel trajectory
RUN_NAMES = {"torch": "torch, 1 process", "jax": "JAX, 1 device", "torch_sync": "torch DDP + SyncBatchNorm",
             "jax_sync": "JAX shard_map + axis_name", "torch_local": "torch DDP, local BN",
             "jax_local": "JAX shard_map, local BN"}  # fmt: skip


def _format_replicas(rep: Dict, rows, stride: int) -> List[str]:
    r = rep["replicas"]
    out = [f"data parallel, {r} replicas (the same global batches, {r} equal slices each): mean loss of the global batch",
           f"{'step':>5}  {'torch sync':>12}  {'jax sync':>12}  {'torch local':>12}  {'jax local':>12}"]  # fmt: skip
    for row in rows:
        if row["step"] % stride == 0 or row["step"] in (1, len(rows)):
            out.append(f"{row['step']:>5}  {row['loss_torch_sync']:>12.6f}  {row['loss_jax_sync']:>12.6f}  "
                       f"{row['loss_torch_local']:>12.6f}  {row['loss_jax_local']:>12.6f}")  # fmt: skip
    for c in rep["comparisons"]:
        verdict = "info" if c["passed"] is None else ("PASS" if c["passed"] else "FAIL")
        tol = "" if c["tolerance"] is None else f" (tolerance {c['tolerance']:g})"
        line = (f"{verdict}: {RUN_NAMES[c['left']]} vs {RUN_NAMES[c['right']]}: max |loss diff| "
                f"{c['max_loss_diff']:.2e}{tol}; final max |dW| {c['weight_diff']:.2e}, |d stats| {c['stat_diff']:.2e}")
        if c["nonfinite_steps"]:
            line += f"; a loss is NaN or infinite at step {c['nonfinite_steps'][0]}"
        out.append(line)
    return out


# --- data parallel: --replicas R -------------------------------------------------------------------------

#: implementation -> how it runs its R replicas
REPLICA_IMPLEMENTATIONS = ("bnref.torch", "torch.nn", "bnref.jax", "flax.linen")


def shard_sizes(replicas: int) -> Dict[str, List[int]]:
    """The shardings compared: equal, unequal, and one replica with an empty shard."""
    return {"equal": [4] * replicas, "unequal": [2 + 2 * r for r in range(replicas)],
            "empty": [0] + [5] * (replicas - 1)}  # fmt: skip


def run_replica_cell(preset: str, sharding: str, dtype: str, impl: str, replicas: int, steps: int = STEPS) -> CellResult:
    """One cell: ``steps`` synchronized training steps and one eval step on ``replicas`` shards,
    every replica's y, dx, running statistics and the summed parameter gradients against
    ``bnref.spec.sync_batch_norm_train`` / ``sync_batch_norm_grad``."""
    convention = spec.preset(preset)
    sizes = shard_sizes(replicas)[sharding]
    rng = np.random.default_rng(sum(sizes) + replicas)
    c = 3
    shards = [round_to(10.0 * np.arange(c).reshape(1, c, 1) + (0.5 + np.arange(c)).reshape(1, c, 1)
                       * rng.standard_normal((n, c, 4)), dtype) for n in sizes]  # fmt: skip
    dys = [round_to(rng.standard_normal(s.shape), dtype) for s in shards]
    g, b = round_to(1 + 0.5 * rng.standard_normal(c), dtype), round_to(rng.standard_normal(c), dtype)
    rm, rv = round_to(rng.standard_normal(c), dtype), round_to(rng.uniform(0.5, 2.0, c), dtype)
    label = f"{sharding} {'/'.join(map(str, sizes))}"
    result = CellResult(preset, label, dtype, impl, "pass")
    try:
        if impl in ("bnref.torch", "torch.nn"):
            if impl == "torch.nn":
                raise NotExpressible("torch.nn.SyncBatchNorm refuses CPU tensors (CUDA only)")
            from bnref.torch._runners import run_sync

            per_rank = run_sync(shards, dys, g, b, rm, rv, convention, steps=steps, layer="bnref", dtype=dtype)
            got = [{"ys": [r["steps"][k]["y"] for r in per_rank], "dxs": [r["steps"][k]["dx"] for r in per_rank],
                    "dgamma": sum(r["steps"][k]["dgamma"] for r in per_rank),
                    "dbeta": sum(r["steps"][k]["dbeta"] for r in per_rank),
                    "running_mean": per_rank[0]["steps"][k]["running_mean"],
                    "running_var": per_rank[0]["steps"][k]["running_var"]} for k in range(steps)]  # fmt: skip
            eval_ys = [r["eval_y"] for r in per_rank]
        else:
            from bnref.jax._runners import run_axis_name

            out = run_axis_name(shards, dys, g, b, rm, rv, convention, dtype, builtin=impl == "flax.linen", steps=steps)
            got, eval_ys = out["steps"], out["eval_ys"]
    except NotExpressible as e:
        return CellResult(preset, label, dtype, impl, "not expressible", str(e))
    worst: Dict[str, List[float]] = {}
    failures: List[str] = []
    s_rm, s_rv = rm, rv
    for k in range(steps):
        ys, s_rm, s_rv = spec.sync_batch_norm_train(shards, g, b, s_rm, s_rv, convention)
        dxs, dg, db = spec.sync_batch_norm_grad(shards, g, dys, convention)
        actual = {"y": np.concatenate(got[k]["ys"]), "dx": np.concatenate(got[k]["dxs"]), "dgamma": got[k]["dgamma"],
                  "dbeta": got[k]["dbeta"], "running_mean": got[k]["running_mean"], "running_var": got[k]["running_var"]}
        expected = {"y": np.concatenate(ys), "dx": np.concatenate(dxs), "dgamma": dg, "dbeta": db,
                    "running_mean": s_rm, "running_var": s_rv}  # fmt: skip
        context = f"{impl}, {replicas} replicas, preset={preset}, {label}, {dtype}"
        cells = compare(actual, expected, context=f"{context}, step {k}", dtype=dtype, check_dtype=False)
        if k == steps - 1:  # then evaluation with the running statistics
            eval_expected = np.concatenate([spec.batch_norm_eval(s, g, b, s_rm, s_rv, convention) for s in shards])
            cells += compare({"eval_y": np.concatenate(eval_ys)}, {"eval_y": eval_expected}, context=f"{context}, eval",
                             dtype=dtype, check_dtype=False)  # fmt: skip
        _tally(cells, worst, failures)
    result.errors = worst
    if failures:
        result.status, result.reason = "FAIL", "; ".join(failures)
    return result


def replicas_matrix(replicas: int, presets: Sequence[str] = ("torch", "d2l"), dtypes: Sequence[str] = DTYPES,
                    impls: Sequence[str] = REPLICA_IMPLEMENTATIONS) -> List[CellResult]:
    return [run_replica_cell(p, s, d, i, replicas) for p in presets for s in shard_sizes(replicas) for d in dtypes
            for i in impls]  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnref.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--preset", action="append", choices=sorted(spec.PRESETS), help="only these presets (repeatable)")
    p.add_argument("--impl", action="append", choices=sorted(IMPLEMENTATIONS), help="only these implementations")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="only these dtypes (matrix); trajectory dtype")
    p.add_argument("--conventions-table", action="store_true", help="print the README conventions table and exit")
    p.add_argument("--trajectory", action="store_true", help="train LeNet-BN in both frameworks and compare")
    p.add_argument("--steps", type=positive_int, default=100, help="trajectory: number of SGD steps")
    p.add_argument("--lr", type=finite_positive_float, default=1.0, help="trajectory: learning rate (finite, > 0)")
    p.add_argument("--batch-size", type=int_at_least(2), default=256, help="trajectory: batch size (>= 2)")
    p.add_argument("--convention", choices=sorted(spec.PRESETS), default="d2l", help="trajectory: BN convention")
    _cli.add_data_options(p, "trajectory: ")
    p.add_argument("--replicas", type=int_at_least(2), default=None,
                   help="data parallel: spec vs bnref.torch SyncBatchNorm on R processes vs bnref.jax / flax.linen "
                        "with axis_name on R devices, for equal, unequal and empty shards")  # fmt: skip
    args = p.parse_args(argv)
    if args.replicas is not None:
        from bnref.train import provide_host_devices

        if args.trajectory and (args.batch_size % args.replicas or args.batch_size // args.replicas < 2):
            p.error(f"--batch-size {args.batch_size} must split into --replicas {args.replicas} equal slices of at "
                    "least 2 examples")  # fmt: skip
        provide_host_devices(args.replicas)  # R JAX devices on a CPU, before JAX starts
    if args.replicas is not None and not args.trajectory:
        start = time.perf_counter()
        results = replicas_matrix(args.replicas, presets=args.preset or ("torch", "d2l"), dtypes=args.dtype or DTYPES,
                                  impls=[i for i in REPLICA_IMPLEMENTATIONS if not args.impl or i in args.impl])  # fmt: skip
        return _report(results, args.json, start)
    if args.conventions_table:
        print(conventions_table())
        return 0
    if args.trajectory:
        dtype = (args.dtype or ["float32"])[-1]
        ds = _cli.load_data(p, args, file=sys.stderr if args.json else None, **_stand_in_sizes(args.batch_size, 0))
        if len(ds.train_labels) < args.batch_size:
            p.error(f"--batch-size {args.batch_size} exceeds the {len(ds.train_labels)} training examples of {ds.source}")
        report = trajectory(args.steps, dtype=dtype, lr=args.lr, batch_size=args.batch_size,
                            convention=args.convention, replicas=args.replicas, data=ds)  # fmt: skip
        print(_io.dumps(report) if args.json else format_trajectory(report))
        return 0 if report["passed"] else 1
    start = time.perf_counter()
    results = matrix(
        presets=args.preset or tuple(spec.PRESETS),
        dtypes=args.dtype or DTYPES,
        impls=args.impl or tuple(IMPLEMENTATIONS),
    )
    return _report(results, args.json, start)


def _report(results, as_json: bool, start: float) -> int:
    failed = [r for r in results if not r.passed]
    if as_json:
        print(_io.dumps([asdict(r) for r in results]))
    else:
        print(format_table(results))
        counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "not expressible")}
        print(f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['not expressible']} not expressible "
              f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
        for r in failed:
            print(f"FAIL {r.reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
