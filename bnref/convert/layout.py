"""Layouts: torch's channels-first NCHW / NCL against Flax's channels-last NHWC / NLC.

Conv kernels ``(O, I, *k)`` <-> ``(*k, I, O)`` (OIHW <-> HWIO); dense weights ``(out, in)``
<-> kernels ``(in, out)``, their inputs in Flax's order where a flatten lies before them:
torch flattens a (C, S) map as ``c*S + s``, Flax an (S, C) one as ``s*C + c``
(:func:`flatten_permutation`, and :func:`_candidate_orders`, every such order of a width);
activations with :func:`channels_last` / :func:`_as_flax_order`. NumPy only.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def conv_kernel_to_flax(w: np.ndarray) -> np.ndarray:
    """torch (O, I, *k) -> Flax (*k, I, O): OIHW -> HWIO, OIL -> LIO."""
    return w.transpose(*range(2, w.ndim), 1, 0)


def conv_kernel_to_torch(k: np.ndarray) -> np.ndarray:
    """Flax (*k, I, O) -> torch (O, I, *k)."""
    return k.transpose(k.ndim - 1, k.ndim - 2, *range(k.ndim - 2))


def dense_kernel_to_flax(w: np.ndarray, perm: Optional[np.ndarray] = None) -> np.ndarray:
    """torch (out, in) -> Flax (in, out), the inputs in Flax's order (``perm``: see
    :func:`flatten_permutation`)."""
    return (w if perm is None else w[:, perm]).T


def dense_kernel_to_torch(k: np.ndarray, perm: Optional[np.ndarray] = None) -> np.ndarray:
    """Flax (in, out) -> torch (out, in), the inverse of :func:`dense_kernel_to_flax`."""
    return k.T if perm is None else k.T[:, np.argsort(perm)]


def flatten_permutation(channels: int, features: int) -> np.ndarray:
    """``P`` with ``flax_vector[j] == torch_vector[P[j]]`` when a (C, S...) feature map is
    flattened channels-first by torch (index ``c*S + s``) and channels-last by Flax
    (``s*C + c``), ``features = C*S``."""
    s = features // channels
    return np.arange(features).reshape(channels, s).T.reshape(-1)


def channels_last(x: np.ndarray) -> np.ndarray:
    """NCHW / NCL -> NHWC / NLC (a 2-D (N, F) array is returned as is)."""
    x = np.asarray(x)
    return np.moveaxis(x, 1, -1) if x.ndim >= 3 else x


def _candidate_orders(width: int) -> list:
    """``[(label, P)]``: every distinct flatten order of a ``width``-wide vector, one per
    factorization C x S (``P`` as in :func:`flatten_permutation`), the identity first."""
    out, seen = [], set()
    for c in [width] + [c for c in range(1, width) if width % c == 0]:
        p = flatten_permutation(c, width)
        if p.tobytes() not in seen:
            seen.add(p.tobytes())
            out.append(("as is" if c == width else f"(C={c}, S={width // c})", p))
    return out


def _as_flax_order(a: np.ndarray, perm) -> np.ndarray:
    """A torch activation in the layout its Flax partner has: channels-last, or a flat vector
    read in the order ``perm``."""
    return channels_last(a) if a.ndim >= 3 else (a if perm is None or a.ndim != 2 else a[:, perm])
