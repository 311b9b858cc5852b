"""The PyTorch training backend, as ``bnref.backends`` sees it: the functions of
``bnref.backends.INTERFACE``, gathered from where they live (``bnref.torch.train``,
``bnref.torch.bench``). The CLI, the benchmark, parity and diagnose reach this backend only
through here.
"""

from __future__ import annotations

from bnref._cli import first_line
from bnref.torch.train import check_checkpoint, device_name, fit, resolve_device, train_steps

__all__ = ["resolve_device", "device_name", "prepare", "check_checkpoint", "fit", "train_steps", "load_run",
           "bench_args", "bench"]


def prepare(config) -> str:
    """Check the device (``ValueError`` for one that is not there) and, with ``config.compile``,
    that torch.compile can run on it (``bnref.torch.compiled.check_compile_support``: a torch
    without it, no C++ compiler or Triton); the device description. Replicas are processes,
    started by :func:`fit` (or by torchrun): nothing to join yet."""
    from bnref.torch.compiled import check_compile_support

    device = resolve_device(config.device)
    if config.compile:
        check_compile_support(device.type)
    name = device_name(device)
    return name if config.replicas == 1 else f"{config.replicas} x {name}"


def load_run(config, checkpoint: str):
    """``(model, None)``: the run's LeNet-BN with its trained weights, in eval mode, on the
    CPU; ``ValueError`` naming ``checkpoint`` for anything else."""
    import torch

    from bnref.torch.train import load_checkpoint, make_model

    model = make_model(config)
    try:
        load_checkpoint(checkpoint, model, None, torch.device("cpu"))
    except Exception as e:  # corrupt, hostile (weights_only refuses it), another format, another model
        raise ValueError(f"{checkpoint}: not a checkpoint of this run's torch model ({first_line(e)})") from None
    return model.eval(), None


def bench_args(argv=None):
    from bnref.torch import bench as _bench

    return _bench.parse_args(argv)


def bench(args):
    from bnref.torch import bench as _bench

    return _bench.run(args)
