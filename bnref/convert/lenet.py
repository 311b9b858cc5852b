"""bnref's LeNet-BN from its ``state_dict`` alone, and a single BN layer's state.

The layers are known (the table in :mod:`bnref.convert`'s docstring), so no sample is needed:
:func:`lenet_torch_to_flax` and :func:`lenet_flax_to_torch` validate the whole input first
(every key present, no extra key, every shape and value right) and then move each array with
the layouts of :mod:`bnref.convert.layout`, ``fc1``'s inputs in the flatten order of its
(16, 4, 4) map. :func:`batch_norm_torch_to_flax` / :func:`batch_norm_flax_to_torch` do one BN
layer (``weight, bias, running_mean, running_var`` <-> ``params`` ``scale, bias`` and
``batch_stats`` ``mean, var``). NumPy only; torch is imported for ``as_torch=True``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping, Optional

import numpy as np

from bnref.convert.layout import (conv_kernel_to_flax, conv_kernel_to_torch, dense_kernel_to_flax, dense_kernel_to_torch,
                                  flatten_permutation)  # fmt: skip
from bnref.convert.values import _check_keys, _check_shape, _check_values, _count, _to_numpy


CONVS = ("conv1", "conv2")
DENSES = ("fc1", "fc2", "fc3")
BNS = ("bn1", "bn2", "bn3", "bn4")
ORDER = ("conv1", "bn1", "conv2", "bn2", "fc1", "bn3", "fc2", "bn4", "fc3")  # torch's state_dict order
_FEATURE_HW = (4, 4)  # conv2's output map after the second pool, for 28x28 inputs


def lenet_shapes(bn: bool = True) -> Dict[str, tuple]:
    """The torch state_dict shapes of LeNet-BN (without ``num_batches_tracked``)."""
    shapes = {
        "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
        "fc1.weight": (120, 256), "fc1.bias": (120,),
        "fc2.weight": (84, 120), "fc2.bias": (84,),
        "fc3.weight": (10, 84), "fc3.bias": (10,),
    }  # fmt: skip
    if bn:
        for name, c in zip(BNS, (6, 16, 120, 84)):
            for field in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{name}.{field}"] = (c,)
    return shapes


def _has_bn(keys) -> bool:
    return any(k.startswith("bn") for k in keys)


_FC1_PERM = flatten_permutation(16, 16 * _FEATURE_HW[0] * _FEATURE_HW[1])  # LeNet: (16, 4, 4) -> 256


def lenet_torch_to_flax(state_dict: Mapping) -> Dict[str, Dict]:
    """A LeNet-BN torch ``state_dict`` (bnref's or torch.nn's BN) -> Flax variables.

    Returns ``{"params": {...}, "batch_stats": {...}}`` of NumPy arrays
    (``batch_stats`` is absent for a LeNet without BN). Raises ``ValueError`` naming
    the key for a missing, extra or misshapen entry.
    """
    where = "torch_to_flax"
    keys = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    bn = _has_bn(keys)
    shapes = lenet_shapes(bn)
    _check_keys(keys, shapes, where)
    extra_counters = [k for k in state_dict if k.endswith("num_batches_tracked") and k.split(".")[0] not in (BNS if bn else ())]
    if extra_counters:
        raise ValueError(f"{where}: unexpected key {extra_counters[0]!r}")
    for k in state_dict:
        if k.endswith("num_batches_tracked"):
            _count(state_dict[k], repr(k), where)
    sd = {k: _to_numpy(state_dict[k]) for k in keys}
    for k in keys:
        _check_shape(k, sd[k], shapes[k], where)
        _check_values(repr(k), sd[k], where, variance=k.endswith("running_var"))
    params, stats = {}, {}
    for name in CONVS:
        params[name] = {"kernel": conv_kernel_to_flax(sd[f"{name}.weight"]), "bias": sd[f"{name}.bias"]}
    for name in DENSES:
        w = sd[f"{name}.weight"]
        params[name] = {"kernel": dense_kernel_to_flax(w, _FC1_PERM if name == "fc1" else None), "bias": sd[f"{name}.bias"]}
    if bn:
        for name in BNS:
            layer = batch_norm_torch_to_flax(sd, prefix=f"{name}.")
            params[name], stats[name] = layer["params"], layer["batch_stats"]
    return {"params": params, "batch_stats": stats} if bn else {"params": params}


def lenet_flax_to_torch(variables: Mapping, *, num_batches_tracked: int = 0, as_torch: bool = False) -> "OrderedDict":
    """Flax LeNet-BN variables -> a torch ``state_dict`` (bnref's and torch.nn's keys).

    ``num_batches_tracked`` (Flax keeps no counter) is written into every BN layer; pass
    the torch model's own count to make torch -> flax -> torch the identity. With
    ``as_torch=True`` the values are torch tensors, ready for ``load_state_dict``.
    """
    where = "flax_to_torch"
    num_batches_tracked = _count(num_batches_tracked, "num_batches_tracked", where)
    if "params" not in variables:
        raise ValueError(f"{where}: missing collection 'params'")
    extra = sorted(set(variables) - {"params", "batch_stats"})
    if extra:
        raise ValueError(f"{where}: unexpected collection {extra[0]!r}")
    params = variables["params"]
    bn = _has_bn(params)
    expected_params = {f"{n}/{f}" for n in CONVS + DENSES for f in ("kernel", "bias")}
    expected_params |= {f"{n}/{f}" for n in (BNS if bn else ()) for f in ("scale", "bias")}
    flat = {f"{n}/{f}": v for n, layer in params.items() for f, v in _items(layer, f"params/{n}", where)}
    _check_keys(flat, expected_params, f"{where}: params")
    stats = variables.get("batch_stats", {})
    if bn and "batch_stats" not in variables:
        raise ValueError(f"{where}: missing collection 'batch_stats'")
    flat_stats = {f"{n}/{f}": v for n, layer in stats.items() for f, v in _items(layer, f"batch_stats/{n}", where)}
    _check_keys(flat_stats, {f"{n}/{f}" for n in (BNS if bn else ()) for f in ("mean", "var")}, f"{where}: batch_stats")
    shapes = lenet_shapes(bn)
    out = OrderedDict()
    for name in ORDER:
        if name in BNS:
            if bn:
                layer = {"params": params[name], "batch_stats": stats[name]}
                c = shapes[f"{name}.weight"][0]
                out.update(batch_norm_flax_to_torch(layer, prefix=f"{name}.", num_batches_tracked=num_batches_tracked, channels=c))
            continue
        k = _to_numpy(params[name]["kernel"])
        if name in CONVS:
            o, i, kh, kw = shapes[f"{name}.weight"]
            _check_shape(f"params/{name}/kernel", k, (kh, kw, i, o), where)
            w = conv_kernel_to_torch(k)
        else:
            o, i = shapes[f"{name}.weight"]
            _check_shape(f"params/{name}/kernel", k, (i, o), where)
            w = dense_kernel_to_torch(k, _FC1_PERM if name == "fc1" else None)
        _check_values(f"params/{name}/kernel", k, where)
        b = _to_numpy(params[name]["bias"])
        _check_shape(f"params/{name}/bias", b, shapes[f"{name}.bias"], where)
        _check_values(f"params/{name}/bias", b, where)
        out[f"{name}.weight"], out[f"{name}.bias"] = np.ascontiguousarray(w), b
    return _as_torch(out) if as_torch else out


def batch_norm_torch_to_flax(state_dict: Mapping, prefix: str = "") -> Dict[str, Dict[str, np.ndarray]]:
    """One torch BN layer's state (``weight, bias, running_mean, running_var`` under
    ``prefix``) -> ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``.

    Hyper-parameters translate too, but are not state: torch ``momentum=m`` is Flax
    ``momentum=1-m`` (``bnref.spec.Convention.from_torch(m).flax_momentum``).
    """
    where = "batch_norm_torch_to_flax"
    names = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
    arrays = {}
    for field in names:
        key = prefix + field
        if key not in state_dict:
            raise ValueError(f"{where}: missing key {key!r}")
        arrays[field] = _to_numpy(state_dict[key])
    channels = arrays["weight"].shape
    for field, a in arrays.items():
        if a.ndim != 1 or a.shape != channels:
            raise ValueError(f"{where}: {prefix + field!r} has shape {a.shape}, expected {channels} like {prefix}weight")
        _check_values(repr(prefix + field), a, where, variance=field == "running_var")
    if prefix + "num_batches_tracked" in state_dict:
        _count(state_dict[prefix + "num_batches_tracked"], repr(prefix + "num_batches_tracked"), where)
    out = {"params": {}, "batch_stats": {}}
    for field, (collection, name) in names.items():
        out[collection][name] = arrays[field]
    return out


def batch_norm_flax_to_torch(
    variables: Mapping, prefix: str = "", num_batches_tracked: int = 0, channels: Optional[int] = None
) -> "OrderedDict":
    """One Flax BN layer's ``{"params": {scale, bias}, "batch_stats": {mean, var}}`` -> torch
    state (``weight, bias, running_mean, running_var, num_batches_tracked`` under ``prefix``)."""
    where = "batch_norm_flax_to_torch"
    fields = (("params", "scale", "weight"), ("params", "bias", "bias"), ("batch_stats", "mean", "running_mean"), ("batch_stats", "var", "running_var"))
    num_batches_tracked = _count(num_batches_tracked, "num_batches_tracked", where)
    out = OrderedDict()
    for collection, name, torch_name in fields:
        key = "/".join(p for p in (collection, prefix.rstrip("."), name) if p)  # no '//' for a bare layer
        try:
            a = _to_numpy(variables[collection][name])
        except (KeyError, TypeError):
            raise ValueError(f"{where}: missing {key}") from None
        if a.ndim != 1 or (channels is not None and a.shape != (channels,)):
            expected = f"({channels},)" if channels is not None else "a vector (channels,)"
            raise ValueError(f"{where}: {key} has shape {a.shape}, expected {expected}")
        _check_values(key, a, where, variance=name == "var")
        out[prefix + torch_name] = a
    if len({a.shape for a in out.values()}) != 1:
        raise ValueError(f"{where}: {prefix.rstrip('.') or 'the layer'}'s arrays disagree in shape: "
                         f"{[a.shape for a in out.values()]}")  # fmt: skip
    out[prefix + "num_batches_tracked"] = np.array(num_batches_tracked, dtype=np.int64)
    return out


def _items(layer, where_key: str, where: str):
    if not isinstance(layer, Mapping):
        raise ValueError(f"{where}: {where_key!r} is not a mapping of arrays")
    return layer.items()


def _as_torch(sd: "OrderedDict") -> "OrderedDict":
    import torch

    return OrderedDict((k, torch.from_numpy(np.array(v, order="C"))) for k, v in sd.items())  # keeps 0-d counters 0-d
