"""JAX training-throughput benchmark: ``python -m bnref.bench --backend jax [options]``.

Examples/second of one LeNet-BN SGD step loop, for four variants measured in interleaved
rounds in ONE process (only ratios measured side by side mean anything on a shared CPU):

- ``bnref BN``: bnref.jax.BatchNorm (two-pass variance), bnref's loop (:func:`bnref.jax.train.train_steps`,
  what fit runs: data on the device, batches gathered inside the jitted step, no per-step sync);
- ``bnref BN fused``: the same with ``--steps-per-call K`` steps per compiled call (``lax.scan``);
- ``bnref BN bfloat16``: ``bnref BN`` in bfloat16 (``--precision bfloat16``);
- ``flax BN``: flax.linen.BatchNorm as users get it (``use_fast_variance=True``), bnref's loop;
- ``no BN``: plain LeNet, bnref's loop;
- ``flax-examples loop``: flax.linen.BatchNorm again, driven like flax/examples/mnist's
  ``train_epoch``: a NumPy permutation, each batch indexed from host NumPy arrays and fed to
  a jitted ``train_step(state, X, y)`` every step, per-step losses collected in a list.

Compile time is excluded (one warm-up call per variant, its seconds reported); each round times
``--steps`` steps per variant (a fused variant whole calls, at least ``--steps``); the median over
``--rounds`` is reported, with the ratios in :data:`RATIOS` (``bnref BN / flax BN``: target >= 0.9)
and the fastest float32 bnref variant over the flax-examples loop (target >= 1.2, issue 18).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time
from typing import Dict, List

import numpy as np

from bnref._cli import int_at_least, positive_int, seed

VARIANTS = ("bnref BN", "bnref BN fused", "bnref BN bfloat16", "flax BN", "no BN", "flax-examples loop")


class _OnDeviceLoop:
    """bnref's loop (the code ``fit`` runs: ``train_steps``): the dataset and the permutation
    live on the device, epoch after epoch in bnref's example order; ``steps_per_call`` steps
    per compiled call, in ``precision``; the model ``family.make`` builds (default linen's,
    ``bnref.jax.train.LINEN``)."""

    def __init__(self, bn, X, y, batch_size, lr, seed, steps_per_call=1, precision="float32", family=None):
        import jax

        from bnref.config import TrainConfig
        from bnref.jax import train as T

        X, y = jax.device_put(T.prepare_images(X)), jax.device_put(np.asarray(y, np.int32))
        family = family or T.LINEN  # the model the loop drives (bnref.nnx.bench: the NNX one)
        model = family.make(TrainConfig(backend="jax", bn=bn, precision=precision))
        state = T.create_train_state(model, jax.random.key(seed), lr, X[:1])
        self.steps = T.train_steps(state, X, y, seed=seed, batch_size=batch_size, epochs=itertools.count(1),
                                   steps_per_call=steps_per_call)  # fmt: skip

    def run(self, steps: int) -> int:
        """At least ``steps`` steps, ending with a compiled call: the number of steps run."""
        done = 0
        for s in self.steps:
            done += 1
            if done >= steps and s.ends_call:
                break
        np.asarray(s.totals)  # one sync at the end, as fit() does once per epoch
        return done


class _FlaxExamplesLoop:
    """flax/examples/mnist style: host NumPy batches fed to a jitted step each step."""

    def __init__(self, bn, X, y, perm, batch_size, lr, seed):
        import jax

        from bnref.jax import train as T
        from bnref.jax.models import LeNetBN

        self._host_batches(X, y, perm, batch_size)
        self.state = T.create_train_state(LeNetBN(bn=bn), jax.random.key(seed), lr, self.X[:1])

    def _host_batches(self, X, y, perm, batch_size):
        from bnref.jax import train as T

        self.X, self.y = T.prepare_images(X), np.asarray(y, np.int32)  # host NumPy
        self.perms = perm[: len(perm) // batch_size * batch_size].reshape(-1, batch_size)
        self.i = 0

    def _train(self, X, y):
        """One step on a host batch: its loss (a device array, not read)."""
        from bnref.jax import train as T

        self.state, loss, _ = T.train_step(self.state, X, y)
        return loss

    def run(self, steps: int) -> int:
        losses = []
        for _ in range(steps):
            idx = self.perms[self.i % len(self.perms)]
            batch_images, batch_labels = self.X[idx, ...], self.y[idx, ...]  # host-side gather
            losses.append(self._train(batch_images, batch_labels))
            self.i += 1
        float(np.mean(losses))  # the example reads its metrics at the end of the epoch
        return steps


def measure(ds, steps: int = 50, rounds: int = 5, batch_size: int = 256, seed: int = 0, log=print,
            variants=VARIANTS, steps_per_call=None, device: str = "auto", tf32: bool = False, *, makers=None,
            ratios=None, float32_like=None, baseline: str = "flax-examples loop", versions=None) -> Dict:
    """Run the interleaved benchmark on the training split of ``ds`` (a ``bnref.data.FashionMNIST``;
    at most the examples it needs); returns examples/sec per variant (median and all rounds).
    ``steps_per_call``: the fused variants' K (default: ``steps``, one compiled call per round).

    Another backend's bench reuses it (``bnref.nnx.bench``) with its own ``makers(X, y, perm,
    batch_size, seed, k) -> {variant: () -> loop}`` (a loop has ``run(steps) -> steps run``), its
    ``ratios`` and ``float32_like`` (default :data:`RATIOS`, :data:`FLOAT32_LIKE`), the
    ``baseline`` loop the fastest float32 variant is set against, and ``versions`` for the log."""
    import jax

    from bnref.jax.train import device_name, matmul_precision, resolve_device

    n = max(batch_size * max(steps, 2), min(60000, batch_size * 200))
    if len(ds.train_labels) < batch_size:
        raise ValueError(f"{ds.source}: {len(ds.train_labels)} training examples, fewer than one batch of {batch_size}")
    X, y, source = ds.train_images[:n], ds.train_labels[:n], ds.source
    n = len(X)
    k = steps_per_call or steps
    perm = np.random.default_rng(seed).permutation(n).astype(np.int32)
    dev = resolve_device(device)
    make = (makers or _makers)(X, y, perm, batch_size, seed, k)
    with jax.default_device(dev), matmul_precision(tf32):
        runners = {name: make[name]() for name in variants}
        log(f"data: {source}, {n} examples; batch {batch_size}, {steps} steps x {rounds} rounds; fused: {k} steps per "
            f"call; device {device_name(dev)} ({dev.device_kind}); {versions or f'jax {jax.__version__}'}; "
            f"TF32 {'on' if tf32 else 'off'}")  # fmt: skip
        compile_s = {}
        for name, r in runners.items():  # compile and warm up, excluded from timing
            t0 = time.perf_counter()
            r.run(2)
            compile_s[name] = time.perf_counter() - t0
        per_round: Dict[str, List[float]] = {name: [] for name in runners}
        for rnd in range(rounds):
            for name, r in runners.items():  # interleaved: every round runs every variant
                t0 = time.perf_counter()
                done = r.run(steps)
                per_round[name].append(done * batch_size / (time.perf_counter() - t0))
            log(f"round {rnd + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in per_round.items()))
    stats = dev.memory_stats() or {}  # None on the CPU backend
    peak = stats.get("peak_bytes_in_use")
    median = {name: statistics.median(v) for name, v in per_round.items()}
    found = {}
    for label, (a, b) in (RATIOS if ratios is None else ratios).items():
        if a in median and b in median:
            found[label] = median[a] / median[b]
    if baseline in median:
        float32 = FLOAT32_LIKE if float32_like is None else float32_like
        best = max((v for v in median if v != baseline and v in float32), key=median.get, default=None)
        if best is not None:
            found[f"fastest float32 variant of bnref's loop ({best}) / {baseline}"] = median[best] / median[baseline]
    return {
        "device": device_name(dev), "device_kind": dev.device_kind, "source": source, "batch_size": batch_size,
        "steps": steps, "rounds": rounds, "steps_per_call": k, "examples_per_sec": median,
        "rounds_examples_per_sec": per_round, "warmup_seconds": compile_s, "ratios": found,
        "peak_device_memory_mib": None if peak is None else peak / 2**20, "tf32": tf32,
    }  # fmt: skip


def _makers(X, y, perm, batch_size, seed, k):
    """This bench's variants: name -> a function building its loop."""
    return {
        "bnref BN": lambda: _OnDeviceLoop("bnref", X, y, batch_size, 0.1, seed),
        "bnref BN fused": lambda: _OnDeviceLoop("bnref", X, y, batch_size, 0.1, seed, steps_per_call=k),
        "bnref BN bfloat16": lambda: _OnDeviceLoop("bnref", X, y, batch_size, 0.1, seed, precision="bfloat16"),
        "flax BN": lambda: _OnDeviceLoop("builtin", X, y, batch_size, 0.1, seed),
        "no BN": lambda: _OnDeviceLoop("none", X, y, batch_size, 0.1, seed),
        "flax-examples loop": lambda: _FlaxExamplesLoop("builtin", X, y, perm, batch_size, 0.1, seed),
    }


#: ratio label -> (numerator variant, denominator variant)
RATIOS = {
    "bnref BN / flax BN": ("bnref BN", "flax BN"),
    "bnref loop / flax-examples loop": ("flax BN", "flax-examples loop"),
    "bnref BN / no BN": ("bnref BN", "no BN"),
    "fused / one step per call": ("bnref BN fused", "bnref BN"),
    "bfloat16 / float32": ("bnref BN bfloat16", "bnref BN"),
}
#: the variants that train LeNet-BN with BN in float32 (what the flax-examples loop trains)
FLOAT32_LIKE = ("bnref BN", "bnref BN fused", "flax BN")
TARGETS = {"bnref BN / flax BN": 0.9, "fastest": 1.2}


def parse_args(argv=None) -> argparse.Namespace:
    """The JAX benchmark's options; a bad value is argparse's one-line error (exit 2)."""
    return parse_options(argv, "python -m bnref.bench --backend jax", __doc__.split("\n\n")[0], VARIANTS)


def parse_options(argv, prog: str, description: str, variants) -> argparse.Namespace:
    """The options of a JAX-machinery bench (this one, ``bnref.nnx.bench``) whose variants are
    ``variants``; a bad value is argparse's one-line error (exit 2)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--steps", type=positive_int, default=50, help="timed SGD steps per variant per round")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds (the median is reported)")
    p.add_argument("--batch-size", type=int_at_least(2), default=256)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--steps-per-call", type=positive_int, default=None, metavar="K",
                   help="the fused variants' steps per compiled call (default: --steps)")
    p.add_argument("--variants", type=functools.partial(_variants, choices=tuple(variants)), default=tuple(variants),
                   metavar="A,B,...", help=f"which to measure, comma-separated, or all (default: all of "
                   f"{', '.join(variants)})")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, gpu/cuda or cuda:N")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="do not report peak device memory")
    p.add_argument("--tf32", action="store_true", help="let float32 matmuls/convolutions use TF32 on GPUs (off: as fit)")
    args = p.parse_args(argv)
    from bnref.jax.train import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    return args


def _variants(text: str, choices=VARIANTS):
    if text.strip() == "all":
        return choices
    names = tuple(v.strip() for v in text.split(","))
    unknown = [v for v in names if v not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from {', '.join(choices)}")
    return names


def run(args: argparse.Namespace) -> Dict:
    """Measure, print the medians and the ratios; returns the measurements (for ``--json``)."""
    res = measure(args.data, args.steps, args.rounds, args.batch_size, args.seed, log=lambda s: print(s, flush=True),
                  variants=args.variants, steps_per_call=args.steps_per_call, device=args.device,
                  tf32=args.tf32)  # fmt: skip
    report(res, args, TARGETS)
    return res


def report(res: Dict, args: argparse.Namespace, targets: Dict[str, float]) -> None:
    """Print a measurement: each variant's median, the peak memory (unless ``--no-memory``), and
    each ratio with its target (``targets``: ratio label prefix -> target) met or not."""
    for name in args.variants:
        print(f"{name:>24}: {res['examples_per_sec'][name]:9.1f} examples/sec (median; warm-up incl. compile "
              f"{res['warmup_seconds'][name]:.1f} s)")  # fmt: skip
    if args.memory:
        peak = res["peak_device_memory_mib"]
        print("peak device memory, all variants together (JAX keeps one peak per device): "
              + (f"{peak:.1f} MiB" if peak is not None else f"not reported by the {res['device']} backend"))
    for name, value in res["ratios"].items():
        target = next((t for key, t in targets.items() if name.startswith(key)), None)
        note = f" (target >= {target}: {'met' if value >= target else 'NOT met'})" if target else ""
        print(f"ratio {name}: {value:.3f}{note}")
