"""What the experiments share: the learning-rate rule (:data:`BASE_LR`, :data:`BASE_BATCH`,
:data:`LR_RULE`, :func:`scaled_lr`), the data (:func:`_dataset`), the figure's caption and saving
(:func:`_save`, :func:`_caption`), per-epoch curves and the batch-size axis of a figure, and the
JAX training helpers of ``batch-size`` and ``eval-stats``: :func:`_jax_sgd` (the training loop)
and :class:`_JaxProbe` (what they measure of the state).

No framework at import time: torch, JAX and matplotlib are imported inside the functions.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from bnref import _io
from bnref.data import is_synthetic

#: d2l's learning rate at its batch size (the seed's defaults); other batch sizes scale from it
BASE_LR, BASE_BATCH = 1.0, 256
LR_RULE = "lr = 1.0 * min(B, 256) / 256 for a (global) batch of B: d2l's 1.0 at 256, linear below, capped above"


def scaled_lr(batch_size: int) -> float:
    """The learning rate for a (global) batch of ``batch_size`` (:data:`LR_RULE`): linear in the
    batch below 256 (Goyal et al.'s rule: the same lr per example, so a fixed budget of examples
    moves the weights about as far at any batch size) and capped at d2l's 1.0 above, which is
    already large for LeNet."""
    return BASE_LR * min(batch_size, BASE_BATCH) / BASE_BATCH


def _dataset(data_dir: Optional[str], n_train: Optional[int], n_test: Optional[int], seed: int, synthetic: bool = False):
    """Fashion-MNIST (from ``data_dir`` or the default places; missing files are an error), or
    with ``synthetic`` the synthetic stand-in, cut to its first ``n_train`` / ``n_test``
    examples (None: all of them)."""
    import dataclasses

    from bnref.data import load_or_synthetic

    data = load_or_synthetic(data_dir, synthetic_data=synthetic, n_train=n_train or 60000, n_test=n_test or 10000,
                             seed=seed)  # fmt: skip
    return dataclasses.replace(data, train_images=data.train_images[:n_train], train_labels=data.train_labels[:n_train],
                               test_images=data.test_images[:n_test], test_labels=data.test_labels[:n_test])  # fmt: skip


def _save(fig, path: str, result: Dict) -> None:
    """Write an experiment's figure with the data it was drawn on in a caption, so a figure
    of the synthetic stand-in can never pass for one of Fashion-MNIST."""
    if "data" in result:
        fig.text(0.5, 0.003, _caption(result), ha="center", va="bottom", fontsize="small",
                 color="red" if is_synthetic(result["data"]) else "gray")  # fmt: skip
        _io.save_figure(fig, path, rect=(0, 0.045, 1, 1))
    else:
        _io.save_figure(fig, path)


def _caption(result: Dict) -> str:
    return f"data: {result['data']}" + (" - NOT Fashion-MNIST (--synthetic)" if is_synthetic(result["data"]) else "")


def _curves(history: Sequence[Dict], keys: Sequence[str] = ("loss", "train_acc", "test_acc")) -> Dict[str, list]:
    """``bnref.train`` metrics per epoch -> one list per key."""
    return {key: [m[key] for m in history] for key in keys}


def _batch_axis(ax, sizes: Sequence[int], label: str) -> None:
    """A log2 x axis ticked at the batch sizes themselves."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes), [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel(label)


def _jax_sgd(model, data, *, lr: float, batch_size: int, steps: int, seed: int, every: int, probe) -> List[Dict]:
    """Train the Flax ``model`` by SGD for ``steps`` steps of ``batch_size`` from its seeded
    initial state, by fit's own loop (``bnref.jax.train.train_steps``: the schedule's example
    order, reshuffled each epoch, full batches); returns ``probe(step, state)`` taken every
    ``every`` steps and after the last.

    Not ``bnref.jax.train.fit``: fit reports metrics per epoch and never hands out the state,
    and these experiments measure the state itself (its running statistics, evaluated several
    ways) at points within training."""
    import itertools

    import jax
    import jax.numpy as jnp

    from bnref.jax import train as jtrain

    X, y = jnp.asarray(jtrain.prepare_images(data.train_images)), jnp.asarray(np.asarray(data.train_labels, np.int32))
    state = jtrain.create_train_state(model, jax.random.key(seed), lr, X[:1])  # X (N, 28, 28, 1), y (N,)
    probes = []
    run = jtrain.train_steps(state, X, y, seed=seed, batch_size=batch_size, epochs=itertools.count(1))
    for step, s in enumerate(itertools.islice(run, steps), start=1):
        if step % every == 0 or step == steps:
            probes.append(probe(step, s.state))  # before the next step donates the state
    return probes


def _train_mode_logits(state, X):
    """Logits with BN in training mode (each test batch normalized by its own statistics); the
    statistics it would update are dropped: evaluation changes nothing."""
    logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, X, train=True,
                               mutable=["batch_stats"])  # fmt: skip
    return logits


class _JaxProbe:
    """Evaluates a Flax LeNet-BN state on the test set with its running statistics (the EMA), with
    precise statistics (``bnref.jax.precise_batch_stats``, population variant, over
    ``precise_examples`` training examples drawn once) and, for each size in ``batch_sizes``,
    with batch statistics (train-mode BN on test batches of that size); and measures how far
    the running statistics are from the precise ones, per BN layer."""

    def __init__(self, model, data, *, precise_examples: int, batch_sizes: Sequence[int] = (), seed: int = 0):
        import jax
        import jax.numpy as jnp

        from bnref.jax import train as jtrain
        from bnref.schedule import epoch_permutation

        self.model, self.batch_sizes = model, tuple(batch_sizes)
        self.Xt = jnp.asarray(jtrain.prepare_images(data.test_images))  # (M, 28, 28, 1)
        self.yt = jnp.asarray(np.asarray(data.test_labels, np.int32))
        # A fixed sample, the same for every probe (the order of an "epoch 0", before training's
        # first), in batches of one shape (one compilation per layer); how the examples are
        # grouped does not change population statistics.
        idx = epoch_permutation(seed, 0, len(data.train_labels))[:precise_examples]
        chunk = min(500, len(idx))
        X = jtrain.prepare_images(data.train_images[idx[: len(idx) - len(idx) % chunk]])
        self.precise_batches = [jnp.asarray(X[i : i + chunk]) for i in range(0, len(X), chunk)]
        self.logits = jax.jit(_train_mode_logits)

    def __call__(self, state) -> Dict:
        from bnref.jax import train as jtrain
        from bnref.jax.precise import precise_batch_stats

        precise = precise_batch_stats(self.model, {"params": state.params, "batch_stats": state.batch_stats},
                                      self.precise_batches)  # fmt: skip
        out = {"acc_running": jtrain.evaluate(state, self.Xt, self.yt),
               "acc_precise": jtrain.evaluate(state.replace(batch_stats=precise), self.Xt, self.yt),
               "acc_batch": {str(b): self._batch_stat_accuracy(state, b) for b in self.batch_sizes},
               "running_var_rel_error": {}, "running_var_ratio": {}, "running_mean_error": {}}  # fmt: skip
        for layer, ema in state.batch_stats.items():
            pm, pv = (np.asarray(precise[layer][k], np.float64) for k in ("mean", "var"))
            rm, rv = (np.asarray(ema[k], np.float64) for k in ("mean", "var"))
            # Per channel, averaged over the layer's channels: |running / population - 1| for the
            # variance (and running / population itself: a bias moves the ratio away from 1, noise
            # does not), and the mean's error in units of the population's std.
            out["running_var_rel_error"][layer] = float(np.mean(np.abs(rv / pv - 1)))
            out["running_var_ratio"][layer] = float(np.mean(rv / pv))
            out["running_mean_error"][layer] = float(np.mean(np.abs(rm - pm) / np.sqrt(pv)))
        return out

    def _batch_stat_accuracy(self, state, batch_size: int) -> float:
        n = len(self.yt) - len(self.yt) % batch_size  # full batches only: one batch size, one compilation
        correct = sum(int((self.logits(state, self.Xt[i : i + batch_size]).argmax(-1) == self.yt[i : i + batch_size]).sum())
                      for i in range(0, n, batch_size))  # fmt: skip
        return correct / n
