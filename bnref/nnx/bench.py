"""Flax NNX training-throughput benchmark: ``python -m bnref.bench --backend nnx [options]``.

Examples/second of LeNet-BN SGD steps in NNX, the variants measured in interleaved rounds in ONE
process (only ratios measured side by side mean anything on a shared CPU), on the JAX bench's
machinery (``bnref.jax.bench.measure``: its data, warm-up, rounds, medians and options):

- ``bnref.nnx BN``: bnref.nnx.BatchNorm (two-pass variance) in bnref's loop, the code ``fit``
  runs for ``--backend nnx`` (``bnref.jax.train.train_steps`` over the NNX model behind
  ``bnref.nnx.train.LinenFace``: data on the device, no per-step sync);
- ``bnref.nnx BN fused``: the same with ``--steps-per-call K`` steps per compiled call;
- ``bnref.nnx BN bfloat16``: ``bnref.nnx BN`` in bfloat16 (``--precision bfloat16``);
- ``flax.nnx BN``: flax.nnx.BatchNorm as users get it (``use_fast_variance=True``, as the JAX
  bench's ``flax BN`` is flax.linen's), in the same loop;
- ``no BN``: plain LeNet in NNX, the same loop;
- ``linen bnref BN``: the JAX bench's ``bnref BN`` (bnref.jax.BatchNorm, linen), the same loop:
  what the NNX face costs;
- ``bnref.nnx BN nnx.jit`` and ``flax.nnx BN nnx.jit``: NNX's own way, as Flax's NNX MNIST
  tutorial trains: ``bnref.nnx.train.train_step`` (``nnx.jit`` over the model and an
  ``nnx.Optimizer``, the BN statistics updated in place), a host NumPy batch fed each step.

Compile time is excluded (one warm-up call per variant, its seconds reported); the median over
``--rounds`` is reported, with the ratios in :data:`RATIOS`; the targets (:data:`TARGETS`):
bnref.nnx over flax.nnx >= 0.9 in each loop.
"""

from __future__ import annotations

import argparse
from typing import Dict

from bnref.jax import bench as jax_bench

__all__ = ["VARIANTS", "RATIOS", "FLOAT32_LIKE", "TARGETS", "measure", "parse_args", "run"]

VARIANTS = ("bnref.nnx BN", "bnref.nnx BN fused", "bnref.nnx BN bfloat16", "flax.nnx BN", "no BN", "linen bnref BN",
            "bnref.nnx BN nnx.jit", "flax.nnx BN nnx.jit")  # fmt: skip

#: ratio label -> (numerator variant, denominator variant)
RATIOS = {
    "bnref.nnx BN / flax.nnx BN": ("bnref.nnx BN", "flax.nnx BN"),
    "bnref.nnx BN / flax.nnx BN, nnx.jit step": ("bnref.nnx BN nnx.jit", "flax.nnx BN nnx.jit"),
    "bnref.nnx BN / no BN": ("bnref.nnx BN", "no BN"),
    "bnref.nnx BN / linen bnref BN": ("bnref.nnx BN", "linen bnref BN"),
    "bnref loop / nnx.jit step": ("flax.nnx BN", "flax.nnx BN nnx.jit"),
    "fused / one step per call": ("bnref.nnx BN fused", "bnref.nnx BN"),
    "bfloat16 / float32": ("bnref.nnx BN bfloat16", "bnref.nnx BN"),
}
#: the variants that train LeNet-BN with BN in float32 in bnref's loop
FLOAT32_LIKE = ("bnref.nnx BN", "bnref.nnx BN fused", "flax.nnx BN")
#: the loop the fastest of :data:`FLOAT32_LIKE` is set against (reported, no target)
BASELINE = "flax.nnx BN nnx.jit"
TARGETS = {"bnref.nnx BN / flax.nnx BN": 0.9}  # a prefix: both loops' ratios


class _NNXStepLoop(jax_bench._FlaxExamplesLoop):
    """NNX's own training step fed host batches (the JAX bench's flax-examples loop, with
    ``bnref.nnx.train.train_step`` over an NNX model and its ``nnx.Optimizer``)."""

    def __init__(self, bn, X, y, perm, batch_size, lr, seed):
        from bnref.config import TrainConfig
        from bnref.nnx import train as N

        self._host_batches(X, y, perm, batch_size)
        self.model = N.initial_model(TrainConfig(backend="nnx", bn=bn), seed)  # linen's initial weights
        self.model.train()
        self.optimizer = N.optimizer_for(self.model, lr)
        self.step = N.train_step

    def _train(self, X, y):
        return self.step(self.model, self.optimizer, X, y)[0]


def _makers(X, y, perm, batch_size, seed, k):
    """This bench's variants: name -> a function building its loop (lr 0.1, as the JAX bench's)."""
    from bnref.nnx.train import NNX

    def loop(bn, **kw):
        return lambda: jax_bench._OnDeviceLoop(bn, X, y, batch_size, 0.1, seed, **kw)

    return {
        "bnref.nnx BN": loop("bnref", family=NNX),
        "bnref.nnx BN fused": loop("bnref", family=NNX, steps_per_call=k),
        "bnref.nnx BN bfloat16": loop("bnref", family=NNX, precision="bfloat16"),
        "flax.nnx BN": loop("builtin", family=NNX),
        "no BN": loop("none", family=NNX),
        "linen bnref BN": loop("bnref"),
        "bnref.nnx BN nnx.jit": lambda: _NNXStepLoop("bnref", X, y, perm, batch_size, 0.1, seed),
        "flax.nnx BN nnx.jit": lambda: _NNXStepLoop("builtin", X, y, perm, batch_size, 0.1, seed),
    }


def measure(ds, steps: int = 50, rounds: int = 5, batch_size: int = 256, seed: int = 0, log=print, variants=VARIANTS,
            steps_per_call=None, device: str = "auto", tf32: bool = False) -> Dict:  # fmt: skip
    """``bnref.jax.bench.measure`` with this bench's variants and ratios (its docstring says what
    is measured and returned)."""
    import flax
    import jax

    return jax_bench.measure(ds, steps, rounds, batch_size, seed, log, variants, steps_per_call, device, tf32,
                             makers=_makers, ratios=RATIOS, float32_like=FLOAT32_LIKE, baseline=BASELINE,
                             versions=f"jax {jax.__version__}, flax {flax.__version__} (nnx)")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    """The NNX benchmark's options (the JAX bench's, with these variants); a bad value is
    argparse's one-line error (exit 2)."""
    return jax_bench.parse_options(argv, "python -m bnref.bench --backend nnx", __doc__.split("\n\n")[0], VARIANTS)


def run(args: argparse.Namespace) -> Dict:
    """Measure, print the medians and the ratios; returns the measurements (for ``--json``)."""
    res = measure(args.data, args.steps, args.rounds, args.batch_size, args.seed, log=lambda s: print(s, flush=True),
                  variants=args.variants, steps_per_call=args.steps_per_call, device=args.device,
                  tf32=args.tf32)  # fmt: skip
    jax_bench.report(res, args, TARGETS)
    return res
