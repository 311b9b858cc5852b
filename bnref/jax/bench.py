"""JAX training-throughput benchmark: ``python -m bnref.bench --backend jax [options]``.

Examples/second of one LeNet-BN SGD step loop, for four variants measured in interleaved
rounds in ONE process (only ratios measured side by side mean anything on a shared CPU):

- ``bnref BN``: bnref.jax.BatchNorm (two-pass variance), bnref's loop (:func:`bnref.jax.train.train_steps`,
  what fit runs: data on the device, batches gathered inside the jitted step, no per-step sync);
- ``flax BN``: flax.linen.BatchNorm as users get it (``use_fast_variance=True``), bnref's loop;
- ``no BN``: plain LeNet, bnref's loop;
- ``flax-examples loop``: flax.linen.BatchNorm again, driven like flax/examples/mnist's
  ``train_epoch``: a NumPy permutation, each batch indexed from host NumPy arrays and fed to
  a jitted ``train_step(state, X, y)`` every step, per-step losses collected in a list.

Compile time is excluded (one warm-up step per variant); each round times ``--steps`` steps
per variant; the median over ``--rounds`` is reported, with the ratios
``bnref BN / flax BN`` (target >= 0.9) and ``bnref loop / flax-examples loop`` (same model:
flax BN; target >= 2).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Dict, List

import numpy as np

from bnref._cli import int_at_least, positive_int, seed

VARIANTS = ("bnref BN", "flax BN", "no BN", "flax-examples loop")


class _OnDeviceLoop:
    """bnref's loop (the code ``fit`` runs: ``train_steps``): the dataset and the permutation
    live on the device, epoch after epoch in bnref's example order."""

    def __init__(self, bn, X, y, batch_size, lr, seed):
        import jax

        from bnref.jax import train as T
        from bnref.jax.models import LeNetBN

        X, y = jax.device_put(T.prepare_images(X)), jax.device_put(np.asarray(y, np.int32))
        state = T.create_train_state(LeNetBN(bn=bn), jax.random.key(seed), lr, X[:1])
        self.steps = T.train_steps(state, X, y, seed=seed, batch_size=batch_size, epochs=itertools.count(1))

    def run(self, steps: int) -> None:
        for s in itertools.islice(self.steps, steps):
            pass
        np.asarray(s.totals)  # one sync at the end, as fit() does once per epoch


class _FlaxExamplesLoop:
    """flax/examples/mnist style: host NumPy batches fed to a jitted step each step."""

    def __init__(self, bn, X, y, perm, batch_size, lr, seed):
        import jax

        from bnref.jax import train as T
        from bnref.jax.models import LeNetBN

        self.T = T
        self.X, self.y = T.prepare_images(X), np.asarray(y, np.int32)  # host NumPy
        self.perms = perm[: len(perm) // batch_size * batch_size].reshape(-1, batch_size)
        self.state = T.create_train_state(LeNetBN(bn=bn), jax.random.key(seed), lr, self.X[:1])
        self.i = 0

    def run(self, steps: int) -> None:
        losses = []
        for _ in range(steps):
            idx = self.perms[self.i % len(self.perms)]
            batch_images, batch_labels = self.X[idx, ...], self.y[idx, ...]  # host-side gather
            self.state, loss, _ = self.T.train_step(self.state, batch_images, batch_labels)
            losses.append(loss)
            self.i += 1
        float(np.mean(losses))  # the example reads its metrics at the end of the epoch


def measure(ds, steps: int = 50, rounds: int = 5, batch_size: int = 256, seed: int = 0, log=print) -> Dict:
    """Run the interleaved benchmark on the training split of ``ds`` (a ``bnref.data.FashionMNIST``;
    at most the examples it needs); returns examples/sec per variant (median and all rounds)."""
    import jax

    from bnref.jax.train import device_name, resolve_device

    n = max(batch_size * max(steps, 2), min(60000, batch_size * 200))
    if len(ds.train_labels) < batch_size:
        raise ValueError(f"{ds.source}: {len(ds.train_labels)} training examples, fewer than one batch of {batch_size}")
    X, y, source = ds.train_images[:n], ds.train_labels[:n], ds.source
    n = len(X)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int32)
    runners = {
        "bnref BN": _OnDeviceLoop("bnref", X, y, batch_size, 0.1, seed),
        "flax BN": _OnDeviceLoop("builtin", X, y, batch_size, 0.1, seed),
        "no BN": _OnDeviceLoop("none", X, y, batch_size, 0.1, seed),
        "flax-examples loop": _FlaxExamplesLoop("builtin", X, y, perm, batch_size, 0.1, seed),
    }
    device = device_name(resolve_device("auto"))
    log(f"data: {source}, {n} examples; batch {batch_size}, {steps} steps x {rounds} rounds; device {device}; jax {jax.__version__}")
    for r in runners.values():  # compile and warm up, excluded from timing
        r.run(2)
    per_round: Dict[str, List[float]] = {k: [] for k in runners}
    for rnd in range(rounds):
        for name, r in runners.items():  # interleaved: every round runs every variant
            t0 = time.perf_counter()
            r.run(steps)
            per_round[name].append(steps * batch_size / (time.perf_counter() - t0))
        log(f"round {rnd + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in per_round.items()))
    median = {k: statistics.median(v) for k, v in per_round.items()}
    ratios = {
        "bnref BN / flax BN": median["bnref BN"] / median["flax BN"],
        "bnref loop / flax-examples loop": median["flax BN"] / median["flax-examples loop"],
        "bnref BN / no BN": median["bnref BN"] / median["no BN"],
    }
    return {
        "device": device, "source": source, "batch_size": batch_size, "steps": steps, "rounds": rounds,
        "examples_per_sec": median, "rounds_examples_per_sec": per_round, "ratios": ratios,
    }


TARGETS = {"bnref BN / flax BN": 0.9, "bnref loop / flax-examples loop": 2.0}


def parse_args(argv=None) -> argparse.Namespace:
    """The JAX benchmark's options; a bad value is argparse's one-line error (exit 2)."""
    p = argparse.ArgumentParser(prog="python -m bnref.bench --backend jax", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive_int, default=50, help="timed SGD steps per variant per round")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds (the median is reported)")
    p.add_argument("--batch-size", type=int_at_least(2), default=256)
    p.add_argument("--seed", type=seed, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict:
    """Measure, print the medians and the ratios; returns the measurements (for ``--json``)."""
    res = measure(args.data, args.steps, args.rounds, args.batch_size, args.seed, log=lambda s: print(s, flush=True))
    for name in VARIANTS:
        print(f"{name:>20}: {res['examples_per_sec'][name]:9.1f} examples/sec (median)")
    for name, value in res["ratios"].items():
        target = TARGETS.get(name)
        note = f" (target >= {target}: {'met' if value >= target else 'NOT met'})" if target else ""
        print(f"ratio {name}: {value:.3f}{note}")
    return res
