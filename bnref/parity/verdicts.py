"""What passes: the trajectory's criterion (:data:`TRAJECTORY_TOLERANCE`) and the verdict on two
runs' per-step losses (:func:`loss_verdict`, :func:`trajectory_verdict`), shared by the one-device
trajectory (:mod:`bnref.parity.trajectory`) and the data-parallel one (:mod:`bnref.parity.replicas`).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["TRAJECTORY_TOLERANCE", "TRAJECTORY_JUDGED_STEPS", "trajectory_verdict", "loss_verdict"]

#: trajectory pass criterion: max |loss_torch - loss_jax| over the judged steps, per dtype (or
#: precision: "bfloat16" is ``--precision bfloat16``, float32 parameters)
TRAJECTORY_TOLERANCE = {"float32": 1e-3, "float64": 1e-9, "bfloat16": 5e-2}
#: where not every step is judged: bfloat16's first 10. Why: each bfloat16 step's gradients are off
#: by a few roundings (2**-8 relative, ``bnref.spec.BF16_UNIT_ROUNDOFF``) differently in the two
#: frameworks, so after one step at lr 1.0 the weights already differ by ~lr * |g| * 2**-8 (3.9e-2
#: measured), and SGD at d2l's lr 1.0 amplifies that chaotically: max |loss diff| 2.0e-2 over steps
#: 1-10, 0.47 at step 19 (lr 0.1: 6.5e-3 over 100 steps; measured at 5f78cc8). Later steps are reported, not judged.
TRAJECTORY_JUDGED_STEPS = {"bfloat16": 10}


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
