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
#
# Memory is torch.nn's (tests/test_torch_memory.py): the forward makes one tensor of x's size,
# y; the Function saves the input x itself (which its caller holds anyway) and the (C,) mean and
# 1 / sigma; the backward makes one tensor of x's size, dx, and recomputes x - mu. Inputs up to
# _WHOLE elements run whole-tensor ops, each written over y's or dx's own buffer; larger ones go
# slab by slab (_Slabs), which costs a few Python calls per slab and saves passes over memory.
# Slabs are for CPU caches: on an accelerator a slab's kernels would cost more to launch than
# to run, and the whole-tensor ops hold the same y and dx (but for a square's temporary in the
# variance of layouts other than contiguous NCHW, and a half input's float32 copies).


#: CPU inputs of more elements run slab by slab (4 Mi elements: 16 MiB of float32, where x, dy and
#: dx no longer fit a 32 MiB L3 cache; below it whole-tensor ops measured faster, above it slabs).
_WHOLE = 1 << 22
#: Elements per slab (1 MiB of float32: one slab's temporaries stay in a 1-2 MiB L2 cache).
_SLAB = 1 << 18
#: Up to this many elements (128 KiB of float32) the whole-tensor backward takes a second buffer
#: rather than a second pass (Python's per-call overhead is what counts there).
_SMALL = 1 << 15


def _by_slabs(x: Tensor) -> bool:
    return x.numel() > _WHOLE and x.device.type == "cpu"


class _Slabs:
    """A large input cut into slabs of about :data:`_SLAB` elements, for element-wise loops whose
    temporaries are one slab (allocated once per call and reused) and whose passes find the
    slab still in cache, so that each tensor of x's size is read or written once per loop.

    A contiguous ``(N, C, *spatial)`` input (with ``dy``, when given, contiguous too:
    ``by_rows``) is cut as its ``(N * C, L)`` rows; per-row reductions over L go into an
    ``(N * C,)`` buffer then reduced over N, :func:`channel_sum`'s own order: the same numbers
    as the whole-tensor reductions. Any other layout is cut along axis 0 (axis 1 when that is
    the channel axis) and the slabs' (C,) channel sums are added (the same sum, reassociated).

    Measured (torch 2.13, CPU, one thread, (64, 64, 128, 128) float32): ``sum dy * (x - mu)``
    slab by slab 33-47 ms, ``(dy * (x - mu)).sum`` 203 ms, most of it faulting in the
    product's 256 MiB. A new temporary for each slab is no substitute for one reused buffer:
    the small allocations between them split the freed chunks and the process grew ~230 MiB.
    """

    def __init__(self, x: Tensor, ax: int, dy: Optional[Tensor] = None) -> None:
        self.ax = ax
        self.channels = x.shape[ax]
        self.by_rows = ax == 1 and x.dim() > 2 and x.is_contiguous() and (dy is None or dy.is_contiguous())
        if self.by_rows:
            self.shape = [x.shape[0] * x.shape[1], x.numel() // (x.shape[0] * x.shape[1])]  # (N * C, L)
            self.dim = 0
        else:
            self.shape = list(x.shape)
            self.dim = 1 if ax == 0 else 0
        rows = self.shape[self.dim]
        self.step = min(rows, max(1, _SLAB // max(1, x.numel() // rows)))  # rows per slab
        self.count = -(-rows // self.step)
        self.bshape = broadcast_shape(x, ax)

    def split(self, t: Tensor) -> List[Tensor]:
        """The slabs of ``t`` (x's shape and layout), as views."""
        return list((t.view(self.shape) if self.by_rows else t).split(self.step, self.dim))

    def split_channel(self, v: Tensor) -> List[Tensor]:
        """A (C,) vector as one piece per slab that broadcasts against it."""
        if self.by_rows:  # (N * C, 1): row n * C + c is channel c
            return list(v.expand(self.shape[0] // self.channels, self.channels).reshape(-1, 1).split(self.step))
        return [v.view(self.bshape)] * self.count

    def buffer(self, x: Tensor, dtype: torch.dtype) -> List[Tensor]:
        """One temporary the size of the largest slab, in x's layout, as a view per slab."""
        buf = torch.empty_like((x.view(self.shape) if self.by_rows else x).narrow(self.dim, 0, self.step), dtype=dtype)
        last = self.shape[self.dim] - (self.count - 1) * self.step
        return [buf] * (self.count - 1) + [buf.narrow(self.dim, 0, last)]

    def rows(self, like: Tensor) -> Tuple[Optional[Tensor], List[Optional[Tensor]]]:
        """For ``by_rows``: an (N * C,) buffer of per-row reductions and its slabs; else ``None``s."""
        if not self.by_rows:
            return None, [None] * self.count
        rows = like.new_empty(self.shape[0])
        return rows, list(rows.split(self.step))

    def add_sum(self, t: Tensor, row: Optional[Tensor], parts: List[Tensor]) -> None:
        """Slab ``t``'s contribution to a per-channel sum: its rows' sums into ``row`` (``by_rows``),
        else its (C,) channel sum onto ``parts``."""
        if row is not None:
            torch.sum(t, 1, out=row)
        else:
            parts.append(channel_sum(t, self.ax))

    def total(self, rows: Optional[Tensor], parts: List[Tensor]) -> Tensor:
        """The (C,) sum from :meth:`add_sum`'s contributions."""
        if rows is not None:
            return rows.view(-1, self.channels).sum(0)  # (N, C) -> (C,)
        return _add_slab_sums(parts)


def _add_slab_sums(sums: List[Tensor]) -> Tensor:
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum(0)  # (slabs, C) -> (C,)


def _dx_coefficients(inv_std: Tensor, gamma: Optional[Tensor], dgamma: Tensor, dbeta: Tensor,
                     n: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(C,) ``k1, k2, k3`` of ``dx = ((x - mu) k2 + k3) + k1 dy``: the spec's
    ``dx = k1 dy - (k1 / n) dbeta - (k1 / n) xhat dgamma`` with ``xhat = (x - mu) / sigma``."""
    k1 = inv_std if gamma is None else gamma * inv_std  # gamma / sigma
    k1n = k1 / -n
    return k1, k1n * inv_std * dgamma, k1n * dbeta  # k2: coefficient of x - mu; k3: constant per channel


def _forward_whole(xs: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                   ax: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, inv_std)`` in the compute dtype by whole-tensor ops: ``x - mu`` is computed
    into y's buffer and scaled there."""
    n = xs.numel() // xs.shape[ax]
    bshape = broadcast_shape(xs, ax)
    mean = _finite_channel_mean(xs, ax)  # (C,) batch mean
    y = torch.sub(xs, mean.view(bshape))  # x - mu, in y's buffer, x's shape
    var = channel_sum_of_squares(y, ax).div_(n)  # (C,) biased variance, two-pass: no E[x^2]-E[x]^2 cancellation
    inv_std = (var + eps).rsqrt_()  # (C,)
    scale = inv_std if gamma is None else gamma * inv_std  # (C,) gamma / sqrt(var + eps)
    if beta is None:
        y.mul_(scale.view(bshape))
    elif y.dim() == 2 and ax == 1:
        torch.addcmul(beta, y, scale, out=y)  # (N, C): one pass (an element-wise op may write over its input)
    else:
        # Not torch.addcmul(beta, xc, scale): with a broadcast first operand over spatial
        # axes it is ~2x slower on the CPU than these two passes (measured, torch 2.13).
        y.mul_(scale.view(bshape)).add_(beta.view(bshape))
    return y, mean, var, inv_std


def _forward_slabs(x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float, ax: int,
                   compute: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_forward_whole`'s numbers (reassociated sums outside ``by_rows``) slab by slab, ``y``
    in x's dtype: a half input's float32 copy is made only for the mean, and freed before y is
    made. Loop 1: ``sum (x - mu)^2``; loop 2: ``y = (x - mu) * scale + beta``."""
    n = x.numel() // x.shape[ax]
    cut = _Slabs(x, ax)
    mean = _finite_channel_mean(x if x.dtype == compute else x.to(compute), ax)  # (C,)
    xs, ms, tmps = cut.split(x), cut.split_channel(mean), cut.buffer(x, compute)  # tmp: x - mu of one slab
    if cut.by_rows:  # as channel_sum_of_squares: the rows' norms, squared, summed over N
        rows = mean.new_empty(cut.shape[0])  # (N * C,)
        for xi, mi, ti, ri in zip(xs, ms, tmps, rows.split(cut.step)):
            torch.linalg.vector_norm(torch.sub(xi, mi, out=ti), dim=1, out=ri)
        var = rows.mul_(rows).view(-1, cut.channels).sum(0)
    else:
        var = _add_slab_sums([channel_sum(torch.sub(xi, mi, out=ti).square_(), ax) for xi, mi, ti in zip(xs, ms, tmps)])
    var = var.div_(n)  # (C,) biased variance
    inv_std = (var + eps).rsqrt_()  # (C,)
    scales = cut.split_channel(inv_std if gamma is None else gamma * inv_std)
    shifts: List[Optional[Tensor]] = [None] * cut.count if beta is None else list(cut.split_channel(beta))
    y = torch.empty_like(x)  # x's dtype and layout
    two_d = x.dim() == 2 and ax == 1
    for xi, mi, ti, si, bi, yi in zip(xs, ms, tmps, scales, shifts, cut.split(y)):
        t = torch.sub(xi, mi, out=ti)
        if bi is None:
            torch.mul(t, si, out=yi)
        elif two_d:
            torch.addcmul(bi, t, si, out=yi)  # as _forward_whole's (N, C) case
        else:
            torch.add(t.mul_(si), bi, out=yi)
    return y, mean, var, inv_std


def _backward_whole(x: Tensor, dy: Tensor, mean: Tensor, inv_std: Tensor, gamma: Optional[Tensor], ax: int,
                    need_x: bool, compute: torch.dtype) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """``(dx, dgamma, dbeta)`` by whole-tensor ops over dx's buffer: ``x - mu``, times ``dy`` for
    dgamma, then ``x - mu`` again, turned into dx in place. Up to :data:`_SMALL` elements the
    product gets a buffer of its own instead (cheaper than the second subtraction there)."""
    n = x.numel() // x.shape[ax]
    bshape = broadcast_shape(x, ax)
    xs = x if x.dtype == compute else x.to(compute)
    dyc = dy if dy.dtype == compute else dy.to(compute)
    m = mean.view(bshape)
    buf = torch.sub(xs, m)  # x - mu, x's shape: dx's buffer
    prod = buf * dyc if x.numel() <= _SMALL else buf.mul_(dyc)  # dy * (x - mu)
    dbeta = channel_sum(dyc, ax)  # (C,) sum dy
    dgamma = channel_sum(prod, ax).mul_(inv_std)  # (C,) sum dy * xhat
    if not need_x:
        return None, dgamma, dbeta
    k1, k2, k3 = _dx_coefficients(inv_std, gamma, dgamma, dbeta, n)
    xc = buf if prod is not buf else torch.sub(xs, m, out=buf)
    dx = xc.mul_(k2.view(bshape)).add_(k3.view(bshape)).addcmul_(dyc, k1.view(bshape))
    return dx if dx.dtype == x.dtype else dx.to(x.dtype), dgamma, dbeta


def _backward_slabs(x: Tensor, dy: Tensor, mean: Tensor, inv_std: Tensor, gamma: Optional[Tensor], ax: int,
                    need_x: bool, compute: torch.dtype) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """:func:`_backward_whole`'s numbers (reassociated sums outside ``by_rows``) slab by slab, dx in
    x's dtype. Loop 1: ``sum dy`` and ``sum dy * (x - mu)``, with ``x - mu`` kept in dx's buffer;
    loop 2 turns it into dx in place. A half input's dx cannot hold ``x - mu`` in float32: its
    loop 2 recomputes it into a slab."""
    n = x.numel() // x.shape[ax]
    cut = _Slabs(x, ax, dy)
    half = x.dtype != compute
    xs, dys, ms = cut.split(x), cut.split(dy), cut.split_channel(mean)
    dx = torch.empty_like(x) if need_x else None  # x's dtype and layout
    dxs = cut.split(dx) if dx is not None else [None] * cut.count
    tmps = cut.buffer(x, compute)  # one slab: dy * (x - mu); a half input's x - mu
    xcs = tmps if (half or dx is None) else dxs  # where x - mu goes
    dyfs = cut.buffer(x, compute) if half else dys  # one slab: a half dy in float32
    rows_dy, row_dy = cut.rows(mean)
    rows_p, row_p = cut.rows(mean)
    parts_dy: List[Tensor] = []
    parts_p: List[Tensor] = []
    for xi, dyi, mi, ci, ti, ui, rdy, rp in zip(xs, dys, ms, xcs, tmps, dyfs, row_dy, row_p):
        dyf = ui.copy_(dyi) if half else dyi
        cut.add_sum(dyf, rdy, parts_dy)
        cut.add_sum(torch.mul(dyf, torch.sub(xi, mi, out=ci), out=ti), rp, parts_p)  # dy * (x - mu)
    dbeta = cut.total(rows_dy, parts_dy)  # (C,) sum dy
    dgamma = cut.total(rows_p, parts_p).mul_(inv_std)  # (C,) sum dy * xhat
    if dx is None:
        return None, dgamma, dbeta
    k1, k2, k3 = (cut.split_channel(k) for k in _dx_coefficients(inv_std, gamma, dgamma, dbeta, n))
    for xi, dyi, mi, ci, ti, ui, dxi, k1i, k2i, k3i in zip(xs, dys, ms, xcs, tmps, dyfs, dxs, k1, k2, k3):
        if half:  # ((x - mu) k2 + k3) + k1 dy in float32, stored in x's dtype
            t = torch.sub(xi, mi, out=ti).mul_(k2i).add_(k3i)
            torch.addcmul(t, ui.copy_(dyi), k1i, out=dxi)
        else:
            dxi.mul_(k2i).add_(k3i).addcmul_(dyi, k1i)  # over x - mu
    return dx, dgamma, dbeta


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode normalization with the spec's analytic backward (the fast path).

    Takes ``x`` in its own dtype (float16/bfloat16 included: the work is in float32, ``compute``)
    and ``gamma``/``beta`` in the compute dtype; returns ``(y, mean, var)``: ``y`` in x's dtype,
    ``mean`` and ``var`` (biased, (C,), compute dtype) not differentiable: they only feed the
    running statistics.

    Memory (the section's comment): the forward makes ``y``, the backward ``dx``, and only the
    input ``x`` and (C,) vectors are saved. At (64, 64, 128, 128) float32 on the CPU (256 MiB)
    forward + backward added 768 MiB of peak memory while ``x - mu`` was saved and separate
    buffers held ``y`` and ``dy * (x - mu)``, 512 MiB now, torch.nn's (:mod:`bnref.torch.memory`).

    A differentiable backward (``create_graph=True``) is computed from the saved ``x`` itself,
    so its graph reaches ``x`` directly.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps: float, ax: int):
        compute = torch.float32 if _is_half(x) else x.dtype
        if _by_slabs(x):
            y, mean, var, inv_std = _forward_slabs(x, gamma, beta, eps, ax, compute)
        elif x.dtype == compute:
            y, mean, var, inv_std = _forward_whole(x, gamma, beta, eps, ax)
        else:
            y, mean, var, inv_std = _forward_whole(x.to(compute), gamma, beta, eps, ax)
            y = y.to(x.dtype)
        ctx.save_for_backward(x, mean, inv_std, gamma)  # x: the input itself, not a copy
        ctx.eps, ctx.ax, ctx.compute = eps, ax, compute
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # unused outputs get None, not a zero tensor of x's size
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, mean, inv_std, gamma = ctx.saved_tensors
        need_x, need_gamma, need_beta = ctx.needs_input_grad[:3]
        if dy is None:
            return None, None, None, None, None
        if torch.is_grad_enabled() or not _plain_eager(dy):
            # A graph of the gradient was requested (create_graph=True), or the backward runs
            # under a transform (batched gradients): the same formula as differentiable ops of
            # the saved x and gamma.
            dx, dgamma, dbeta = _grad_composite(x.to(ctx.compute), gamma, dy.to(ctx.compute), ctx.eps, ctx.ax)
            dx = dx.to(x.dtype)
        elif _by_slabs(x):
            dx, dgamma, dbeta = _backward_slabs(x, dy, mean, inv_std, gamma, ctx.ax, need_x, ctx.compute)
        else:
            dx, dgamma, dbeta = _backward_whole(x, dy, mean, inv_std, gamma, ctx.ax, need_x, ctx.compute)
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


def _grad_composite(x: Tensor, gamma: Optional[Tensor], dy: Tensor, eps: float,
                    ax: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dgamma, dbeta)`` of the training forward, by the analytic formula written with
    differentiable ops of ``x``, ``gamma`` and ``dy`` (so its own derivatives are right: the
    batch statistics are recomputed from ``x``, the fast path's forward's numbers)."""
    bshape = broadcast_shape(x, ax)
    n = x.numel() // x.shape[ax]
    mean, xc, var, inv_std = _stats(x, eps, ax)
    xhat = xc * inv_std.view(bshape)
    dims = _reduce_dims(x.dim(), ax)
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
    g = None if gamma is None else gamma.to(compute)
    b = None if beta is None else beta.to(compute)
    if n == 0:  # empty batch: empty output (still connected to gamma and beta), no statistics
        y = x.to(compute)
        if g is not None:
            y = y * g.view(bshape)
        if b is not None:
            y = y + b.view(bshape)
        stats = torch.zeros(x.shape[ax], dtype=compute, device=x.device)
        return y.to(x.dtype), stats, stats, n
    if not torch.jit.is_scripting():  # (nested: TorchScript skips this block, not a call in an `and`)
        if _plain_eager(x, g, b):
            y, mean, var = _BatchNormTrain.apply(x, g, b, float(eps), ax)  # x itself: the Function upcasts half types
            return y, mean, var, n
    y, mean, var = _composite_train(x.to(compute), g, b, float(eps), ax)
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
