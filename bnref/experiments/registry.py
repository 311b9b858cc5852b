"""The experiments' registry: :data:`EXPERIMENTS` (name -> :class:`Experiment`: what runs, what
draws it, which backends it can use and why not others), :class:`ExperimentConfig` (one run of the
command) and :func:`run_experiment` (run, write the numbers and the figure)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from bnref import _io
from bnref.experiments.activations import _plot_activations, activations
from bnref.experiments.batch_size import _plot_batch_size, batch_size
from bnref.experiments.bn_vs_none import _plot_bn_vs_none, bn_vs_none
from bnref.experiments.eval_stats import _plot_eval_stats, eval_stats
from bnref.experiments.fast_variance import _plot_fast_variance, fast_variance
from bnref.experiments.momentum_port import _plot_momentum_port, momentum_port
from bnref.experiments.placement import _plot_placement, placement
from bnref.experiments.sync_vs_local import _plot_sync_vs_local, sync_vs_local


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
    "activations": Experiment(activations, _plot_activations, ("torch", "jax"), ("torch", "jax"),
                              "its probes read bnref.torch's and flax.linen's LeNetBN (the NNX model has no run here)"),
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
