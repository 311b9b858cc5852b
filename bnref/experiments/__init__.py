"""BatchNorm experiments with figures: ``python -m bnref.experiments NAME [--backend torch|jax] [--quick] --out DIR``.

Each experiment answers one question a learner asks and writes ``DIR/NAME.png`` (the figure) and
``DIR/NAME.json`` (the numbers behind it, with what was run: data, sizes, learning rates).
``--quick`` uses little data and few steps (seconds; what the tests run); without it, the full
run (the README's figures). ``--backend`` runs an experiment that can use either framework on
that one only; an experiment written for one framework (or that compares both by construction)
says so and stops. The training runs call the library: ``bnref.training.train_and_evaluate`` where
per-epoch metrics suffice, and the backends' step iterators (``train_steps``), ``evaluate`` and
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
- ``activations`` (default both backends): what BN does to the activations, in pictures: LeNet
  with and without BN, sigmoid and ReLU, on the same batches; each hidden layer's pre-activations
  on a fixed probe batch through training (percentiles, per-channel spread, saturated sigmoids,
  dead ReLUs, histograms), with the training loss and the final test accuracy.

Where the code is: ``registry`` holds the registry (:data:`EXPERIMENTS`, :class:`Experiment`) and
the run of one experiment (:class:`ExperimentConfig`, :func:`run_experiment`); ``cli`` the
command (:func:`main`, which ``__main__`` runs); ``_common`` what the experiments share (the lr
rule :func:`scaled_lr`, the data, the figure's caption, the training helpers ``_jax_sgd`` /
``_JaxProbe``); and one module per
experiment, named after it (``momentum_port``, ``fast_variance``, ``bn_vs_none``, ``batch_size``,
``eval_stats``, ``placement``, ``sync_vs_local``, ``activations``: the experiment's function, its
figure and what only it uses). The package's attribute of each of those names is the experiment's function, as
it was before the split; its module is ``sys.modules["bnref.experiments.NAME"]``, and
``from bnref.experiments.NAME import ...`` reads from it.
"""

from __future__ import annotations

from bnref.experiments._common import BASE_BATCH, BASE_LR, LR_RULE, _caption, scaled_lr  # noqa: F401
from bnref.experiments.activations import activations
from bnref.experiments.batch_size import BATCH_SIZES, batch_size  # noqa: F401
from bnref.experiments.bn_vs_none import bn_vs_none
from bnref.experiments.cli import main
from bnref.experiments.eval_stats import eval_stats
from bnref.experiments.fast_variance import fast_variance
from bnref.experiments.momentum_port import momentum_port
from bnref.experiments.placement import ORDERS, placement  # noqa: F401
from bnref.experiments.registry import EXPERIMENTS, Experiment, ExperimentConfig, run_experiment
from bnref.experiments.sync_vs_local import MODES, REPLICAS, sync_vs_local  # noqa: F401

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentConfig", "run_experiment", "scaled_lr", "momentum_port", "fast_variance",
           "bn_vs_none", "batch_size", "eval_stats", "placement", "sync_vs_local", "activations", "main"]
