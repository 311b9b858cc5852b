"""flax.linen <-> flax.nnx variables: an NNX model's state as linen's ``{"params", "batch_stats"}``
and back.

An NNX module keeps its parameters in ``nnx.Param`` and its BN statistics in ``nnx.BatchStat``
attributes; a linen module keeps the same arrays in the ``params`` and ``batch_stats`` collections.
For two models whose submodules have the same names (``bnref.nnx.LeNetBN`` and
``bnref.jax.LeNetBN``; any linen/NNX pair written alike) the trees are key for key the same, so
converting is moving arrays, checked: a missing, extra or misshapen entry is a ``ValueError``
naming its path, and nothing is changed then.

    variables = linen_variables(nnx_model)       # {"params": ..., "batch_stats": ...}
    load_linen(nnx_model, linen_variables)       # in place
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import jax
import numpy as np
from flax import nnx

__all__ = ["linen_variables", "load_linen", "COLLECTIONS"]

#: linen collection -> NNX variable type
COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def _pure(state) -> Dict:
    """An ``nnx.State`` as nested dicts of arrays."""
    to_pure = getattr(nnx, "to_pure_dict", None)
    return to_pure(state) if to_pure is not None else state.to_pure_dict()


def linen_variables(model: nnx.Module) -> Dict[str, Dict]:
    """``{"params": ..., "batch_stats": ...}`` of an NNX ``model``: its ``nnx.Param`` and
    ``nnx.BatchStat`` arrays in linen's layout (the arrays themselves, not copies)."""
    return {collection: _pure(nnx.state(model, kind)) for collection, kind in COLLECTIONS.items()}


def _paths(tree: Mapping, prefix=()) -> Dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_paths(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def load_linen(model: nnx.Module, variables: Mapping[str, Mapping]) -> nnx.Module:
    """Set ``model``'s ``nnx.Param`` and ``nnx.BatchStat`` arrays from linen ``variables``
    (``{"params": ..., "batch_stats": ...}``; a collection the model has no variable of may be
    left out), in place; returns ``model``. Every path and shape is checked before anything is
    written: ``ValueError`` naming the first difference."""
    unknown = sorted(set(variables) - set(COLLECTIONS))
    if unknown:
        raise ValueError(f"linen variables have collections {unknown}; an NNX model takes {sorted(COLLECTIONS)}")
    updates = []
    for collection, kind in COLLECTIONS.items():
        have = _paths(_pure(nnx.state(model, kind)))
        given = _paths(variables.get(collection, {}))
        if not have and not given:
            continue
        for path in sorted(set(have) | set(given), key=str):
            where = f"{collection}/{'/'.join(map(str, path))}"
            if path not in given:
                raise ValueError(f"{where}: the NNX model has it, the linen variables do not")
            if path not in have:
                raise ValueError(f"{where}: the linen variables have it, the NNX model does not")
            if np.shape(given[path]) != np.shape(have[path]):
                raise ValueError(f"{where}: shape {np.shape(given[path])} in the linen variables, "
                                 f"{np.shape(have[path])} in the NNX model")  # fmt: skip
        state = nnx.state(model, kind)
        _replace(state, variables[collection])
        updates.append(state)
    for state in updates:
        nnx.update(model, state)
    return model


def _replace(state, pure: Mapping) -> None:
    """``nnx.replace_by_pure_dict`` with the arrays as JAX arrays of the stored dtype."""
    dtypes = jax.tree.map(lambda a: a.dtype, _pure(state))
    cast = jax.tree.map(lambda a, d: jax.numpy.asarray(a, d), dict(pure), dtypes)
    nnx.replace_by_pure_dict(state, cast)
