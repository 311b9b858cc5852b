"""Precise BatchNorm statistics for any Flax NNX model: :func:`precise_batch_stats`.

The NNX face of :func:`bnref.jax.precise_batch_stats` (flax.linen's), with the same variants,
the same algorithm and the same refusals, run by the same code (``bnref.jax.precise``'s
``check_batches`` / ``recompute`` / ``moments``): for every BN layer of the model,
``flax.nnx.BatchNorm`` or ``bnref.nnx.BatchNorm``, new statistics recomputed with the weights
fixed over ``batches``:

- ``"population"`` (:func:`bnref.spec.population_stats`): the exact mean and biased variance of
  each layer's input over all the batches' values, the model in evaluation mode with the new
  statistics of the layers below; bottom-up, one jitted pass per layer (returning only that
  layer's input moments, so XLA drops the layers above it).
- ``"batch_average"`` (:func:`bnref.spec.batch_average_stats`): the model in training mode, the
  equally weighted average of each batch's mean and variance, the variance with the layer's own
  estimator (flax.nnx: biased; bnref.nnx: its convention's); one pass.

NNX's way in: the model carries its state, so there are no ``variables`` to pass; its mode is
set as ``model.train()`` / ``model.eval()`` set it (``use_running_average``, ``deterministic``).
The passes run on fresh copies of the model (:mod:`bnref.nnx.observe`), which is left as it was
until the end: with ``update=True`` the new statistics are written into its ``nnx.BatchStat``s
then, and only when every layer's are computed; with ``update=False`` it is never modified (the
training loop's precise-BN evaluation). The statistics come back in linen's layout, what
``bnref.nnx.variables.linen_variables(model)["batch_stats"]`` gives, each leaf in its dtype.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional

from flax import nnx

from bnref.jax import precise as _linen
from bnref.nnx.layers import BatchNorm
from bnref.nnx.observe import LinenView, modules
from bnref.nnx.variables import linen_variables, load_linen

__all__ = ["VARIANTS", "precise_batch_stats"]

#: the variants, the default first
VARIANTS = _linen.VARIANTS
_BN_TYPES = (nnx.BatchNorm, BatchNorm)
_NONE = "flax.nnx.BatchNorm or bnref.nnx.BatchNorm layer"


def _is_bn(module) -> bool:
    return isinstance(module, _BN_TYPES)


def precise_batch_stats(
    model: nnx.Module,
    batches: Iterable,
    *,
    variant: str = "population",
    progress: bool = False,
    update: bool = True,
    train_kwargs: Optional[Mapping[str, Any]] = None,
    eval_kwargs: Optional[Mapping[str, Any]] = None,
) -> Dict:
    """New statistics for every BN layer of the NNX ``model`` over ``batches``.

    ``batches``: the inputs (arrays, or ``(inputs, ...)`` tuples); ``"population"`` goes over
    them once per BN layer, so they must be re-iterable (a list), not a one-shot iterator.
    ``progress``: a progress bar per pass. ``update``: write the new statistics into the model's
    ``nnx.BatchStat``s (default) or leave the model as it was. ``train_kwargs`` /
    ``eval_kwargs``: what the model's own call takes in training / evaluation mode besides the
    mode ``model.train()`` / ``model.eval()`` set (default ``{"train": True}`` / ``{"train":
    False}`` when its ``__call__`` has a ``train`` argument, as bnref's LeNet-BN, else none).

    Returns the model's ``batch_stats`` in linen's layout (a nested dict of arrays, the called
    BN layers' ``mean``/``var`` new, every other leaf as it was). ``ValueError``, the model
    unchanged, for an unknown variant, no batches, a one-shot iterator for ``"population"``, a
    batch that is neither an array nor a tuple/list starting with one, a model with no BN layer
    or none called, a BN layer called more than once per forward pass (a shared layer), a batch
    with fewer than 2 values per feature (``"batch_average"``) or all batches together with
    fewer than 2 (``"population"``).
    """
    batches = _linen.check_batches(batches, variant)
    if not any(_is_bn(m) for _, m in modules(model)):
        raise ValueError(f"the model has no {_NONE}")
    view = LinenView(model, train_kwargs, eval_kwargs)
    train = variant == "batch_average"

    def run(variables, x):
        store: Dict = {}

        def record(path, module, args, kwargs, out):
            if path in store:
                raise _linen.shared_layer_error(path, "forward pass")
            store[path] = (module, _linen.moments(module, args[0] if args else kwargs["x"]))

        view.apply(variables, x, train=train, select=_is_bn, on_call=record)
        return {p: got for p, (_, got) in store.items()}, {p: m for p, (m, _) in store.items()}

    own = linen_variables(model)
    stats = _linen.recompute(run, own, batches, variant=variant, progress=progress,
                             none_called=f"no {_NONE} was called by the model")  # fmt: skip
    if update:
        load_linen(model, {**own, "batch_stats": stats})
    return stats
