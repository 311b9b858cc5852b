"""Training runs as directories: ``python -m bnref.train --out DIR`` / ``--resume DIR`` / ``--compare``.

A run directory holds:

- ``config.json``: the :class:`bnref.train.TrainConfig`, the command line, the data used, and the
  versions of Python, NumPy, bnref and the backend's frameworks: what it takes to rerun it;
- ``metrics.jsonl``: one JSON object per finished epoch, appended and flushed (and fsynced) as
  the epoch ends;
- ``curves.png``: loss and accuracies per epoch (markers on every point) and the per-step
  training loss, redrawn after every epoch; the title names the BN actually used;
- ``checkpoint``: the model, optimizer and BN state after the last finished epoch, with the
  metrics so far (torch: a ``torch.save`` file loaded with ``weights_only=True``; JAX:
  ``flax.serialization`` msgpack), replaced atomically, so a kill never leaves a broken one.

``--resume DIR`` continues from the checkpoint's epoch to ``--epochs``: ``metrics.jsonl`` is
rewritten from the checkpoint's metrics (an epoch logged after the checkpoint was written, by a
run killed in between, is dropped and trained again) and appended to. Training is deterministic
given the state and the epoch (example order: ``epoch_permutation(seed, epoch)``), so a resumed
run gives the uninterrupted run's numbers. This module imports no framework.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Dict, List, Sequence

from bnref import _io

__all__ = ["RUNS_DIR_ENV", "CHECKPOINT", "RunDir", "default_run_dir", "check_new_run_dir", "read_metrics", "plot_curves",
           "compare"]

#: where default run directories go (``runs``, or this variable's value)
RUNS_DIR_ENV = "BNREF_RUNS_DIR"
CHECKPOINT = "checkpoint"
#: the TrainConfig fields a resumed run may change (everything else must match the checkpoint's run)
RESUMABLE = ("epochs", "progress", "data_dir", "download", "plot", "json")


def default_run_dir(config) -> str:
    """A new, empty ``runs/<backend>-<bn>-<UTC timestamp>`` (``$BNREF_RUNS_DIR`` instead of
    ``runs``), made here; ``-2``, ``-3``, ... appended when runs start within the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = os.path.join(os.environ.get(RUNS_DIR_ENV, "runs"), f"{config.backend}-{config.bn}-{stamp}")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    for k in range(1, 1000):
        path = base if k == 1 else f"{base}-{k}"
        try:
            os.mkdir(path)  # atomic: two runs never get the same directory
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not make a new run directory next to {base}")


def check_new_run_dir(path: str) -> None:
    """``ValueError`` when ``path`` already holds a run (it has a ``config.json``)."""
    if os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"{path} already holds a run; resume it with --resume {path}, or choose another directory")


def _versions(backend: str) -> Dict[str, str]:
    import numpy

    import bnref

    out = {"python": platform.python_version(), "numpy": numpy.__version__, "bnref": bnref.__version__}
    names = ("torch",) if backend == "torch" else ("jax", "jaxlib", "flax", "optax")
    for name in names:
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    return out


class RunDir:
    """One run's directory (see the module docstring)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.resuming = False  # set when the backend should start from the checkpoint
        self.readonly = False  # a process that is not the one reporting: it writes no log
        self.history: List[Dict] = []  # every epoch's metrics, the resumed ones included

    def resumed(self, history: List[Dict]) -> None:
        """Called by the backend with the checkpoint's metrics when it resumes: they become the
        run's history, and ``metrics.jsonl`` is rewritten to them (:meth:`restart_metrics`)."""
        self.history[:] = history
        self.restart_metrics(history)

    def require_checkpoint(self) -> str:
        if not os.path.isfile(self.checkpoint):
            raise ValueError(f"{self.path} has no checkpoint to resume from (no epoch has finished)")
        return self.checkpoint

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.path, CHECKPOINT)

    @property
    def metrics(self) -> str:
        return os.path.join(self.path, "metrics.jsonl")

    @property
    def curves(self) -> str:
        return os.path.join(self.path, "curves.png")

    @property
    def config_file(self) -> str:
        return os.path.join(self.path, "config.json")

    # --- a new run ---

    @classmethod
    def create(cls, path: str, config, argv: Sequence[str], data_source: str, device: str) -> "RunDir":
        """Make the directory (it must not hold a run already) and write ``config.json``."""
        check_new_run_dir(path)
        run = cls(path)
        os.makedirs(path, exist_ok=True)
        _io.write_json(run.config_file, {"config": dataclasses.asdict(config), "argv": list(argv), "data": data_source,
                                         "device": device, "versions": _versions(config.backend),
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})  # fmt: skip
        open(run.metrics, "w").close()
        return run

    # --- an existing run ---

    @classmethod
    def open(cls, path: str) -> "RunDir":
        """An existing run directory; ``ValueError`` when it is not one."""
        run = cls(path)
        if not os.path.isfile(run.config_file):
            raise ValueError(f"{path} is not a run directory: it has no config.json")
        return run

    def saved_config(self) -> Dict:
        with open(self.config_file) as f:
            return json.load(f)["config"]

    def resumed_config(self, overrides: Dict):
        """The run's config with the :data:`RESUMABLE` fields of ``overrides`` applied; ``ValueError``
        naming the first other field that differs (a resumed run trains the same model the same way)."""
        from bnref.train import TrainConfig

        saved = self.saved_config()
        for key, value in overrides.items():
            if key in RESUMABLE or key not in saved or value == saved[key]:
                continue
            raise ValueError(f"--resume {self.path}: {key} was {saved[key]!r} in that run, not {value!r}; "
                             "only " + ", ".join(RESUMABLE) + " may change")  # fmt: skip
        merged = {**saved, **{k: v for k, v in overrides.items() if k in RESUMABLE}}
        return TrainConfig(**merged)

    def restart_metrics(self, history: List[Dict]) -> None:
        """Rewrite ``metrics.jsonl`` (atomically) with the checkpoint's metrics: a line logged
        after the checkpoint by a killed run is dropped (that epoch is trained again)."""
        if self.readonly:
            return
        _io.atomic_write_bytes(self.metrics, "".join(_line(m) for m in history).encode())

    # --- every epoch ---

    def log_epoch(self, m: Dict) -> None:
        """Append one epoch's metrics to ``metrics.jsonl``, flushed to disk."""
        if self.readonly:
            return
        with open(self.metrics, "a") as f:
            f.write(_line(m))
            f.flush()
            os.fsync(f.fileno())


def _line(m: Dict) -> str:
    return json.dumps(_io.strict_json(m), allow_nan=False) + "\n"


def read_metrics(path: str) -> List[Dict]:
    """The epochs logged in ``path``'s ``metrics.jsonl`` (``path``: a run directory or the file)."""
    file = path if path.endswith(".jsonl") else os.path.join(path, "metrics.jsonl")
    with open(file) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(history: Sequence[Dict], path: str, title: str = "") -> None:
    """``curves.png``: loss and accuracies per epoch (left; EMA and precise test accuracy when the
    run has both) and the per-step training loss (right), written atomically."""
    fig, (ax, steps) = _io.new_figure(2)
    epochs = [m["epoch"] for m in history]
    ax.plot(epochs, [m["loss"] for m in history], "o-", label="loss")
    ax.plot(epochs, [m["train_acc"] for m in history], "s--", label="train acc")
    if history and "test_acc_precise" in history[0]:
        ax.plot(epochs, [m["test_acc_ema"] for m in history], "v:", label="test acc (EMA)")
        ax.plot(epochs, [m["test_acc_precise"] for m in history], "^-.", label="test acc (precise BN)")
    else:
        ax.plot(epochs, [m["test_acc"] for m in history], "^-.", label="test acc")
    ax.set_xlabel("epoch"), ax.set_xticks(epochs), ax.grid(True), ax.legend(fontsize="small")
    losses = [x for m in history for x in m.get("step_losses", [])]
    steps.plot(range(1, len(losses) + 1), losses, "-", lw=0.8, marker="." if len(losses) < 200 else None)
    steps.set_xlabel("step"), steps.set_ylabel("training loss (batch mean)"), steps.grid(True)
    fig.suptitle(title)
    _io.save_figure(fig, path)


def compare(run_dirs: Sequence[str], path: str) -> None:
    """Overlay several runs' test accuracy and loss per epoch in one figure at ``path``, each
    labelled with its directory's name and the BN it used. ``ValueError`` before drawing when a
    directory is not a run or has no finished epoch."""
    runs = []
    for d in run_dirs:
        run = RunDir.open(d)
        history = read_metrics(d)
        if not history:
            raise ValueError(f"{d} has no finished epoch to compare")
        cfg = run.saved_config()
        runs.append((f"{os.path.basename(os.path.normpath(d))} ({cfg['backend']}, bn={cfg['bn']})", history))
    fig, (acc, loss) = _io.new_figure(2)
    for label, history in runs:
        epochs = [m["epoch"] for m in history]
        acc.plot(epochs, [m["test_acc"] for m in history], "o-", label=label)
        loss.plot(epochs, [m["loss"] for m in history], "o-", label=label)
    acc.set_ylabel("test accuracy"), loss.set_ylabel("training loss")
    for ax in (acc, loss):
        ax.set_xlabel("epoch"), ax.grid(True)
    acc.legend(fontsize="small")
    _io.save_figure(fig, path)

