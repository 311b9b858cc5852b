"""``fast-variance`` (JAX): Flax's default ``use_fast_variance=True`` against a two-pass variance as
the input's mean grows next to its spread, in float32 and bfloat16 (:func:`fast_variance`, its
figure :func:`_plot_fast_variance`)."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from bnref import _io
from bnref.experiments._common import _save


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
