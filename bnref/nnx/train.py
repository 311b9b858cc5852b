"""Training LeNet-BN in Flax NNX: ``python -m bnref.train --backend nnx``.

Two ways in, the same numbers:

- NNX's own: :func:`train_step` ``(model, optimizer, X, y) -> (loss, correct)``, an ``nnx.jit``
  step over an ``nnx.Optimizer`` (``wrt=nnx.Param``), the model in ``model.train()`` mode, its
  ``nnx.BatchStat``s updated in place; :func:`eval_step` in ``model.eval()`` mode.
- The backend's: :func:`fit` runs the JAX backend's loop (``bnref.jax.train``: the dataset on the
  device, the example order, ``--steps-per-call`` in one ``lax.scan``, ``--replicas`` over a device
  mesh with ``axis_name``, bfloat16, checkpoints and exact resume, precise BN) over an NNX model,
  through :class:`LinenFace`: the model's graph (``nnx.split``) merged with the state inside each
  compiled step (``nnx.merge``), the functional form Flax's NNX guide gives for ``jax.jit``,
  ``lax.scan`` and ``shard_map``. The checkpoint holds the NNX state in linen's layout
  (``bnref.nnx.variables``).

Initial weights: the linen model's for the seed (``bnref.jax.LeNetBN.init``), loaded into the NNX
model, so ``--backend nnx`` and ``--backend jax`` start from the same point and follow the same
example order: the same trajectory, bit for bit on a CPU in float32 and float64
(``tests/test_nnx_train.py``). In bfloat16 the NNX layers follow flax.nnx's dtype rule (scale, bias
and statistics cast to bfloat16 before normalizing; linen's compute in float32), so the two
bfloat16 runs drift apart (1.2e-2 over the first 10 steps, README).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bnref.jax import train as jax_train
from bnref.nnx.models import LeNetBN
from bnref.nnx.observe import LinenView, state_from_linen
from bnref.nnx.variables import load_linen

__all__ = ["LinenFace", "NNX", "make_model", "initial_model", "model_holding", "fit", "check_checkpoint", "train_step",
           "eval_step", "optimizer_for"]


class LinenFace(LinenView):
    """An NNX LeNet-BN behind linen's ``init`` / ``apply``, the calls ``bnref.jax.train``'s loop
    makes: ``bnref.nnx.observe.LinenView`` (what the tools wrap a user's NNX model in) over the
    model's abstract graph, whose ``apply`` merges the graph with the given variables
    (``nnx.merge``), sets the mode as ``model.train()`` / ``model.eval()`` do, calls it with its
    ``train`` argument, and returns the updated ``nnx.BatchStat``s as ``batch_stats``.

    ``kwargs``: :class:`bnref.nnx.LeNetBN`'s (``bn``, ``convention``, ``dtype``, ``axis_name``).
    """

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        super().__init__(nnx.eval_shape(lambda: LeNetBN(rngs=nnx.Rngs(0), **kwargs)), {"train": True},
                         {"train": False})  # fmt: skip

    def _linen_twin(self):
        from bnref.jax.models import LeNetBN as LinenLeNetBN

        kw = {k: v for k, v in self.kwargs.items() if k in ("bn", "convention", "dtype", "param_dtype")}
        return LinenLeNetBN(**kw)

    def init(self, rng, x, train: bool = False):
        """The initial variables for ``rng``: linen's LeNet-BN's (the same draws as ``--backend jax``),
        checked against this model's layout."""
        variables = self._linen_twin().init(rng, x, train=train)
        state_from_linen(self.model, variables)  # checks the layout; the abstract model is not modified
        return variables


def make_model(config, axis_name: Optional[str] = None) -> LinenFace:
    """``config``'s LeNet-BN in NNX behind :class:`LinenFace` (``bnref.jax.train.make_model``'s
    choices: ``bn``, ``convention``, bfloat16 computation with float32 parameters)."""
    dtype = jnp.bfloat16 if config.precision == "bfloat16" else None
    return LinenFace(bn=config.bn, convention=config.bn_convention, dtype=dtype, axis_name=axis_name)


def _precise(face: LinenFace, variables, batches, *, variant: str, progress: bool):
    from bnref.nnx.precise import precise_batch_stats

    model = face.copy(variables)  # the NNX model holding the variables
    return precise_batch_stats(model, batches, variant=variant, progress=progress, update=False)


#: the training loop's model family for NNX (``bnref.jax.train.Family``)
NNX = jax_train.Family("flax.nnx", make_model, _precise)


def fit(config, data, on_epoch: Callable[[Dict], None], run=None) -> List[Dict]:
    """``bnref.jax.train.fit`` with the NNX model (:data:`NNX`): the same metrics, checkpoints and
    options."""
    return jax_train.fit(config, data, on_epoch, run, family=NNX)


def check_checkpoint(path: str, config, run_id) -> int:
    """``bnref.jax.train.check_checkpoint`` against the NNX model's state."""
    return jax_train.check_checkpoint(path, config, run_id, family=NNX)


def model_holding(config, variables) -> LeNetBN:
    """``config``'s NNX LeNet-BN holding linen ``variables`` (checked: ``ValueError`` naming the
    first path or shape that differs)."""
    return load_linen(LeNetBN(rngs=nnx.Rngs(0), **make_model(config).kwargs), variables)


def initial_model(config, seed: Optional[int] = None) -> LeNetBN:
    """The NNX LeNet-BN ``--backend nnx`` starts from for ``seed`` (default ``config.seed``): the
    linen model's initial weights loaded into it."""
    variables = make_model(config).init(jax.random.key(config.seed if seed is None else seed),
                                        jnp.zeros((1, 28, 28, 1)))  # fmt: skip
    return model_holding(config, variables)


def optimizer_for(model: nnx.Module, lr: float) -> nnx.Optimizer:
    """SGD on ``model``'s ``nnx.Param``s (fit's optimizer), as an ``nnx.Optimizer``."""
    try:
        return nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)
    except TypeError:  # a Flax before wrt= (<= 0.10): Params are its default
        return nnx.Optimizer(model, optax.sgd(lr))


def _loss(model, X, y):
    logits = model(X)
    logits32 = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # as the JAX backend's loss
    return optax.softmax_cross_entropy_with_integer_labels(logits32, y).mean(), logits


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, X, y):
    """One SGD step of ``model`` (in ``model.train()`` mode) on ``X`` (B, 28, 28, 1), ``y`` (B,):
    ``(mean loss, number correct)``; the parameters (through ``optimizer``) and the BN statistics
    are updated in place. The same numbers as ``fit``'s steps (``tests/test_nnx_train.py``)."""
    (loss, logits), grads = nnx.value_and_grad(_loss, has_aux=True)(model, X, y)
    _update(optimizer, model, grads)
    return loss, (jnp.argmax(logits, -1) == y).sum()


def _update(optimizer, model, grads) -> None:
    try:
        optimizer.update(model, grads)
    except TypeError:  # a Flax before update(model, grads) (<= 0.10): update(grads)
        optimizer.update(grads)


@nnx.jit
def eval_step(model: nnx.Module, X):
    """Logits of ``X`` with the model's stored statistics, whatever mode it is in."""
    return model(X, train=False)

