"""The data-parallel proof (``--replicas R``): the replicas matrix (:func:`replicas_matrix`: spec vs
bnref's SyncBatchNorm on R processes vs bnref.jax / flax.linen / bnref.nnx / flax.nnx with
``axis_name`` on R devices, on equal, unequal and empty shards, :func:`run_replica_cell`), and the
replica trajectories (:func:`replica_trajectories`: LeNet-BN trained data-parallel in both
frameworks, its criterion :data:`REPLICA_TOLERANCE` and its part of the trajectory's report,
:func:`_format_replicas`)."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

from bnref import backends, spec
from bnref.parity.matrix import FULL_DTYPES as DTYPES, IMPLEMENTATIONS, STEPS, CellResult, _tally
from bnref.parity.verdicts import TRAJECTORY_TOLERANCE, loss_verdict
from bnref.testing import NotExpressible, compare, round_to

#: implementation -> how it runs its R replicas
REPLICA_IMPLEMENTATIONS = tuple(IMPLEMENTATIONS)  # every backend's runners have a run_sync_bn


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
        _, runner, _ = IMPLEMENTATIONS[impl]
        run_sync_bn = backends.parity_runner(impl, "run_sync_bn")
        out = run_sync_bn(shards, dys, g, b, rm, rv, convention, dtype, builtin=runner == "run_builtin", steps=steps)
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


# --- the data-parallel trajectory: --trajectory --replicas R -------------------------------------------

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
    from bnref.jax._runners import run_data_parallel_trajectory as run_jax
    from bnref.torch._runners import run_data_parallel_trajectory as run_torch

    variables = convert.torch_to_flax(initial)
    finals = dict(single)
    torch_runs = run_torch(initial, batches, lr, dtype, convention, replicas, modes=(True, False))
    for t, sync, kind in zip(torch_runs, (True, False), ("sync", "local")):
        j = run_jax(variables, batches, lr, dtype, convention, replicas, sync_bn=sync)
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
