"""The training schedule both backends follow, so that they train alike: the example order of
an epoch (:func:`epoch_permutation`), its batches (:func:`batch_slices`), an epoch's metrics
(:func:`epoch_metrics`), the batches precise BN goes over (:func:`precise_batch_indices`) and the
stop on a non-finite loss (:func:`check_finite_loss`).

A leaf of bnref's layers: NumPy only, no framework; the backends import it, never the CLI.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from bnref.config import TrainConfig

__all__ = ["NonFiniteLoss", "batch_slices", "check_finite_loss", "epoch_metrics", "epoch_permutation",
           "precise_batch_indices"]


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` training examples in ``epoch`` (1-based): example-level
    shuffling from NumPy, so both backends see the same order for the same seed."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def batch_slices(n: int, batch_size: int) -> List[Tuple[int, int]]:
    """``(start, size)`` of each training batch of an epoch of ``n`` shuffled examples.

    Full batches only, as Flax's examples do: the remainder (96 of Fashion-MNIST's 60000 at
    batch 256) is left out of that epoch. Kept, it is the epoch's last step, taken at lr 1.0
    on a small batch whose statistics also make up 10% of the running average (decay 0.9)
    right before evaluation: measured, the JAX run's test accuracy fell from 0.831 to 0.731
    on that one step. The order is reshuffled every epoch, so every example is trained on.
    With fewer than ``batch_size`` examples, one batch of all of them (at least 2: training
    BatchNorm needs two values per channel).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if n < 2:
        raise ValueError(f"training needs at least 2 examples, got {n}")
    if n < batch_size:
        return [(0, n)]
    return [(i * batch_size, batch_size) for i in range(n // batch_size)]


def epoch_metrics(config: TrainConfig, epoch: int, loss_sum: float, correct: float, seen: int, seconds: float,
                  test_acc: float, device: str, test_acc_precise: Optional[float] = None,
                  precise_seconds: Optional[float] = None) -> Dict:
    """One epoch's metrics, as every backend reports them (the keys :func:`format_epoch` reads):
    mean training loss and train-mode accuracy over the ``seen`` examples, eval-mode test
    accuracy, and training examples per second. With precise BN, ``test_acc`` is given with the
    running averages (EMA) and ``test_acc_precise`` with the recomputed statistics: the metrics
    carry both as ``test_acc_ema`` / ``test_acc_precise``, and ``test_acc`` is the precise one
    (what the run evaluates with); ``precise_seconds`` is what recomputing them took."""
    m = {
        "epoch": epoch,
        "epochs": config.epochs,
        "loss": loss_sum / seen,
        "train_acc": correct / seen,
        "test_acc": test_acc,
        "examples_per_sec": seen / seconds,
        "device": device,
    }
    if test_acc_precise is not None:
        m.update(test_acc=test_acc_precise, test_acc_ema=test_acc, test_acc_precise=test_acc_precise,
                 precise_seconds=precise_seconds)
    return m


def precise_batch_indices(config: TrainConfig, perm: np.ndarray) -> List[np.ndarray]:
    """The training examples precise BN goes over after an epoch: the first ``precise_batches``
    (default all) of the epoch's full batches, in the epoch's order ``perm``."""
    slices = batch_slices(len(perm), config.batch_size)[: config.precise_batches]
    return [perm[start : start + size] for start, size in slices]


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run stops (its last checkpoint stays)."""


def check_finite_loss(epoch: int, step_losses: Sequence[float]) -> None:
    """Raise :class:`NonFiniteLoss` naming the epoch and the step (1-based, within the epoch) of
    the first NaN or infinite batch loss of an epoch, before anything of that epoch is saved."""
    for step, loss in enumerate(step_losses, start=1):
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"epoch {epoch}, step {step}: the training loss is {loss}; the run stops here "
                                f"(the checkpoint of epoch {epoch - 1} is kept; a smaller --lr may help)")  # fmt: skip
