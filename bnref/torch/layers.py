"""``BatchNorm1d`` / ``BatchNorm2d`` / ``BatchNorm3d``: drop-ins for torch.nn's, on bnref's functional core.

Same constructor (``num_features, eps=1e-5, momentum=0.1, affine=True,
track_running_stats=True, device=None, dtype=None, *, bias=True`` in torch 2.13), same
parameters and buffers (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) and so the same ``state_dict`` keys, the same accepted shapes and
the same exception types for bad input, so ``load_state_dict`` works both ways with
``torch.nn.BatchNorm*d`` and the defaults give torch.nn's numbers.

One extra keyword, ``convention=`` (a :class:`bnref.spec.Convention` or a preset name,
default ``"torch"``), chooses how the running statistics are kept, e.g. the seed's
``"d2l"``: decay 0.9 and the BIASED batch variance in the running average, which
torch.nn cannot express (it always feeds the unbiased ``n/(n-1)`` variance). ``eps`` and
``momentum`` passed explicitly override the convention's ``eps`` and ``decay``
(``decay = 1 - momentum``: torch's momentum is the weight of the NEW batch).

``momentum=None`` is torch's cumulative average: at step ``k`` (``num_batches_tracked``
after the increment) the decay is ``1 - 1/k``, so the running statistics are the plain
mean of all batches seen.

Deliberate departures from torch.nn, each so that a failed call changes nothing:
``num_batches_tracked`` is incremented only after the input has been validated (torch.nn
increments it before the kernel rejects a one-value-per-channel or wrong-channel batch),
and an empty batch in training raises ValueError (torch.nn returns an empty output).
A float32/float64 input whose dtype differs from the parameters' raises RuntimeError on
every device (torch.nn's CPU rule); float16/bfloat16 inputs may meet float32 parameters.

In training the new running statistics (computed by the functional core's update) are
copied into the buffers in place, after every check has passed;
:func:`bnref.torch.batch_norm` returns them as new tensors instead.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from bnref import spec
from bnref.torch.functional import _forward, _normalize_train, _running_update, resolve_convention

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

class _FromConvention:
    """Default of ``eps`` / ``momentum``: "the convention's" (1e-5 / 0.1 for the default, torch.nn's).

    A sentinel rather than a number so that an explicitly passed value, even 1e-5, is
    known to override the convention.
    """

    def __repr__(self) -> str:
        return "<from convention>"


_UNSET = _FromConvention()


class _BatchNorm(nn.Module):
    """Common base of bnref's BatchNorm layers (torch.nn's ``_NormBase`` + ``_BatchNorm``)."""

    _version = 2  # torch.nn's state_dict version (2: has num_batches_tracked)
    _expected_dims: tuple = ()

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
        super().__init__()
        conv = resolve_convention(convention)
        if eps is _UNSET:
            eps = conv.eps
        if momentum is _UNSET:
            momentum = conv.torch_momentum  # torch's word: weight of the NEW batch
        self._running_var_estimator = conv.running_var  # "unbiased" (torch.nn) or "biased"
        self.num_features = num_features
        self.eps = eps  # read at every call, as torch.nn does: setting it later takes effect
        self.momentum = momentum  # likewise; None: cumulative average (decay 1 - 1/k at step k)
        self.affine = affine
        self.track_running_stats = track_running_stats
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    @property
    def convention(self) -> Optional[spec.Convention]:
        """This layer's :class:`bnref.spec.Convention` now (``None`` for ``momentum=None``,
        whose decay changes every step)."""
        if self.momentum is None:
            return None
        return spec.Convention(decay=1.0 - self.momentum, eps=self.eps, running_var=self._running_var_estimator)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )
        if self._running_var_estimator != "unbiased":  # only shown where it differs from torch.nn
            s += f", running_var={self._running_var_estimator!r}"
        return s

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # As torch.nn: state dicts older than version 2 have no num_batches_tracked.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._expected_dims:
            want = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"expected {want} input (got {x.dim()}D input)")

    def _check_input(self, x: torch.Tensor, use_batch_stats: bool) -> None:
        """torch.nn's checks, in torch.nn's order and with its exception types."""
        self._check_input_dim(x)  # ValueError
        if not x.is_floating_point():
            raise NotImplementedError(f'"batch_norm" not implemented for {x.dtype}')
        channels = x.shape[1]
        if self.training and (x.numel() // channels if channels else 0) <= 1:
            # torch.nn lets an empty batch through (empty output); bnref raises for it too.
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(self, name)
            if t is None or (name.startswith("running") and use_batch_stats):
                continue  # unused in this call (torch.nn passes None for it too)
            if t.numel() != channels:  # torch.nn's kernel raises RuntimeError here
                raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
            if x.dtype not in (torch.float16, torch.bfloat16) and t.dtype != x.dtype:
                raise RuntimeError(f"mixed dtype: input is {x.dtype} but {name} is {t.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Which statistics, as torch.nn decides: the batch's in training, and in eval when
        # there are no running buffers; the running ones are updated only when tracked.
        track = self.training and self.track_running_stats
        use_batch_stats = self.training or self.running_mean is None
        self._check_input(x, use_batch_stats and not track)
        if self.momentum is None:  # cumulative average: decay 1 - 1/k at step k
            decay = 1.0 - 1.0 / (int(self.num_batches_tracked) + 1) if track else 0.0
        else:
            decay = 1.0 - self.momentum
        unbiased = self._running_var_estimator == "unbiased"
        if not track:  # the functional core, buffers read (eval) or not used at all
            use_buffers = not use_batch_stats
            return _forward(x, self.weight, self.bias, self.running_mean if use_buffers else None,
                            self.running_var if use_buffers else None, train=use_batch_stats, decay=decay,
                            eps=self.eps, unbiased=unbiased, axis=1)[0]
        # Training with tracking: the functional core's normalization, then the running update
        # written straight into the buffers (what batch_norm returns as new tensors), only
        # now that every check has passed.
        y, mean, var, n = _normalize_train(x, self.weight, self.bias, self.eps, 1)
        new_mean, new_var = _running_update(self.running_mean, self.running_var, mean, var, n,
                                            decay=decay, unbiased=unbiased)  # fmt: skip
        with torch.no_grad():
            self.running_mean.copy_(new_mean)
            self.running_var.copy_(new_var)
            self.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm1d``: input ``(N, C)`` or ``(N, C, L)``; see the module docstring."""

    _expected_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm2d``: input ``(N, C, H, W)``; see the module docstring."""

    _expected_dims = (4,)


class BatchNorm3d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm3d``: input ``(N, C, D, H, W)``; see the module docstring."""

    _expected_dims = (5,)
