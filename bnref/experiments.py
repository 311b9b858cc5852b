"""BatchNorm experiments with figures: ``python -m bnref.experiments NAME [--backend torch|jax] [--quick] --out DIR``.

Each experiment answers one question a learner asks and writes ``DIR/NAME.png`` (the figure) and
``DIR/NAME.json`` (the numbers behind it, with what was run: data, sizes, learning rates).
``--quick`` uses little data and few steps (seconds; what the tests run); without it, the full
run (the README's figures). ``--backend`` runs an experiment that can use either framework on
that one only; an experiment written for one framework (or that compares both by construction)
says so and stops. The training runs call the library: ``bnref.train.train_and_evaluate`` where
per-epoch metrics suffice, and the backends' ``train_step`` / ``train_batches``, ``evaluate`` and
precise-BN functions where the experiment reads the model state during training.

- ``momentum-port`` (torch and JAX): the classic porting bug. ``torch.nn.BatchNorm2d(momentum=0.1)``
  ported to ``flax.linen.BatchNorm(momentum=0.1)``: 0.1 weights the NEW batch in PyTorch and the
  OLD value in Flax. The training loss cannot show it (in training mode the running statistics
  play no part), eval accuracy shows it only a little, and a one-step probe shows it at once:
  Flax's running-mean update over torch's is 0.9 / 0.1 = 9 with the bug, 1 with ``momentum=0.9``.
- ``fast-variance`` (JAX): Flax's default ``use_fast_variance=True`` (``E[x^2] - E[x]^2``)
  against a two-pass variance, as the input's mean grows next to its spread, in float32 and
  bfloat16.
- ``bn-vs-none`` (default both backends): d2l's claim that BN converges faster; LeNet with and
  without BN, training loss and test accuracy per epoch.
- ``batch-size`` (JAX): batch 4 ... 512 on one budget of training examples (lr linear in the
  batch, capped at 1.0: :data:`LR_RULE`): test accuracy with the running and with precise
  statistics, and how far the running statistics are from the population's, per BN layer.
- ``eval-stats`` (JAX): through training, test accuracy with the running statistics (EMA),
  precise population statistics, and batch statistics (BN in training mode at test time).
- ``placement`` (torch): BN before vs after ReLU; a conv/linear bias right before BN gets no
  gradient, and training without it is the same training.
- ``sync-vs-local`` (default JAX; torch too): 8 replicas of 4 ... 32 examples, synchronized vs
  local BN vs one device with the whole global batch.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from bnref import _cli, _io, spec
from bnref.data import is_synthetic

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentConfig", "run_experiment", "scaled_lr", "momentum_port", "fast_variance",
           "bn_vs_none", "batch_size", "eval_stats", "placement", "sync_vs_local", "main"]


def momentum_port(quick: bool, data_dir: Optional[str] = None, seed: int = 0, synthetic: bool = False) -> Dict:
    """Port a torch LeNet-BN (torch.nn BN, ``momentum=0.1``) to Flax twice, with
    ``momentum=0.1`` copied as is (the bug) and with ``momentum=0.9`` (the fix); probe one step,
    then train both ports on the same batches and evaluate them as they go."""
    import jax.numpy as jnp
    import optax
    import torch

    from bnref import convert
    from bnref.jax import train as jtrain
    from bnref.jax.models import LeNetBN as FlaxLeNetBN
    from bnref.torch import train as ttrain
    from bnref.torch.models import LeNetBN as TorchLeNetBN

    steps, batch, lr, n_train, n_test = (160, 64, 0.1, 10240, 1000) if quick else (468, 256, 0.1, 60000, 10000)
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    X, y = data.train_images, data.train_labels
    Xt, yt = jnp.asarray(jtrain.prepare_images(data.test_images)), jnp.asarray(data.test_labels)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(X)) for _ in range(steps * batch // len(X) + 1)])
    batches = [order[i * batch : (i + 1) * batch] for i in range(steps)]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tmodel = TorchLeNetBN(bn="builtin", convention="torch")  # torch.nn.BatchNorm: momentum=0.1
    variables = convert.torch_to_flax(tmodel.state_dict())
    ports = {"naive (momentum=0.1)": 0.1, "fixed (momentum=0.9)": 0.9}  # flax.linen's momentum = decay

    # The probe: one training step on the first batch, from the same state in both frameworks.
    old = tmodel.bn1.running_mean.detach().numpy().copy()
    ttrain.train_step(tmodel, torch.optim.SGD(tmodel.parameters(), lr=lr), *ttrain.load_tensors(X[batches[0]], y[batches[0]],
                      torch.device("cpu")))  # fmt: skip
    torch_delta = tmodel.bn1.running_mean.detach().numpy() - old
    out: Dict = {"steps": steps, "batch_size": batch, "lr": lr, "data": data.source, "probe_ratio": {},
                 "train_loss": {}, "eval_acc": {}, "eval_steps": []}  # fmt: skip
    eval_at = set(np.linspace(0, steps, 9)[1:].round().astype(int).tolist())  # 8 evenly spaced, the last step included
    for name, momentum in ports.items():
        conv = spec.Convention(decay=momentum, eps=1e-5, running_var="biased")
        model = FlaxLeNetBN(bn="builtin", convention=conv)
        state = jtrain.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                         batch_stats=variables["batch_stats"], tx=optax.sgd(lr))  # fmt: skip
        losses, accs, at = [], [], []
        for k, idx in enumerate(batches, start=1):
            state, loss, _ = jtrain.train_step(state, jnp.asarray(jtrain.prepare_images(X[idx])), jnp.asarray(y[idx]))
            losses.append(float(loss))
            if k == 1:
                flax_delta = np.asarray(state.batch_stats["bn1"]["mean"]) - old
                out["probe_ratio"][name] = float(np.median(flax_delta / torch_delta))
            if k in eval_at:
                accs.append(jtrain.evaluate(state, Xt, yt))
                at.append(k)
        out["train_loss"][name], out["eval_acc"][name], out["eval_steps"] = losses, accs, at
    naive, fixed = (out["train_loss"][n] for n in ports)
    out["max_train_loss_difference"] = float(np.max(np.abs(np.array(naive) - np.array(fixed))))
    return out


def _plot_momentum_port(result: Dict, path: str) -> None:
    fig, (loss, acc) = _io.new_figure(2)
    for (name, losses), style in zip(result["train_loss"].items(), ("-", "--")):
        loss.plot(range(1, len(losses) + 1), losses, style, label=name)
    loss.set_xlabel("step"), loss.set_ylabel("training loss"), loss.grid(True), loss.legend(fontsize="small")
    loss.set_title(f"training loss: identical (max diff {result['max_train_loss_difference']:.1g})")
    for (name, accs), style in zip(result["eval_acc"].items(), ("o-", "s--")):
        ratio = result["probe_ratio"][name]
        acc.plot(result["eval_steps"], accs, style, label=f"{name}: probe ratio {ratio:.2f}")
    acc.set_xlabel("step"), acc.set_ylabel("eval accuracy (running statistics)"), acc.grid(True)
    acc.legend(fontsize="small")
    acc.set_title("eval accuracy (probe: Flax / torch update)")
    fig.suptitle("torch BatchNorm(momentum=0.1) ported to flax.linen.BatchNorm")
    _save(fig, path, result)


def fast_variance(quick: bool, data_dir: Optional[str] = None, seed: int = 0, synthetic: bool = False) -> Dict:
    """BatchNorm's error in training mode (max |y - exact normalization of the input as given|)
    for inputs of std 1 and growing mean, float32 and bfloat16: flax.linen.BatchNorm with its
    default ``use_fast_variance=True`` (``E[x^2] - E[x]^2``), flax.linen with
    ``use_fast_variance=False`` and bnref.jax (two-pass)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bnref.jax import BatchNorm

    ratios = np.logspace(0, 5, 6 if quick else 21)  # input mean / input std
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((256, 8))
    layers = {"flax.linen (fast variance, default)": lambda dt: nn.BatchNorm(use_running_average=False, dtype=dt),
              "flax.linen (use_fast_variance=False)": lambda dt: nn.BatchNorm(use_running_average=False, dtype=dt,
                                                                                use_fast_variance=False),
              "bnref.jax (two-pass)": lambda dt: BatchNorm(use_running_average=False, dtype=dt)}  # fmt: skip
    out: Dict = {"ratios": ratios.tolist(), "max_error": {}}
    for dtype in ("float32", "bfloat16"):
        for name, make in layers.items():
            layer = make(jnp.dtype(dtype))
            errors = []
            for r in ratios:
                x = jnp.asarray(r + noise, dtype)  # mean r, std 1 before rounding to dtype
                y, _ = layer.apply(layer.init(jax.random.key(0), x), x, mutable=["batch_stats"])
                # The exact normalization (float64) of the input as it is, rounded to dtype: in
                # bfloat16 at large means the rounding itself has eaten the spread.
                xr = np.asarray(x, np.float64)
                exact = (xr - xr.mean(0)) / np.sqrt(xr.var(0) + 1e-5)
                errors.append(float(np.max(np.abs(np.asarray(y, np.float64) - exact))))
            out["max_error"][f"{name}, {dtype}"] = errors
    return out


def _plot_fast_variance(result: Dict, path: str) -> None:
    fig, ax = _io.new_figure(1)
    for name, err in result["max_error"].items():
        style = ("o-" if "two-pass" in name else "^:" if "False" in name else "s--")
        ax.loglog(result["ratios"], np.maximum(err, 1e-8), style, label=name, ms=4)
    ax.set_xlabel("input mean / input std"), ax.set_ylabel("max |y - exact| (floored at 1e-8)"), ax.grid(True)
    ax.legend(fontsize="x-small")
    ax.set_title("BatchNorm's variance: E[x²] - E[x]² vs two-pass")
    _save(fig, path, result)


# --- shared by the training experiments ------------------------------------------------------------

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
    initial state, in bnref.train's example order (``epoch_permutation``, the full batches of
    ``batch_slices``), reshuffling each epoch; returns ``probe(step, state)`` taken every
    ``every`` steps and after the last.

    Not ``bnref.jax.train.fit``: fit reports metrics per epoch and never hands out the state,
    and these experiments measure the state itself (its running statistics, evaluated several
    ways) at points within training. The step is fit's own (``bnref.jax.train.train_step``)."""
    import jax

    from bnref.jax import train as jtrain
    from bnref.train import batch_slices, epoch_permutation

    X, y = jtrain.prepare_images(data.train_images), np.asarray(data.train_labels, np.int32)  # (N, 28, 28, 1), (N,)
    state = jtrain.create_train_state(model, jax.random.key(seed), lr, X[:1])
    slices, step, epoch, probes = batch_slices(len(y), batch_size), 0, 0, []
    while step < steps:
        epoch += 1
        perm = epoch_permutation(seed, epoch, len(y))
        for start, size in slices[: steps - step]:
            idx = perm[start : start + size]
            state, _, _ = jtrain.train_step(state, X[idx], y[idx])  # donates the old state
            step += 1
            if step % every == 0 or step == steps:
                probes.append(probe(step, state))
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
        from bnref.train import epoch_permutation

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


# --- bn-vs-none ------------------------------------------------------------------------------------


def bn_vs_none(quick: bool, data_dir: Optional[str] = None, seed: int = 0, backends: Sequence[str] = ("torch", "jax"),
               synthetic: bool = False) -> Dict:
    """d2l's claim that BatchNorm makes LeNet converge faster. The same LeNet (sigmoids, d2l's
    initialization) with bnref's BN after every conv/linear layer but the last (d2l's
    convention) and without BN, trained by ``bnref.train.train_and_evaluate`` in each of
    ``backends`` with d2l's BN-chapter defaults, lr 1.0, batch 256, SGD; training loss and test
    accuracy per epoch. (d2l's own BN-free LeNet chapter trains at lr 0.9: one lr for both here,
    so BN is the only difference.)"""
    from bnref.train import TrainConfig, train_and_evaluate

    epochs, batch, n_train, n_test = (3, 64, 1024, 500) if quick else (10, BASE_BATCH, None, None)
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    out: Dict = {"epochs": epochs, "lr": BASE_LR, "batch_size": batch, "data": data.source,
                 "train_examples": len(data.train_labels), "test_examples": len(data.test_labels), "runs": {}}  # fmt: skip
    for backend in backends:
        for bn, label in (("bnref", "BN"), ("none", "no BN")):
            config = TrainConfig(backend=backend, bn=bn, epochs=epochs, lr=BASE_LR, batch_size=batch, seed=seed,
                                 progress=False)  # fmt: skip
            run = out["runs"][f"{backend}, {label}"] = _curves(train_and_evaluate(config, data))
            print(f"{backend}, {label}: loss {run['loss'][-1]:.3f}, test acc {run['test_acc'][-1]:.3f}", flush=True)
    return out


def _plot_bn_vs_none(result: Dict, path: str) -> None:
    fig, (loss, acc) = _io.new_figure(2)
    epochs = range(1, result["epochs"] + 1)
    for name, run in result["runs"].items():
        style = ("o" if name.startswith("torch") else "s") + ("-" if name.endswith(", BN") else "--")
        loss.plot(epochs, run["loss"], style, label=name)
        acc.plot(epochs, run["test_acc"], style, label=name)
    loss.set_ylabel("training loss (mean over the epoch)"), acc.set_ylabel("test accuracy")
    for ax in (loss, acc):
        ax.set_xlabel("epoch"), ax.set_xticks(epochs), ax.grid(True), ax.legend(fontsize="small")
    fig.suptitle(f"LeNet with and without BatchNorm (lr {result['lr']}, batch {result['batch_size']}, {result['train_examples']} "
                 "training examples)")  # fmt: skip
    _save(fig, path, result)


# --- batch-size ------------------------------------------------------------------------------------

BATCH_SIZES = (4, 16, 64, 256, 512)


def batch_size(quick: bool, data_dir: Optional[str] = None, seed: int = 0, synthetic: bool = False) -> Dict:
    """BatchNorm at batch sizes 4 ... 512 on a fixed budget of training examples (the same
    number of examples for every batch size, so batch 4 takes 128 times the steps of batch
    512), lr per :data:`LR_RULE`: bnref.jax's LeNet-BN (d2l's convention: decay 0.9, biased
    running variance). At the end of each third of the budget, test accuracy with the running
    statistics (the EMA) and with precise population statistics, and the gap between the two
    sets of statistics per BN layer (see :class:`_JaxProbe`)."""
    from bnref.jax.models import LeNetBN

    sizes, epochs, n_train, n_test, precise, probes = (
        ((4, 64), 2, 1024, 500, 500, 1) if quick else (BATCH_SIZES, 3, None, None, 10000, 3))
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    budget = epochs * len(data.train_labels)
    model = LeNetBN(bn="bnref", convention="d2l")
    probe = _JaxProbe(model, data, precise_examples=precise, seed=seed)
    out: Dict = {"batch_sizes": list(sizes), "lr": [scaled_lr(b) for b in sizes], "lr_rule": LR_RULE,
                 "budget_examples": budget, "epochs": epochs, "data": data.source, "precise_examples": precise,
                 "test_examples": len(data.test_labels), "probes": {}}  # fmt: skip
    for b in sizes:
        steps = budget // b
        out["probes"][str(b)] = _jax_sgd(model, data, lr=scaled_lr(b), batch_size=b, steps=steps, seed=seed,
                                         every=-(-steps // probes), probe=lambda step, state, b=b: {
                                             "step": step, "examples": step * b, **probe(state)})  # fmt: skip
        last = out["probes"][str(b)][-1]
        print(f"batch {b}: test acc {last['acc_running']:.3f} (running), {last['acc_precise']:.3f} (precise)", flush=True)
    return out


def _plot_batch_size(result: Dict, path: str) -> None:
    fig, (acc, gap) = _io.new_figure(2)
    sizes = result["batch_sizes"]
    final = [result["probes"][str(b)][-1] for b in sizes]
    acc.plot(sizes, [p["acc_running"] for p in final], "o-", label="running statistics (EMA)")
    acc.plot(sizes, [p["acc_precise"] for p in final], "s--", label="precise (population) statistics")
    acc.set_ylabel("test accuracy"), acc.set_title(f"after {result['budget_examples']} training examples")
    for layer, style in zip(final[0]["running_var_rel_error"], ("o-", "s-", "^--", "v--")):
        gap.plot(sizes, [p["running_var_rel_error"][layer] for p in final], style, label=layer)
    gap.set_yscale("log"), gap.set_ylabel("|running / population var - 1|")
    gap.set_title("running variance vs population, per BN layer")
    for ax in (acc, gap):
        _batch_axis(ax, sizes, "batch size (lr = min(B, 256) / 256)")
        ax.grid(True, alpha=0.4), ax.legend(fontsize="small")
    fig.suptitle("LeNet-BN (bnref.jax) at batch sizes 4-512, one budget of examples")
    _save(fig, path, result)


# --- eval-stats ------------------------------------------------------------------------------------


def eval_stats(quick: bool, data_dir: Optional[str] = None, seed: int = 0, synthetic: bool = False) -> Dict:
    """Through training (bnref.jax's LeNet-BN, d2l's defaults: lr 1.0, batch 256, decay 0.9),
    test accuracy three ways, several times per epoch: with the running statistics (the EMA
    eval mode uses), with precise population statistics recomputed over a fixed sample of
    training examples with the weights as they are, and with batch statistics (BN left in
    training mode at test time) on test batches of the training batch size and of 16."""
    from bnref.jax.models import LeNetBN
    from bnref.train import batch_slices

    epochs, batch, n_train, n_test, precise, per_epoch = (2, 64, 1024, 500, 500, 2) if quick else (10, BASE_BATCH, None, None, 10000, 3)
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    model = LeNetBN(bn="bnref", convention="d2l")
    probe = _JaxProbe(model, data, precise_examples=precise, batch_sizes=(batch, 16), seed=seed)
    steps_per_epoch = len(batch_slices(len(data.train_labels), batch))
    probes = _jax_sgd(model, data, lr=BASE_LR, batch_size=batch, steps=epochs * steps_per_epoch, seed=seed,
                      every=steps_per_epoch // per_epoch,
                      probe=lambda step, state: {"step": step, "epoch": step / steps_per_epoch, **probe(state)})  # fmt: skip
    return {"epochs": epochs, "lr": BASE_LR, "batch_size": batch, "data": data.source, "precise_examples": precise,
            "eval_batch_sizes": [batch, 16], "train_examples": len(data.train_labels),
            "test_examples": len(data.test_labels), "probes": probes}  # fmt: skip


def _plot_eval_stats(result: Dict, path: str) -> None:
    fig, ax = _io.new_figure(1, size=(7.5, 4.2))
    probes = result["probes"]
    x = [p["epoch"] for p in probes]
    ax.plot(x, [p["acc_running"] for p in probes], "o-", ms=3, label="running statistics (EMA, eval mode)")
    ax.plot(x, [p["acc_precise"] for p in probes], "s-", ms=3, label=f"precise population statistics ({result['precise_examples']} training examples)")
    for b, style in zip(result["eval_batch_sizes"], ("^--", "v:")):
        ax.plot(x, [p["acc_batch"][str(b)] for p in probes], style, ms=3, label=f"batch statistics, test batches of {b}")
    ax.set_xlabel("epoch"), ax.set_ylabel("test accuracy"), ax.grid(True), ax.legend(fontsize="small")
    ax.set_title(f"LeNet-BN (bnref.jax), lr {result['lr']}, batch {result['batch_size']}: three ways to evaluate")
    _save(fig, path, result)


# --- placement -------------------------------------------------------------------------------------

#: the two places of BN relative to the activation
ORDERS = {"bn-relu": "conv/linear -> BN -> ReLU", "relu-bn": "conv/linear -> ReLU -> BN"}


def _placement_lenet(order: str, bias: bool):
    """LeNet-BN's layers (d2l's sizes, average pooling) with ReLU, BN (bnref's, d2l's convention)
    before or after each hidden ReLU per ``order``; ``bias``: whether the four conv/linear layers
    that feed a BN block have a bias (the output layer always has one)."""
    from collections import OrderedDict

    from torch import nn

    from bnref.torch.layers import BatchNorm1d, BatchNorm2d

    layers: List[tuple] = []
    blocks = ((nn.Conv2d(1, 6, 5, bias=bias), BatchNorm2d(6, convention="d2l"), True),
              (nn.Conv2d(6, 16, 5, bias=bias), BatchNorm2d(16, convention="d2l"), True),
              (nn.Linear(256, 120, bias=bias), BatchNorm1d(120, convention="d2l"), False),
              (nn.Linear(120, 84, bias=bias), BatchNorm1d(84, convention="d2l"), False))  # fmt: skip
    for k, (linear, bn, pool) in enumerate(blocks, start=1):
        name = f"conv{k}" if pool else f"fc{k - 2}"
        pair = [(f"bn{k}", bn), (f"relu{k}", nn.ReLU())]
        layers += [(name, linear)] + (pair if order == "bn-relu" else pair[::-1])
        layers += [(f"pool{k}", nn.AvgPool2d(2))] if pool else []
        layers += [("flatten", nn.Flatten())] if k == 2 else []
    return nn.Sequential(OrderedDict(layers + [("fc3", nn.Linear(84, 10))]))  # (N, 1, 28, 28) -> (N, 10)


def _torch_sgd(model, data, *, lr: float, batch_size: int, epochs: int, seed: int) -> List[Dict]:
    """SGD on ``model`` with bnref.torch.train's epoch (``train_batches``, the example order of
    ``epoch_permutation``, the full batches of ``batch_slices``): per epoch the mean training
    loss, each step's loss and the test accuracy (eval mode). Not ``bnref.torch.train.fit``, which
    trains LeNet-BN only."""
    import torch

    from bnref.torch import train as ttrain
    from bnref.train import batch_slices, epoch_permutation

    cpu, dtype = torch.device("cpu"), next(model.parameters()).dtype
    X, y = ttrain.load_tensors(data.train_images, data.train_labels, cpu)  # (N, 1, 28, 28), (N,)
    Xt, yt = ttrain.load_tensors(data.test_images, data.test_labels, cpu)
    X, Xt = X.to(dtype), Xt.to(dtype)  # the model's dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    starts = [start for start, _ in batch_slices(len(y), batch_size)]
    history = []
    for epoch in range(1, epochs + 1):
        perm = torch.from_numpy(epoch_permutation(seed, epoch, len(y))).long()
        losses: List = []
        loss_sum, _, seen = ttrain.train_batches(model, optimizer, X, y, perm, starts, batch_size, losses)
        history.append({"loss": float(loss_sum) / seen, "step_losses": [float(v) for v in losses],
                        "test_acc": ttrain.evaluate(model, Xt, yt)})  # fmt: skip
    return history


def placement(quick: bool, data_dir: Optional[str] = None, seed: int = 0, synthetic: bool = False) -> Dict:
    """Where BN goes, in torch: a ReLU LeNet with BN before the activation (conv -> BN -> ReLU)
    and after it (conv -> ReLU -> BN), from one seed's weights, on the same batches (lr 0.1,
    batch 256, SGD); and the bias of a conv/linear layer right before BN, which BN's mean
    subtraction cancels: its gradient norm at every step (BN -> ReLU: zero but for rounding;
    ReLU -> BN and the output layer: not), and the BN -> ReLU network trained again without
    those biases, from the same other weights, whose per-step training losses and final
    eval-mode test logits are compared with the biased network's.

    In float64, so that "the same to rounding" reads 1e-16, not float32's rounding amplified by
    training (two float32 runs whose sums round differently part after a few dozen steps, as any
    two would). The float32 size of the cancelled gradients is measured too, on the trained
    BN -> ReLU network: the max norm over 10 training batches."""
    import copy

    import torch

    from bnref.torch import train as ttrain
    from bnref.train import batch_slices

    epochs, batch, n_train, n_test = (2, 64, 1024, 500) if quick else (10, BASE_BATCH, None, None)
    lr = 0.1
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    steps_per_epoch = len(batch_slices(len(data.train_labels), batch))
    out: Dict = {"epochs": epochs, "lr": lr, "batch_size": batch, "dtype": "float64", "data": data.source,
                 "orders": ORDERS, "train_examples": len(data.train_labels), "runs": {}, "bias_grad_norm": {}}  # fmt: skip
    initial, trained, step_losses = {}, {}, {}
    for name, order, bias in (("bn-relu", "bn-relu", True), ("relu-bn", "relu-bn", True),
                              ("bn-relu, no bias before BN", "bn-relu", False)):  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _placement_lenet(order, bias).to(torch.float64)
        if not bias:  # the biased network's initial weights, without the biases
            model.load_state_dict({k: v for k, v in initial["bn-relu"].items() if k in model.state_dict()})
        initial[name] = {k: v.clone() for k, v in model.state_dict().items()}
        norms = _record_bias_grad_norms(model)
        history = _torch_sgd(model, data, lr=lr, batch_size=batch, epochs=epochs, seed=seed)
        trained[name], step_losses[name] = model, np.array([v for m in history for v in m["step_losses"]])
        out["runs"][name] = _curves(history, ("loss", "test_acc"))
        out["bias_grad_norm"][name] = {
            layer: {"max": max(v), "median": float(np.median(v)),
                    "per_epoch_max": [max(v[i : i + steps_per_epoch]) for i in range(0, len(v), steps_per_epoch)]}
            for layer, v in norms.items()}  # fmt: skip
    Xt, _ = ttrain.load_tensors(data.test_images, data.test_labels, torch.device("cpu"))
    with torch.inference_mode():
        biased, unbiased = (trained[k].eval()(Xt.double()) for k in ("bn-relu", "bn-relu, no bias before BN"))
    out["bias_vs_no_bias"] = {
        "max_step_loss_diff": float(np.max(np.abs(step_losses["bn-relu"] - step_losses["bn-relu, no bias before BN"]))),
        "max_test_logit_diff": float((biased - unbiased).abs().max()), "max_abs_test_logit": float(biased.abs().max())}  # fmt: skip
    model32 = copy.deepcopy(trained["bn-relu"]).float()  # a copy: a training-mode forward moves running statistics
    norms32 = _record_bias_grad_norms(model32)
    X, y = ttrain.load_tensors(data.train_images[: 10 * batch], data.train_labels[: 10 * batch], torch.device("cpu"))
    for i in range(0, len(y), batch):
        torch.nn.functional.cross_entropy(model32.train()(X[i : i + batch]), y[i : i + batch]).backward()
        model32.zero_grad()
    out["float32_bias_grad_norm"] = {layer: max(v) for layer, v in norms32.items()}
    return out


def _record_bias_grad_norms(model) -> Dict[str, list]:
    """``{layer: []}`` for each conv/linear layer of ``model`` with a bias, to which the norm of
    that bias's gradient is appended at every backward pass (a tensor hook)."""
    from torch import nn

    norms: Dict[str, list] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.register_hook(lambda g, store=norms.setdefault(name, []): store.append(float(g.norm())))
    return norms


def _plot_placement(result: Dict, path: str) -> None:
    fig, (acc, grad) = _io.new_figure(2)
    epochs = range(1, result["epochs"] + 1)
    for (name, run), style in zip(result["runs"].items(), ("o-", "s--", "x:")):
        acc.plot(epochs, run["test_acc"], style, label=name)
    same = result["bias_vs_no_bias"]
    acc.set_title(f"without the bias before BN: max |loss diff| {same['max_step_loss_diff']:.1g}", fontsize="medium")
    acc.set_xlabel("epoch"), acc.set_ylabel("test accuracy"), acc.grid(True), acc.legend(fontsize="small")
    for name, style in (("bn-relu", "-"), ("relu-bn", "--")):
        for (layer, norms), marker in zip(result["bias_grad_norm"][name].items(), "os^vx"):
            grad.semilogy(epochs, np.maximum(norms["per_epoch_max"], 1e-20), marker + style, label=f"{name}: {layer}.bias")
    grad.set_xlabel("epoch"), grad.set_ylabel("max over the epoch's steps of |d loss / d bias|")
    grad.set_title("bias gradients (solid: BN -> ReLU, dashed: ReLU -> BN)", fontsize="medium")
    grad.grid(True, alpha=0.4), grad.legend(fontsize="x-small", ncol=2, loc="center right")
    for ax in (acc, grad):
        ax.set_xticks(epochs)
    fig.suptitle(f"BN before or after ReLU, and the bias before BN (torch, lr {result['lr']}, batch {result['batch_size']})")
    _save(fig, path, result)


# --- sync-vs-local ---------------------------------------------------------------------------------

REPLICAS = 8
#: what each sync-vs-local run is: (replicas, synchronized BN)
MODES = {"single device": (1, None), "sync BN": (REPLICAS, True), "local BN": (REPLICAS, False)}


def sync_vs_local(quick: bool, data_dir: Optional[str] = None, seed: int = 0, backends: Sequence[str] = ("jax",),
                  synthetic: bool = False) -> Dict:
    """Small per-replica batches: LeNet-BN (bnref's BN, d2l's convention) trained data-parallel
    on 8 replicas with synchronized BN and with local BN (each replica normalizes its slice),
    and on one device with the whole global batch, for 4 ... 32 examples per replica, by
    ``bnref.train.train_and_evaluate`` (``replicas``, ``sync_bn``): JAX on 8 host devices under
    ``shard_map`` (a subprocess: the device count is fixed when JAX starts), torch on 8 gloo
    processes. lr per :data:`LR_RULE` of the global batch. Per run: loss and test accuracy per
    epoch, and the largest difference of a step's global-batch loss from the single device's."""
    out: Dict = {"replicas": REPLICAS, "lr_rule": LR_RULE, "runs": {}}
    for backend in backends:
        result = (_replica_runs_subprocess(quick, data_dir, seed, synthetic) if backend == "jax"
                  else _replica_runs(quick, data_dir, seed, backend, synthetic))  # fmt: skip
        out["runs"][backend] = result.pop("runs")
        out.update(result)
    return out


def _replica_runs(quick: bool, data_dir: Optional[str], seed: int, backend: str, synthetic: bool = False) -> Dict:
    """The runs of :func:`sync_vs_local` for one backend, in this process (JAX needs
    :data:`REPLICAS` devices here already)."""
    from bnref.train import TrainConfig, train_and_evaluate

    per_replica, epochs, n_train, n_test = ((4,), 1, 512, 500) if quick else ((4, 8, 16, 32), 2, None, None)
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    runs: Dict = {}
    for p in per_replica:
        runs[str(p)] = {}
        for mode, (replicas, sync) in MODES.items():
            config = TrainConfig(backend=backend, device="cpu", epochs=epochs, lr=scaled_lr(REPLICAS * p),
                                 batch_size=REPLICAS * p, seed=seed, replicas=replicas, sync_bn=sync, progress=False)  # fmt: skip
            history = train_and_evaluate(config, data)
            runs[str(p)][mode] = {**_curves(history), "step_losses": [v for m in history for v in m["step_losses"]]}
        single = np.array(runs[str(p)]["single device"].pop("step_losses"))
        for mode in ("sync BN", "local BN"):
            diff = np.abs(np.array(runs[str(p)][mode].pop("step_losses")) - single)
            runs[str(p)][mode].update(max_step_loss_diff=float(diff.max()), mean_step_loss_diff=float(diff.mean()))
    return {"per_replica": list(per_replica), "lr": [scaled_lr(REPLICAS * p) for p in per_replica], "epochs": epochs,
            "data": data.source, "train_examples": len(data.train_labels), "runs": runs}  # fmt: skip


def _replica_runs_subprocess(quick: bool, data_dir: Optional[str], seed: int, synthetic: bool = False) -> Dict:
    """:func:`_replica_runs` for JAX in a new Python process given :data:`REPLICAS` host devices
    (``--xla_force_host_platform_device_count`` takes effect only before JAX starts, and this
    process may have started it already); its numbers come back as JSON on stdout."""
    import json
    import subprocess

    code = ("import json, sys\n"
            "from bnref.train import provide_host_devices\n"
            f"provide_host_devices({REPLICAS})\n"
            "from bnref import _io, experiments\n"
            "quick, data_dir, seed, synthetic = json.loads(sys.argv[1])\n"
            "print(_io.dumps(experiments._replica_runs(quick, data_dir, seed, 'jax', synthetic)))\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([quick, data_dir, seed, synthetic])], capture_output=True,
                          text=True, timeout=600 if quick else 3600)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the JAX sync-vs-local process failed (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def _plot_sync_vs_local(result: Dict, path: str) -> None:
    fig, (acc, diff) = _io.new_figure(2)
    p = result["per_replica"]
    for backend, runs in result["runs"].items():
        for mode, style in zip(MODES, ("o-", "s--", "^:")):
            acc.plot(p, [runs[str(k)][mode]["test_acc"][-1] for k in p], style, label=f"{backend}, {mode}")
        for mode, style in zip(("sync BN", "local BN"), ("s--", "^:")):
            diff.plot(p, [max(runs[str(k)][mode]["max_step_loss_diff"], 1e-8) for k in p], style, label=f"{backend}, {mode}")
    acc.set_ylabel(f"test accuracy after {result['epochs']} epoch(s)")
    diff.set_yscale("log"), diff.set_ylabel("max over steps |loss - single device's loss|")
    for ax in (acc, diff):
        _batch_axis(ax, p, f"examples per replica (global batch: {result['replicas']} x that)")
        ax.grid(True, alpha=0.4), ax.legend(fontsize="small")
    fig.suptitle(f"synchronized vs local BatchNorm, {result['replicas']} replicas, lr scaled with the global batch")
    _save(fig, path, result)


# --- the command -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """One entry of :data:`EXPERIMENTS`: ``run(quick, data_dir, seed[, backends]) -> numbers`` and
    ``plot(numbers, path)``. ``backends``: the ones ``--backend`` may name; when there are two, the
    run takes ``backends=`` (those chosen, ``default`` without ``--backend``), else it always
    runs on ``default``, and ``why`` says why ``--backend`` cannot change that."""

    run: Callable[..., Dict]
    plot: Callable[[Dict, str], None]
    backends: Tuple[str, ...]
    default: Tuple[str, ...]
    why: str = ""
    uses_data: bool = True  # False: it trains nothing, and --data-dir / --synthetic mean nothing to it


EXPERIMENTS: Dict[str, Experiment] = {
    "momentum-port": Experiment(momentum_port, _plot_momentum_port, (), ("torch", "jax"),
                                "it ports a torch model to Flax, so it always runs both"),
    "fast-variance": Experiment(fast_variance, _plot_fast_variance, ("jax",), ("jax",),
                                "it measures flax.linen's use_fast_variance", uses_data=False),
    "bn-vs-none": Experiment(bn_vs_none, _plot_bn_vs_none, ("torch", "jax"), ("torch", "jax")),
    "batch-size": Experiment(batch_size, _plot_batch_size, ("jax",), ("jax",),
                             "it reads the running statistics out of the training state as values"),
    "eval-stats": Experiment(eval_stats, _plot_eval_stats, ("jax",), ("jax",),
                             "it reads the running statistics out of the training state as values"),
    "placement": Experiment(placement, _plot_placement, ("torch",), ("torch",),
                            "its model variants are torch modules"),
    "sync-vs-local": Experiment(sync_vs_local, _plot_sync_vs_local, ("torch", "jax"), ("jax",)),
}  # fmt: skip


@dataclass(frozen=True)
class ExperimentConfig:
    """What one ``python -m bnref.experiments`` run does: experiment ``name`` on ``backends``,
    ``quick`` or full, on Fashion-MNIST (from ``data_dir`` or the default places; missing files
    are an error) or, with ``synthetic``, on the synthetic stand-in, writing ``out/NAME.png`` and
    ``out/NAME.json``."""

    name: str
    out: str
    quick: bool = False
    backends: Tuple[str, ...] = ()
    data_dir: Optional[str] = None
    seed: int = 0
    synthetic: bool = False

    @property
    def paths(self) -> Tuple[str, str]:
        return os.path.join(self.out, f"{self.name}.png"), os.path.join(self.out, f"{self.name}.json")


def run_experiment(config: ExperimentConfig) -> Dict:
    """Run the experiment, write its numbers (with the config) and its figure; returns the numbers."""
    exp = EXPERIMENTS[config.name]
    kwargs = {"backends": config.backends} if len(exp.backends) > 1 else {}
    result = exp.run(config.quick, config.data_dir, config.seed, synthetic=config.synthetic, **kwargs)
    png, js = config.paths
    _io.write_json(js, {"experiment": config.name, "quick": config.quick, "backends": list(config.backends), **result})
    exp.plot(result, png)
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(prog="python -m bnref.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(EXPERIMENTS))
    p.add_argument("--backend", choices=("torch", "jax"), default=None,
                   help="run on this backend only, where the experiment can (default: its own, see the docstring)")
    p.add_argument("--quick", action="store_true", help="little data, few steps (seconds; what the tests run)")
    p.add_argument("--out", required=True, help="directory for NAME.png and NAME.json")
    _cli.add_data_options(p)
    args = p.parse_args(argv)
    exp = EXPERIMENTS[args.name]
    if args.backend is not None and args.backend not in exp.backends:
        p.error(f"--backend {args.backend}: {args.name} runs on {' and '.join(exp.default)} only: {exp.why}")
    if not exp.uses_data and (args.data_dir is not None or args.synthetic):
        p.error(f"{args.name} trains nothing and reads no data: it takes no --data-dir / --synthetic")
    config = ExperimentConfig(args.name, args.out, args.quick, (args.backend,) if args.backend else exp.default,
                              args.data_dir, synthetic=args.synthetic)  # fmt: skip
    try:
        _io.check_output_paths(dict(zip(("figure", "numbers"), config.paths)), figures=("figure",),
                               make_dirs=True)  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    print(config, flush=True)
    if exp.uses_data:  # the data is checked before any work (the experiment reads it again, at its own size)
        _cli.load_data(p, args, n_train=512, n_test=256, seed=config.seed)
    os.makedirs(config.out, exist_ok=True)
    result = run_experiment(config)
    print("wrote {} and {}".format(*config.paths))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
