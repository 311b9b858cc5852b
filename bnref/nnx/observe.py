"""Looking into any Flax NNX model from outside, for precise BN and the tools (``bnref.convert``,
``bnref.diagnose``): which layers one forward pass calls and on what, and the model behind
linen's ``init`` / ``apply`` in linen's variable layout (:class:`LinenView`).

flax.linen has ``intercept_methods`` to watch a layer's calls; NNX has no such hook, and its
``nnx.capture`` sees outputs only. So a forward pass is watched on a fresh copy of the model
(``nnx.merge`` of its graph with copies of its state: NNX's ``split`` shares the Variable
objects, and a run in training mode writes its ``BatchStat``s and RNG counters), whose chosen
layers have their class swapped for a subclass that reports each call (:func:`observing`) and
swapped back when the pass is over. The caller's model is never touched, in or out of ``jax.jit``.

Paths are NNX's: a tuple of attribute names and list indices (``("blocks", 0, "bn")``), written
``blocks/0/bn`` in messages (:func:`path_name`); in linen's layout an index is a string key
(``"0"``), as in every linen tree, and NNX's ``replace_by_pure_dict`` reads both.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from bnref.nnx.variables import load_linen

__all__ = ["modules", "path_name", "observing", "mode_kwargs", "LinenView", "linen_layout", "state_from_linen"]

#: the variable types an NNX model holds linen's two collections in
_PARAM_TYPES = (nnx.Param, nnx.BatchStat)


def modules(model: nnx.Module) -> list:
    """``[(path, module)]`` for every module of ``model`` (itself included, path ``()``); a module
    reachable by two paths is listed once, as NNX's graph has it once."""
    iterate = getattr(nnx, "iter_modules", None)  # the function since flax 0.11; before it, the method
    return list(iterate(model) if iterate is not None else model.iter_modules())


def path_name(path) -> str:
    """``("blocks", 0, "bn")`` -> ``"blocks/0/bn"``."""
    return "/".join(map(str, path))


_OBSERVED: Dict[type, type] = {}  # a module class -> its reporting subclass (made once per class)
_LISTENERS: Dict[int, Tuple[tuple, Callable]] = {}  # id(module) -> (path, on_call), while observed


def _observed_class(cls: type) -> type:
    sub = _OBSERVED.get(cls)
    if sub is None:

        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            listener = _LISTENERS.get(id(self))
            if listener is not None:
                listener[1](listener[0], self, args, kwargs, out)
            return out

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})  # fmt: skip
        _OBSERVED[cls] = sub
    return sub


@contextlib.contextmanager
def observing(model: nnx.Module, select: Callable[[nnx.Module], bool], on_call: Callable):
    """Inside the block, each call of a module of ``model`` that ``select`` chooses reports
    ``on_call(path, module, args, kwargs, output)`` after it returns. ``model`` must be a copy
    the caller owns (:meth:`LinenView.copy`): its chosen modules change class for the block."""
    chosen = [(tuple(path), m) for path, m in modules(model) if select(m)]
    classes = [type(m) for _, m in chosen]
    try:
        for (path, m), cls in zip(chosen, classes):
            _LISTENERS[id(m)] = (path, on_call)
            m.__class__ = _observed_class(cls)
        yield
    finally:
        for (_, m), cls in zip(chosen, classes):
            m.__class__ = cls
            _LISTENERS.pop(id(m), None)


def mode_kwargs(model: nnx.Module, train: bool) -> Dict[str, bool]:
    """The call arguments that put ``model`` in a mode besides ``model.train()`` / ``eval()``:
    ``{"train": train}`` when its ``__call__`` takes a ``train`` argument (bnref's LeNet-BN, linen
    habits), else none."""
    try:
        takes = "train" in inspect.signature(model.__call__).parameters
    except (TypeError, ValueError):  # no signature to read
        takes = False
    return {"train": train} if takes else {}


def _fresh(state):
    """A copy of an ``nnx.State`` with new Variable objects (the same arrays)."""
    return jax.tree.map(lambda a: a, state)


def _replaced(state, pure: Mapping):
    """A copy of ``state`` holding the arrays of the pure dict ``pure`` in their own dtypes (no cast:
    the tools run a float32 model in float64), as JAX arrays: a layer writes its Variables in
    place (``self.mean[...] = ...``), which must never reach a caller's NumPy array."""
    state = _fresh(state)
    if pure:
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(pure)))
    return state


def linen_layout(tree: Mapping) -> Dict:
    """A pure dict with every key a string (an NNX list's index ``0`` -> ``"0"``), as linen's are."""
    return {str(k): linen_layout(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


class LinenView:
    """An NNX model behind flax.linen's ``init`` / ``apply``, for code written for linen models.

    The variables are linen's ``{"params": ..., "batch_stats": ...}`` (the model's ``nnx.Param``
    and ``nnx.BatchStat`` arrays; :meth:`variables` gives the model's own, string keys); every
    other state of the model (RNG keys and counters, say) is the model's, copied. ``apply``
    runs a fresh copy of the model holding the given variables in the mode asked for, set as
    ``model.train()`` / ``model.eval()`` set it (``use_running_average`` and ``deterministic``
    of every layer that has them), and calls it with ``train_kwargs`` / ``eval_kwargs``, the
    model's own call arguments (default :func:`mode_kwargs`). The model is never modified.
    """

    def __init__(self, model: nnx.Module, train_kwargs: Optional[Mapping] = None,
                 eval_kwargs: Optional[Mapping] = None):  # fmt: skip
        self.model = model
        self.train_kwargs = mode_kwargs(model, True) if train_kwargs is None else dict(train_kwargs)
        self.eval_kwargs = mode_kwargs(model, False) if eval_kwargs is None else dict(eval_kwargs)
        self._graphdef, self._params, self._stats, self._rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

    def variables(self) -> Dict[str, Dict]:
        """The model's own variables, linen's layout (a collection the model has none of is left
        out, as linen's ``init`` leaves it out)."""
        out = {}
        for collection, state in (("params", self._params), ("batch_stats", self._stats)):
            pure = linen_layout(nnx.to_pure_dict(state))
            if pure:
                out[collection] = pure
        return out

    def init(self, rng=None, x=None, **kwargs) -> Dict[str, Dict]:
        """linen's ``init``: the model's own variables (an NNX model is built initialized)."""
        return self.variables()

    def copy(self, variables: Optional[Mapping] = None) -> nnx.Module:
        """A fresh copy of the model holding ``variables`` (default: its own), as JAX arrays of
        their own dtypes (not the model's: the tools run a float32 model in float64)."""
        variables = self.variables() if variables is None else variables
        return nnx.merge(self._graphdef, _replaced(self._params, variables.get("params", {})),
                         _replaced(self._stats, variables.get("batch_stats", {})), _fresh(self._rest))  # fmt: skip

    def apply(self, variables: Mapping, x, *, train: bool = False, mutable=False,
              select: Optional[Callable] = None, on_call: Optional[Callable] = None):  # fmt: skip
        """linen's ``apply(variables, x, train=..., mutable=...)``: the output, and with ``mutable``
        also ``{"batch_stats": ...}`` after the call (linen's layout). ``select`` / ``on_call``:
        the calls to report (:func:`observing`)."""
        model = self.copy(variables)
        if train:
            model.train()
        else:
            model.eval()
        kwargs = self.train_kwargs if train else self.eval_kwargs
        with observing(model, select or (lambda m: False), on_call or (lambda *a: None)):
            out = model(x, **kwargs)
        if mutable:
            return out, {"batch_stats": linen_layout(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))}
        return out

    def __call__(self, x, train: bool = False):
        """The model on ``x`` in the mode ``train`` says, with its own variables (a signature the
        tools' argument checks read: the view's one mode argument is ``train``)."""
        return self.apply(self.variables(), x, train=train)


def _int_keys(pure: Mapping, like: Mapping) -> Dict:
    """``pure`` with each string key that is an index in ``like`` (a pure dict of the model) as that int."""
    out = {}
    for k, v in pure.items():
        key = int(k) if k not in like and isinstance(k, str) and k.isdigit() and int(k) in like else k
        inner = like.get(key)
        out[key] = _int_keys(v, inner) if isinstance(v, Mapping) and isinstance(inner, Mapping) else v
    return out


def state_from_linen(model: nnx.Module, variables: Mapping) -> nnx.State:
    """linen ``variables`` (``{"params", "batch_stats"}``, string or int keys) as an ``nnx.State``
    of ``model``'s ``nnx.Param`` and ``nnx.BatchStat`` variables, each array in the dtype the
    model stores it in, for ``nnx.update(model, state)``; checked as
    :func:`bnref.nnx.variables.load_linen` checks (``ValueError`` naming the first path or shape
    that differs). ``model`` is not modified."""
    from bnref.nnx.variables import linen_variables

    own = linen_variables(model)
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, _fresh(state))
    given = {c: _int_keys(t, own.get(c, {})) if isinstance(t, Mapping) else t for c, t in dict(variables).items()}
    load_linen(copy, given)
    return nnx.state(copy, nnx.Any(*_PARAM_TYPES))
