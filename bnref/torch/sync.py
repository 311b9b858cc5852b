r"""``SyncBatchNorm``: BatchNorm over the global batch of a ``torch.distributed`` process group.

The spec's :func:`bnref.spec.sync_batch_norm_train` on ``torch.distributed`` (gloo on CPUs, NCCL
on GPUs; launched by ``python -m bnref.train --replicas R`` or ``torchrun``). Per channel, each
replica computes its shard's count, mean and sum of squared deviations (two-pass), and ONE
collective (an all-gather of those ``2C + 1`` numbers) gives every replica all of them; the merge
is exact and stable (Chan et al.)::

    n = sum_r n_r      mu = sum_r n_r mu_r / n      M2 = sum_r M2_r + sum_r n_r (mu_r - mu)^2

(no ``E[x^2] - E[x]^2``; shards may differ in size, and may be empty; a layer's first
distributed forward also all-gathers its channel count once, so that replicas built with
different layers fail with a clear error instead of mismatched collectives). Each replica normalizes
its shard with ``mu`` and ``M2 / n`` and, in training, updates its running statistics with them
and with the global ``n`` for Bessel's correction, so they stay identical on every replica.
The backward is ONE all-reduce of the local ``sum dy`` and ``sum dy (x - mu)`` (``2C`` numbers);
``dx`` follows the single-device formula with the global sums and count. The gradients of the
weight and bias are the replica's own sums: DDP averages them across replicas like every other
parameter gradient, which makes R-replica training equal to one device on the global batch
(``tests/test_torch_distributed.py`` checks it, step by step).

Not distributed (no process group), a world of one, or evaluation mode: the layer is bnref's
``BatchNorm*d`` (its local forward), as ``torch.nn.SyncBatchNorm`` falls back. Unlike
``torch.nn.SyncBatchNorm`` it runs on CPU tensors (gloo), and it keeps bnref's conventions.
Derivatives of the second order through the collective are not implemented: a gradient graph
through it (``create_graph=True``) raises instead of being silently wrong.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnref import spec
from bnref.torch._core import broadcast_shape, channel_mean, channel_sum, channel_sum_of_squares
# the layers' base class, subclassed within the package as torch.nn's own modules subclass _BatchNorm
from bnref.torch.layers import _UNSET, _BatchNorm, running_var_estimator

__all__ = ["SyncBatchNorm"]


def _all_gather(out: Tensor, mine: Tensor, group) -> None:
    """Every rank's ``mine`` into ``out`` (1-D, rank order): ``all_gather_single`` where torch has
    it (2.13 deprecates ``all_gather_into_tensor``), else ``all_gather_into_tensor``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def _world(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class _SyncBatchNormTrain(torch.autograd.Function):
    """Training-mode synchronized normalization: ``(y, mean, var, n)``; the last three (global,
    not differentiable) feed the running update."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, process_group, world: int):
        C = x.shape[1]
        n_local = x.numel() // C if C else 0
        bshape = broadcast_shape(x, 1)
        stats = torch.zeros(2 * C + 1, dtype=torch.float64, device=x.device)  # [n_r, mu_r (C), M2_r (C)]
        if n_local > 0:
            mean_local = channel_mean(x, 1)
            stats[0] = n_local
            stats[1 : C + 1] = mean_local
            stats[C + 1 :] = channel_sum_of_squares(x - mean_local.view(bshape), 1)
        gathered = torch.empty(world * (2 * C + 1), dtype=torch.float64, device=x.device)
        _all_gather(gathered, stats, process_group)  # the forward's one collective
        gathered = gathered.view(world, 2 * C + 1)  # (R, 2C + 1), rank order
        counts, means, m2s = gathered[:, :1], gathered[:, 1 : C + 1], gathered[:, C + 1 :]  # (R, 1), (R, C), (R, C)
        n = counts.sum()
        if int(n) == 1:
            raise ValueError("Expected more than 1 value per channel when training, got 1 over all replicas")
        if int(n) == 0:  # every shard empty: an empty output, no statistics
            y = x * (1 if weight is None else weight.view(bshape)) + (0 if bias is None else bias.view(bshape))
            ctx.mark_non_differentiable(n)
            ctx.empty = True
            ctx.save_for_backward(x, weight)
            zeros = torch.zeros(C, dtype=x.dtype, device=x.device)
            return y, zeros, zeros, n
        mean64 = (counts * means).sum(0) / n  # (C,)
        var64 = (m2s.sum(0) + (counts * (means - mean64) ** 2).sum(0)) / n  # (C,) biased, exact merge
        mean, var = mean64.to(x.dtype), var64.to(x.dtype)
        inv_std = torch.rsqrt(var + eps)
        scale = inv_std if weight is None else weight * inv_std
        y = (x - mean.view(bshape)).mul_(scale.view(bshape))
        if bias is not None:
            y.add_(bias.view(bshape))
        ctx.empty = False
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.n, ctx.process_group = float(n), process_group
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        if torch.is_grad_enabled():
            raise RuntimeError("bnref.torch.SyncBatchNorm: double backward through the cross-replica collective "
                               "is not implemented")  # fmt: skip
        if ctx.empty:
            x, weight = ctx.saved_tensors
            dims = [0] + list(range(2, x.dim()))
            return (torch.zeros_like(x), None if weight is None else torch.zeros_like(weight),
                    dy.sum(dims) if ctx.needs_input_grad[2] else None, None, None, None)  # fmt: skip
        x, weight, mean, inv_std = ctx.saved_tensors
        C, bshape = x.shape[1], broadcast_shape(x, 1)
        xc = x - mean.view(bshape)
        if x.numel() == 0:  # an empty shard still joins the collective, with zero sums
            local = torch.zeros(2 * C, dtype=dy.dtype, device=dy.device)
        else:
            local = torch.cat([channel_sum(dy, 1), channel_sum(dy * xc, 1)])  # [sum dy (C), sum dy (x - mu) (C)]
        totals = local.clone()
        dist.all_reduce(totals, group=ctx.process_group)  # the backward's one collective
        sum_dy, sum_dy_xc = totals[:C], totals[C:]
        n = ctx.n
        k = inv_std if weight is None else weight * inv_std  # gamma / sigma
        # dx = (gamma / sigma) (dy - sum dy / n - xhat sum(dy xhat) / n), xhat = xc / sigma, global sums
        dx = dy.mul(k.view(bshape)).sub_((k * sum_dy / n).view(bshape))
        dx.addcmul_(xc, (-k * inv_std * inv_std * sum_dy_xc / n).view(bshape))
        dweight = local[C:] * inv_std if (weight is not None and ctx.needs_input_grad[1]) else None  # this replica's
        dbias = local[:C] if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm``'s constructor (``process_group`` included) plus ``convention=``;
    input ``(N, C, *)`` of rank >= 2. See the module docstring.

    A ``torch.nn.modules.batchnorm._BatchNorm`` (the tools that look for BatchNorm find it) but
    deliberately not a ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses every
    ``torch.nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers only work with GPU
    modules"), and this one runs on CPUs.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = _UNSET,
        momentum: Optional[float] = _UNSET,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        convention: Union[spec.Convention, str] = spec.TORCH,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         convention=convention)  # fmt: skip
        self.process_group = process_group
        self._checked_channels = False

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def _forward_impl(self, x: Tensor) -> Tensor:
        world = _world(self.process_group)
        if not self.training or world == 1 or torch.jit.is_scripting():
            return super()._forward_impl(x)  # local BatchNorm, as torch.nn.SyncBatchNorm falls back
        self._check_sync_input(x, world)
        y, mean, var, n = _SyncBatchNormTrain.apply(x, self.weight, self.bias, float(self.eps), self.process_group,
                                                    world)  # fmt: skip
        self._count_and_update(mean, var, int(n))  # global statistics and count: identical on every replica
        return y

    def _check_sync_input(self, x: Tensor, world: int) -> None:
        """Local checks (torch.nn's), then, once, that every replica has this layer with the same
        channel count (different counts would make the collectives mismatch: a hang or garbage)."""
        self._check_input_dim(x)
        if not x.is_floating_point():
            raise NotImplementedError(f'"batch_norm" not implemented for {x.dtype}')
        if x.dtype in (torch.float16, torch.bfloat16):
            raise NotImplementedError("bnref.torch.SyncBatchNorm: half-precision input is not implemented")
        if not self.eps > 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if x.shape[1] != self.num_features:
            raise RuntimeError(f"rank {dist.get_rank()}: input has {x.shape[1]} channels, the layer {self.num_features}")
        if self._checked_channels:
            return
        mine = torch.tensor([self.num_features], dtype=torch.int64, device=x.device)
        every = torch.empty(world, dtype=torch.int64, device=x.device)
        _all_gather(every, mine, self.process_group)
        if (every != every[0]).any():
            per_rank = ", ".join(f"rank {r}: {int(c)}" for r, c in enumerate(every))
            raise ValueError(f"SyncBatchNorm layers differ in channel count across replicas ({per_rank})")
        self._checked_channels = True

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``module`` with every BatchNorm layer, bnref's or torch.nn's (``BatchNorm1d/2d/3d``, and
        ``torch.nn.SyncBatchNorm``), replaced by a bnref ``SyncBatchNorm`` holding the same
        parameters and buffers (same ``state_dict`` keys). bnref's layers keep their convention;
        torch.nn's get torch.nn's (unbiased running variance) with their own eps and momentum."""
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            estimator = running_var_estimator(module)
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, bias=module.bias is not None,
                      convention=spec.Convention(decay=0.9, running_var=estimator))  # fmt: skip
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out

