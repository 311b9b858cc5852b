"""Find the BatchNorm bugs of a PyTorch <-> Flax port (flax.linen or Flax NNX).

- :func:`bn_report` (:mod:`bnref.diagnose.report`): ``bn_report(torch_module, flax_module,
  flax_variables, sample_input)``, or ``bn_report(torch_module, nnx_model, sample_input)``, runs
  both models on one batch and compares every pair of BN layers (decay, eps, the running
  variance's estimator, axis, mode, statistics, non-finite values); a :class:`Report` of
  findings (what to change) and notes (what neither framework can change).
- ``python -m bnref.diagnose`` (:mod:`bnref.diagnose.cli`, :func:`main`): the same on two
  checkpoints, two bnref run directories or a user's models and files.
"""

from bnref.diagnose.cli import main
from bnref.diagnose.report import KINDS, Finding, LayerComparison, Report, bn_report

__all__ = ["KINDS", "Finding", "LayerComparison", "Report", "bn_report", "main"]
