"""Training runs as directories: ``python -m bnref.train --out DIR`` / ``--resume DIR`` / ``--compare``.

A run directory holds:

- ``config.json``: the :class:`bnref.config.TrainConfig`, the command line, the data used, and the
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
from bnref.config import TrainConfig

__all__ = ["RUNS_DIR_ENV", "CHECKPOINT", "RunDir", "default_run_dir", "check_new_run_dir", "check_run_id",
           "read_metrics", "plot_curves", "compare"]

#: where default run directories go (``runs``, or this variable's value)
RUNS_DIR_ENV = "BNREF_RUNS_DIR"
CHECKPOINT = "checkpoint"
#: the TrainConfig fields a resumed run takes from the command line (typed or default), never from
#: the run's config.json: the epoch target (the run's own when not typed), how it reports, where
#: its extra outputs go, and the data (checked to be the data the run trained on)
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
    """``ValueError`` unless ``path`` can become a new run directory: it does not exist (and its
    nearest existing parent is a writable directory) or it is an empty writable directory.

    A directory that already holds a run (``config.json``) is to be resumed; one holding anything
    else is someone's files (TensorFlow's checkpoint index is a file named ``checkpoint``, and a
    run would replace it). Nothing is created."""
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(p):
        if os.path.exists(os.path.join(p, "config.json")):
            raise ValueError(f"{path} already holds a run; resume it with --resume {path}, or choose another directory")
        foreign = sorted(os.listdir(p))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ValueError(f"{path} is not empty ({shown}) and holds no bnref run: bnref writes only into a new "
                             "or empty directory, so that nothing of yours is overwritten")  # fmt: skip
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"{path} is not writable")
        return
    if os.path.lexists(p):
        raise ValueError(f"{path} exists and is not a directory")
    parent = str(_io.nearest_existing(os.path.dirname(p)))
    if not os.path.isdir(parent):
        raise ValueError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: {parent} is not writable, so the run directory cannot be made")


def check_run_id(path: str, found, expected) -> None:
    """``ValueError`` unless the checkpoint at ``path`` (run id ``found``) belongs to the run whose
    ``config.json`` says ``expected``: a checkpoint copied in from another run would replace this
    run's history and train its weights under this run's config."""
    if found != expected:
        raise ValueError(f"{path} belongs to another run (run id {found}; this run's is {expected}): a checkpoint "
                         "resumes only the run that wrote it")  # fmt: skip


def _versions(backend: str) -> Dict[str, str]:
    import numpy

    import bnref

    out = {"python": platform.python_version(), "numpy": numpy.__version__, "bnref": bnref.__version__}
    from bnref import backends

    for name in backends.get(backend).packages:
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
        self.run_id = None  # config.json's: every checkpoint names the run it belongs to
        self._saved = None  # config.json, once read
        self._lock_fd = None

    def __getstate__(self):  # a replica process gets the paths, never the parent's lock
        return {**self.__dict__, "_lock_fd": None}

    # --- one process trains in a directory at a time ---

    def lock(self) -> None:
        """Hold the directory's lock (``flock`` on the directory itself, so no file is added)
        until :meth:`release` or the process ends; ``ValueError`` when another process holds it:
        two processes training in one directory interleave their logs and overwrite each other's
        checkpoints."""
        import fcntl

        if self._lock_fd is not None:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"{self.path} is in use: another process is training in it (wait for it to end, "
                             "or stop it)") from None  # fmt: skip
        self._lock_fd = fd

    def release(self) -> None:
        """Let go of :meth:`lock`."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

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
    def create(cls, path: str, config, argv: Sequence[str], data, device: str) -> "RunDir":
        """Make the directory (new or empty: :func:`check_new_run_dir`), lock it, and write
        ``config.json`` with a new ``run_id``. ``data``: the ``bnref.data.FashionMNIST`` trained
        on (its source and content digest are recorded, so that a resume can check it trains on
        the same data). The check is repeated under the lock: of two runs racing for one
        directory, the second is refused."""
        import uuid

        check_new_run_dir(path)
        run = cls(path)
        os.makedirs(path, exist_ok=True)
        run.lock()
        try:
            check_new_run_dir(path)
        except ValueError:
            run.release()
            raise
        run.run_id = uuid.uuid4().hex
        _io.write_json(run.config_file, {"run_id": run.run_id, "config": dataclasses.asdict(config), "argv": list(argv),
                                         "data": data.source, "data_sha256": getattr(data, "sha256", None),
                                         "device": device, "versions": _versions(config.backend),
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})  # fmt: skip
        open(run.metrics, "w").close()
        return run

    # --- an existing run ---

    @classmethod
    def open(cls, path: str) -> "RunDir":
        """An existing run directory; ``ValueError`` naming the file when it is not one (no
        ``config.json``, or one that is not a bnref run's)."""
        run = cls(path)
        if not os.path.isfile(run.config_file):
            raise ValueError(f"{path} is not a run directory: it has no config.json")
        run.run_id = run.saved.get("run_id")  # reads and checks config.json
        return run

    def _read_config(self) -> Dict:
        try:
            with open(self.config_file, "rb") as f:
                saved = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{self.config_file}: not readable as JSON ({e})") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ValueError(f"{self.config_file}: not a bnref run's config (no \"config\" object)")
        return saved

    def saved_config(self) -> Dict:
        return dict(self.saved["config"])

    @property
    def saved(self) -> Dict:
        """All of ``config.json`` (the config, the data recorded, the run id, ...)."""
        if self._saved is None:
            self._saved = self._read_config()
        return self._saved

    def resumed_config(self, typed: Dict, given: Dict):
        """The config to resume with: the run's own, except the :data:`RESUMABLE` fields, which
        are ``given`` (the command line's values, typed or default; never the saved ones: a run
        directory someone sent must not make bnref write files elsewhere or read other data;
        ``epochs`` alone keeps the run's target when not typed).
        ``typed``: the options the user actually typed; each one outside :data:`RESUMABLE` must
        equal the run's, else ``ValueError`` naming it (a resumed run trains the same model the
        same way; an option typed with its default value is compared too)."""
        saved = self.saved_config()
        for key, value in typed.items():
            if key in RESUMABLE or value == saved.get(key, value):
                continue
            raise ValueError(f"--resume {self.path}: {key} was {saved[key]!r} in that run, not {value!r}; "
                             "only " + ", ".join(RESUMABLE) + " may change")  # fmt: skip
        # --epochs untyped: the run's own target (a killed run continues to where it was headed)
        return self.train_config(**{k: given[k] for k in RESUMABLE if k != "epochs" or k in typed})

    def train_config(self, **changes) -> TrainConfig:
        """The run's :class:`bnref.config.TrainConfig`, with ``changes`` applied; ``ValueError``
        naming ``config.json`` for a key this bnref does not know or a value it refuses."""
        saved = self.saved_config()
        unknown = sorted(str(k) for k in set(saved) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ValueError(f"{self.config_file}: unknown config key(s) {', '.join(unknown)}: not a run of this bnref")
        try:
            return TrainConfig(**{**saved, **changes})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.config_file}: {e}") from None

    def check_data(self, data) -> None:
        """``ValueError`` when ``data`` (a ``bnref.data.FashionMNIST``) is not the data the run
        trained on (recorded in ``config.json`` as its content's SHA-256)."""
        recorded, found = self.saved.get("data_sha256"), getattr(data, "sha256", None)
        if recorded is not None and found != recorded:
            raise ValueError(f"--resume {self.path}: that run trained on {self.saved.get('data')} (content SHA-256 "
                             f"{recorded[:16]}...), not on the data found now, {data.source} "
                             f"({(found or 'no digest')[:16]}...): pass --data-dir with the run's data")  # fmt: skip

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


def read_metrics(path: str, need: Sequence[str] = ()) -> List[Dict]:
    """The epochs logged in ``path``'s ``metrics.jsonl`` (``path``: a run directory or the file).
    ``ValueError`` naming the file and the line when it is missing, unreadable, or a line is not a
    JSON object (a half-written last line of a killed run) or lacks one of the keys ``need``."""
    file = path if str(path).endswith(".jsonl") else os.path.join(path, "metrics.jsonl")
    try:
        with open(file, "rb") as f:
            lines = f.read().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{file}: no such file (not a finished bnref run?)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: cannot be read ({e})") from None
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except ValueError:
            last = " (the last line: half-written by a run that was killed?)" if number == len(lines) else ""
            raise ValueError(f"{file}: line {number} is not valid JSON{last}") from None
        if not isinstance(m, dict) or any(k not in m for k in ("epoch", *need)):
            missing = [k for k in ("epoch", *need) if not isinstance(m, dict) or k not in m]
            raise ValueError(f"{file}: line {number} has no {', '.join(repr(k) for k in missing)}")
        out.append(m)
    return out


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
        history = read_metrics(d, need=("loss", "test_acc"))
        if not history:
            raise ValueError(f"{d} has no finished epoch to compare")
        cfg = run.saved_config()
        label = f"{os.path.basename(os.path.normpath(d))} ({cfg.get('backend', '?')}, bn={cfg.get('bn', '?')})"
        runs.append((label, history))
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

