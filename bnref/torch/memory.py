"""Peak memory of one training-mode BatchNorm forward + backward, bnref's against torch.nn's.

:func:`bn_peak_memory` runs ``y = bn(x); y.backward(dy)`` once, for bnref's layer
(:mod:`bnref.torch.layers`) or torch.nn's, in a FRESH Python process (nothing another
measurement allocated or cached is counted), and returns the memory that call added on top
of what was held before it (``x``, ``dy`` and the layer, already allocated, and the
interpreter with torch imported). :func:`compare_peak_memory` measures both and their ratio;
issue #18's target is ``bnref / torch.nn <= 1.1``::

    .venv/bin/python -c "from bnref.torch.memory import compare_peak_memory; print(compare_peak_memory())"

How the peak is read:

- CPU: the process's peak resident set, ``VmHWM`` of ``/proc/self/status``, reset to the
  current resident set just before the call by writing ``5`` to ``/proc/self/clear_refs``
  (Linux >= 4.0); the result is ``VmHWM`` after the call minus ``VmRSS`` before it. Where
  the reset is refused, ``VmHWM`` is read without it (``method`` says so), and without
  ``/proc`` ``resource.getrusage().ru_maxrss`` before and after: the peak is then
  only right if the call's peak exceeds everything earlier in the child, which a warm-up on
  a tiny input keeps true. Pages count once touched, so an allocated but unwritten buffer
  costs nothing here (as in the operating system's own accounting).
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the call: the caching allocator's view, tensors only.

Before the measured call the child runs the same forward + backward on a tiny input of the
same rank, so that one-time costs (kernel dispatch tables, the autograd engine's threads,
OpenMP's pool) are in the baseline and not in the peak.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Dict, Optional, Sequence

__all__ = ["IMPLS", "DTYPES", "bn_peak_memory", "compare_peak_memory"]

#: the layers that can be measured
IMPLS = ("bnref", "torch.nn")
#: input dtypes (half inputs meet float32 parameters and buffers, as in mixed precision)
DTYPES = ("float32", "float64", "float16", "bfloat16")
DEFAULT_SHAPE = (64, 64, 128, 128)  # 256 MiB of float32, NCHW
_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
_MIB = 2**20


def _check(impl: str, shape: Sequence[int], device: str, dtype: str) -> tuple:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    shape = tuple(shape)
    # rank 2..5: what BatchNorm1d/2d/3d accept; every size >= 1, and more than one value per channel
    if not 2 <= len(shape) <= 5 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"shape must be 2 to 5 positive ints (N, C, *spatial), got {shape!r}")
    if math.prod(shape) // shape[1] < 2:
        raise ValueError(f"shape must have more than one value per channel for training, got {shape!r}")
    return shape


def bn_peak_memory(impl: str, shape: Sequence[int] = DEFAULT_SHAPE, device: str = "cpu", dtype: str = "float32",
                   timeout_s: float = 600.0) -> Dict[str, object]:  # fmt: skip
    """Peak memory one training forward + backward of ``impl``'s BatchNorm adds, in a fresh process.

    Args:
      impl: ``"bnref"`` (:class:`bnref.torch.BatchNorm2d` and its 1d/3d siblings) or
        ``"torch.nn"`` (``torch.nn.BatchNorm*d``), chosen by the rank of ``shape``.
      shape: the input's shape ``(N, C, *spatial)``, rank 2 to 5; default (64, 64, 128, 128),
        256 MiB of float32.
      device: ``"cpu"`` or a CUDA device.
      dtype: the input's dtype (:data:`DTYPES`); the layer's parameters and buffers are
        float32 for half inputs, else the input's dtype.
      timeout_s: the child process's limit, in seconds.

    Returns:
      ``{"impl", "shape", "device", "dtype", "input_mib", "peak_mib", "method"}``: ``peak_mib``
      is the memory the call added, in MiB (2**20 bytes); ``input_mib`` the size of ``x``;
      ``method`` how the peak was read (the module docstring).

    Raises:
      ValueError: an unknown ``impl`` (naming the choices), ``dtype`` or ``device``, or a bad
        ``shape``.
      RuntimeError: the child failed or ran past ``timeout_s`` (its last error line quoted).
    """
    shape = _check(impl, shape, device, dtype)
    args = json.dumps({"impl": impl, "shape": list(shape), "device": device, "dtype": dtype})
    root = str(pathlib.Path(__file__).resolve().parents[2])  # the directory holding bnref/
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    code = f"from bnref.torch.memory import _child; _child({args!r})"
    try:
        done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                              timeout=timeout_s, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"bn_peak_memory({impl!r}, {shape}): the child ran past {timeout_s} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"bn_peak_memory({impl!r}, {shape}): the child exited with {done.returncode}: {last}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["input_mib"] = math.prod(shape) * _ITEMSIZE[dtype] / _MIB
    return result


def compare_peak_memory(shape: Sequence[int] = DEFAULT_SHAPE, device: str = "cpu", dtype: str = "float32",
                        timeout_s: float = 600.0) -> Dict[str, object]:  # fmt: skip
    """:func:`bn_peak_memory` of both layers (one fresh process each) and ``ratio = bnref / torch.nn``
    of their ``peak_mib``: ``{"bnref": {...}, "torch.nn": {...}, "ratio": float}``."""
    out: Dict[str, object] = {impl: bn_peak_memory(impl, shape, device, dtype, timeout_s) for impl in IMPLS}
    out["ratio"] = out["bnref"]["peak_mib"] / out["torch.nn"]["peak_mib"]
    return out


# --- the child process ------------------------------------------------------------------------


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current VmRSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(args_json: str) -> None:
    """Run in the fresh process: set up, warm up, measure one call, print one JSON line."""
    import gc

    import torch

    from bnref.torch import layers

    a = json.loads(args_json)
    impl, shape, device = a["impl"], tuple(a["shape"]), torch.device(a["device"])
    dtype = getattr(torch, a["dtype"])
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    classes = {"bnref": (layers.BatchNorm1d, layers.BatchNorm2d, layers.BatchNorm3d),
               "torch.nn": (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)}[impl]  # fmt: skip
    cls = classes[max(len(shape) - 3, 0)]  # rank 2, 3: 1d; 4: 2d; 5: 3d
    bn = cls(shape[1], device=device, dtype=param_dtype).train()

    def step(x: torch.Tensor, dy: torch.Tensor) -> None:
        y = bn(x)
        y.backward(dy)

    small = (2, shape[1]) + (2,) * (len(shape) - 2)
    step(torch.randn(small, device=device, dtype=dtype, requires_grad=True), torch.randn(small, device=device, dtype=dtype))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    dy = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    x.grad = None
    bn.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(x, dy)
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    elif _status_kib("VmRSS") is not None:
        reset = _reset_hwm()
        base = _status_kib("VmRSS") * 1024
        step(x, dy)
        peak = _status_kib("VmHWM") * 1024 - base
        method = "VmHWM after clear_refs 5" if reset else "VmHWM (clear_refs refused: not reset)"
    else:  # no /proc (not Linux): the lifetime peak, which cannot be reset
        import resource

        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        step(x, dy)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit - base
        method = "ru_maxrss (not reset: the increase over the earlier peak)"
    print(json.dumps({"impl": impl, "shape": list(shape), "device": str(device), "dtype": a["dtype"],
                      "peak_mib": peak / _MIB, "method": method}))  # fmt: skip
