"""Arrays coming in: to NumPy (always a copy), and refused by name when they are corrupt.

Every path of :mod:`bnref.convert` reads the caller's arrays through :func:`_to_numpy` (torch
tensors, JAX arrays, NumPy; bfloat16 kept as ml_dtypes' bfloat16) and validates them before it
converts anything: :func:`_check_values` (floating, finite, a variance >= 0), :func:`_count`
(a ``num_batches_tracked``), :func:`_check_keys` / :func:`_check_shape` (a known key table).
A ``ValueError`` names the first bad key, so nothing is ever half converted.
"""

from __future__ import annotations

import numpy as np


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor: copy to host without importing torch here
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; ml_dtypes' (JAX's) is the same bits
            import ml_dtypes

            return v.float().numpy().astype(ml_dtypes.bfloat16)  # exact: bf16 -> f32 -> bf16
        v = v.numpy()
    return np.array(v)  # always a copy: the caller's arrays are never shared or modified


def _is_float(dtype) -> bool:
    """NumPy's floating types and ml_dtypes' (bfloat16, float8_*), which NumPy files under 'V'."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8", "float6", "float4"))


def _check_values(key: str, a: np.ndarray, where: str, *, variance: bool = False) -> None:
    """``ValueError`` unless ``a`` is floating and finite (and, for a variance, >= 0). An int64
    weight or a string array is a corrupt checkpoint, not something to cast."""
    if not _is_float(a.dtype):
        raise ValueError(f"{where}: {key} has dtype {a.dtype}, expected a floating-point array")
    v = a.astype(np.float64)
    finite = np.isfinite(v)
    if not finite.all():
        i = np.unravel_index(int(np.argmin(finite)), v.shape) if v.ndim else ()
        what = "NaN" if np.isnan(v[i]) else "inf"
        raise ValueError(f"{where}: {key} holds {what} (at index {tuple(int(j) for j in i)}): the weights are corrupt")
    if variance and v.size and v.min() < 0:
        i = np.unravel_index(int(np.argmin(v)), v.shape)
        raise ValueError(f"{where}: {key} holds a negative variance ({float(v[i]):.3g} at index "
                         f"{tuple(int(j) for j in i)}): a running variance is >= 0, the state is corrupt")  # fmt: skip


def _count(n, what: str, where: str) -> int:
    """A ``num_batches_tracked``: an integer >= 0 (2.7 is refused, not truncated to 2)."""
    a = _to_numpy(n)
    ok = a.ndim == 0 and (a.dtype.kind in "iu" or (a.dtype.kind == "f" and np.isfinite(a) and float(a).is_integer()))
    if not ok or a < 0:
        raise ValueError(f"{where}: {what} is {n!r}, expected a count (an integer >= 0)")
    return int(a)


def _check_keys(found, expected, where: str) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise ValueError(f"{where}: unexpected key {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _check_shape(key: str, a: np.ndarray, shape: tuple, where: str) -> None:
    if a.shape != tuple(shape):
        raise ValueError(f"{where}: {key!r} has shape {a.shape}, expected {tuple(shape)}")
