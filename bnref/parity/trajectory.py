"""The one-device trajectory: the same LeNet-BN trained in both frameworks and compared step by step
(:func:`trajectory`, on :func:`trajectory_data`) and its report (:func:`format_trajectory`); its
criterion and verdicts are :mod:`bnref.parity.verdicts`'. With ``replicas=R`` it adds the
data-parallel runs of :mod:`bnref.parity.replicas`; with ``nnx=True`` a third side, bnref.nnx's
LeNet-BN trained the NNX way (``nnx.jit`` step, ``nnx.Optimizer``), compared with the linen one."""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

from bnref import spec
from bnref.parity.matrix import FULL_DTYPES as DTYPES
from bnref.parity.replicas import _format_replicas, replica_trajectories
from bnref.parity.verdicts import TRAJECTORY_JUDGED_STEPS, TRAJECTORY_TOLERANCE, loss_verdict, trajectory_verdict  # noqa: F401



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
    precision: str = "float32",
    device: str = "cpu",
    nnx: bool = False,
) -> Dict:
    """Train one LeNet-BN in both frameworks and compare them step by step.

    The torch model (bnref's BN, ``convention``) is initialised from ``seed``; its weights and
    BN state are converted to Flax variables with :mod:`bnref.convert`; both take the same
    batches and SGD steps (``lr``) in ``dtype`` on the CPU. Per step the report has both
    losses, their difference, the max abs difference of all weights (Flax's converted back to
    torch layout) and of the running statistics. ``passed`` when the max loss difference is
    within :data:`TRAJECTORY_TOLERANCE`.

    ``precision="bfloat16"``: both train as ``--precision bfloat16`` does (float32 parameters,
    statistics and SGD; torch under ``torch.autocast(dtype=bfloat16)``, Flax with
    ``dtype=bfloat16``), judged by ``TRAJECTORY_TOLERANCE["bfloat16"]``. Float32 matmuls and
    convolutions never use TF32 here (``bnref.jax.train.matmul_precision`` and
    ``bnref.torch.train.float32_matmuls``, off for the run).

    ``device``: where both train (``"cpu"``, ``"auto"``: a GPU when there is one, ``"cuda"`` /
    ``"cuda:N"``); the replicas always run on the CPU.

    ``data``: a ``bnref.data.FashionMNIST`` to take the batches from (default:
    :func:`trajectory_data` of ``data_dir``: Fashion-MNIST, an error when absent).

    ``replicas=R`` also trains the same model data-parallel from the same initial state on the
    same global batches, each split into R equal slices: torch DDP on R gloo processes and
    bnref.jax under ``shard_map`` on R devices, once with synchronized BN and once without. See
    :func:`replica_trajectories` for what is compared and what must pass.

    ``nnx=True`` adds a third side: ``bnref.nnx.models.LeNetBN`` holding the linen side's initial
    variables (``bnref.nnx.variables.load_linen``), trained by ``bnref.nnx.train.train_step`` (an
    ``nnx.jit`` step over an ``nnx.Optimizer``, the BN statistics updated in place) on the same
    batches, in the same dtype or precision. Each row gains ``loss_nnx``, ``nnx_loss_diff``
    (|linen - NNX|), ``nnx_weight_diff`` and ``nnx_stat_diff`` (max abs over every parameter /
    running statistic, in linen's layout); ``report["nnx"]`` is the linen-vs-NNX verdict, by the
    same tolerance and judged steps as torch vs linen, and ``passed`` needs it.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (bfloat16 is a precision: precision='bfloat16'), got {dtype!r}")
    if precision not in spec.PRECISIONS:
        raise ValueError(f"precision must be one of {spec.PRECISIONS}, got {precision!r}")
    if replicas is not None and device != "cpu":
        raise ValueError("replicas run as CPU processes and devices: device must be 'cpu'")
    if precision != "float32" and (dtype != "float32" or replicas is not None):
        raise ValueError("precision bfloat16 trains float32 parameters on one device: dtype float32, no replicas")
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
    from bnref import convert
    from bnref.jax.train import matmul_precision
    from bnref.torch.train import float32_matmuls

    with float32_matmuls(False), matmul_precision(False):
        rows, tmodel, state, initial, weight_keys, stat_keys, batches, source, conv = _train_both(
            steps, dtype, lr, batch_size, convention, data, data_dir, seed, precision, device, nnx)
    key = precision if precision != "float32" else dtype  # the tolerance's
    judged = min(steps, TRAJECTORY_JUDGED_STEPS.get(key, steps))
    report = {
        "steps": steps, "dtype": dtype, "precision": precision, "device": device, "lr": lr, "batch_size": batch_size, "convention": convention,
        "data": source, "tolerance": TRAJECTORY_TOLERANCE[key], "judged_steps": judged,
        **trajectory_verdict(rows[:judged], TRAJECTORY_TOLERANCE[key]),
        "rows": rows,
    }  # fmt: skip
    if nnx:
        linen, nnx_losses = (np.array([r[k] for r in rows[:judged]]) for k in ("loss_jax", "loss_nnx"))
        report["nnx"] = {"tolerance": TRAJECTORY_TOLERANCE[key], "judged_steps": judged,
                         **loss_verdict(linen, nnx_losses, TRAJECTORY_TOLERANCE[key], steps=range(1, judged + 1)),
                         "max_weight_diff": max(r["nnx_weight_diff"] for r in rows),
                         "max_stat_diff": max(r["nnx_stat_diff"] for r in rows),
                         "max_loss_diff_torch": float(np.max([abs(r["loss_torch"] - r["loss_nnx"]) for r in rows]))}  # fmt: skip
        report["passed"] = report["passed"] and report["nnx"]["passed"]
    if replicas is not None:
        single = {"torch": {k: v.detach().numpy() for k, v in tmodel.state_dict().items()},
                  "jax": convert.flax_to_torch({"params": state.params, "batch_stats": state.batch_stats})}  # fmt: skip
        report["replicas"] = replica_trajectories(initial, batches, rows, single, replicas, dtype=dtype, lr=lr,
                                                  convention=conv, weight_keys=weight_keys, stat_keys=stat_keys)  # fmt: skip
        report["passed"] = report["passed"] and report["replicas"]["passed"]
    return report


def _train_both(steps, dtype, lr, batch_size, convention, data, data_dir, seed, precision, device, nnx=False):
    """The trajectory's two trainings (three with ``nnx``), step by step: ``(rows, torch model, Flax
    state, initial torch state, weight keys, statistics keys, batches, data source, convention)``."""
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
    tdev, jdev = ttrain.resolve_device(device), jtrain.resolve_device(device)  # ValueError for one not there
    torch.manual_seed(seed)
    tmodel = TorchLeNetBN(bn="bnref", convention=conv).to(tdtype)
    initial = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
    tmodel = tmodel.to(tdev)
    opt = torch.optim.SGD(tmodel.parameters(), lr=lr)
    host = lambda: {k: v.detach().cpu() for k, v in tmodel.state_dict().items()}  # noqa: E731
    stat_keys = [k for k in tmodel.state_dict() if k.endswith(("running_mean", "running_var"))]
    weight_keys = [k for k, _ in tmodel.named_parameters()]
    rows = []
    with jax.enable_x64(dtype == "float64"), jax.default_device(jdev):
        jdtype = jnp.dtype(dtype)
        compute = jnp.bfloat16 if precision == "bfloat16" else jdtype
        fmodel = FlaxLeNetBN(bn="bnref", convention=conv, dtype=compute, param_dtype=jdtype)
        variables = convert.torch_to_flax(host())
        cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jdtype), tree)  # noqa: E731
        state = jtrain.TrainState.create(
            apply_fn=fmodel.apply, params=cast(variables["params"]),
            batch_stats=cast(variables["batch_stats"]), tx=optax.sgd(lr),
        )  # fmt: skip
        nnx_side = _NNXSide(variables, conv, compute, jdtype, lr) if nnx else None  # its own arrays: linen's are donated
        for step, (images, labels) in enumerate(batches, start=1):
            tX, ty = ttrain.load_tensors(images, labels, tdev)
            t_loss = float(ttrain.train_step(tmodel, opt, tX.to(tdtype), ty, precision=precision))
            jX = jnp.asarray(jtrain.prepare_images(images), jdtype)
            state, j_loss, _ = jtrain.train_step(state, jX, jnp.asarray(labels))
            back = convert.flax_to_torch({"params": state.params, "batch_stats": state.batch_stats})
            sd = host()
            diff = lambda keys: max(float(np.max(np.abs(back[k] - sd[k].numpy()))) for k in keys)  # noqa: E731
            j_loss = float(j_loss)
            rows.append({"step": step, "loss_torch": t_loss, "loss_jax": j_loss, "loss_diff": abs(t_loss - j_loss),
                         "weight_diff": diff(weight_keys), "stat_diff": diff(stat_keys)})  # fmt: skip
            if nnx_side is not None:
                rows[-1].update(nnx_side.step(jX, jnp.asarray(labels), j_loss, state))
    return rows, tmodel, state, initial, weight_keys, stat_keys, batches, source, conv


class _NNXSide:
    """The trajectory's NNX side: bnref.nnx's LeNet-BN from the linen side's initial ``variables``,
    one ``bnref.nnx.train.train_step`` per batch, compared with the linen side after each."""

    def __init__(self, variables, conv, compute, param_dtype, lr: float):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from bnref.nnx import train as ntrain
        from bnref.nnx.models import LeNetBN as NNXLeNetBN
        from bnref.nnx.variables import load_linen

        self.model = load_linen(NNXLeNetBN(rngs=nnx.Rngs(0), bn="bnref", convention=conv, dtype=compute,
                                           param_dtype=param_dtype), variables)  # fmt: skip
        # the running statistics in the parameters' dtype, as the linen side's: an NNX BatchStat
        # starts float32 and keeps its dtype (flax.nnx and bnref.nnx write new statistics in place),
        # so a float64 run would otherwise keep float32 statistics
        stats = nnx.state(self.model, nnx.BatchStat)
        nnx.update(self.model, jax.tree.map(lambda a: jnp.asarray(a, param_dtype), stats))
        self.model.train()
        self.optimizer = ntrain.optimizer_for(self.model, lr)
        self.train_step = ntrain.train_step

    def step(self, X, y, linen_loss: float, linen_state) -> Dict:
        """One NNX step on ``X``, ``y``; its row entries against the linen side's loss and state."""
        import jax

        from bnref.nnx.variables import linen_variables

        loss = float(self.train_step(self.model, self.optimizer, X, y)[0])
        mine = linen_variables(self.model)
        diff = lambda a, b: max(jax.tree.leaves(jax.tree.map(  # noqa: E731
            lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))), a, b)))
        return {"loss_nnx": loss, "nnx_loss_diff": abs(linen_loss - loss),
                "nnx_weight_diff": diff(linen_state.params, mine["params"]),
                "nnx_stat_diff": diff(linen_state.batch_stats, mine["batch_stats"])}  # fmt: skip


def format_trajectory(report: Dict) -> str:
    """Per-step rows at a readable stride, then how the drift grows (max per tenth of the run)."""
    rows = report["rows"]
    out = [
        f"LeNet-BN trajectory: {report['steps']} SGD steps, lr {report['lr']}, batch {report['batch_size']}, "
        f"{report['dtype']}{', precision bfloat16' if report.get('precision') == 'bfloat16' else ''}, "
        f"convention {report['convention']}, data {report['data']}, on {report.get('device', 'cpu')}, TF32 off",
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
    judged = report.get("judged_steps", report["steps"])
    over = "" if judged == report["steps"] else f" over steps 1-{judged} (the judged steps of {report['precision']})"
    line = (f"{'PASS' if one_device else 'FAIL'}: max |loss diff| {report['max_loss_diff']:.2e}{over} "
            f"(tolerance {report['tolerance']:g})")  # fmt: skip
    if report.get("nonfinite_steps"):
        steps = report["nonfinite_steps"]
        line += f"; a loss is NaN or infinite at {len(steps)} step(s), first at step {steps[0]}"
    out.append(line)
    if "nnx" in report:
        out.extend(_format_nnx(report, rows, stride))
    if "replicas" in report:
        out.extend(_format_replicas(report["replicas"], rows, stride))
        checks = 1 + sum(c["passed"] is not None for c in report["replicas"]["comparisons"])
        out.append(f"{'PASS' if report['passed'] else 'FAIL'}: all {checks} checks")
    return "\n".join(out)


def _format_nnx(report: Dict, rows, stride: int):
    """The NNX side's lines: linen vs NNX per step at the table's stride, then its verdict."""
    v = report["nnx"]
    out = ["NNX side (bnref.nnx LeNet-BN, nnx.jit step, nnx.Optimizer) against the linen side (bnref.jax):",
           f"{'step':>5}  {'loss linen':>12}  {'loss nnx':>12}  {'|loss diff|':>11}  {'max |dW|':>9}  {'max |d stats|':>13}"]  # fmt: skip
    for r in rows:
        if r["step"] % stride == 0 or r["step"] in (1, len(rows)):
            out.append(f"{r['step']:>5}  {r['loss_jax']:>12.6f}  {r['loss_nnx']:>12.6f}  {r['nnx_loss_diff']:>11.2e}  "
                       f"{r['nnx_weight_diff']:>9.2e}  {r['nnx_stat_diff']:>13.2e}")  # fmt: skip
    over = "" if v["judged_steps"] == report["steps"] else f" over steps 1-{v['judged_steps']}"
    line = (f"{'PASS' if v['passed'] else 'FAIL'}: linen vs NNX max |loss diff| {v['max_loss_diff']:.2e}{over} "
            f"(tolerance {v['tolerance']:g}; max |dW| {v['max_weight_diff']:.2e}, max |d stats| "
            f"{v['max_stat_diff']:.2e}); torch vs NNX max |loss diff| {v['max_loss_diff_torch']:.2e}")  # fmt: skip
    if v["nonfinite_steps"]:
        line += f"; a loss is NaN or infinite at {len(v['nonfinite_steps'])} step(s), first at step {v['nonfinite_steps'][0]}"
    return out + [line]
