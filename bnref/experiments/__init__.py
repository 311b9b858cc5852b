"""BatchNorm experiments with figures: ``python -m bnref.experiments NAME [--backend torch|jax] [--quick] --out DIR``.

Each experiment answers one question a learner asks and writes ``DIR/NAME.png`` (the figure) and
``DIR/NAME.json`` (the numbers behind it, with what was run: data, sizes, learning rates).
``--quick`` uses little data and few steps (seconds; what the tests run); without it, the full
run (the README's figures). ``--backend`` runs an experiment that can use either framework on
that one only; an experiment written for one framework (or that compares both by construction)
says so and stops. The training runs call the library: ``bnref.train.train_and_evaluate`` where
per-epoch metrics suffice, and the backends' ``train_step`` / ``train_batches``, ``evaluate`` and
precise-BN functions where the experiment reads the model state during training.

- ``momentum-port`` (torch and JAX): the classic porting bug. ``torch.nn.BatchNorm2d(momentum=0.1)``
  ported to ``flax.linen.BatchNorm(momentum=0.1)``: 0.1 weights the NEW batch in PyTorch and the
  OLD value in Flax. The training loss cannot show it (in training mode the running statistics
  play no part), eval accuracy shows it only a little, and a one-step probe shows it at once:
  Flax's running-mean update over torch's is 0.9 / 0.1 = 9 with the bug, 1 with ``momentum=0.9``.
- ``fast-variance`` (JAX): Flax's default ``use_fast_variance=True`` (``E[x^2] - E[x]^2``)
  against a two-pass variance, as the input's mean grows next to its spread, in float32 and
  bfloat16.
- ``bn-vs-none`` (default both backends): d2l's claim that BN converges faster; LeNet with and
  without BN, training loss and test accuracy per epoch.
- ``batch-size`` (JAX): batch 4 ... 512 on one budget of training examples (lr linear in the
  batch, capped at 1.0: :data:`LR_RULE`): test accuracy with the running and with precise
  statistics, and how far the running statistics are from the population's, per BN layer.
- ``eval-stats`` (JAX): through training, test accuracy with the running statistics (EMA),
  precise population statistics, and batch statistics (BN in training mode at test time).
- ``placement`` (torch): BN before vs after ReLU; a conv/linear bias right before BN gets no
  gradient, and training without it is the same training.
- ``sync-vs-local`` (default JAX; torch too): 8 replicas of 4 ... 32 examples, synchronized vs
  local BN vs one device with the whole global batch.

Where the code is: this package holds the registry (:data:`EXPERIMENTS`, :class:`Experiment`) and
the run of one experiment (:class:`ExperimentConfig`, :func:`run_experiment`); ``__main__`` the
command (:func:`main`); ``_common`` what the experiments share (the lr rule :func:`scaled_lr`, the
data, the figure's caption, the training helpers ``_jax_sgd`` / ``_JaxProbe``); and one module per
experiment, named after it (``momentum_port``, ``fast_variance``, ``bn_vs_none``, ``batch_size``,
``eval_stats``, ``placement``, ``sync_vs_local``: the experiment's function, its figure and what
only it uses). The package's attribute of each of those names is the experiment's function, as
it was before the split; its module is ``sys.modules["bnref.experiments.NAME"]``, and
``from bnref.experiments.NAME import ...`` reads from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from bnref import _io
from bnref.experiments._common import BASE_BATCH, BASE_LR, LR_RULE, _caption, scaled_lr  # noqa: F401
from bnref.experiments.batch_size import BATCH_SIZES, _plot_batch_size, batch_size  # noqa: F401
from bnref.experiments.bn_vs_none import _plot_bn_vs_none, bn_vs_none
from bnref.experiments.eval_stats import _plot_eval_stats, eval_stats
from bnref.experiments.fast_variance import _plot_fast_variance, fast_variance
from bnref.experiments.momentum_port import _plot_momentum_port, momentum_port
from bnref.experiments.placement import ORDERS, _plot_placement, placement  # noqa: F401
from bnref.experiments.sync_vs_local import MODES, REPLICAS, _plot_sync_vs_local, sync_vs_local  # noqa: F401

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentConfig", "run_experiment", "scaled_lr", "momentum_port", "fast_variance",
           "bn_vs_none", "batch_size", "eval_stats", "placement", "sync_vs_local", "main"]


@dataclass(frozen=True)
class Experiment:
    """One entry of :data:`EXPERIMENTS`: ``run(quick, data_dir, seed[, backends]) -> numbers`` and
    ``plot(numbers, path)``. ``backends``: the ones ``--backend`` may name; when there are two, the
    run takes ``backends=`` (those chosen, ``default`` without ``--backend``), else it always
    runs on ``default``, and ``why`` says why ``--backend`` cannot change that."""

    run: Callable[..., Dict]
    plot: Callable[[Dict, str], None]
    backends: Tuple[str, ...]
    default: Tuple[str, ...]
    why: str = ""
    uses_data: bool = True  # False: it trains nothing, and --data-dir / --synthetic mean nothing to it


EXPERIMENTS: Dict[str, Experiment] = {
    "momentum-port": Experiment(momentum_port, _plot_momentum_port, (), ("torch", "jax"),
                                "it ports a torch model to Flax, so it always runs both"),
    "fast-variance": Experiment(fast_variance, _plot_fast_variance, ("jax",), ("jax",),
                                "it measures flax.linen's use_fast_variance", uses_data=False),
    "bn-vs-none": Experiment(bn_vs_none, _plot_bn_vs_none, ("torch", "jax"), ("torch", "jax")),
    "batch-size": Experiment(batch_size, _plot_batch_size, ("jax",), ("jax",),
                             "it reads the running statistics out of the training state as values"),
    "eval-stats": Experiment(eval_stats, _plot_eval_stats, ("jax",), ("jax",),
                             "it reads the running statistics out of the training state as values"),
    "placement": Experiment(placement, _plot_placement, ("torch",), ("torch",),
                            "its model variants are torch modules"),
    "sync-vs-local": Experiment(sync_vs_local, _plot_sync_vs_local, ("torch", "jax"), ("jax",)),
}  # fmt: skip


@dataclass(frozen=True)
class ExperimentConfig:
    """What one ``python -m bnref.experiments`` run does: experiment ``name`` on ``backends``,
    ``quick`` or full, on Fashion-MNIST (from ``data_dir`` or the default places; missing files
    are an error) or, with ``synthetic``, on the synthetic stand-in, writing ``out/NAME.png`` and
    ``out/NAME.json``."""

    name: str
    out: str
    quick: bool = False
    backends: Tuple[str, ...] = ()
    data_dir: Optional[str] = None
    seed: int = 0
    synthetic: bool = False

    @property
    def paths(self) -> Tuple[str, str]:
        return os.path.join(self.out, f"{self.name}.png"), os.path.join(self.out, f"{self.name}.json")


def run_experiment(config: ExperimentConfig) -> Dict:
    """Run the experiment, write its numbers (with the config) and its figure; returns the numbers."""
    exp = EXPERIMENTS[config.name]
    kwargs = {"backends": config.backends} if len(exp.backends) > 1 else {}
    result = exp.run(config.quick, config.data_dir, config.seed, synthetic=config.synthetic, **kwargs)
    png, js = config.paths
    _io.write_json(js, {"experiment": config.name, "quick": config.quick, "backends": list(config.backends), **result})
    exp.plot(result, png)
    return result


def __getattr__(name: str):
    """``main`` (the command, in ``__main__``) on first use: importing ``__main__`` here would make
    ``python -m bnref.experiments`` find it imported already and warn."""
    if name == "main":
        from bnref.experiments.__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
