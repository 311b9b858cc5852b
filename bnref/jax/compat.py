"""What differs between the JAX versions bnref runs on, in one place: float64 (``x64``) for a
block of code. ``jax.enable_x64`` is a context manager in JAX >= 0.6 (0.10 here); older JAX
has it as ``jax.experimental.enable_x64``. The device machines run whatever JAX they have, so
this is a version check, not a requirement."""

from __future__ import annotations

import contextlib

import jax

__all__ = ["x64"]


def x64(enabled: bool = True):
    """A context in which JAX computes in float64 when ``enabled`` (else a no-op context)."""
    if not enabled:
        return contextlib.nullcontext()
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # JAX < 0.6

    return enable_x64()
