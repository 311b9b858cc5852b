"""Flax NNX models in :mod:`bnref.convert` (and :mod:`bnref.diagnose`): wherever a Flax module
and its variables go, an ``nnx.Module`` may go instead, carrying its own state.

An NNX model is shown to the linen code paths through ``bnref.nnx.observe.LinenView``: the
model behind linen's ``init`` / ``apply``, its ``nnx.Param`` and ``nnx.BatchStat`` arrays in
linen's ``{"params", "batch_stats"}`` layout (the same tree, key for key: an NNX list's index is
the string key ``"0"``, so ``blocks/0/conv`` pairs with torch's ``blocks.0.conv``), each run on
a fresh copy of the model (which is never modified). Its layers: ``nnx.Conv`` <-> Conv1d/Conv2d,
``nnx.Linear`` <-> Linear, ``nnx.BatchNorm`` / ``bnref.nnx.BatchNorm`` <-> BatchNorm1d/2d/3d.
Its mode is NNX's, ``model.train()`` / ``model.eval()``; ``eval_kwargs`` / ``train_kwargs`` are
then what the model's own call takes besides (default ``{"train": ...}`` when its ``__call__``
has a ``train`` argument, else none).

What comes out for an NNX model is NNX's: ``torch_to_flax`` gives an ``nnx.State`` (its Param
and BatchStat variables, for ``nnx.update(model, state)``); ``flax_to_torch`` takes the model's
own state, or an ``nnx.State``, or linen variables. :func:`nnx_to_linen` and
:func:`linen_to_nnx` move bnref's variables between the two Flax APIs (``bnref.nnx.variables``).

Nothing here imports Flax until an NNX object is handed in (an object can only be an
``nnx.Module`` once ``flax.nnx`` is imported).
"""

from __future__ import annotations

import sys
from typing import Mapping, Optional

from bnref.convert.layers import _check_mode_arguments, is_nnx

__all__ = ["is_nnx", "is_nnx_state", "as_linen", "nnx_variables", "nnx_to_linen", "linen_to_nnx"]


def is_nnx_state(obj) -> bool:
    """Whether ``obj`` is an ``nnx.State`` (without importing Flax)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.State)


def as_linen(model, variables, where: str, *, train_kwargs: Optional[Mapping] = None,
             eval_kwargs: Optional[Mapping] = None):  # fmt: skip
    """The NNX ``model`` as the linen code paths take a Flax model: ``(view, linen_variables,
    view_train_kwargs, view_eval_kwargs)``, the view's mode arguments being ``{"train": True}``
    / ``{"train": False}``. ``variables``: None (the model's own), an ``nnx.State``, or linen's
    ``{"params", "batch_stats"}``, checked against the model (every path and shape:
    ``ValueError`` naming the first that differs). ``train_kwargs`` / ``eval_kwargs``: what the
    model's own call takes (default :func:`bnref.nnx.observe.mode_kwargs`); ``eval_kwargs`` are
    checked against its signature (``ValueError`` saying what to pass)."""
    from bnref.nnx.observe import LinenView, state_from_linen

    view = LinenView(model, train_kwargs, eval_kwargs)
    _check_mode_arguments(model, view.eval_kwargs, where)  # given, or the default (as linen's: the eval call's)
    linen = nnx_variables(model, variables, where)
    if variables is not None:
        try:
            state_from_linen(model, linen)
        except ValueError as e:
            raise ValueError(f"{where}: the variables do not fit the NNX model: {e}") from None
    return view, linen, {"train": True}, {"train": False}


def nnx_variables(model, variables, where: str) -> dict:
    """The linen-layout variables for the NNX ``model``: its own (``variables`` None), those of an
    ``nnx.State`` (its Param and BatchStat variables), or linen ``variables`` as given (their
    keys as strings)."""
    from bnref.nnx.observe import linen_layout

    if variables is None:
        return nnx_to_linen(model)
    if is_nnx_state(variables):
        return _linen_of_state(variables)
    if not isinstance(variables, Mapping):
        raise ValueError(f"{where}: the NNX model's variables must be an nnx.State or linen's {{'params', "
                         f"'batch_stats'}} mapping (or left out: the model's own), got a "
                         f"{type(variables).__name__}")  # fmt: skip
    return {c: linen_layout(t) if isinstance(t, Mapping) else t for c, t in variables.items()}


def _linen_of_state(state) -> dict:
    from flax import nnx

    from bnref.nnx.observe import linen_layout

    params, stats, _ = nnx.split_state(state, nnx.Param, nnx.BatchStat, ...)
    out = {}
    for collection, part in (("params", params), ("batch_stats", stats)):
        pure = linen_layout(nnx.to_pure_dict(part))
        if pure:
            out[collection] = pure
    return out


def nnx_to_linen(model_or_state) -> dict:
    """An NNX model's (or an ``nnx.State``'s) ``nnx.Param`` / ``nnx.BatchStat`` arrays as linen's
    ``{"params": ..., "batch_stats": ...}`` (string keys, as a linen tree has; the collections it
    has none of left out): what ``bnref.jax.LeNetBN.apply`` takes for ``bnref.nnx.LeNetBN``'s."""
    if is_nnx_state(model_or_state):
        return _linen_of_state(model_or_state)
    if not is_nnx(model_or_state):
        raise ValueError(f"nnx_to_linen: an nnx.Module or nnx.State goes here, got a {type(model_or_state).__name__}")
    from bnref.nnx.observe import LinenView

    return LinenView(model_or_state, {}, {}).variables()


def linen_to_nnx(variables: Mapping, model):
    """linen ``variables`` (``{"params", "batch_stats"}``) as an ``nnx.State`` of ``model`` (an
    ``nnx.Module`` with the same tree: ``bnref.nnx.LeNetBN`` for ``bnref.jax.LeNetBN``'s), each
    array in the model's dtype, for ``nnx.update(model, state)``; ``ValueError`` naming the first
    path or shape that differs. ``model`` is not modified."""
    if not is_nnx(model):
        raise ValueError(f"linen_to_nnx: the NNX model goes second, got a {type(model).__name__}")
    if not isinstance(variables, Mapping):
        raise ValueError(f"linen_to_nnx: linen variables {{'params', 'batch_stats'}} go first, got a "
                         f"{type(variables).__name__}")  # fmt: skip
    from bnref.nnx.observe import state_from_linen

    return state_from_linen(model, variables)
