"""Move weights and BN state between a PyTorch model and its Flax port.

Any model made of the usual layers: ``torch_to_flax(torch_module, flax_module, sample_input)``
and ``flax_to_torch(flax_module, variables, torch_module, sample_input)``. Supported layers:
``Conv1d``/``Conv2d`` <-> ``nn.Conv``, ``Linear`` <-> ``nn.Dense``, ``BatchNorm1d/2d/3d`` (torch.nn's,
bnref's, ``SyncBatchNorm``) <-> ``nn.BatchNorm`` / ``bnref.jax.BatchNorm``; anything without
parameters may sit between them (activations, pooling, dropout, flatten). The rules:

1. **Pairing.** Both models run once on ``sample_input`` (torch: NCHW / NCL / NF, as given;
   Flax: the same values channels-last) and their layers are listed in call order. A torch
   layer and a Flax layer pair when their paths agree with dots and slashes read as ``_``
   (torch ``features.0`` = Flax ``features_0``, the name Flax gives the first module of a list
   attribute ``features``; ``block.conv`` = ``block/conv``). The layers left over pair in call
   order when both sides have as many, of the same kinds (Flax's automatic names, ``Conv_0``,
   ``Dense_1``, against a torch ``Sequential``). Otherwise ``ValueError`` lists them.
2. **Layouts.** Conv kernels ``(O, I, *k)`` <-> ``(*k, I, O)`` (OIHW <-> HWIO); dense weights
   ``(out, in)`` <-> kernels ``(in, out)``; ``weight``/``bias`` <-> ``scale``/``bias``;
   ``running_mean``/``running_var`` <-> ``batch_stats`` ``mean``/``var``; ``num_batches_tracked``
   has no Flax counterpart (dropped; kept from the torch module on the way back).
3. **Layer by layer, then flatten order.** torch flattens a (C, H, W) map as ``c*HW + s``, Flax
   an (H, W, C) one as ``s*C + c``. The layers whose inputs are maps convert first; then both
   models run (float64 where they allow it) and every pair's input and output are compared in
   Flax call order, each to the bound of the precision the Flax model computes in up to there.
   A layer fed a flat vector (a Linear, a BatchNorm1d) gets its order only once everything
   called before it agrees: the order the layer before it left when no flatten lies between,
   otherwise the one flatten order (over every factorization C x S of the width) under which
   the two inputs agree. A difference is named where the models part: at the layer whose
   output differs though its input agrees (padding, stride, eps, ...), or between layers
   (activation, pooling, skip connection, channel shuffle); "no flatten order fits",
   "inputs all zero" and "the sample does not decide" are their own messages.
4. **Check.** With ``check=True`` (default) the variables are checked once more in their own
   dtypes; the bound is ``CHECK_RTOL`` of the least precise dtype the Flax model computes or
   stores in (float64 1e-7, float32 1e-4, float16 2e-2, bfloat16 1e-1, relative to the
   largest value). ``check=False`` converts despite a difference, taking, below a difference,
   the flatten of the previous layer's map, but never an order the sample cannot decide.
   Corrupt state (NaN/inf, a negative running variance, non-float arrays) is refused by name;
   ``report=True`` also returns a :class:`ConversionReport` (pairing, input orders, bound).

bnref's own LeNet-BN also converts without a sample, from its ``state_dict``:

PyTorch (``bnref.torch.LeNetBN``, NCHW)             Flax (``bnref.jax.LeNetBN``, NHWC)
-----------------------------------------           --------------------------------------------
``convN.weight``  (O, I, kh, kw)  OIHW       <->    ``params/convN/kernel``  (kh, kw, I, O)  HWIO
``convN.bias``    (O,)                       <->    ``params/convN/bias``    (O,)
``fcN.weight``    (out, in)                  <->    ``params/fcN/kernel``    (in, out)   transposed
``fcN.bias``      (out,)                     <->    ``params/fcN/bias``      (out,)
``bnN.weight`` / ``bnN.bias``                <->    ``params/bnN/scale`` / ``params/bnN/bias``
``bnN.running_mean`` / ``bnN.running_var``   <->    ``batch_stats/bnN/mean`` / ``batch_stats/bnN/var``
``bnN.num_batches_tracked``                  ->     (dropped: Flax keeps no counter)

with ``fc1``'s inputs in the flatten order of rule 3 for its (16, 4, 4) map. Both directions
validate the whole input first (every key present, no extra key, every shape right) and
raise ``ValueError`` naming the first bad key (or value: non-float, NaN/inf, a negative
running variance, a ``num_batches_tracked`` that is not an integer >= 0), so nothing is ever
half converted. Inputs are never modified. Keys are the same for bnref's BN layers and for
torch.nn's / flax.linen's (``bn="builtin"``); :func:`batch_norm_torch_to_flax` /
:func:`batch_norm_flax_to_torch` do a single BN layer.

``import bnref.convert`` imports NumPy only; the model paths import torch and JAX when called.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from typing import Dict, Mapping, NamedTuple, Optional

import numpy as np

__all__ = [
    "torch_to_flax",
    "flax_to_torch",
    "match_layers",
    "torch_layers",
    "flax_layers",
    "flatten_permutation",
    "channels_last",
    "batch_norm_torch_to_flax",
    "batch_norm_flax_to_torch",
    "lenet_shapes",
    "ConversionReport",
    "LayerPair",
    "CHECK_RTOL",
]

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


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor: copy to host without importing torch here
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; ml_dtypes' (JAX's) is the same bits
            import ml_dtypes

            return v.float().numpy().astype(ml_dtypes.bfloat16)  # exact: bf16 -> f32 -> bf16
        v = v.numpy()
    return np.array(v)  # always a copy: the caller's arrays are never shared or modified


def _is_float(dtype) -> bool:
    """NumPy's floating types and ml_dtypes' (bfloat16, float8_*), which NumPy files under 'V'."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8", "float6", "float4"))


def _check_values(key: str, a: np.ndarray, where: str, *, variance: bool = False) -> None:
    """``ValueError`` unless ``a`` is floating and finite (and, for a variance, >= 0). An int64
    weight or a string array is a corrupt checkpoint, not something to cast."""
    if not _is_float(a.dtype):
        raise ValueError(f"{where}: {key} has dtype {a.dtype}, expected a floating-point array")
    v = a.astype(np.float64)
    finite = np.isfinite(v)
    if not finite.all():
        i = np.unravel_index(int(np.argmin(finite)), v.shape) if v.ndim else ()
        what = "NaN" if np.isnan(v[i]) else "inf"
        raise ValueError(f"{where}: {key} holds {what} (at index {tuple(int(j) for j in i)}): the weights are corrupt")
    if variance and v.size and v.min() < 0:
        i = np.unravel_index(int(np.argmin(v)), v.shape)
        raise ValueError(f"{where}: {key} holds a negative variance ({float(v[i]):.3g} at index "
                         f"{tuple(int(j) for j in i)}): a running variance is >= 0, the state is corrupt")  # fmt: skip


def _count(n, what: str, where: str) -> int:
    """A ``num_batches_tracked``: an integer >= 0 (2.7 is refused, not truncated to 2)."""
    a = _to_numpy(n)
    ok = a.ndim == 0 and (a.dtype.kind in "iu" or (a.dtype.kind == "f" and np.isfinite(a) and float(a).is_integer()))
    if not ok or a < 0:
        raise ValueError(f"{where}: {what} is {n!r}, expected a count (an integer >= 0)")
    return int(a)


def _has_bn(keys) -> bool:
    return any(k.startswith("bn") for k in keys)


def _check_keys(found, expected, where: str) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise ValueError(f"{where}: unexpected key {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _check_shape(key: str, a: np.ndarray, shape: tuple, where: str) -> None:
    if a.shape != tuple(shape):
        raise ValueError(f"{where}: {key!r} has shape {a.shape}, expected {tuple(shape)}")


def conv_kernel_to_flax(w: np.ndarray) -> np.ndarray:
    """torch (O, I, *k) -> Flax (*k, I, O): OIHW -> HWIO, OIL -> LIO."""
    return w.transpose(*range(2, w.ndim), 1, 0)


def conv_kernel_to_torch(k: np.ndarray) -> np.ndarray:
    """Flax (*k, I, O) -> torch (O, I, *k)."""
    return k.transpose(k.ndim - 1, k.ndim - 2, *range(k.ndim - 2))


def dense_kernel_to_flax(w: np.ndarray, perm: Optional[np.ndarray] = None) -> np.ndarray:
    """torch (out, in) -> Flax (in, out), the inputs in Flax's order (``perm``: see
    :func:`flatten_permutation`)."""
    return (w if perm is None else w[:, perm]).T


def dense_kernel_to_torch(k: np.ndarray, perm: Optional[np.ndarray] = None) -> np.ndarray:
    """Flax (in, out) -> torch (out, in), the inverse of :func:`dense_kernel_to_flax`."""
    return k.T if perm is None else k.T[:, np.argsort(perm)]


def flatten_permutation(channels: int, features: int) -> np.ndarray:
    """``P`` with ``flax_vector[j] == torch_vector[P[j]]`` when a (C, S...) feature map is
    flattened channels-first by torch (index ``c*S + s``) and channels-last by Flax
    (``s*C + c``), ``features = C*S``."""
    s = features // channels
    return np.arange(features).reshape(channels, s).T.reshape(-1)


_FC1_PERM = flatten_permutation(16, 16 * _FEATURE_HW[0] * _FEATURE_HW[1])  # LeNet: (16, 4, 4) -> 256


def _lenet_torch_to_flax(state_dict: Mapping) -> Dict[str, Dict]:
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


def _lenet_flax_to_torch(variables: Mapping, *, num_batches_tracked: int = 0, as_torch: bool = False) -> "OrderedDict":
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


# --------------------------------------------------------------------------------------------
# Any model: torch_to_flax(torch_module, flax_module, sample_input) and back
# --------------------------------------------------------------------------------------------
#
# The two models are run once each on ``sample_input`` (NCHW for torch, the same values
# channels-last for Flax) to list their layers in call order; layers are paired by module
# path, what remains by call order; each pair's weights change layout; the input order of every
# layer fed a flattened vector (a Linear, or a BatchNorm1d, after an NCHW flatten) is inferred
# from the two models' activations on ``sample_input`` once every layer called before it agrees
# (so a port that computes something else is named where it parts, not at its head); and the
# result is checked layer by layer on ``sample_input`` (float64 where the models allow it).

#: relative tolerance of the layer-by-layer comparison, by the lowest precision the Flax model
#: computes or keeps its weights in up to that layer: a float64 run agrees to rounding, a
#: float32 one to ~1e3 ulps, and a half-precision port rounds every activation to 8 (bfloat16)
#: or 11 (float16) bits, so its bound is set by that rounding compounded over a deep network.
#: (Measured: a 17-layer residual CNN ported in float16 parts from torch's float64 by at most
#: 2e-3 at any layer's input, in bfloat16 by 1.4e-2; a port that computes something else, by O(1).)
CHECK_RTOL = {"float64": 1e-7, "float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
CHECK_RTOL64, CHECK_RTOL32 = CHECK_RTOL["float64"], CHECK_RTOL["float32"]


def check_rtol(dtypes) -> float:
    """The bound (relative to the largest value, see :func:`_rel_error`) for results computed
    in ``dtypes``: that of the least precise one (``CHECK_RTOL``; another float: 10 ulps)."""
    import ml_dtypes

    rtol = CHECK_RTOL["float64"]
    for dt in dtypes:
        dt = np.dtype(dt)
        if _is_float(dt):
            rtol = max(rtol, CHECK_RTOL.get(dt.name, 10 * float(ml_dtypes.finfo(dt).eps)))
    return rtol


class Layer:
    """One call of a supported layer: framework, name (torch ``features.0``, Flax
    ``features/0``-style path joined by ``/``), kind (conv, dense, bn), the module, its input
    (NumPy) and its output (NumPy)."""

    __slots__ = ("framework", "name", "kind", "module", "input", "output")

    def __init__(self, framework, name, kind, module, input, output):
        self.framework, self.name, self.kind, self.module = framework, name, kind, module
        self.input, self.output = input, output

    @property
    def key(self) -> str:
        """The name for matching: torch's dots and Flax's slashes both become ``_``."""
        return self.name.replace(".", "_").replace("/", "_")

    def describe(self) -> str:
        return f"{self.framework} {self.name!r} ({self.kind}{self.param_shape()})"

    def param_shape(self) -> str:
        if self.framework == "torch":
            w = self.module.weight if self.kind != "bn" or self.module.affine else self.module.running_mean
            return f", weight {tuple(w.shape)}" if w is not None else ""
        return f", input {tuple(self.input.shape)}"


def _torch_kind(m) -> Optional[str]:
    from torch import nn

    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(m, nn.Linear):
        return "dense"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):  # torch.nn's BatchNorm1d/2d/3d, bnref's, SyncBatchNorm
        return "bn"
    return None


def _flax_kind(m) -> Optional[str]:
    import flax.linen as fnn

    from bnref.jax.layers import BatchNorm

    if isinstance(m, fnn.Conv):
        return "conv"
    if isinstance(m, fnn.Dense):
        return "dense"
    if isinstance(m, (fnn.BatchNorm, BatchNorm)):
        return "bn"
    return None


def channels_last(x: np.ndarray) -> np.ndarray:
    """NCHW / NCL -> NHWC / NLC (a 2-D (N, F) array is returned as is)."""
    x = np.asarray(x)
    return np.moveaxis(x, 1, -1) if x.ndim >= 3 else x


def torch_layers(module, sample_input, *, train: bool = False, dtype=None, where: str = "torch_layers") -> tuple:
    """Run a copy of ``module`` (``train()`` or ``eval()``, cast to ``dtype`` if given) on
    ``sample_input`` and return ``(layers, output, copy)``: every call of a supported layer in
    call order, with its input and output. Raises ``ValueError`` for a leaf module that holds
    parameters or buffers but is not a supported layer (it would be silently left out), and
    for a sample the module cannot run on (torch's ``RuntimeError``, e.g. a wrong shape)."""
    import copy

    import torch

    net = copy.deepcopy(module)
    if dtype is not None:
        net = net.to(dtype)
    net.train(train)
    unsupported = [f"{name!r} ({type(m).__name__})" for name, m in net.named_modules()
                   if _torch_kind(m) is None and not list(m.children())
                   and (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)))]  # fmt: skip
    if unsupported:
        raise ValueError(f"torch module has layers bnref.convert does not convert: {', '.join(unsupported)} "
                         "(supported: Conv1d, Conv2d, Linear, BatchNorm1d/2d/3d and bnref's)")  # fmt: skip
    layers, handles = [], []
    for name, m in net.named_modules():
        kind = _torch_kind(m)
        if kind is None:
            continue

        def hook(mod, args, out, name=name, kind=kind):
            layers.append(Layer("torch", name, kind, mod, args[0].detach().cpu().numpy().copy(),
                                out.detach().cpu().numpy().copy()))  # fmt: skip

        handles.append(m.register_forward_hook(hook))
    try:
        x = torch.as_tensor(np.asarray(sample_input), dtype=dtype or next(net.parameters()).dtype)
        try:
            out = net(x)
        except RuntimeError as e:  # a shape the model cannot take: say which, in one line
            raise ValueError(f"{where}: the torch module cannot run on sample_input of shape {tuple(x.shape)} "
                             f"({_first_line(e)}): pass a batch in torch's layout, (N, C, H, W) / (N, C, L) / "
                             "(N, F), with the channels and size the model takes") from None  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return layers, out.detach().cpu().numpy(), net


def flax_layers(module, variables, sample_input, kwargs: Mapping, *, mutable=False, where: str = "flax_layers") -> tuple:
    """Apply ``module`` to ``sample_input`` (already channels-last) with ``variables`` and
    ``kwargs`` and return ``(layers, output, updates)``: every call of a supported layer (Conv,
    Dense, flax.linen's and bnref's BatchNorm) in call order, with its input and output;
    ``updates`` is ``{}`` unless ``mutable``. Flax's own errors for a layer that updates its
    statistics without ``mutable`` or needs an rng come back as a one-line ``ValueError``."""
    import flax.linen as fnn

    layers = []

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        kind = _flax_kind(context.module)
        if kind is not None and context.method_name == "__call__":
            name = "/".join(context.module.path)
            layers.append(Layer("flax", name, kind, context.module, np.asarray(args[0]), np.asarray(out)))
        return out

    with fnn.intercept_methods(interceptor), _flax_errors(where, kwargs):
        if mutable:
            out, updates = module.apply(variables, sample_input, mutable=mutable, **kwargs)
        else:
            out, updates = module.apply(variables, sample_input, **kwargs), {}
    return layers, np.asarray(out), updates


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def _flax_errors(where: str, kwargs: Mapping):
    """Flax's errors for the two port mistakes a run exposes, as one-line ``ValueError``s that
    say what to change."""
    import flax.errors

    try:
        yield
    except flax.errors.ModifyScopeVariableError as e:
        m = re.search(r'in "/?([^"]*)"', str(e))
        layer = m.group(1) if m else "?"
        raise ValueError(f"{where}: Flax layer {layer!r} updates its batch_stats when called with {dict(kwargs)!r} "
                         "(a BatchNorm with use_running_average=False fixed at construction?): tie it to the mode "
                         "argument, use_running_average=not train, and pass that argument in eval_kwargs") from None  # fmt: skip
    except flax.errors.InvalidRngError as e:
        m = re.match(r'\s*(\S+) needs PRNG for "([^"]+)"', str(e))
        layer, rng = (m.group(1), m.group(2)) if m else ("?", "?")
        raise ValueError(f"{where}: Flax layer {layer!r} needs a {rng!r} rng when called with {dict(kwargs)!r} "
                         "(an nn.Dropout with deterministic=False fixed?): the models are compared without "
                         "randomness, so make it deterministic=not train and pass that argument in eval_kwargs") from None  # fmt: skip


def match_layers(tlayers, flayers) -> list:
    """Pair torch and Flax layers: (1) by name, dots and slashes read as ``_`` (torch
    ``features.0`` = Flax ``features_0``; ``block.conv`` = ``block/conv``); (2) the layers left
    on both sides by call order, when they are as many and of the same kinds in that order.
    Returns ``[(torch_layer, flax_layer), ...]`` in Flax call order; raises ``ValueError``
    listing what did not match."""
    return _match_layers(tlayers, flayers)[0]


def _match_layers(tlayers, flayers):
    """:func:`match_layers` and, for each Flax layer name, how it was paired: ``"path"`` or
    ``"call order"``."""
    tfirst = _first_calls(tlayers, "torch")
    ffirst = _first_calls(flayers, "flax")
    tby = {t.key: t for t in tfirst}
    pairs, by = {}, {}
    for f in ffirst:
        t = tby.get(f.key)
        if t is not None and t.kind == f.kind:
            pairs[f.name], by[f.name] = t, "path"
    matched_t = {t.name for t in pairs.values()}
    t_left = [t for t in tfirst if t.name not in matched_t]
    f_left = [f for f in ffirst if f.name not in pairs]
    if [t.kind for t in t_left] == [f.kind for f in f_left]:
        pairs.update({f.name: t for t, f in zip(t_left, f_left)})
        by.update({f.name: "call order" for f in f_left})
    elif t_left or f_left:
        lines = ["torch_to_flax: these layers have no partner (paired by name, dots and slashes read as '_', "
                 "then by call order when the rest agree in number and kind):"]  # fmt: skip
        lines += [f"  {t.describe()}" for t in t_left] or ["  (every torch layer matched)"]
        lines += [f"  {f.describe()}" for f in f_left] or ["  (every Flax layer matched)"]
        raise ValueError("\n".join(lines))
    return [(pairs[f.name], f) for f in ffirst], by


def _first_calls(layers, framework):
    seen, first = set(), []
    for layer in layers:
        if layer.name in seen:
            raise ValueError(f"{framework} layer {layer.name!r} is called more than once (shared weights are not "
                             "supported)")  # fmt: skip
        seen.add(layer.name)
        first.append(layer)
    return first


def _candidate_orders(width: int) -> list:
    """``[(label, P)]``: every distinct flatten order of a ``width``-wide vector, one per
    factorization C x S (``P`` as in :func:`flatten_permutation`), the identity first."""
    out, seen = [], set()
    for c in [width] + [c for c in range(1, width) if width % c == 0]:
        p = flatten_permutation(c, width)
        if p.tobytes() not in seen:
            seen.add(p.tobytes())
            out.append(("as is" if c == width else f"(C={c}, S={width // c})", p))
    return out


def _rel_error(a, b) -> float:
    """``max|a - b| / (max|a| + 1)`` in float64; NaN when either holds a NaN (it never passes)."""
    a, b = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
    if a.shape != b.shape:
        return float("nan")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b))) / (float(np.max(np.abs(a))) + 1.0)


def _torch_params(t: Layer) -> Dict[str, np.ndarray]:
    m = t.module
    out = {}
    for name in ("weight", "bias", "running_mean", "running_var"):
        v = getattr(m, name, None)
        if v is not None:
            out[name] = v.detach().cpu().numpy().copy()
    return out


def _pair_where(t: Layer, f: Layer) -> str:
    return f"torch {t.name!r} <-> Flax {f.name!r}"


def _layer_torch_to_flax(t: Layer, f: Layer, tp: Dict[str, np.ndarray], perm, fshapes: Mapping) -> Dict:
    """One pair's Flax variables ``{collection: {name: array}}`` from the torch layer's arrays."""
    where = _pair_where(t, f)
    out = {"params": {}, "batch_stats": {}}
    if t.kind in ("conv", "dense"):
        w = tp["weight"]
        out["params"]["kernel"] = conv_kernel_to_flax(w) if t.kind == "conv" else dense_kernel_to_flax(w, perm)
        if "bias" in tp:
            out["params"]["bias"] = tp["bias"]
    else:
        order = (lambda a: a) if perm is None else (lambda a: a[perm])
        if t.module.affine:
            out["params"]["scale"], out["params"]["bias"] = order(tp["weight"]), order(tp["bias"])
        if "running_mean" not in tp:
            raise ValueError(f"{where}: the torch layer keeps no running statistics (track_running_stats=False) "
                             "and normalizes with batch statistics in eval mode; a Flax BatchNorm cannot")  # fmt: skip
        out["batch_stats"]["mean"], out["batch_stats"]["var"] = order(tp["running_mean"]), order(tp["running_var"])
    _check_against(out, fshapes, where)
    return out


def _check_against(arrays: Mapping, fshapes: Mapping, where: str) -> None:
    """``arrays`` ({collection: {name: array}}) has exactly the Flax layer's variables, shapes included."""
    have = {f"{c}/{n}": a.shape for c, d in arrays.items() for n, a in d.items()}
    want = {f"{c}/{n}": tuple(s) for c, d in fshapes.items() for n, s in d.items()}
    for key in sorted(set(have) | set(want)):
        if key not in want:
            raise ValueError(f"{where}: the torch layer has {key.split('/')[1]!r} ({_torch_name(key)}) and the Flax "
                             "layer does not (use_bias / use_scale?)")  # fmt: skip
        if key not in have:
            raise ValueError(f"{where}: the Flax layer has {key} and the torch layer has no {_torch_name(key)} "
                             "(bias=False / affine=False?)")  # fmt: skip
        if have[key] != want[key]:
            raise ValueError(f"{where}: {key} would get shape {have[key]} from torch, the Flax layer has {want[key]}")


def _torch_name(key: str) -> str:
    return {"params/kernel": "weight", "params/scale": "weight", "params/bias": "bias",
            "batch_stats/mean": "running_mean", "batch_stats/var": "running_var"}[key]  # fmt: skip


def _layer_variables(tree: Mapping, path: str) -> Dict:
    """``{collection: {name: leaf}}`` of one Flax layer (``path`` joined by ``/``)."""
    out = {}
    for collection, sub in tree.items():
        node = sub
        for part in path.split("/") if path else ():
            node = node.get(part) if isinstance(node, Mapping) else None
            if node is None:
                break
        if isinstance(node, Mapping):
            leaves = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
            if leaves:
                out[collection] = leaves
    return out


def _set_layer(tree: Dict, path: str, arrays: Mapping) -> None:
    for collection, leaves in arrays.items():
        if not leaves:
            continue
        node = tree.setdefault(collection, {})
        for part in path.split("/") if path else ():
            node = node.setdefault(part, {})
        node.update(leaves)


def _leaf_paths(tree: Mapping, prefix: str = "") -> list:
    paths = []
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        paths.extend(_leaf_paths(v, p) if isinstance(v, Mapping) else [p])
    return paths


def _x64():
    import jax

    return jax.enable_x64(True) if hasattr(jax, "enable_x64") else __import__("jax.experimental").experimental.enable_x64()


def check_sample(sample_input, where: str) -> np.ndarray:
    """``sample_input`` as a NumPy array; ``ValueError`` unless it is a finite floating batch
    ``(N, C, ...)`` with N >= 2 (one example has no batch statistics)."""
    x = np.asarray(sample_input)
    if x.ndim < 2 or x.shape[0] < 2 or not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
        raise ValueError(f"{where}: sample_input must be a finite floating NumPy array (N, C, ...) with N >= 2, "
                         f"got {x.dtype} {x.shape}")  # fmt: skip
    return x


_BETWEEN = ("an activation (relu vs relu6?), pooling, a skip connection, a channel shuffle, a reshape, or the "
            "layers' order?")  # fmt: skip
_ITSELF = {
    "conv": "padding: Flax's 'SAME' pads a stride-2 layer (0, 1), torch's padding=k//2 pads both sides; stride, "
            "dilation, groups?",
    "dense": "use_bias?",
    "bn": "epsilon, axis, use_scale/use_bias, a mode not set by eval_kwargs? bnref.diagnose.bn_report compares BN "
          "layers in detail",
}  # fmt: skip


def _as_flax_order(a: np.ndarray, perm) -> np.ndarray:
    """A torch activation in the layout its Flax partner has: channels-last, or a flat vector
    read in the order ``perm``."""
    return channels_last(a) if a.ndim >= 3 else (a if perm is None or a.ndim != 2 else a[:, perm])


class _Walk:
    """Compares the paired layers' inputs and outputs in Flax call order, on runs of both models,
    each against the bound of the precision computed in up to there (:func:`check_rtol`).
    Remembers the first layer whose output differs though its input agrees (``faulty``), so that
    the first input that differs is blamed on that layer, or else on what lies between layers.
    ``strict``: raise at the first difference; otherwise keep its message in ``first_diff``."""

    def __init__(self, where: str, strict: bool, var_dtypes: Optional[Mapping] = None):
        self.where, self.strict, self.var_dtypes = where, strict, dict(var_dtypes or {})
        self.done = 0  # pairs[:done] compared
        self.dtypes = {np.dtype(np.float64)}  # what the Flax layers before pairs[done] computed and kept in
        self.faulty = None  # (torch layer, Flax layer, error)
        self.first_diff = None
        self.rtol = CHECK_RTOL["float64"]

    def blame(self, between: str) -> str:
        if self.faulty is not None:
            t, f, err = self.faulty
            return (f": the output of {_pair_where(t, f)} already differs (by {err:.2g}) though its input agrees, so "
                    f"that layer is set up differently ({_ITSELF[t.kind]})")  # fmt: skip
        return f", though every layer called before it agrees: {between}"

    def differ(self, what: str, err: float, rtol: float, between: str) -> None:
        msg = (f"{self.where}: {what} differs between the models by {err:.2g} (relative; the bound is {rtol:g}) on "
               f"sample_input{self.blame(between)}")  # fmt: skip
        if self.strict:
            raise ValueError(msg)
        if self.first_diff is None:
            self.first_diff = msg

    def run(self, pairs, flayers: Mapping, perms: Mapping, pending=()):
        """Compare ``pairs[done:]`` on this Flax run (``flayers`` by name) up to the first Flax
        layer named in ``pending``; return ``(torch layer, Flax layer, bound)`` for it, or None."""
        for i in range(self.done, len(pairs)):
            t, f = pairs[i][0], flayers[pairs[i][1].name]
            dtypes = self.dtypes | {f.input.dtype}
            rtol = check_rtol(dtypes)
            if f.name in pending:
                return t, f, rtol
            perm = perms.get(f.name)
            err = _rel_error(_as_flax_order(t.input, perm), f.input)
            if not err <= rtol:
                self.differ(f"the input of {_pair_where(t, f)}", err, rtol, f"something between them differs ({_BETWEEN})")
            dtypes = dtypes | {f.output.dtype} | set(self.var_dtypes.get(f.name, ()))
            out_err = _rel_error(_as_flax_order(t.output, perm if t.kind == "bn" else None), f.output)
            if not out_err <= check_rtol(dtypes) and self.faulty is None and self.first_diff is None:
                self.faulty = (t, f, out_err)
            self.dtypes, self.done = dtypes, i + 1
        return None

    def output(self, tout: np.ndarray, fout: np.ndarray) -> None:
        self.rtol = check_rtol(self.dtypes | {fout.dtype})
        a = _as_flax_order(tout, None)
        if a.shape != fout.shape:
            raise ValueError(f"{self.where}: the output has shape {a.shape} in torch (channels-last) and {fout.shape} in "
                             "Flax: the models differ after their last layer")  # fmt: skip
        err = _rel_error(a, fout)
        if not err <= self.rtol:
            self.differ("the output", err, self.rtol, "something after the last layer differs (a final activation, "
                        "pooling, a reshape?)")  # fmt: skip


def _decide_order(t: Layer, f: Layer, pred: Optional[Layer], inherited, model_ndim: int, rtol: float, walk: _Walk,
                  where: str):  # fmt: skip
    """The order ``(P, label)`` of a flat input (``f.input[:, j] == t.input[:, P[j]]``), every
    layer called before it agreeing (``walk``). With no flatten since the torch layer before it
    (``pred``'s output, or the model's input, is already flat) the order is the one that layer
    left (``inherited``; as is after a Linear); after a flatten, the one flatten order (over the
    factorizations C x S of the width) that fits within ``rtol``. Each way it can fail has its
    own message: all-zero inputs, several orders fit, none does."""
    pair, width = _pair_where(t, f), t.input.shape[1]
    flat_before = (pred.output.ndim == 2) if pred is not None else model_ndim == 2
    cands = ([("as the layer before it left it", inherited)] if flat_before and inherited is not None else [])
    cands += _candidate_orders(width)
    errs = [(_rel_error(t.input[:, p], f.input), label, p) for label, p in cands]
    fits, seen = [], set()
    for e in errs:
        if e[0] <= rtol and e[2].tobytes() not in seen:
            seen.add(e[2].tobytes())
            fits.append(e)
    if flat_before and errs[0][0] <= rtol:  # no flatten in between: the order it came in, if it fits
        return errs[0][2], errs[0][1]
    if len(fits) == 1:
        return fits[0][2], fits[0][1]
    if fits:
        if not np.any(t.input) and not np.any(f.input):
            raise ValueError(f"{where}: {pair}: the layer's {width} inputs are zero on every example of sample_input "
                             "(dead ReLUs?), so they cannot tell one flatten order from another: pass examples (or "
                             "weights) that activate them")  # fmt: skip
        dead = int(np.sum(~np.any(t.input != 0, axis=0)))
        note = f"; {dead} of the inputs are zero on every example" if dead else ""
        raise ValueError(f"{where}: {pair}: the sample input does not decide the order of the layer's {width} inputs "
                         f"(the flatten orders {fits[0][1]} and {fits[1][1]} both fit{note}): pass more, and more "
                         "varied, examples")  # fmt: skip
    ranked = sorted(errs, key=lambda e: e[0])
    decided = len(ranked) == 1 or ranked[0][0] * 10 < ranked[1][0]  # check=False: the clearly closest one
    if walk.first_diff is None:
        if flat_before:
            walk.differ(f"the input of {pair}", errs[0][0], rtol, f"something between them differs ({_BETWEEN})")
            return errs[0][2], errs[0][1]  # check=False: no flatten in between, so no other order to try
        before = f"torch {pred.name!r}" if pred is not None else "the model's input"
        msg = (f"{where}: {pair}: no flatten order fits the layer's {width} inputs on sample_input (the closest, "
               f"{ranked[0][1]}, is off by {ranked[0][0]:.2g}; the bound is {rtol:g})"
               + walk.blame(f"the models differ between {before} and it (pooling, an activation, a skip connection, "
                            "a flatten of another layout?)"))  # fmt: skip
        if walk.strict or not decided:
            raise ValueError(msg)
        walk.first_diff = msg
    if decided:
        return ranked[0][2], ranked[0][1]
    # check=False, the models already differ below: the data cannot decide, so take the flatten of
    # the torch layer before's map (C = its channels), when there is one; never a guess among the rest
    c = pred.output.shape[1] if pred is not None and pred.output.ndim >= 3 else None
    if c is not None and width % c == 0:
        return flatten_permutation(c, width), f"(C={c}, S={width // c})"
    raise ValueError(f"{walk.first_diff}; so the order of the inputs of {pair} cannot be found on it")


def _check_mode_arguments(flax_module, eval_kwargs: Mapping, where: str) -> None:
    """``ValueError`` before any work when ``flax_module.__call__`` cannot take ``eval_kwargs``
    (its mode argument is not called ``train``, or it needs one)."""
    import inspect

    try:
        sig = inspect.signature(flax_module.__call__)
    except (TypeError, ValueError):  # no signature to read: the run itself will tell
        return
    try:
        sig.bind(None, **eval_kwargs)
    except TypeError as e:
        rest = [p for p in list(sig.parameters)[1:] if sig.parameters[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                                       inspect.Parameter.VAR_KEYWORD)]  # fmt: skip
        on = {"deterministic", "use_running_average", "eval", "evaluate", "inference", "is_eval"}
        hint = f"eval_kwargs={{{rest[0]!r}: {rest[0] in on}}}" if rest else "eval_kwargs={}"
        raise ValueError(f"{where}: eval_kwargs={dict(eval_kwargs)!r} do not fit flax_module.__call__{sig} ({e}): "
                         f"pass the module's own evaluation-mode arguments, e.g. {hint}") from None  # fmt: skip


class LayerPair(NamedTuple):
    """How one torch layer was paired with one Flax layer (see :class:`ConversionReport`)."""

    torch: str  #: torch module path (``features.0``)
    flax: str  #: Flax module path, ``/``-joined (``features_0``, ``Conv_0``)
    kind: str  #: ``conv``, ``dense`` or ``bn``
    paired_by: str  #: ``"path"`` (the names agree, dots and slashes read as ``_``) or ``"call order"``
    input_order: str  #: ``"as is"``, or the torch flatten ``"(C=16, S=16)"`` read in Flax's order


class ConversionReport(NamedTuple):
    """What a conversion did (``torch_to_flax(..., report=True)`` returns it with the variables):
    ``pairs``, one :class:`LayerPair` per Flax layer in its call order; ``rtol``, the bound the
    models' outputs were compared with (by the Flax model's precision, ``CHECK_RTOL``);
    ``checked``, whether ``check`` ran. ``str(report)`` is a table."""

    pairs: tuple
    rtol: float
    checked: bool

    def __str__(self) -> str:
        w_t = max([len("torch")] + [len(p.torch) for p in self.pairs])
        w_f = max([len("flax")] + [len(p.flax) for p in self.pairs])
        lines = [f"{'torch':<{w_t}}  {'flax':<{w_f}}  kind   paired by   input order"]
        lines += [f"{p.torch:<{w_t}}  {p.flax:<{w_f}}  {p.kind:<5}  {p.paired_by:<10}  {p.input_order}" for p in self.pairs]
        lines.append(f"checked on sample_input to {self.rtol:g} (relative)" if self.checked else "not checked (check=False)")
        return "\n".join(lines)


def _plan(torch_module, flax_module, sample_input, eval_kwargs, where: str, strict: bool = True):
    """Pair the layers, convert ``torch_module``'s own weights and compare the two models layer
    by layer on ``sample_input`` (float64 where the models allow), finding each flattened
    input's order only once everything called before it agrees: ``(pairs, perms, variables,
    init, report_pairs)``: ``perms`` maps a Flax layer's name to its input order (None: as
    is), ``variables`` is a float64 NumPy tree shaped like ``flax_module``'s, ``init`` its
    abstract variables (shapes and dtypes). ``strict``: a difference anywhere is a
    ``ValueError``; otherwise only one that leaves a flatten order undecided."""
    import jax
    import torch

    x = check_sample(sample_input, where)
    _check_mode_arguments(flax_module, eval_kwargs, where)
    tlayers, tout, _ = torch_layers(torch_module, x, train=False, dtype=torch.float64, where=where)
    xf = channels_last(x.astype(np.float64))
    with _x64():
        with _flax_errors(where, eval_kwargs):
            init = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), xf, **eval_kwargs))
        shapes = jax.tree.map(lambda s: tuple(s.shape), dict(init))
        variables = jax.tree.map(lambda s: np.zeros(s.shape, np.float64), dict(init))
        flayers, _, _ = flax_layers(flax_module, variables, xf, eval_kwargs, where=where)
        pairs, by = _match_layers(tlayers, flayers)
        for t, f in pairs:  # the first layer whose input shapes differ is where the models part
            if channels_last(t.input).shape != f.input.shape:
                raise ValueError(f"{where}: the input of {_pair_where(t, f)} has shape {channels_last(t.input).shape} "
                                 f"in torch (channels-last) and {f.input.shape} in Flax: the models differ before it "
                                 "(padding, stride, pooling, layer order?)")  # fmt: skip
        for t, _ in pairs:  # corrupt weights are named as such, not as a port that computes something else
            for name, a in _torch_params(t).items():
                _check_values(f"torch {t.name!r} {name}", a, where, variance=name == "running_var")
        tfirst = _first_calls(tlayers, "torch")
        pred = {t.name: (tfirst[i - 1] if i else None) for i, t in enumerate(tfirst)}
        flax_of = {t.name: f.name for t, f in pairs}
        needs_order = {f.name for t, f in pairs if t.input.ndim == 2 and t.kind in ("dense", "bn")}
        perms, labels, converted = {}, {}, set()

        def convert(t, f, perm):
            arrays = _layer_torch_to_flax(t, f, _torch_params(t), perm, _layer_variables(shapes, f.name))
            _set_layer(variables, f.name, arrays)
            converted.update({f"{c}/{f.name}/{n}" if f.name else f"{c}/{n}" for c, d in arrays.items() for n in d})

        for t, f in pairs:
            if f.name not in needs_order:
                convert(t, f, None)
        walk = _Walk(where, strict)
        while True:  # one run per flat input: what follows it depends on its order
            fl, fout, _ = flax_layers(flax_module, variables, xf, eval_kwargs, where=where)
            stop = walk.run(pairs, {g.name: g for g in fl}, perms, pending=needs_order - set(perms))
            if stop is None:
                walk.output(tout, fout)
                break
            t, f, rtol = stop
            p = pred[t.name]
            inherited = perms.get(flax_of[p.name]) if p is not None and p.kind == "bn" else None
            perm, label = _decide_order(t, f, p, inherited, x.ndim, rtol, walk, where)
            perm = None if np.array_equal(perm, np.arange(len(perm))) else perm
            convert(t, f, perm)
            perms[f.name], labels[f.name] = perm, ("as is" if perm is None else label)
        left = [p for p in _leaf_paths(shapes) if p not in converted]
        if left:
            raise ValueError(f"{where}: Flax variables that no supported layer holds: {', '.join(left)}")
    report_pairs = tuple(LayerPair(t.name, f.name, t.kind, by[f.name], labels.get(f.name, "as is")) for t, f in pairs)
    return pairs, perms, variables, init, report_pairs


def _check_same_function(torch_module, flax_module, variables, sample_input, eval_kwargs, perms: Mapping,
                         where: str, init=None) -> float:  # fmt: skip
    """Run both models in eval mode on ``sample_input`` (float64 where the models allow) and
    compare every paired layer's input and output (flattened ones in the order ``perms`` gives,
    as :func:`_plan` found it) and the models' outputs, each to the bound of the precision the
    Flax model computes and (``init``: its abstract variables) stores its weights in; raise
    ``ValueError`` naming the first layer that differs. Returns the bound at the output."""
    import jax
    import torch

    x = np.asarray(sample_input, np.float64)
    tlayers, tout, _ = torch_layers(torch_module, x, train=False, dtype=torch.float64, where=where)
    with _x64():
        v64 = jax.tree.map(lambda a: np.asarray(a).astype(np.float64), dict(variables))
        flayers, fout, _ = flax_layers(flax_module, v64, channels_last(x), eval_kwargs, where=where)
    var_dtypes = {}
    if init is not None:
        dtypes = jax.tree.map(lambda s: np.dtype(s.dtype), dict(init))
        var_dtypes = {f.name: [d for c in _layer_variables(dtypes, f.name).values() for d in c.values()]
                      for f in flayers}  # fmt: skip
    walk = _Walk(where, strict=True, var_dtypes=var_dtypes)
    walk.run(match_layers(tlayers, flayers), {f.name: f for f in flayers}, perms)
    walk.output(tout, fout)
    return walk.rtol


def _torch_module_to_flax(torch_module, flax_module, sample_input, eval_kwargs=None, check=True):
    import jax

    where = "torch_to_flax"
    eval_kwargs = {"train": False} if eval_kwargs is None else dict(eval_kwargs)
    pairs, perms, variables, init, report_pairs = _plan(torch_module, flax_module, sample_input, eval_kwargs, where,
                                                        strict=check)  # fmt: skip
    dtypes = jax.tree.map(lambda s: s.dtype, dict(init))
    result = jax.tree.map(lambda a, dt: np.asarray(a, dt), variables, dtypes)
    rtol = float("nan")
    if check:
        rtol = _check_same_function(torch_module, flax_module, result, sample_input, eval_kwargs, perms, where, init)
    return result, ConversionReport(report_pairs, rtol, bool(check))


def _flax_module_to_torch(flax_module, variables, torch_module, sample_input, eval_kwargs=None, check=True,
                          as_torch=True):  # fmt: skip
    """The reverse: ``torch_module``'s ``state_dict`` with every paired layer's entries taken
    from the Flax ``variables`` (anything the Flax model lacks, e.g. ``num_batches_tracked``,
    is the torch module's own). The pairing and flatten orders are found by converting
    ``torch_module``'s own weights forward on ``sample_input``."""
    import jax
    import torch

    where = "flax_to_torch"
    eval_kwargs = {"train": False} if eval_kwargs is None else dict(eval_kwargs)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(f"{where}: variables must be a mapping with a 'params' collection")
    pairs, perms, _, init, report_pairs = _plan(torch_module, flax_module, sample_input, eval_kwargs, where,
                                                strict=check)  # fmt: skip
    shapes = jax.tree.map(lambda s: tuple(s.shape), dict(init))
    given = jax.tree.map(_to_numpy, dict(variables))
    have, want = set(_leaf_paths(given)), set(_leaf_paths(shapes))
    if have != want:
        bad = sorted(want - have) or sorted(have - want)
        raise ValueError(f"{where}: variables {'lack' if want - have else 'have an unexpected'} {bad[0]!r}"
                         + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))  # fmt: skip
    for p in sorted(want):
        node_g, node_s = given, shapes
        for part in p.split("/"):
            node_g, node_s = node_g[part], node_s[part]
        if tuple(node_g.shape) != tuple(node_s):
            raise ValueError(f"{where}: {p} has shape {tuple(node_g.shape)}, the Flax module makes {tuple(node_s)}")
        _check_values(p, node_g, where, variance=p.startswith("batch_stats/") and p.endswith("/var"))
    sd = OrderedDict((k, v.detach().cpu().clone()) for k, v in torch_module.state_dict().items())
    for t, f in pairs:
        perm = perms[f.name] if f.name in perms else None
        lv = _layer_variables(given, f.name)
        params, stats = lv.get("params", {}), lv.get("batch_stats", {})
        prefix = f"{t.name}." if t.name else ""
        if t.kind in ("conv", "dense"):
            k = params["kernel"]
            w = conv_kernel_to_torch(k) if t.kind == "conv" else dense_kernel_to_torch(k, perm)
            new = {"weight": w, "bias": params.get("bias")}
        else:
            inverse = None if perm is None else np.argsort(perm)  # torch's order from Flax's
            new = {"weight": params.get("scale"), "bias": params.get("bias"),
                   "running_mean": stats.get("mean"), "running_var": stats.get("var")}  # fmt: skip
            new = {k: a if a is None or inverse is None else a[inverse] for k, a in new.items()}
        for name, a in new.items():
            if a is not None:
                old = sd[prefix + name]
                sd[prefix + name] = torch.from_numpy(np.ascontiguousarray(a).astype(np.float64)).to(old.dtype)
    rtol = float("nan")
    if check:
        import copy

        probe = copy.deepcopy(torch_module)
        probe.load_state_dict(sd)
        rtol = _check_same_function(probe, flax_module, given, sample_input, eval_kwargs, perms, where, init)
    sd = sd if as_torch else OrderedDict((k, v.numpy()) for k, v in sd.items())
    return sd, ConversionReport(report_pairs, rtol, bool(check))


def torch_to_flax(torch_module, flax_module=None, sample_input=None, *, eval_kwargs: Optional[Mapping] = None,
                  check: bool = True, report: bool = False):  # fmt: skip
    """PyTorch weights -> Flax variables, for any model made of the usual layers.

    ``torch_to_flax(torch_module, flax_module, sample_input)``: ``torch_module`` a
    ``torch.nn.Module`` of Conv1d/Conv2d, Linear and BatchNorm layers (torch.nn's or bnref's)
    with anything parameter-free between them (activations, pooling, dropout, flatten),
    ``flax_module`` its Flax port (``nn.Conv``, ``nn.Dense``, ``nn.BatchNorm`` or bnref's),
    ``sample_input`` a NumPy batch in torch's layout (NCHW / NCL / NF, N >= 2). Returns NumPy
    variables ``{"params", "batch_stats"}`` with which ``flax_module.apply(variables,
    x_channels_last, **eval_kwargs)`` (default ``train=False``) computes what ``torch_module``
    computes in ``eval()`` mode. Rules (see the module docstring): layers paired by path,
    then by call order; conv kernels OIHW -> HWIO; dense kernels transposed, their inputs
    reordered where a flatten turned NCHW into NHWC order (found on ``sample_input``, once
    every layer called before agrees). The models are compared layer by layer on
    ``sample_input`` as the weights convert, and with ``check`` (default) again with the
    converted variables in their own dtypes: a ``ValueError`` names the first layer that
    differs by more than the bound of the Flax model's precision (``CHECK_RTOL``: float64
    1e-7, float32 1e-4, float16 2e-2, bfloat16 1e-1, relative to the largest value).
    ``check=False`` converts despite a difference, except where it leaves a flatten order
    undecided. With ``report=True`` returns ``(variables, ConversionReport)``: how each layer
    was paired (path or call order) and its input order. ``torch_module`` is never modified.

    ``torch_to_flax(state_dict)``: bnref's LeNet-BN ``state_dict`` (the layers are known, no
    sample needed); the same layer rules, and a ``ValueError`` naming the first bad key.
    """
    if isinstance(torch_module, Mapping):
        if report:
            raise TypeError("torch_to_flax(state_dict) is LeNet-BN's, whose layers are known: report=True is for "
                            "torch_to_flax(torch_module, flax_module, sample_input)")  # fmt: skip
        if flax_module is not None or sample_input is not None:
            raise TypeError("torch_to_flax(state_dict) is LeNet-BN's; for any other model pass the torch module, "
                            "the Flax module and sample_input")  # fmt: skip
        return _lenet_torch_to_flax(torch_module)
    if flax_module is None or sample_input is None:
        raise TypeError("torch_to_flax(torch_module, flax_module, sample_input): all three are needed")
    variables, rep = _torch_module_to_flax(torch_module, flax_module, sample_input, eval_kwargs, check)
    return (variables, rep) if report else variables


def flax_to_torch(flax_module_or_variables, variables=None, torch_module=None, sample_input=None, *,
                  eval_kwargs: Optional[Mapping] = None, check: bool = True, num_batches_tracked: int = 0,
                  as_torch: Optional[bool] = None, report: bool = False):  # fmt: skip
    """Flax variables -> a PyTorch ``state_dict``, the reverse of :func:`torch_to_flax`.

    ``flax_to_torch(flax_module, variables, torch_module, sample_input)``: returns
    ``torch_module``'s ``state_dict`` (torch tensors) with every paired layer's entries from
    ``variables``, ready for ``torch_module.load_state_dict``; entries Flax has no counterpart
    for (``num_batches_tracked``) stay the torch module's. The pairing and flatten orders
    are found as in :func:`torch_to_flax`, from ``torch_module``'s own weights; with ``check``
    the result is verified on ``sample_input`` layer by layer; ``report=True`` returns
    ``(state_dict, ConversionReport)``.

    ``flax_to_torch(variables)``: bnref's LeNet-BN variables -> its ``state_dict``
    (NumPy arrays, or torch tensors with ``as_torch=True``); ``num_batches_tracked`` is
    written into every BN layer (pass the torch model's own count to make torch -> flax ->
    torch the identity).
    """
    if isinstance(flax_module_or_variables, Mapping):
        if report:
            raise TypeError("flax_to_torch(variables) is LeNet-BN's, whose layers are known: report=True is for "
                            "flax_to_torch(flax_module, variables, torch_module, sample_input)")  # fmt: skip
        if variables is not None or torch_module is not None or sample_input is not None:
            raise TypeError("flax_to_torch(variables) is LeNet-BN's; for any other model pass the Flax module, "
                            "its variables, the torch module and sample_input")  # fmt: skip
        return _lenet_flax_to_torch(flax_module_or_variables, num_batches_tracked=num_batches_tracked,
                                    as_torch=bool(as_torch))  # fmt: skip
    if variables is None or torch_module is None or sample_input is None:
        raise TypeError("flax_to_torch(flax_module, variables, torch_module, sample_input): all four are needed")
    sd, rep = _flax_module_to_torch(flax_module_or_variables, variables, torch_module, sample_input, eval_kwargs,
                                    check, as_torch=True if as_torch is None else as_torch)  # fmt: skip
    return (sd, rep) if report else sd
