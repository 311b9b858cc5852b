"""The JAX/Flax (linen) training backend, as ``bnref.backends`` sees it: the functions of
``bnref.backends.INTERFACE``, gathered from where they live (``bnref.jax.train``,
``bnref.jax.distributed``, ``bnref.jax.bench``). The CLI, the benchmark, parity and diagnose
reach this backend only through here.
"""

from __future__ import annotations

import sys

from bnref._cli import first_line
from bnref.jax import distributed
from bnref.jax.train import check_checkpoint, device_name, fit, resolve_device, train_steps

__all__ = ["resolve_device", "device_name", "prepare", "check_checkpoint", "fit", "train_steps", "load_run",
           "bench_args", "bench"]


def prepare(config) -> str:
    """Join a multi-process run (process 0 checks the coordinator's port first: a port in use
    made JAX segfault) and check the replicas' devices; the device description."""
    if config.num_processes > 1:
        distributed.check_coordinator(config)
        print(f"process {config.process_id} of {config.num_processes}: joining at {config.coordinator} "
              f"(JAX aborts the process if the others have not joined within {config.join_timeout_s} s)",
              file=sys.stderr, flush=True)  # fmt: skip
        distributed.join_processes(config)
    device = resolve_device(config.device)
    if config.replicas == 1:
        return device_name(device)
    distributed.replica_devices(config, device.platform)
    return f"{config.replicas} x {device_name(device)}"


def load_run(config, checkpoint: str):
    """``(model, variables)``: the run's Flax LeNet-BN and its trained variables (what the
    checkpoint holds: ``{"params", "batch_stats"}``); ``ValueError`` naming ``checkpoint`` for a
    file that is not such a checkpoint."""
    from bnref.jax.train import checkpoint_variables, make_model

    local_stats = config.replicas > 1 and not config.sync_bn  # one set of statistics per device
    try:
        variables = checkpoint_variables(checkpoint, per_device_stats=local_stats)
    except Exception as e:  # corrupt or truncated msgpack, another format, another structure
        raise ValueError(f"{checkpoint}: not a checkpoint of this run's Flax model ({first_line(e)})") from None
    return make_model(config), variables


def bench_args(argv=None):
    from bnref.jax import bench as _bench

    return _bench.parse_args(argv)


def bench(args):
    from bnref.jax import bench as _bench

    return _bench.run(args)
