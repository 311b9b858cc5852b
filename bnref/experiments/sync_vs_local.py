"""``sync-vs-local`` (default JAX; torch too): :data:`REPLICAS` replicas of 4 ... 32 examples,
synchronized vs local BN vs one device with the whole global batch (:func:`sync_vs_local`, the runs
of one backend :func:`_replica_runs`, JAX's in a subprocess :func:`_replica_runs_subprocess`, the
figure :func:`_plot_sync_vs_local`)."""

from __future__ import annotations

import sys
from typing import Dict, Optional, Sequence

import numpy as np

from bnref import _io, backends as registry
from bnref.experiments._common import LR_RULE, _batch_axis, _curves, _dataset, _save, scaled_lr

REPLICAS = 8
#: what each sync-vs-local run is: (replicas, synchronized BN)
MODES = {"single device": (1, None), "sync BN": (REPLICAS, True), "local BN": (REPLICAS, False)}


def sync_vs_local(quick: bool, data_dir: Optional[str] = None, seed: int = 0, backends: Sequence[str] = ("jax",),
                  synthetic: bool = False) -> Dict:
    """Small per-replica batches: LeNet-BN (bnref's BN, d2l's convention) trained data-parallel
    on 8 replicas with synchronized BN and with local BN (each replica normalizes its slice),
    and on one device with the whole global batch, for 4 ... 32 examples per replica, by
    ``bnref.training.train_and_evaluate`` (``replicas``, ``sync_bn``): JAX on 8 host devices under
    ``shard_map`` (a subprocess: the device count is fixed when JAX starts), torch on 8 gloo
    processes. lr per :data:`LR_RULE` of the global batch. Per run: loss and test accuracy per
    epoch, and the largest difference of a step's global-batch loss from the single device's."""
    out: Dict = {"replicas": REPLICAS, "lr_rule": LR_RULE, "runs": {}}
    for backend in backends:
        # A backend whose replicas are host devices needs them asked for before its framework
        # starts, and this process may have started it already: a new process then.
        result = (_replica_runs_subprocess(quick, data_dir, seed, backend, synthetic)
                  if registry.get(backend).host_devices else _replica_runs(quick, data_dir, seed, backend, synthetic))  # fmt: skip
        out["runs"][backend] = result.pop("runs")
        out.update(result)
    return out


def _replica_runs(quick: bool, data_dir: Optional[str], seed: int, backend: str, synthetic: bool = False) -> Dict:
    """The runs of :func:`sync_vs_local` for one backend, in this process (JAX needs
    :data:`REPLICAS` devices here already)."""
    from bnref.config import TrainConfig
    from bnref.training import train_and_evaluate

    per_replica, epochs, n_train, n_test = ((4,), 1, 512, 500) if quick else ((4, 8, 16, 32), 2, None, None)
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    runs: Dict = {}
    for p in per_replica:
        runs[str(p)] = {}
        for mode, (replicas, sync) in MODES.items():
            config = TrainConfig(backend=backend, device="cpu", epochs=epochs, lr=scaled_lr(REPLICAS * p),
                                 batch_size=REPLICAS * p, seed=seed, replicas=replicas, sync_bn=sync, progress=False)  # fmt: skip
            history = train_and_evaluate(config, data)
            runs[str(p)][mode] = {**_curves(history), "step_losses": [v for m in history for v in m["step_losses"]]}
        single = np.array(runs[str(p)]["single device"].pop("step_losses"))
        for mode in ("sync BN", "local BN"):
            diff = np.abs(np.array(runs[str(p)][mode].pop("step_losses")) - single)
            runs[str(p)][mode].update(max_step_loss_diff=float(diff.max()), mean_step_loss_diff=float(diff.mean()))
    return {"per_replica": list(per_replica), "lr": [scaled_lr(REPLICAS * p) for p in per_replica], "epochs": epochs,
            "data": data.source, "train_examples": len(data.train_labels), "runs": runs}  # fmt: skip


def _replica_runs_subprocess(quick: bool, data_dir: Optional[str], seed: int, backend: str,
                             synthetic: bool = False) -> Dict:
    """:func:`_replica_runs` for ``backend`` (JAX) in a new Python process given :data:`REPLICAS` host devices
    (``--xla_force_host_platform_device_count`` takes effect only before JAX starts, and this
    process may have started it already); its numbers come back as JSON on stdout."""
    import json
    import subprocess

    code = ("import json, sys\n"
            "from bnref.backends import provide_host_devices\n"
            f"provide_host_devices({REPLICAS})\n"
            "from bnref import _io\n"
            "from bnref.experiments.sync_vs_local import _replica_runs\n"
            "quick, data_dir, seed, backend, synthetic = json.loads(sys.argv[1])\n"
            "print(_io.dumps(_replica_runs(quick, data_dir, seed, backend, synthetic)))\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([quick, data_dir, seed, backend, synthetic])],
                          capture_output=True,
                          text=True, timeout=600 if quick else 3600)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the {backend} sync-vs-local process failed (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def _plot_sync_vs_local(result: Dict, path: str) -> None:
    fig, (acc, diff) = _io.new_figure(2)
    p = result["per_replica"]
    for backend, runs in result["runs"].items():
        for mode, style in zip(MODES, ("o-", "s--", "^:")):
            acc.plot(p, [runs[str(k)][mode]["test_acc"][-1] for k in p], style, label=f"{backend}, {mode}")
        for mode, style in zip(("sync BN", "local BN"), ("s--", "^:")):
            diff.plot(p, [max(runs[str(k)][mode]["max_step_loss_diff"], 1e-8) for k in p], style, label=f"{backend}, {mode}")
    acc.set_ylabel(f"test accuracy after {result['epochs']} epoch(s)")
    diff.set_yscale("log"), diff.set_ylabel("max over steps |loss - single device's loss|")
    for ax in (acc, diff):
        _batch_axis(ax, p, f"examples per replica (global batch: {result['replicas']} x that)")
        ax.grid(True, alpha=0.4), ax.legend(fontsize="small")
    fig.suptitle(f"synchronized vs local BatchNorm, {result['replicas']} replicas, lr scaled with the global batch")
    _save(fig, path, result)
