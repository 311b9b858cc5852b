"""A model's layers: run it once on a sample, list its supported layers, pair them across frameworks.

:func:`torch_layers` and :func:`flax_layers` run a torch or Flax model on ``sample_input`` and
return every call of a supported layer (Conv1d/Conv2d <-> ``nn.Conv``, Linear <-> ``nn.Dense``,
BatchNorm <-> ``nn.BatchNorm`` / bnref's; their NNX twins, :mod:`bnref.convert.nnx`) in call
order, with its input and output (:class:`Layer`); :func:`match_layers` pairs them, by path
(dots and slashes read as ``_``), then by call order. Also the checks of what the caller passes (:func:`check_sample`,
:func:`_check_mode_arguments`, Flax's errors as one-line ``ValueError``s) and the helpers that
read and write one Flax layer's variables in a tree (:func:`_layer_variables`). torch and Flax
are imported when called.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Dict, Mapping, Optional

import numpy as np


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


def is_nnx(obj) -> bool:
    """Whether ``obj`` is an ``nnx.Module`` (without importing Flax: it can only be one once
    ``flax.nnx`` is imported)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def _is_view(obj) -> bool:
    """Whether ``obj`` is an NNX model's ``bnref.nnx.observe.LinenView`` (:mod:`bnref.convert.nnx`)."""
    observe = sys.modules.get("bnref.nnx.observe")
    return observe is not None and isinstance(obj, observe.LinenView)


def _flax_kind(m) -> Optional[str]:
    """A Flax layer's kind: linen's Conv, Dense, BatchNorm and bnref.jax's; or their NNX twins
    (:mod:`bnref.convert.nnx`): nnx.Conv, nnx.Linear, nnx's BatchNorm and bnref.nnx's."""
    if is_nnx(m):
        from flax import nnx as api

        from bnref.nnx.layers import BatchNorm

        dense = api.Linear
    else:
        import flax.linen as api

        from bnref.jax.layers import BatchNorm

        dense = api.Dense
    for types, kind in ((api.Conv, "conv"), (dense, "dense"), ((api.BatchNorm, BatchNorm), "bn")):
        if isinstance(m, types):
            return kind
    return None


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
    Dense, flax.linen's and bnref's BatchNorm; an NNX model's, through its view) in call order,
    with its input and output;
    ``updates`` is ``{}`` unless ``mutable``. Flax's own errors for a layer that updates its
    statistics without ``mutable`` or needs an rng come back as a one-line ``ValueError``."""
    import flax.linen as fnn

    layers = []
    if _is_view(module):  # an NNX model (bnref.convert.nnx): its calls reported by the view
        from bnref.nnx.observe import path_name

        def on_call(path, m, args, kw, out):
            x = args[0] if args else next(iter(kw.values()))
            layers.append(Layer("flax", path_name(path), _flax_kind(m), m, np.asarray(x), np.asarray(out)))

        got = module.apply(variables, sample_input, mutable=bool(mutable), select=lambda m: _flax_kind(m) is not None,
                           on_call=on_call, **kwargs)  # fmt: skip
        out, updates = got if mutable else (got, {})
        return layers, np.asarray(out), updates

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


def check_sample(sample_input, where: str) -> np.ndarray:
    """``sample_input`` as a NumPy array; ``ValueError`` unless it is a finite floating batch
    ``(N, C, ...)`` with N >= 2 (one example has no batch statistics)."""
    x = np.asarray(sample_input)
    if x.ndim < 2 or x.shape[0] < 2 or not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
        raise ValueError(f"{where}: sample_input must be a finite floating NumPy array (N, C, ...) with N >= 2, "
                         f"got {x.dtype} {x.shape}")  # fmt: skip
    return x


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
