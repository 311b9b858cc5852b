"""The Flax NNX training backend, as ``bnref.backends`` sees it: the functions of
``bnref.backends.INTERFACE``. NNX builds on the JAX backend (its registry entry's ``builds_on``):
the devices, the processes, the training loop and the benchmark's machinery are JAX's; the model
is NNX's (``bnref.nnx.train``).
"""

from __future__ import annotations

from bnref._cli import first_line
from bnref.jax.backend import prepare  # noqa: F401 - the same devices and processes as JAX's
from bnref.jax.train import device_name, resolve_device, train_steps  # noqa: F401 - the same loop
from bnref.nnx.train import check_checkpoint, fit  # noqa: F401

__all__ = ["resolve_device", "device_name", "prepare", "check_checkpoint", "fit", "train_steps", "load_run",
           "bench_args", "bench"]


def load_run(config, checkpoint: str):
    """``(model, None)``: the run's NNX LeNet-BN holding its trained variables (an NNX model
    carries its state); ``ValueError`` naming ``checkpoint`` for a file that is not such a
    checkpoint."""
    from bnref.jax.train import checkpoint_variables
    from bnref.nnx.train import model_holding

    local_stats = config.replicas > 1 and not config.sync_bn  # one set of statistics per device
    try:
        variables = checkpoint_variables(checkpoint, per_device_stats=local_stats)
        return model_holding(config, variables), None
    except Exception as e:  # corrupt or truncated msgpack, another format, another structure
        raise ValueError(f"{checkpoint}: not a checkpoint of this run's NNX model ({first_line(e)})") from None


def bench_args(argv=None):
    from bnref.nnx import bench as _bench

    return _bench.parse_args(argv)


def bench(args):
    from bnref.nnx import bench as _bench

    return _bench.run(args)
