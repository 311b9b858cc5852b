"""Training LeNet-BN from Python: :func:`train_and_evaluate` (what ``python -m bnref.train``
runs, and what tests, experiments and notebooks call directly), the data it trains on
(:func:`load_data`, :func:`check_data`), the per-epoch line (:func:`format_epoch`) and d2l's
training figure (:func:`plot_history`).

The shape of Flax's ``examples/*/train.py`` beside their ``main.py``: this is the library, the
CLI :mod:`bnref.train` parses flags into a :class:`bnref.config.TrainConfig` and calls it. The
backend is the registry's (``bnref.backends``): ``bnref.<backend>.backend.fit(config, data,
on_epoch, run=None) -> list[dict]`` trains; this module owns the data, the files written after
every epoch and the run directory's log, so every backend behaves alike.

Example::

    from bnref.config import TrainConfig
    from bnref.training import train, train_and_evaluate

    history = train_and_evaluate(TrainConfig(backend="torch", epochs=1, train_limit=2048, test_limit=512))
    print(history[-1]["test_acc"])

    trained = train(TrainConfig(backend="jax", epochs=1, train_limit=2048, test_limit=512), out="runs/mine")
    trained.model, trained.variables, trained.history  # the Flax module, its params and batch_stats, the metrics

:func:`train` is :func:`train_and_evaluate` into a run directory, with the trained model back
(:func:`load_trained` reads one from any finished run directory).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence

from bnref import _io, backends
from bnref.config import TrainConfig
from bnref.schedule import batch_slices

__all__ = ["train_and_evaluate", "train", "Trained", "load_trained", "load_data", "check_data", "format_epoch", "figure_title", "plot_history"]


def format_epoch(m: Dict) -> str:
    """One line per epoch in d2l's wording, e.g.
    ``epoch 3/10: loss 0.402, train acc 0.855, test acc 0.752, 13290.1 examples/sec on cpu``;
    with precise BN, ``test acc 0.861 (precise; EMA 0.829)``."""
    test = f"test acc {m['test_acc']:.3f}"
    if "test_acc_precise" in m:
        test += f" (precise; EMA {m['test_acc_ema']:.3f})"
    return (
        f"epoch {m['epoch']}/{m['epochs']}: loss {m['loss']:.3f}, train acc {m['train_acc']:.3f}, "
        f"{test}, {m['examples_per_sec']:.1f} examples/sec on {m['device']}"
    )


def load_data(config: TrainConfig):
    """Fashion-MNIST as NumPy arrays, cut to the configured limits; ``ValueError`` when a split
    is too small to train or evaluate on."""
    from bnref import data as data_mod

    ds = data_mod.load_fashion_mnist(config.data_dir, download=config.download)
    if config.train_limit is not None or config.test_limit is not None:
        ds = dataclasses.replace(
            ds,
            train_images=ds.train_images[: config.train_limit],
            train_labels=ds.train_labels[: config.train_limit],
            test_images=ds.test_images[: config.test_limit],
            test_labels=ds.test_labels[: config.test_limit],
        )
    check_data(config, ds)
    return ds


def check_data(config: TrainConfig, data) -> None:
    """Raise ``ValueError`` if ``data`` cannot be trained (fewer than 2 examples with BN, 1
    without) or evaluated on (an empty test split), before any work."""
    need = 1 if config.bn == "none" else 2
    if config.replicas > 1:
        need = config.batch_size  # every replica takes its slice of full global batches
    if len(data.train_labels) < need:
        raise ValueError(f"{data.source}: the training split has {len(data.train_labels)} example(s); "
                         f"training needs at least {need}")  # fmt: skip
    if len(data.test_labels) == 0:
        raise ValueError(f"{data.source}: the test split is empty; evaluation needs at least 1 example")
    if config.precise_batches is not None:
        available = len(batch_slices(len(data.train_labels), config.batch_size))
        if config.precise_batches > available:
            raise ValueError(f"--precise-batches {config.precise_batches}: the training split has {available} "
                             f"batch(es) of {config.batch_size}")  # fmt: skip


def train_and_evaluate(
    config: TrainConfig, data=None, on_epoch: Optional[Callable[[Dict], None]] = None, run=None
) -> List[Dict]:
    """Train and evaluate; returns the per-epoch metrics (dicts with ``epoch``, ``epochs``,
    ``loss``, ``train_acc``, ``test_acc``, ``examples_per_sec``, ``device``).

    ``data`` (a ``bnref.data.FashionMNIST``) defaults to :func:`load_data`. ``on_epoch`` is
    called with each epoch's metrics as soon as they exist (the CLI prints them). The output
    paths are checked before anything else; ``config.plot`` and ``config.json`` are rewritten
    atomically after every epoch (strict JSON: a NaN metric is written as null and named
    under "nonfinite").

    ``run``: a :class:`bnref.runs.RunDir` to log to (``metrics.jsonl``, ``curves.png``) and
    checkpoint into after every epoch, or to resume from (``run.resuming``); the returned
    metrics then include the epochs before the resume.
    """
    config.check_outputs()
    if data is None:
        data = load_data(config)
    else:
        check_data(config, data)
    backend = backends.load(config.backend)
    history: List[Dict] = run.history if run is not None else []

    started = time.perf_counter()

    def epoch_done(m: Dict) -> None:
        m["wall_seconds"] = time.perf_counter() - started  # since this process started training
        history.append(m)
        if run is not None:
            from bnref import runs

            run.log_epoch(m)
            runs.plot_curves(history, run.curves, title=figure_title(config))
        if config.json:
            _io.write_json(config.json, {"config": dataclasses.asdict(config), "data": data.source, "history": history})
        if config.plot:
            plot_history(history, config.plot, title=figure_title(config))
        if on_epoch is not None:
            on_epoch(m)

    backend.fit(config, data, epoch_done, run=run)
    return history


@dataclasses.dataclass(frozen=True)
class Trained:
    """A finished training run: its ``config``, its per-epoch metrics (``history``, as
    :func:`train_and_evaluate` returns them), its run directory (``run_dir``) and the trained
    model as its backend holds one: torch, the ``bnref.torch.LeNetBN`` in eval mode with
    ``variables`` None; JAX (linen), the ``bnref.jax.LeNetBN`` module with ``variables``
    ``{"params": ..., "batch_stats": ...}``; NNX, the ``bnref.nnx.LeNetBN`` holding its own state
    with ``variables`` None."""

    config: TrainConfig
    history: List[Dict]
    run_dir: str
    model: object
    variables: Optional[Dict]


def train(config: TrainConfig, data=None, *, out: str, on_epoch: Optional[Callable[[Dict], None]] = None) -> Trained:
    """:func:`train_and_evaluate` into the new run directory ``out`` (``python -m bnref.train
    --out``: config, metrics, curves, a checkpoint after every epoch; a directory that exists and is
    not empty is an error, nothing in it is touched), then the trained model read back from the
    checkpoint (:func:`load_trained`). ``out`` is required: a run's files go where you say."""
    from bnref import runs

    config.check_outputs()
    runs.check_new_run_dir(out)  # before the data loads
    if data is None:
        data = load_data(config)
    else:
        check_data(config, data)
    run = runs.RunDir.create(out, config, ["bnref.training.train"], data, device=backends.load(config.backend).prepare(config))
    try:
        history = train_and_evaluate(config, data, on_epoch=on_epoch, run=run)
    finally:
        run.release()
    return dataclasses.replace(load_trained(out), history=history)


def load_trained(run_dir: str) -> Trained:
    """The trained model of the finished run in ``run_dir`` (a ``python -m bnref.train`` or
    :func:`train` run directory) with its config and metrics; ``ValueError`` naming what is missing
    (no such run, no finished epoch, a checkpoint of another model)."""
    from bnref import runs

    run = runs.RunDir.open(run_dir)
    config = run.train_config()
    checkpoint = run.require_checkpoint()
    model, variables = backends.load(config.backend).load_run(config, checkpoint)
    return Trained(config, runs.read_metrics(run_dir), run_dir, model, variables)


def figure_title(config: TrainConfig) -> str:
    """What the figure shows: the network actually trained (no "BN" without BN layers)."""
    bn = {"bnref": f"bnref BN, {config.convention}", "builtin": "framework BN", "none": "no BN"}[config.bn]
    return f"LeNet ({bn}, {config.backend})"


def plot_history(history: Sequence[Dict], path: str, title: str = "") -> None:
    """Save d2l's training figure (loss, train acc, test acc per epoch) to ``path``, atomically.

    Markers on every point, so the first epoch's single point is visible too.
    """
    epochs = [m["epoch"] for m in history]
    fig, ax = _io.new_figure(size=(5, 3.5))
    for key, style in (("loss", "o-"), ("train_acc", "s--"), ("test_acc", "^-.")):
        ax.plot(epochs, [m[key] for m in history], style, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_xticks(epochs)
    ax.set_title(title)
    ax.grid(True)
    ax.legend()
    _io.save_figure(fig, path)
