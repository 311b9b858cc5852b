"""What passes: the trajectory's criterion (:data:`TRAJECTORY_TOLERANCE`) and the verdict on two
runs' per-step losses (:func:`loss_verdict`, :func:`trajectory_verdict`), shared by the one-device
trajectory (:mod:`bnref.parity.trajectory`) and the data-parallel one (:mod:`bnref.parity.replicas`).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["TRAJECTORY_TOLERANCE", "trajectory_verdict", "loss_verdict"]

#: trajectory pass criterion: max |loss_torch - loss_jax| over all steps, per dtype
TRAJECTORY_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


def trajectory_verdict(rows: Sequence[Dict], tolerance: float) -> Dict:
    """``max_loss_diff`` and ``passed`` for a trajectory's rows.

    A NaN or infinite loss on either side is a failure, whatever the other side did: two
    diverged runs do not "agree", and ``max()`` must not skip a NaN (Python's does, unless it
    comes first). ``nonfinite_steps`` lists the steps where either loss is not finite.
    """
    losses = np.array([[r["loss_torch"], r["loss_jax"]] for r in rows], dtype=np.float64).reshape(-1, 2)
    return loss_verdict(losses[:, 0], losses[:, 1], tolerance, steps=[r["step"] for r in rows])


def loss_verdict(a: np.ndarray, b: np.ndarray, tolerance: float, steps: Optional[Sequence[int]] = None) -> Dict:
    """``max_loss_diff``, ``passed`` and ``nonfinite_steps`` (1-based unless ``steps`` names
    them) for two runs' per-step losses: NaN or inf on either side fails; no steps fails."""
    steps = list(range(1, len(a) + 1)) if steps is None else list(steps)
    bad = [s for s, x, y in zip(steps, a, b) if not (math.isfinite(x) and math.isfinite(y))]
    max_loss_diff = float(np.max(np.abs(a - b))) if len(a) else float("nan")
    passed = not bad and bool(max_loss_diff <= tolerance)
    return {"max_loss_diff": max_loss_diff, "passed": passed, "nonfinite_steps": bad}
