"""Any model: ``torch_to_flax(torch_module, flax_module, sample_input)`` and back.

The two models are run once each on ``sample_input`` (NCHW for torch, the same values
channels-last for Flax) to list their layers in call order (:mod:`bnref.convert.layers`); layers
are paired by module path, what remains by call order; each pair's weights change layout
(:mod:`bnref.convert.layout`); the input order of every layer fed a flattened vector (a Linear,
or a BatchNorm1d, after an NCHW flatten) is inferred from the two models' activations on
``sample_input`` once every layer called before it agrees (:mod:`bnref.convert.walk`; so a port
that computes something else is named where it parts, not at its head); and the result is
checked layer by layer on ``sample_input`` (float64 where the models allow it).
:func:`module_torch_to_flax` and :func:`module_flax_to_torch` are the two directions, each
returning its result with a :class:`ConversionReport`. torch and JAX are imported when called.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping, NamedTuple

import numpy as np

from bnref.convert.layers import (Layer, _check_mode_arguments, _first_calls, _flax_errors, _layer_variables,
                                  _leaf_paths, _match_layers, _pair_where, _set_layer, _torch_params, check_sample,
                                  flax_layers, match_layers, torch_layers)  # fmt: skip
from bnref.convert.layout import (channels_last, conv_kernel_to_flax, conv_kernel_to_torch, dense_kernel_to_flax,
                                  dense_kernel_to_torch)  # fmt: skip
from bnref.convert.values import _check_values, _to_numpy
from bnref.convert.walk import _Walk, _decide_order


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

    from bnref.jax.compat import x64

    x = check_sample(sample_input, where)
    _check_mode_arguments(flax_module, eval_kwargs, where)
    tlayers, tout, _ = torch_layers(torch_module, x, train=False, dtype=torch.float64, where=where)
    xf = channels_last(x.astype(np.float64))
    with x64():
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

    from bnref.jax.compat import x64

    x = np.asarray(sample_input, np.float64)
    tlayers, tout, _ = torch_layers(torch_module, x, train=False, dtype=torch.float64, where=where)
    with x64():
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


def module_torch_to_flax(torch_module, flax_module, sample_input, *, eval_kwargs=None, check=True):
    """``torch_to_flax(torch_module, flax_module, sample_input)``: ``(variables, report)``, NumPy
    variables in the dtypes of ``flax_module``'s own and a :class:`ConversionReport` (checked
    again in those dtypes with ``check``)."""
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


def module_flax_to_torch(flax_module, variables, torch_module, sample_input, *, eval_kwargs=None, check=True,
                         as_torch=True):  # fmt: skip
    """The reverse, ``(state_dict, report)``: ``torch_module``'s ``state_dict`` with every
    paired layer's entries taken from the Flax ``variables`` (anything the Flax model lacks,
    e.g. ``num_batches_tracked``, is the torch module's own), as torch tensors in the torch
    module's dtypes (``as_torch=False``: NumPy copies of them). The pairing and flatten orders
    are found by converting ``torch_module``'s own weights forward on ``sample_input``."""
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
