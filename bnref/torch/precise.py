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
``num_batches_tracked`` are left as they were; only ``running_mean`` and ``running_var`` change.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from bnref import spec

__all__ = ["VARIANTS", "precise_bn", "bn_layers"]

#: the variants, the default first
VARIANTS = ("population", "batch_average")


def bn_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every BN layer of ``model`` that keeps running statistics."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]  # fmt: skip


class _Stop(Exception):
    """Raised by a hook to end a forward pass at the layer being measured."""


def _inputs(batch, device):
    x = batch[0] if isinstance(batch, (list, tuple)) else batch  # (inputs, targets) pairs, as update_bn takes
    return x.to(device)


def _channel_moments(x: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """``(n, mean, M2)`` per channel (axis 1) in float64: count, mean, sum of squared deviations."""
    x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # (C, n)
    mean = x.mean(1)
    return x.shape[1], mean, ((x - mean[:, None]) ** 2).sum(1)


def _unbiased(m: nn.Module) -> bool:
    """Whether the layer feeds the unbiased batch variance into its running average."""
    return getattr(m, "_running_var_estimator", "unbiased") == "unbiased"  # torch.nn's layers: always


def _bar(batches, desc: str, progress: bool):
    if not progress:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, leave=False, unit="batch", disable=None)


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable, *, variant: str = "population",
               progress: bool = False) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Recompute the running statistics of every BN layer of ``model`` over ``batches``, in place.

    ``batches``: the inputs (tensors, or ``(inputs, ...)`` tuples as a DataLoader yields), moved to
    the model's device; ``"population"`` goes over them once per BN layer, so they must be
    re-iterable (a list, a DataLoader), not a one-shot iterator. ``variant``: ``"population"`` or
    ``"batch_average"`` (see the module docstring). ``progress``: a progress bar over the batches.

    Returns ``{layer name: (running_mean, running_var)}``, the new statistics. Raises
    ``ValueError`` before changing anything when the variant is unknown, the model has no BN
    layer, there are no batches, or a one-shot iterator is given for ``"population"``; and, after
    restoring the statistics, when a BN layer is never called by the model's forward.
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
    param = next(model.parameters(), None)
    device = param.device if param is not None else layers[0][1].running_mean.device
    saved = {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for name, m in layers}
    was_training = {m: m.training for m in model.modules()}
    try:
        if variant == "batch_average":
            new = _batch_average(model, layers, batches, device, progress)
        else:
            new = _population(model, layers, batches, device, progress)
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


def _batch_average(model, layers, batches, device, progress):
    sums: Dict[str, list] = {}

    def hook(name):
        def pre(module, args):
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
        for batch in _bar(batches, "precise BN (batch average)", progress):
            model(_inputs(batch, device))
    finally:
        for h in handles:
            h.remove()
    _check_called(layers, sums)
    return {name: (sums[name][1] / sums[name][0], sums[name][2] / sums[name][0]) for name, _ in layers}


def _population(model, layers, batches, device, progress):
    model.eval()
    order = _call_order(model, layers, _inputs(next(iter(batches)), device))
    new = {}
    for k, (name, m) in enumerate(order, start=1):
        moments: List[tuple] = []

        def pre(module, args, moments=moments):
            n, mean, m2 = _channel_moments(args[0])
            moments.append((n, mean.cpu().numpy(), m2.cpu().numpy()))
            raise _Stop  # nothing above this layer is needed for its statistics

        handle = m.register_forward_pre_hook(pre)
        try:
            for batch in _bar(batches, f"precise BN (layer {k}/{len(order)}: {name})", progress):
                try:
                    model(_inputs(batch, device))
                except _Stop:
                    pass
        finally:
            handle.remove()
        _, mean, var = spec.merge_stats(*zip(*moments))  # exact, with counts; biased: the population's variance
        m.running_mean.copy_(torch.from_numpy(mean)), m.running_var.copy_(torch.from_numpy(var))
        new[name] = (m.running_mean.clone(), m.running_var.clone())
    return new


def _call_order(model, layers, x) -> List[Tuple[str, nn.Module]]:
    """The BN layers in the order the model's forward calls them (the bottom-up order)."""
    seen: Dict[str, nn.Module] = {}

    def hook(name):
        def pre(module, args):  # returns None: a pre-hook's return value would replace the input
            seen.setdefault(name, module)

        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    _check_called(layers, seen)
    return list(seen.items())


def _check_called(layers, seen) -> None:
    missing = [name for name, _ in layers if name not in seen]
    if missing:
        raise ValueError(f"BN layer(s) {missing} are never called by the model's forward: no statistics to compute")
