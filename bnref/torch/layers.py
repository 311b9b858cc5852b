"""``BatchNorm1d`` / ``BatchNorm2d`` / ``BatchNorm3d``: torch.nn's BatchNorm layers on bnref's functional core.

Each is a subclass of the torch.nn class it replaces (``isinstance(layer, nn.BatchNorm2d)``
holds, and so does ``isinstance(layer, nn.modules.batchnorm._BatchNorm)``), so every tool
that looks for BatchNorm finds it: ``torch.optim.swa_utils.update_bn`` recalibrates it,
``torch.func.replace_all_batch_norm_modules_`` patches it, ``torch.ao.quantization.fuse_modules``
folds it into the preceding convolution, state dicts load both ways. The constructor is
torch.nn's (``num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
device=None, dtype=None, *, bias=True``), the parameters and buffers are torch.nn's, and the
defaults give torch.nn's numbers. Only ``forward`` is bnref's: the functional core of
:mod:`bnref.torch.functional`, not ``F.batch_norm``.

One extra keyword, ``convention=`` (a :class:`bnref.spec.Convention` or a preset name,
default ``"torch"``), chooses how the running statistics are kept, e.g. the seed's
``"d2l"``: decay 0.9 and the BIASED batch variance in the running average, which
torch.nn cannot express (it always feeds the unbiased ``n/(n-1)`` variance). ``eps`` and
``momentum`` passed explicitly override the convention's ``eps`` and ``decay``
(``decay = 1 - momentum``: torch's momentum is the weight of the NEW batch).

``momentum=None`` is torch's cumulative average: at step ``k`` (``num_batches_tracked``
after the increment) the decay is ``1 - 1/k``, so the running statistics are the plain
mean of all batches seen (what ``update_bn`` sets to recompute the statistics).

Tools that REPLACE a BatchNorm by the framework's own class keep its parameters and
buffers but not bnref's convention: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` gives a
``torch.nn.SyncBatchNorm``, which keeps torch.nn's unbiased running variance (and refuses
CPU tensors). The README's differences table lists these.

Works with: ``torch.fx.symbolic_trace`` (the layer's call is one opaque node that keeps the
layer, so ``GraphModule.train()/eval()`` still switch its mode), ``torch.jit.script``
(a TorchScript-compatible forward, the composite path), ``torch.export`` and ``torch.func``
in training mode (the composite path), ``torch.autograd`` derivatives of every order.

Deliberate departures from torch.nn, each so that a failed call changes nothing:
``num_batches_tracked`` is incremented only after the input has been validated (torch.nn
increments it before the kernel rejects a one-value-per-channel or wrong-channel batch).
Parameters and buffers of another dtype than the input's raise RuntimeError on every device
(torch.nn's CPU rule), except that a float16/bfloat16 input may meet parameters and buffers
that are all float32.

In training the new running statistics (computed by the functional core's update) are
copied into the buffers in place, after every check has passed;
:func:`bnref.torch.batch_norm` returns them as new tensors instead.
"""

from __future__ import annotations

import inspect
from typing import Optional, Union

import torch
import torch.fx
from torch import Tensor, nn

from bnref import spec
from bnref.torch._core import normalize_eval, normalize_train, running_update
from bnref.torch.functional import resolve_convention

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "running_var_estimator"]

# torch.nn's BatchNorm took its ``bias=`` keyword in 2026; with an older torch, bnref's layer
# still accepts it and drops the bias parameter itself.
_TORCH_HAS_BIAS_KW = "bias" in inspect.signature(nn.modules.batchnorm._NormBase.__init__).parameters


class _FromConvention:
    """Default of ``eps`` / ``momentum``: "the convention's" (1e-5 / 0.1 for the default, torch.nn's).

    A sentinel rather than a number so that an explicitly passed value, even 1e-5, is
    known to override the convention.
    """

    def __repr__(self) -> str:
        return "<from convention>"


_UNSET = _FromConvention()


def _opaque_forward(module: "_BatchNorm", x: Tensor) -> Tensor:
    """``module``'s eager forward, behind a name that ``torch.fx`` records as one call.

    Traced through, the forward's checks (``x.dim()``, ``x.shape``) would be control flow on
    proxies, and its mode (``module.training``) would be frozen into the graph; as an opaque
    call taking the module itself (a ``get_attr`` node), the traced ``GraphModule`` keeps the
    layer and switches its mode with ``train()``/``eval()`` as torch.nn's leaf layers do.
    """
    return module._forward_impl(x)


torch.fx.wrap("_opaque_forward")


def _check_dtypes(x: Tensor, used) -> None:
    """torch.nn's CPU dtype rule, on every device: the parameters and buffers a call reads all
    have ``x``'s dtype, or, for a float16/bfloat16 ``x`` only, all float32 (statistics in
    float32, as in mixed-precision training). Anything else is RuntimeError, as torch.nn on the
    CPU raises "mixed dtype" (or "expected scalar type"); bnref's float32 computation of half
    inputs would otherwise accept float64 or bfloat16 state that torch.nn refuses."""
    if not used:
        return
    first_name, first = used[0]
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    if first.dtype not in allowed:
        raise RuntimeError(f"mixed dtype: input is {x.dtype} but {first_name} is {first.dtype} "
                           f"(parameters and buffers must be {' or '.join(str(d) for d in allowed)})")
    for name, t in used[1:]:
        if t.dtype != first.dtype:
            raise RuntimeError(f"mixed dtype: {first_name} is {first.dtype} but {name} is {t.dtype} "
                               "(the parameters and buffers must share one dtype)")


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Common base of bnref's BatchNorm layers: torch.nn's ``_BatchNorm`` with bnref's forward."""

    # TorchScript compiles properties unless told not to; this one returns a Python dataclass.
    __jit_unused_properties__ = ["convention"]

    def __init__(
        self,
        num_features: int,
        eps: float = _UNSET,
        momentum: Optional[float] = _UNSET,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        convention: Union[spec.Convention, str] = spec.TORCH,
    ) -> None:
        conv = resolve_convention(convention)
        if eps is _UNSET:
            eps = conv.eps
        if momentum is _UNSET:
            momentum = conv.torch_momentum  # torch's word: weight of the NEW batch
        kw = {"bias": bias} if _TORCH_HAS_BIAS_KW else {}
        # device and dtype by keyword: torch.nn.SyncBatchNorm takes process_group in that position
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **kw)
        if not _TORCH_HAS_BIAS_KW and affine and not bias:
            self.bias = None  # what torch.nn's bias=False does
        # "unbiased" (torch.nn) or "biased": which batch variance enters the running average.
        # eps and momentum stay plain attributes read at every call, as in torch.nn.
        self._running_var_estimator = conv.running_var

    @property
    def convention(self) -> Optional[spec.Convention]:
        """This layer's :class:`bnref.spec.Convention` now (``None`` for ``momentum=None``,
        whose decay changes every step)."""
        if self.momentum is None:
            return None
        return spec.Convention(decay=1.0 - self.momentum, eps=self.eps, running_var=self._running_var_estimator)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if not _TORCH_HAS_BIAS_KW and self.affine and self.bias is None:
            s += ", bias=False"
        if self._running_var_estimator != "unbiased":  # only shown where it differs from torch.nn
            s += f", running_var={self._running_var_estimator!r}"
        return s

    def _check_input(self, x: Tensor) -> None:
        """torch.nn's checks, in torch.nn's order and with its exception types, all before any work."""
        self._check_input_dim(x)  # ValueError
        if not x.is_floating_point():
            raise NotImplementedError(f'"batch_norm" not implemented for {x.dtype}')
        channels = x.shape[1]
        use_batch_stats = self.training or self.running_mean is None
        if self.training and x.numel() == channels:  # exactly one value per channel (0 is an empty batch)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        if use_batch_stats and not self.eps > 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if not self.eps >= 0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")
        track = self.training and self.track_running_stats
        used = []  # (name, tensor) of the parameters and buffers this call reads
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(self, name)
            if t is None or (name.startswith("running") and use_batch_stats and not track):
                continue  # unused in this call (torch.nn passes None for it too)
            if t.numel() != channels:  # torch.nn's kernel raises RuntimeError here
                raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
            used.append((name, t))
        _check_dtypes(x, used)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_impl(x)
        else:
            return _opaque_forward(self, x)

    def _forward_impl(self, x: Tensor) -> Tensor:
        # TorchScript compiles this method (the branches on is_scripting() it does not take are
        # skipped), so it sticks to what TorchScript can type.
        if torch.jit.is_scripting():
            self._check_input_dim(x)
        else:
            self._check_input(x)
        # Which statistics, as torch.nn decides: the batch's in training, and in eval when
        # there are no running buffers; the running ones are updated only when tracked.
        running_mean = self.running_mean
        running_var = self.running_var
        if not self.training and running_mean is not None and running_var is not None:
            return normalize_eval(x, self.weight, self.bias, running_mean, running_var, self.eps, 1)
        y, mean, var, n = normalize_train(x, self.weight, self.bias, self.eps, 1)
        if self.training:
            self._count_and_update(mean, var, n)
        return y

    def _count_and_update(self, mean: Tensor, var: Tensor, n: int) -> None:
        """After a training forward whose checks all passed: count the step and write the running
        update (what batch_norm returns as new tensors) into the buffers. An empty batch counts
        as a step and changes no statistic, as in torch.nn. ``mean``/``var``: the batch's (biased)
        statistics over ``n`` values per channel."""
        counter, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if not self.track_running_stats or counter is None:
            return
        counter.add_(1)
        if n > 0 and running_mean is not None and running_var is not None:
            momentum = self.momentum
            decay = 1.0 - 1.0 / float(counter) if momentum is None else 1.0 - momentum  # None: cumulative
            new_mean, new_var = running_update(running_mean, running_var, mean, var, n, decay,
                                                self._running_var_estimator == "unbiased")  # fmt: skip
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` with bnref's forward and ``convention=``: input ``(N, C)`` or ``(N, C, L)``."""


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with bnref's forward and ``convention=``: input ``(N, C, H, W)``."""


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` with bnref's forward and ``convention=``: input ``(N, C, D, H, W)``."""


def running_var_estimator(module: nn.Module) -> str:
    """Which batch variance ``module``'s running average takes: ``"unbiased"`` (Bessel's
    n/(n-1), torch.nn's) or ``"biased"``. bnref's layers keep their convention's choice;
    torch.nn's BatchNorm layers always take the unbiased one. The public way to ask (precise BN,
    synchronized BN and diagnose do), as ``bnref.jax.BatchNorm.resolved_convention()`` is in JAX."""
    return module._running_var_estimator if isinstance(module, _BatchNorm) else "unbiased"


def _register_quantization_fusers() -> None:
    """Let ``torch.ao.quantization.fuse_modules`` fold bnref's layers like torch.nn's.

    Its fuser table is keyed by exact module types, so a subclass is not found there
    ("did not find fuser method"); the same fuser functions apply unchanged (they read
    ``running_mean``, ``running_var``, ``eps``, ``weight`` and ``bias``, whose eval-mode
    meaning is convention-free). Only bnref's own keys are added.
    """
    from torch.ao.quantization import fuser_method_mappings as fmm

    table = fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    pairs = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
    for key, fuser in list(table.items()):
        if any(k in pairs for k in key):
            table.setdefault(tuple(pairs.get(k, k) for k in key), fuser)


_register_quantization_fusers()
