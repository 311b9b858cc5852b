"""The kernels of bnref's PyTorch BatchNorm, shared by the functional form
(:mod:`bnref.torch.functional`), the layers (:mod:`bnref.torch.layers`) and synchronized BN
(:mod:`bnref.torch.sync`): the per-channel reductions, the training normalization (a custom
autograd Function with the spec's backward, or a composite of torch ops where a Function cannot
go; ``bnref.torch.functional``'s docstring says when each runs), the evaluation normalization
and the running update.

Public names (no leading underscore) are what the other modules import; underscored ones are
this module's own. Every function takes the channel axis ``ax`` already checked
(non-negative); the checks are the callers'.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["broadcast_shape", "channel_mean", "channel_sum", "channel_sum_of_squares", "normalize_train", "normalize_eval",
           "running_update"]


# --- layout helpers (TorchScript-compatible: the scripted layer uses them too) ---------------


def _reduce_dims(ndim: int, ax: int) -> List[int]:
    dims: List[int] = []
    for i in range(ndim):  # (a loop: TorchScript has no comprehension filters)
        if i != ax:
            dims.append(i)
    return dims


def broadcast_shape(x: Tensor, ax: int) -> List[int]:
    """The shape that broadcasts a (C,) vector against ``x`` along channel axis ``ax``."""
    shape = [1] * x.dim()
    shape[ax] = x.shape[ax]
    return shape


def channel_mean(t: Tensor, ax: int) -> Tensor:
    """Per-channel mean of ``t``, shape (C,), taken level by level.

    ``(N, C, L)`` means over L, then over N (``(M1, M2, C)`` likewise for channels last):
    every partial result is a mean, bounded by ``max |t|``, so no sum spans more than one
    level (L or N values, not N * L); on the CPU it is also as fast as one sum over the
    strided axes (measured). One level can still overflow (float32 1e35 over 4096 values, or
    an (N, C) input, which has one level): :func:`_finite_channel_mean` catches that.
    """
    ndim = t.dim()
    if ndim > 2 and ax == 1:
        return t.reshape(t.shape[0], t.shape[1], -1).mean(2).mean(0)  # (N, C, L) -> (N, C) -> (C,)
    if ndim > 2 and ax == ndim - 1:
        return t.reshape(t.shape[0], -1, t.shape[ax]).mean(1).mean(0)  # (N, L, C) -> (N, C) -> (C,)
    return t.mean(_reduce_dims(ndim, ax))


def _scaled_channel_mean(t: Tensor, ax: int) -> Tensor:
    """Per-channel mean of ``t`` as ``sum(t / n)``: every term is at most ``max |t| / n`` and every
    partial sum at most ``max |t|``, so it is finite for any finite ``t`` (up to the largest
    float), at the cost of one extra pass and a ``t``-sized temporary."""
    n = t.numel() // t.shape[ax]
    return channel_sum(t / n, ax)


def _finite_channel_mean(t: Tensor, ax: int) -> Tensor:
    """:func:`channel_mean`, finite for every finite ``t``; for the fast path (plain eager).

    Each level of :func:`channel_mean` sums in ``t``'s dtype, so a level of ``k`` values
    overflows once ``|t|`` nears ``max_float / k`` (float32 1e35 over 4096 rows, in (4096, C),
    (4096, C, L) or (N, C, 4096); torch.nn accumulates in float64 on the CPU and stays
    finite). Overflow is rare and shows as a non-finite mean, so the fast mean is kept and
    only a non-finite one is recomputed by :func:`_scaled_channel_mean`. On the CPU one host
    read of the (C,) mean decides: ~2.5 us per forward (measured, torch 2.13, one thread: the
    fast forward at (256, 84) 30.5 -> 33.1 us; forward + backward 1-5% slower at LeNet's four
    BN shapes, the most at (256, 84)). Elsewhere a host read would stall the device queue, so
    the scaled mean is computed and selected with ``torch.where`` (no sync; one extra pass).
    Input that holds inf or NaN has a non-finite mean either way, and its output stays NaN.
    """
    mean = channel_mean(t, ax)  # (C,)
    if t.device.type == "cpu":
        if math.isfinite(float(mean.sum())):  # (a sum of means near max_float may overflow: recomputed, same result)
            return mean
        return _scaled_channel_mean(t, ax)
    return torch.where(torch.isfinite(mean), mean, _scaled_channel_mean(t, ax))


def _finite_channel_mean_composite(t: Tensor, ax: int) -> Tensor:
    """:func:`_finite_channel_mean` with no data-dependent control flow (``torch.func``, tracing,
    TorchScript): the scaled mean is always computed and selected per channel."""
    mean = channel_mean(t, ax)  # (C,)
    return torch.where(torch.isfinite(mean), mean, _scaled_channel_mean(t, ax))


def channel_sum(t: Tensor, ax: int) -> Tensor:
    """Per-channel sum of ``t`` (channel axis ``ax``), shape (C,).

    A contiguous ``(N, C, *spatial)`` tensor is summed as ``(N, C, L)`` over L, then N, and a
    channels-last one as ``(M, C)`` over M: about twice as fast on the CPU as one
    ``sum(dims)`` over the strided dims (measured), and the same sum.
    """
    if t.is_contiguous():
        if ax == t.dim() - 1:
            return t.reshape(-1, t.shape[ax]).sum(0)  # (M, C) -> (C,)
        if ax == 1:
            return t.reshape(t.shape[0], t.shape[1], -1).sum(2).sum(0)  # (N, C, L) -> (N, C) -> (C,)
    return t.sum(_reduce_dims(t.dim(), ax))


def channel_sum_of_squares(t: Tensor, ax: int) -> Tensor:
    """Per-channel sum of ``t * t``, shape (C,).

    For a contiguous ``(N, C, *spatial)`` tensor, ``linalg.vector_norm`` over the flattened
    spatial axis squares and sums in one pass with no temporary of ``t``'s size: ~3x faster
    on the CPU than ``(t * t).sum`` (measured, torch 2.13, (256, 6, 24, 24)).
    """
    if t.is_contiguous() and ax == 1 and t.dim() > 2:
        norms = torch.linalg.vector_norm(t.reshape(t.shape[0], t.shape[1], -1), dim=2)  # (N, C)
        return norms.mul_(norms).sum(0)
    return channel_sum(t * t, ax)


def _plain_eager(*tensors: Optional[Tensor]) -> bool:
    """True where the fast path's custom Function (in-place work buffers, analytic backward)
    may run: plain tensors in plain eager mode. Inside a ``torch.func`` transform, while
    ``torch.export`` / ``torch.compile`` / ``torch.jit.trace`` trace, and for tensor
    subclasses (fake, functional, DTensor, ...), the composite path runs instead."""
    if torch._C._functorch.maybe_current_level() is not None:  # inside grad / vmap / jacrev / ...
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return all(
        t is None
        or (type(t) in (torch.Tensor, torch.nn.Parameter) and not _batched_or_wrapped(t))
        for t in tensors
    )


def _batched_or_wrapped(t: Tensor) -> bool:
    # Gradients batched by autograd.grad(is_grads_batched=True) (batched gradcheck) are legacy
    # batched tensors, seen in the backward with no transform level set.
    f = torch._C._functorch
    return f.is_functorch_wrapped_tensor(t) or f.is_legacy_batchedtensor(t)


# --- the fast path ----------------------------------------------------------------------------


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode normalization with the spec's analytic backward (the fast path).

    Returns ``(y, mean, var, xc)``. ``mean`` and ``var`` (biased, (C,)) are not differentiable:
    they only feed the running statistics. ``xc = x - mean`` is returned only so that the
    backward can save it AS AN OUTPUT of this node: the first-order backward reads it (no
    recomputation, and the input need not be kept alive, as in torch.nn's memory), and a
    differentiable backward computed from it stays connected to ``x`` through this node, whose
    backward maps a gradient of ``xc`` to ``x`` (``dx = dxc - mean(dxc)`` per channel).
    Callers ignore it.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps: float, ax: int):
        n = x.numel() // x.shape[ax]
        bshape = broadcast_shape(x, ax)
        mean = _finite_channel_mean(x, ax)  # (C,) batch mean
        xc = x - mean.view(bshape)  # x - mu, x's shape
        var = channel_sum_of_squares(xc, ax).div_(n)  # (C,) biased variance, two-pass: no E[x^2]-E[x]^2 cancellation
        work = torch.empty_like(xc)
        inv_std = (var + eps).rsqrt_()  # (C,)
        scale = inv_std if gamma is None else gamma * inv_std  # (C,) gamma / sqrt(var + eps)
        if beta is None:
            y = torch.mul(xc, scale.view(bshape), out=work)
        elif xc.dim() == 2 and ax == 1:
            y = torch.addcmul(beta, xc, scale, out=work)  # (N, C): one pass
        else:
            # Not torch.addcmul(beta, xc, scale): with a broadcast first operand over spatial
            # axes it is ~2x slower on the CPU than these two passes (measured, torch 2.13).
            y = torch.mul(xc, scale.view(bshape), out=work).add_(beta.view(bshape))
        ctx.save_for_backward(xc, inv_std, gamma)  # xc is an output: saved with this node as its grad_fn
        ctx.eps, ctx.ax = eps, ax
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # unused outputs get None, not a zero tensor of x's size
        return y, mean, var, xc

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, dxc):
        xc, inv_std, gamma = ctx.saved_tensors
        ax = ctx.ax
        need_x, need_gamma, need_beta = ctx.needs_input_grad[:3]
        bshape = broadcast_shape(xc, ax)
        dx = dgamma = dbeta = None
        if dy is not None:
            if torch.is_grad_enabled() or not _plain_eager(dy):
                # A graph of the gradient was requested (create_graph=True), or the backward runs
                # under a transform (batched gradients): the same formula as differentiable ops
                # of the saved x - mu (an output of this node, so connected to x) and gamma.
                dx, dgamma, dbeta = _grad_composite(xc, gamma, dy, ctx.eps, ax)
            else:
                n = xc.numel() // inv_std.numel()
                dbeta = channel_sum(dy, ax)  # (C,) sum dy
                work = dy * xc  # x's shape; reused for dx below
                dgamma = channel_sum(work, ax).mul_(inv_std)  # (C,) sum dy * xhat
                if need_x:
                    k1 = inv_std if gamma is None else gamma * inv_std  # gamma / sigma
                    # dx = k1 dy - (k1 / n) dbeta - (k1 / n) xhat dgamma, with xhat = xc * inv_std:
                    k1n = k1 / -n
                    k2 = k1n * inv_std * dgamma  # coefficient of xc
                    k3 = k1n * dbeta  # constant per channel
                    dx = torch.mul(dy, k1.view(bshape), out=work).add_(k3.view(bshape)).addcmul_(xc, k2.view(bshape))
        if dxc is not None and need_x:  # a gradient reaching x - mu itself (double backward)
            from_xc = dxc - channel_mean(dxc, ax).view(bshape)
            dx = from_xc if dx is None else dx + from_xc
        return (
            dx if need_x else None,
            dgamma if (gamma is not None and need_gamma) else None,
            dbeta if need_beta else None,
            None,
            None,
        )


# --- the composite path (TorchScript-compatible) ------------------------------------------------


def _stats(x: Tensor, eps: float, ax: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mean, xc, var, inv_std)`` of a training batch, two-pass, differentiable."""
    bshape = broadcast_shape(x, ax)
    mean = _finite_channel_mean_composite(x, ax)  # (C,)
    xc = x - mean.view(bshape)  # x's shape
    var = channel_mean(xc * xc, ax)  # (C,) biased
    return mean, xc, var, torch.rsqrt(var + eps)


def _composite_train(x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                     ax: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, biased var)`` of a training batch as plain differentiable ops."""
    bshape = broadcast_shape(x, ax)
    mean, xc, var, inv_std = _stats(x, eps, ax)
    y = xc * inv_std.view(bshape)  # xhat
    if gamma is not None:
        y = y * gamma.view(bshape)
    if beta is not None:
        y = y + beta.view(bshape)
    return y, mean.detach(), var.detach()


def _grad_composite(xc: Tensor, gamma: Optional[Tensor], dy: Tensor, eps: float,
                    ax: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dgamma, dbeta)`` of the training forward, by the analytic formula written with
    differentiable ops of ``xc = x - mean(x)``, ``gamma`` and ``dy`` (so its own derivatives
    are right; the fast path's node maps a gradient of ``xc`` on to ``x``)."""
    bshape = broadcast_shape(xc, ax)
    n = xc.numel() // xc.shape[ax]
    var = channel_mean(xc * xc, ax)  # (C,) biased variance (xc has zero mean per channel)
    inv_std = torch.rsqrt(var + eps)
    xhat = xc * inv_std.view(bshape)
    dims = _reduce_dims(xc.dim(), ax)
    dbeta = dy.sum(dims)
    dgamma = (dy * xhat).sum(dims)
    k = inv_std if gamma is None else gamma * inv_std  # gamma / sigma
    dx = (k / n).view(bshape) * (n * dy - dbeta.view(bshape) - xhat * dgamma.view(bshape))
    return dx, dgamma, dbeta


def _is_half(x: Tensor) -> bool:
    return x.dtype == torch.float16 or x.dtype == torch.bfloat16


def _check_training_values(x: Tensor, ax: int) -> int:
    """Values per channel ``n`` of a training batch; raises for ``n == 1`` (0 is an empty batch)."""
    channels = x.shape[ax]
    n = x.numel() // channels if channels > 0 else 0
    if n == 1:
        # One value per channel has no spread (y == beta) and its unbiased variance is 0/0.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    return n


def normalize_train(x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                     ax: int) -> Tuple[Tensor, Tensor, Tensor, int]:
    """``(y, mean, biased var, n)`` of a training-mode forward; no state. ``mean``/``var`` are
    only meaningful for ``n > 0`` (an empty batch has no statistics)."""
    n = _check_training_values(x, ax)
    bshape = broadcast_shape(x, ax)
    compute = torch.float32 if _is_half(x) else x.dtype  # half types: the whole computation in float32
    xs = x.to(compute)
    g = None if gamma is None else gamma.to(compute)
    b = None if beta is None else beta.to(compute)
    if n == 0:  # empty batch: empty output (still connected to gamma and beta), no statistics
        y = xs
        if g is not None:
            y = y * g.view(bshape)
        if b is not None:
            y = y + b.view(bshape)
        stats = torch.zeros(x.shape[ax], dtype=compute, device=x.device)
        return y.to(x.dtype), stats, stats, n
    if not torch.jit.is_scripting():  # (nested: TorchScript skips this block, not a call in an `and`)
        if _plain_eager(xs, g, b):
            y, mean, var, _ = _BatchNormTrain.apply(xs, g, b, float(eps), ax)
            return y.to(x.dtype), mean, var, n
    y, mean, var = _composite_train(xs, g, b, float(eps), ax)
    return y.to(x.dtype), mean, var, n


def normalize_eval(x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], mean: Tensor, var: Tensor,
                    eps: float, ax: int) -> Tensor:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` with fixed (C,) statistics (eval mode)."""
    compute = torch.float32 if _is_half(x) else x.dtype
    bshape = broadcast_shape(x, ax)
    inv_std = torch.rsqrt(var.detach().to(compute) + eps)  # (C,)
    scale = inv_std if gamma is None else gamma.to(compute) * inv_std  # (C,)
    # Subtract first, then scale: folding the mean into one shift, x * scale + (beta - mean * scale),
    # cancels catastrophically when |mean| is large compared with the spread (the eval twin of
    # the one-pass variance problem).
    xc = x.to(compute) - mean.detach().to(compute).view(bshape)  # x's shape
    y = xc * scale.view(bshape)
    if beta is not None:
        y = y + beta.to(compute).view(bshape)
    return y.to(x.dtype)


def running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, n: int, decay: float,
                    unbiased: bool) -> Tuple[Tensor, Tensor]:
    """NEW running statistics from a batch's ``mean`` and biased ``var`` over ``n >= 2`` values,
    in the running tensors' own dtype (the arguments are not written; the result is detached:
    the running statistics are state, not part of the autograd graph)."""
    mean, var = mean.detach(), var.detach()
    s2 = var * (n / (n - 1)) if unbiased else var  # estimator fed to the average
    # decay * old + (1 - decay) * batch, as old + (1 - decay) * (batch - old): one op
    new_mean = torch.lerp(running_mean.detach().to(mean.dtype), mean, 1.0 - decay)
    new_var = torch.lerp(running_var.detach().to(var.dtype), s2, 1.0 - decay)
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)  # no-op when dtypes agree
