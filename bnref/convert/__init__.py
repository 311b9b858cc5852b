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

The package: this module is the public API (the names in ``__all__``, re-exported from the
submodules that own them) and the one place that tells the two forms of a call apart
(:func:`_lenet_form`); :mod:`bnref.convert.lenet` owns the LeNet-BN table and the single BN
layer; :mod:`bnref.convert.layout` the layouts (rule 2, the flatten orders of rule 3,
:func:`channels_last`); :mod:`bnref.convert.values` reading the caller's arrays and refusing
corrupt ones; :mod:`bnref.convert.layers` running a model and listing and pairing its layers
(rule 1); :mod:`bnref.convert.walk` the layer-by-layer comparison and the input orders it
decides (rule 3); :mod:`bnref.convert.models` any model's conversion, both ways, and its
:class:`ConversionReport` (rule 4).

**Flax NNX.** Wherever a Flax module and its variables go, an ``nnx.Module`` may go instead,
carrying its state (:mod:`bnref.convert.nnx`): ``torch_to_flax(torch_module, nnx_model,
sample_input)`` returns an ``nnx.State`` for ``nnx.update(nnx_model, state)``, and
``flax_to_torch(nnx_model, torch_module, sample_input)`` converts the model's own state (or the
``nnx.State`` / linen variables given second); its mode is NNX's, ``model.eval()``. The same
rules, layer for layer: ``nnx.Conv``, ``nnx.Linear``, ``nnx.BatchNorm`` / ``bnref.nnx.BatchNorm``,
an NNX list's ``blocks/0`` paired with torch's ``blocks.0``. ``flax_to_torch(nnx_model)`` is
LeNet-BN's form for ``bnref.nnx.LeNetBN``; :func:`nnx_to_linen` / :func:`linen_to_nnx` move
bnref's variables between the two Flax APIs (the trees are key for key the same).

``import bnref.convert`` imports NumPy only; the model paths import torch and JAX when called.
"""

from __future__ import annotations

from typing import Mapping, Optional

from bnref.convert.layers import Layer, _layer_variables, check_sample, flax_layers, match_layers, torch_layers
from bnref.convert.layout import (channels_last, conv_kernel_to_flax, conv_kernel_to_torch, dense_kernel_to_flax,
                                  dense_kernel_to_torch, flatten_permutation)  # fmt: skip
from bnref.convert.lenet import (BNS, CONVS, DENSES, ORDER, batch_norm_flax_to_torch, batch_norm_torch_to_flax,
                                 lenet_flax_to_torch, lenet_shapes, lenet_torch_to_flax)  # fmt: skip
from bnref.convert.models import ConversionReport, LayerPair, module_flax_to_torch, module_torch_to_flax
from bnref.convert.nnx import as_linen, is_nnx, is_nnx_state, linen_to_nnx, nnx_to_linen
from bnref.convert.walk import CHECK_RTOL, CHECK_RTOL32, CHECK_RTOL64, _rel_error, check_rtol

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
    "nnx_to_linen",
    "linen_to_nnx",
    "ConversionReport",
    "LayerPair",
    "CHECK_RTOL",
]

#: each public function's two forms, for :func:`_lenet_form`'s messages: its LeNet-BN form, the
#: positional arguments of its module form, and those arguments in words
_FORMS = {
    "torch_to_flax": ("torch_to_flax(state_dict)", ("torch_module", "flax_module", "sample_input"),
                      "the torch module, the Flax module and sample_input"),
    "flax_to_torch": ("flax_to_torch(variables)", ("flax_module", "variables", "torch_module", "sample_input"),
                      "the Flax module, its variables, the torch module and sample_input"),
}  # fmt: skip


def _lenet_form(where: str, first, rest: tuple, report: bool) -> bool:
    """Which form a call of ``where`` (``torch_to_flax`` / ``flax_to_torch``) is, the one switch
    on argument types in :mod:`bnref.convert`: True for LeNet-BN's (``first`` a ``Mapping``, its
    ``state_dict`` or variables: the layers are known, so ``rest``, the module form's other
    positional arguments, must be absent and ``report`` False), False for the module form
    (``first`` a module, and every one of ``rest`` given). ``TypeError`` for a mix of the two."""
    lenet, names, words = _FORMS[where]
    module_form = f"{where}({', '.join(names)})"
    if isinstance(first, Mapping):
        if report:
            raise TypeError(f"{lenet} is LeNet-BN's, whose layers are known: report=True is for {module_form}")
        if any(a is not None for a in rest):
            raise TypeError(f"{lenet} is LeNet-BN's; for any other model pass {words}")
        return True
    if any(a is None for a in rest):
        raise TypeError(f"{module_form}: all {({3: 'three', 4: 'four'})[len(names)]} are needed")
    return False


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

    ``flax_module`` may be an ``nnx.Module`` (:mod:`bnref.convert.nnx`): the result is then an
    ``nnx.State`` of its ``nnx.Param`` / ``nnx.BatchStat`` variables (``nnx.update(model,
    state)`` loads it; the model is not modified), the model run in ``model.eval()`` mode with
    ``eval_kwargs`` its own call's arguments besides.

    ``torch_to_flax(state_dict)``: bnref's LeNet-BN ``state_dict`` (the layers are known, no
    sample needed); the same layer rules, and a ``ValueError`` naming the first bad key.
    """
    if _lenet_form("torch_to_flax", torch_module, (flax_module, sample_input), report):
        return lenet_torch_to_flax(torch_module)
    nnx_model = flax_module if is_nnx(flax_module) else None
    if nnx_model is not None:
        flax_module, _, _, eval_kwargs = as_linen(nnx_model, None, "torch_to_flax", eval_kwargs=eval_kwargs)
    variables, rep = module_torch_to_flax(torch_module, flax_module, sample_input, eval_kwargs=eval_kwargs, check=check)
    if nnx_model is not None:
        variables = linen_to_nnx(variables, nnx_model)
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

    ``flax_to_torch(nnx_model, torch_module, sample_input)``: an ``nnx.Module`` carries its
    variables; an ``nnx.State`` or linen variables given second are converted instead
    (``flax_to_torch(nnx_model, state, torch_module, sample_input)``). ``flax_to_torch(nnx_model)``
    (or an ``nnx.State``) alone is the LeNet-BN form for ``bnref.nnx.LeNetBN``.

    ``as_torch`` means one thing in both forms: torch tensors (True) or NumPy arrays (False).
    Its default, None, is each form's own result: the module form returns ``torch_module``'s
    ``state_dict`` for its ``load_state_dict`` (tensors, in the torch module's dtypes), the
    LeNet-BN form one built from the Flax arrays without torch (NumPy). ``num_batches_tracked``
    is the LeNet-BN form's: the module form keeps ``torch_module``'s own counters.
    """
    first = flax_module_or_variables
    if is_nnx(first) and sample_input is None and variables is not None and not isinstance(variables, Mapping):
        variables, torch_module, sample_input = None, variables, torch_module  # (nnx_model, torch_module, sample)
    if is_nnx(first) and variables is None and torch_module is None and sample_input is None:
        first = nnx_to_linen(first)  # the LeNet-BN form, from the model's own variables
    elif is_nnx(first):
        first, variables, _, eval_kwargs = as_linen(first, variables, "flax_to_torch", eval_kwargs=eval_kwargs)
    elif is_nnx_state(first):
        first = nnx_to_linen(first)
    lenet = _lenet_form("flax_to_torch", first, (variables, torch_module, sample_input), report)
    as_torch = (not lenet) if as_torch is None else bool(as_torch)  # None: the form's own result, see above
    if lenet:
        return lenet_flax_to_torch(first, num_batches_tracked=num_batches_tracked, as_torch=as_torch)
    sd, rep = module_flax_to_torch(first, variables, torch_module, sample_input, eval_kwargs=eval_kwargs, check=check,
                                   as_torch=as_torch)  # fmt: skip
    return (sd, rep) if report else sd
