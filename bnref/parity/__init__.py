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
  unbiased running variance);
- ``bnref.nnx``: ``bnref.nnx.BatchNorm``, driven as NNX code drives it (``nnx.jit``, ``nnx.grad``,
  its ``nnx.BatchStat``s updated in place);
- ``flax.nnx``: ``flax.nnx.BatchNorm`` configured to the preset (as flax.linen, no unbiased
  running variance).

Quantities: y, new running mean, new running var, dx, dgamma, dbeta (gradients of
``sum(y * dy)``) and the eval output; each cell shows the max abs / max rel error over the
steps, judged by the per-dtype tolerances of ``bnref.testing.TOLERANCES``. The exit
status is non-zero on any failure. ``--json`` prints machine-readable results.

``--trajectory`` trains the same LeNet-BN in both frameworks instead (see
:func:`trajectory`; ``--trajectory --nnx`` adds bnref.nnx's LeNet-BN trained the NNX way,
compared with the linen one), and ``--conventions-table`` prints the README's conventions table,
generated from the presets so it cannot drift.

``--replicas R`` is the data-parallel proof: the matrix becomes spec vs bnref's
SyncBatchNorm on R processes vs bnref.jax / flax.linen / bnref.nnx / flax.nnx with ``axis_name``
on R devices, with equal, unequal and empty shards (:func:`replicas_matrix`); ``--trajectory
--replicas R`` also trains LeNet-BN data-parallel in both frameworks and checks that R
synchronized replicas train like one device (:func:`replica_trajectories`).

Where the code is: :mod:`bnref.parity.matrix` the cells, the matrix and its table
(:func:`run_cell`, :func:`matrix`, :func:`format_table`) and the README's conventions table
(:func:`conventions_table`: which presets torch.nn and flax.linen can express, as the matrix's
"not expressible" cells say); :mod:`bnref.parity.trajectory` the one-device trajectory, its
report (:func:`trajectory`, :func:`format_trajectory`); :mod:`bnref.parity.verdicts` what passes
(:data:`TRAJECTORY_TOLERANCE`, :func:`trajectory_verdict`, :func:`loss_verdict`);
:mod:`bnref.parity.replicas` the data-parallel proof (the replicas matrix :func:`replicas_matrix`
and the replica trajectories :func:`replica_trajectories`); and :mod:`bnref.parity.cli` the
command (:func:`main`, which ``__main__`` runs). Every name is importable from ``bnref.parity``
too. The implementations are the backend registry's (``bnref.backends``).
"""

from __future__ import annotations

from bnref import spec  # noqa: F401  (bnref.parity.spec, as before the split)
from bnref.parity.matrix import (DTYPES, IMPLEMENTATIONS, LAYOUTS, STEPS, CellResult, conventions_table, format_table,
                                 matrix, run_cell)
from bnref.parity.replicas import (REPLICA_IMPLEMENTATIONS, REPLICA_TOLERANCE, RUN_NAMES, _format_replicas,  # noqa: F401
                                   replica_trajectories, replicas_matrix, run_replica_cell, shard_sizes)
from bnref.parity.trajectory import format_trajectory, trajectory, trajectory_data
from bnref.parity.verdicts import TRAJECTORY_TOLERANCE, loss_verdict, trajectory_verdict
from bnref.parity.cli import main

__all__ = ["IMPLEMENTATIONS", "LAYOUTS", "DTYPES", "STEPS", "CellResult", "run_cell", "matrix", "format_table",
           "conventions_table", "TRAJECTORY_TOLERANCE", "trajectory_data", "trajectory", "trajectory_verdict",
           "loss_verdict", "format_trajectory", "REPLICA_IMPLEMENTATIONS", "shard_sizes", "run_replica_cell",
           "replicas_matrix", "REPLICA_TOLERANCE", "replica_trajectories", "RUN_NAMES", "main"]
