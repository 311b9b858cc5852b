"""bnref's PyTorch backend: BatchNorm from plain tensor ops, a drop-in for torch.nn's.

- :func:`batch_norm`: the functional core ``(x, gamma, beta, running_mean, running_var,
  *, train, convention, axis) -> (y, new_running_mean, new_running_var)``.
- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: drop-ins for
  ``torch.nn.BatchNorm*d`` with an extra ``convention=`` keyword.
- :class:`SyncBatchNorm`: BatchNorm over the global batch of a ``torch.distributed`` group (CPU
  and GPU), ``SyncBatchNorm.convert_sync_batchnorm`` for bnref's and torch.nn's layers.
- :func:`precise_bn`: recompute every BN layer's running statistics with the weights fixed
  (the spec's population or batch-average variant), for any module.
- :class:`LeNetBN`: the seed's LeNet with BatchNorm; ``bnref.torch.train`` trains it.
"""

from bnref.torch.functional import resolve_convention, batch_norm
from bnref.torch.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnref.torch.models import LeNetBN
from bnref.torch.precise import precise_bn
from bnref.torch.sync import SyncBatchNorm

__all__ = ["batch_norm", "resolve_convention", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LeNetBN",
           "precise_bn"]
