"""How far a training speed is from the machine's limit: LeNet-BN's arithmetic per training
example (:func:`lenet_train_flops`) and a device's peak arithmetic rate (:func:`peak_flops`),
which ``python -m bnref.bench`` turns into the achieved fraction of peak beside every speed.

A leaf: it imports no framework (the benchmark passes it the device's name).

FLOPs count a multiply-add as 2. Training is forward + backward, the backward of a convolution
or dense layer being two products of the forward's size (the input and the weight gradients):
3x the forward's multiply-adds; BN, sigmoid, pooling and the loss are elementwise (about 1 %
more, left out, so the fraction is a slight under-estimate of the work done).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

__all__ = ["LENET_LAYERS", "lenet_train_flops", "peak_flops", "GPU_PEAKS", "fraction_of_peak"]

#: LeNet-BN's layers as (name, multiply-adds per example in the forward pass): conv1 5x5x1 -> 6
#: at 24x24, conv2 5x5x6 -> 16 at 8x8, fc1 256 -> 120, fc2 120 -> 84, fc3 84 -> 10
LENET_LAYERS: Tuple[Tuple[str, int], ...] = (
    ("conv1", 24 * 24 * 6 * 5 * 5 * 1),
    ("conv2", 8 * 8 * 16 * 5 * 5 * 6),
    ("fc1", 256 * 120),
    ("fc2", 120 * 84),
    ("fc3", 84 * 10),
)


def lenet_train_flops() -> int:
    """FLOPs of one training example's SGD step: 3 x 2 x the forward's multiply-adds (1.69e6)."""
    return 3 * 2 * sum(macs for _, macs in LENET_LAYERS)


#: dense peak FLOP/s from the vendors' data sheets (SXM parts; no sparsity): float32 on the
#: CUDA cores, TF32 and bfloat16 on the tensor cores. Matched against the device's name.
GPU_PEAKS: Dict[str, Dict[str, float]] = {
    "H200": {"float32": 67e12, "tf32": 495e12, "bfloat16": 989e12},
    "H100": {"float32": 67e12, "tf32": 495e12, "bfloat16": 989e12},
    "A100": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12},
}


def _cpu_peak() -> Tuple[Optional[float], str]:
    """cores x clock x float32 FLOPs per cycle (2 FMA units of the widest vector the CPU has:
    AVX-512 64, AVX2 32, else 8), from /proc/cpuinfo and the CPUs this process may use."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None, "no /proc/cpuinfo: CPU peak unknown"
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    per_cycle, isa = (64, "AVX-512") if " avx512f" in flags else (32, "AVX2") if " avx2" in flags else (8, "SSE")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not mhz:
        return None, "no clock in /proc/cpuinfo: CPU peak unknown"
    ghz = max(mhz) / 1000
    return cores * ghz * 1e9 * per_cycle, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} float32 FLOPs/cycle ({isa} FMA)"


def peak_flops(device: str, precision: str = "float32", tf32: bool = False) -> Tuple[Optional[float], str]:
    """``(peak FLOP/s or None, how it was obtained)`` for a device described as ``"cpu"`` or by
    its GPU name (e.g. ``"NVIDIA H200"``), in ``precision`` (``"float32"``, ``"bfloat16"``; on
    a GPU float32 with ``tf32`` uses the TF32 peak)."""
    if device.lower().startswith("cpu"):
        return _cpu_peak()  # bfloat16 on a CPU without AMX runs at (or below) float32's rate
    for name, peaks in GPU_PEAKS.items():
        if name.lower() in device.lower():
            key = "tf32" if precision == "float32" and tf32 else precision
            return peaks[key], f"{name} data-sheet dense {key} peak"
    return None, f"no peak figure known for {device!r}"


def fraction_of_peak(examples_per_sec: float, device: str, precision: str = "float32", tf32: bool = False) -> Dict:
    """The achieved FLOP/s of LeNet-BN training at ``examples_per_sec`` and its fraction of the
    device's peak (None when the peak is unknown), with the peak used and where it came from."""
    achieved = examples_per_sec * lenet_train_flops()
    peak, source = peak_flops(device, precision, tf32)
    return {"flops_per_example": lenet_train_flops(), "achieved_flops": achieved, "peak_flops": peak,
            "peak_source": source, "fraction_of_peak": None if peak is None else achieved / peak}  # fmt: skip
