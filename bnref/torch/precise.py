"""Precise BatchNorm statistics for any torch module: :func:`precise_bn`.

The running averages a BN layer keeps are an EMA of batch statistics taken while the weights
moved; :func:`precise_bn` recomputes them with the weights fixed, over ``batches``, for every BN
layer of ``model`` (torch.nn's ``BatchNorm*d`` and ``SyncBatchNorm``, bnref's layers: anything
derived from ``torch.nn.modules.batchnorm._BatchNorm`` that tracks running statistics), in one
of the two variants :mod:`bnref.spec` defines:

- ``"population"`` (:func:`bnref.spec.population_stats`): the exact mean and biased variance of
  each layer's input over all the batches' values, the layers below in evaluation mode with
  their new statistics, as inference sees them; bottom-up, one pass per layer (each pass stops
  the forward at the layer it measures).
- ``"batch_average"`` (:func:`bnref.spec.batch_average_stats`, what
  ``torch.optim.swa_utils.update_bn`` and fvcore's PreciseBN compute): the model in training
  mode, the equally weighted average of each batch's mean and variance, the variance with each
  layer's own running-variance estimator (torch.nn's: unbiased); one pass.

Statistics are accumulated in float64 (each batch's count, mean and sum of squared deviations,
merged exactly by :func:`bnref.spec.merge_stats`: no ``E[x^2] - E[x]^2`` cancellation). The model's mode, its other buffers and
``num_batches_tracked`` are left as they were; only ``running_mean`` and ``running_var`` change,
and only when the whole computation succeeds: on any error every BN layer's statistics and the
modules' modes are restored before the exception propagates.

A BN layer called more than once per forward (one module shared by two places) is refused, as
:mod:`bnref.convert` refuses it: its one pair of running statistics would have to describe two
different inputs, and each variant would silently measure something else (the population pass
stops at the first call, the batch average mixes both).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np
import torch
from torch import nn

from bnref import spec
from bnref._progress import bar
from bnref.torch.layers import running_var_estimator

__all__ = ["VARIANTS", "precise_bn", "bn_layers"]

#: the variants, the default first
VARIANTS = spec.PRECISE_VARIANTS


def bn_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every BN layer of ``model`` that keeps running statistics."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]  # fmt: skip


class _Stop(Exception):
    """Raised by a hook to end a forward pass at the layer being measured."""


_ACCEPTED = ("a batch must be a torch.Tensor or a NumPy array of inputs, or a tuple/list whose first item is one "
             "(inputs, targets)")  # fmt: skip


def _inputs(batch, k: int, device, dtype):
    """Batch ``k``'s inputs as a tensor on ``device``. A NumPy array is converted, a floating one
    to the model's floating dtype (``dtype``); a tensor is used as it is. Anything else (a dict
    of features, a list of numbers) is refused: the model is called as ``model(inputs)``."""
    x = _check_batch(batch, k)
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)
    return x.to(device)


def _check_batch(batch, k: int):
    """Batch ``k``'s inputs (``batch`` or its first item), a tensor or a numeric NumPy array;
    ``ValueError`` saying what is accepted otherwise. Run on every item of a list before any work."""
    x = batch[0] if isinstance(batch, (list, tuple)) and len(batch) > 0 else batch  # (inputs, targets) pairs
    where = f"batch {k}{'[0]' if x is not batch else ''}"
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise ValueError(f"precise_bn: {where} is a NumPy array of {x.dtype}, not numbers; {_ACCEPTED}")
        return x
    if not isinstance(x, torch.Tensor):
        what = "a dict" if isinstance(x, Mapping) else f"a {type(x).__name__}"
        raise ValueError(f"precise_bn: {where} is {what}; {_ACCEPTED}")
    return x


def _channel_moments(x: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """``(n, mean, M2)`` per channel (axis 1) in float64: count, mean, sum of squared deviations."""
    x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # (C, n)
    mean = x.mean(1)
    return x.shape[1], mean, ((x - mean[:, None]) ** 2).sum(1)


def _unbiased(m: nn.Module) -> bool:
    """Whether the layer feeds the unbiased batch variance into its running average."""
    return running_var_estimator(m) == "unbiased"


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable, *, variant: str = "population",
               progress: bool = False) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Recompute the running statistics of every BN layer of ``model`` over ``batches``, in place.

    ``batches``: the inputs (tensors, or ``(inputs, ...)`` tuples as a DataLoader yields), moved to
    the model's device; NumPy arrays are accepted too and converted (a floating array to the
    model's floating dtype). The model is called as ``model(inputs)``: a dict of features is not
    a batch here (``ValueError``; wrap such a model so that it takes one tensor). ``"population"``
    goes over them once per BN layer, so they must be re-iterable (a list, a DataLoader), not a
    one-shot iterator. ``variant``: ``"population"`` or ``"batch_average"`` (see the module
    docstring). ``progress``: a progress bar over the batches.

    Returns ``{layer name: (running_mean, running_var)}``, the new statistics. Raises
    ``ValueError`` before changing anything when the variant is unknown, the model has no BN
    layer, there are no batches, a one-shot iterator is given for ``"population"``, or a batch of
    a list is neither a tensor nor an array; and, after restoring the statistics and modes, when a
    BN layer is never called by the model's forward or called more than once per forward (a
    shared layer), when a batch has fewer than 2 values per channel (``"batch_average"``: each
    batch's variance needs 2) or all batches together have fewer than 2 (``"population"``), or
    when anything else fails (the model's own errors propagate as they are).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    layers = bn_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics")
    if variant == "population" and iter(batches) is batches:
        raise ValueError("the population variant goes over the batches once per BN layer: pass a list or a "
                         "DataLoader, not a one-shot iterator")  # fmt: skip
    if variant == "batch_average":
        batches = list(batches)
    if not any(True for _ in batches):
        raise ValueError("precise BN needs at least one batch")
    if isinstance(batches, (list, tuple)):  # cheap to check all before any work; a DataLoader is checked as it yields
        for k, batch in enumerate(batches):
            _check_batch(batch, k)
    param = next(model.parameters(), None)
    device = param.device if param is not None else layers[0][1].running_mean.device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), layers[0][1].running_mean.dtype)
    feed = lambda batch, k: _inputs(batch, k, device, dtype)  # noqa: E731
    saved = {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for name, m in layers}
    was_training = {m: m.training for m in model.modules()}
    try:
        if variant == "batch_average":
            new = _batch_average(model, layers, batches, feed, progress)
        else:
            new = _population(model, layers, batches, feed, progress)
    except BaseException:
        for name, m in layers:
            m.running_mean.copy_(saved[name][0]), m.running_var.copy_(saved[name][1])
        raise
    finally:
        for m, t in was_training.items():
            m.training = t
        for name, m in layers:
            m.num_batches_tracked.copy_(saved[name][2])
    for name, m in layers:
        m.running_mean.copy_(new[name][0]), m.running_var.copy_(new[name][1])
    return {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers}


def _batch_average(model, layers, batches, feed, progress):
    model.eval()  # the probe must not move the running statistics
    _call_order(model, layers, feed(batches[0], 0))  # refuses shared and uncalled layers before any update
    sums: Dict[str, list] = {}
    calls: Dict[str, int] = {}  # this forward's calls per layer

    def hook(name):
        def pre(module, args):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:  # a forward that calls it twice on some batch only (data-dependent control flow)
                raise _shared(name, calls[name])
            n, mean, m2 = _channel_moments(args[0])
            if n < 2:
                raise ValueError(f"layer {name!r} got {n} value(s) per channel; a batch variance needs at least 2")
            var = m2 / (n - 1) if _unbiased(module) else m2 / n
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0], s[1], s[2] = s[0] + 1, s[1] + mean, s[2] + var

        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
    try:
        model.train()
        for k, batch in enumerate(bar(batches, "precise BN (batch average)", progress)):
            calls.clear()
            model(feed(batch, k))
    finally:
        for h in handles:
            h.remove()
    _check_called(layers, sums)
    return {name: (sums[name][1] / sums[name][0], sums[name][2] / sums[name][0]) for name, _ in layers}


def _population(model, layers, batches, feed, progress):
    model.eval()
    order = _call_order(model, layers, feed(next(iter(batches)), 0))
    new = {}
    for k, (name, m) in enumerate(order, start=1):
        moments: List[tuple] = []

        def pre(module, args, moments=moments):
            n, mean, m2 = _channel_moments(args[0])
            moments.append((n, mean.cpu().numpy(), m2.cpu().numpy()))
            raise _Stop  # nothing above this layer is needed for its statistics

        handle = m.register_forward_pre_hook(pre)
        try:
            for j, batch in enumerate(bar(batches, f"precise BN (layer {k}/{len(order)}: {name})", progress)):
                try:
                    model(feed(batch, j))
                except _Stop:
                    pass
        finally:
            handle.remove()
        total = sum(n for n, _, _ in moments)
        if total < 2:  # one value per channel has no variance: a running_var of exactly 0 would be made up
            raise ValueError(f"layer {name!r} got {total} value(s) per channel over all batches; a population "
                             "variance needs at least 2")  # fmt: skip
        _, mean, var = spec.merge_stats(*zip(*moments))  # exact, with counts; biased: the population's variance
        m.running_mean.copy_(torch.from_numpy(mean)), m.running_var.copy_(torch.from_numpy(var))
        new[name] = (m.running_mean.clone(), m.running_var.clone())
    return new


def _call_order(model, layers, x) -> List[Tuple[str, nn.Module]]:
    """The BN layers in the order the model's forward calls them (the bottom-up order)."""
    seen: Dict[str, nn.Module] = {}
    calls: Dict[str, int] = {}

    def hook(name):
        def pre(module, args):  # returns None: a pre-hook's return value would replace the input
            seen.setdefault(name, module)
            calls[name] = calls.get(name, 0) + 1

        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    _check_called(layers, seen)
    shared = [(name, k) for name, k in calls.items() if k > 1]
    if shared:
        raise _shared(*shared[0])
    return list(seen.items())


def _shared(name: str, k: int) -> ValueError:
    return ValueError(f"BN layer {name!r} is called {k} times per forward (a shared layer): its one pair of running "
                      "statistics cannot describe each call's input; precise BN refuses shared BN layers, as "
                      "bnref.convert does (give each call its own layer)")  # fmt: skip


def _check_called(layers, seen) -> None:
    missing = [name for name, _ in layers if name not in seen]
    if missing:
        raise ValueError(f"BN layer(s) {missing} are never called by the model's forward: no statistics to compute")
