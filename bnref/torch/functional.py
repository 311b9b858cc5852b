r"""The functional core of bnref's PyTorch BatchNorm: :func:`batch_norm`.

Plain tensor ops (never ``torch.nn.functional.batch_norm`` / ``torch.batch_norm``),
implementing :mod:`bnref.spec` exactly. Training mode, per channel ``c`` over its ``n``
values (every axis but ``axis``)::

    mu     = mean(x)                                  two passes: mean first, then
    sigma2 = mean((x - mu)^2)                         the squared deviations (stable)
    y      = gamma * (x - mu) / sqrt(sigma2 + eps) + beta

and the NEW running statistics (the arguments are never written)::

    running_mean' = decay * running_mean + (1 - decay) * mu
    running_var'  = decay * running_var  + (1 - decay) * s2,
    s2 = sigma2 * n / (n - 1)  (convention.running_var == "unbiased", torch.nn)  or  sigma2  ("biased")

Evaluation mode normalizes with the running statistics (or, when there are none, with the
batch statistics, like ``torch.nn`` with ``track_running_stats=False``) and changes nothing.
An empty batch (``n = 0``) in training gives an empty output and leaves the running
statistics as they are (torch.nn's behaviour); ``n = 1`` is an error.

Two implementations of the training forward, the same numbers:

- **fast path** (plain eager mode): a :class:`torch.autograd.Function` with the analytic
  backward of the spec's docstring,

      dx = (gamma / (n sqrt(sigma2 + eps))) * (n dy - dbeta - xhat * dgamma),
      dgamma = sum(dy * xhat),  dbeta = sum(dy),

  because autograd through the plain forward ops makes about twice as many passes over
  the activations (measured on LeNet's BN shapes, batch 256, CPU: forward + backward
  1.6-1.8x faster than autograd through the same ops). Its backward is itself
  differentiable: when a graph of the gradient is requested (``create_graph=True``,
  gradient penalties, ``gradgradcheck``), it computes the same formula with differentiable
  ops from the saved input ``x``; derivatives of every order are correct. Its memory is
  torch.nn's: the forward makes ``y``, only ``x`` (which the caller holds anyway) and (C,)
  vectors are saved, the backward makes ``dx`` and recomputes ``x - mu`` into it (inputs of
  over 4 Mi elements go slab by slab: one-slab temporaries, fewer passes over memory).
  Measured with :mod:`bnref.torch.memory`: forward + backward at a 256 MiB float32 input
  adds 512 MiB, as torch.nn; saving ``x - mu`` and a separate product buffer added 768 MiB.
- **composite path**: the same math as plain differentiable tensor ops, used wherever the
  custom Function cannot go: inside ``torch.func`` transforms (``grad``, ``vmap``,
  ``jacrev``, batched gradients), ``torch.export`` / ``torch.compile`` tracing,
  ``torch.jit.trace`` and ``torch.jit.script``, and for tensor subclasses. Autograd
  differentiates it to any order.

``tests/test_torch_tools.py`` checks both with ``gradcheck`` / ``gradgradcheck`` in float64
(batched gradients run the composite path) and the gradient penalty against torch.nn;
``tests/test_torch_module_db.py`` runs ``gradcheck`` / ``gradgradcheck`` on PyTorch's own
BatchNorm cases. The running update is detached: it is state, not part of the autograd graph.

float16/bfloat16 inputs are normalized with statistics accumulated in float32; the output
has the input's dtype and the new running statistics the running buffers' dtype. Channel
means are taken level by level (over the spatial axes, then the batch), and a level whose
sum overflows (float32 values near 1e35 over a few thousand rows: every shape, (N, C) and
(N, C, L) included) is detected and recomputed as ``sum(x / n)``, so the mean is finite for
every finite input.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from bnref import spec
from bnref.torch._core import normalize_eval, normalize_train, running_update

__all__ = ["batch_norm", "resolve_convention"]


def resolve_convention(convention: Union[spec.Convention, str, None]) -> spec.Convention:
    """A :class:`bnref.spec.Convention` from itself, a preset name (``"torch"``, ``"d2l"``, ...),
    or ``None`` (torch.nn's, :data:`bnref.spec.TORCH`)."""
    return spec.as_convention(convention, spec.TORCH)


# --- validation and the public function ---------------------------------------------------------


def _layout(x: Tensor, axis: int) -> int:
    """The channel axis of ``x`` as a non-negative int; raises ValueError on a bad rank or axis."""
    ndim = x.dim()
    if ndim < 2:
        raise ValueError(f"x must have rank >= 2 (batch and channel axes), got rank {ndim}")
    # The spec's rule: a Python or NumPy integer (np.int64 from shape arithmetic is an index
    # like any other), never a bool, a float or a tensor.
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an int in [{-ndim}, {ndim}) for x of rank {ndim}, got {axis!r}")
    return int(axis) % ndim


def _check_vector(v: Optional[Tensor], name: str, channels: int) -> None:
    if v is not None and tuple(v.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) to match the {channels} channels of x, got {tuple(v.shape)}")


def check_mode(train) -> bool:
    """``train`` as a bool; anything but a bool is a TypeError (``train="False"`` must not train)."""
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool (True: batch statistics, False: running statistics), got {train!r}")
    return train


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        # Integers would be truncated and complex numbers have no order-2 statistics here
        # (torch.nn refuses both too).
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")


def _forward(x, gamma, beta, running_mean, running_var, *, train: bool, decay: float, eps: float,
             unbiased: bool, axis: int):
    """:func:`batch_norm` with the convention spelled out; every check before any work."""
    check_mode(train)
    _check_input(x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    ax = _layout(x, axis)
    channels = x.shape[ax]
    for v, name in ((gamma, "gamma"), (beta, "beta"), (running_mean, "running_mean"), (running_var, "running_var")):
        _check_vector(v, name, channels)
    if train or running_mean is None:
        y, mean, var, n = normalize_train(x, gamma, beta, eps, ax)
        if running_mean is None or not train or n == 0:  # nothing to update (an empty batch has no statistics)
            return y, running_mean, running_var
        new_mean, new_var = running_update(running_mean, running_var, mean, var, n, decay, unbiased)
        return y, new_mean, new_var
    y = normalize_eval(x, gamma, beta, running_mean, running_var, eps, ax)
    return y, running_mean, running_var


def batch_norm(
    x: torch.Tensor,
    gamma: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    *,
    train: bool,
    convention: Union[spec.Convention, str] = spec.TORCH,
    axis: int = 1,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """BatchNorm of ``x`` along channel axis ``axis``; returns ``(y, new_running_mean, new_running_var)``.

    Args:
      x: floating tensor of rank >= 2 (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` with
        ``axis=1``; ``(N, H, W, C)`` with ``axis=-1``).
      gamma, beta: (C,) scale and shift, or ``None`` (scale 1 / shift 0: ``affine=False``).
        ``y`` is differentiable (to any order) with respect to ``x``, ``gamma`` and ``beta``.
      running_mean, running_var: (C,) running statistics, or both ``None`` (no tracking:
        batch statistics in both modes, and ``None``s come back).
      train: a bool: normalize with the batch statistics and update the running ones
        (``True``), or normalize with the running statistics (``False``). Always explicit.
      convention: a :class:`bnref.spec.Convention` or preset name: ``decay`` (weight of the
        old running value; torch's ``momentum`` is ``1 - decay``), ``eps``, and which batch
        variance enters the running average. Default: torch.nn's.
      axis: the channel axis: a Python or NumPy integer (not a bool), as in :mod:`bnref.spec`.

    Returns:
      ``y`` (``x``'s shape and dtype) and the new running statistics as NEW tensors in the
      running buffers' dtype. The arguments themselves come back where nothing changes: in
      eval mode, and for an empty training batch (``n = 0``, whose output is empty);
      ``None`` when there are none. Nothing passed in is mutated.

    Raises:
      TypeError: ``train`` not a bool; ``x`` not a floating-point tensor (integers, bool,
        complex).
      ValueError: rank < 2, bad ``axis``, a (C,) vector that does not match ``x``'s channels,
        or exactly 1 value per channel in training.
    """
    c = resolve_convention(convention)
    return _forward(x, gamma, beta, running_mean, running_var, train=train, decay=c.decay, eps=c.eps,
                    unbiased=c.running_var == "unbiased", axis=axis)
