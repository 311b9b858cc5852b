"""Launching torch replicas, the framework-free part: the torchrun environment, read once for
everyone (the CLI and the torch backend), and the error a failed replica is reported with.

No framework import (``os.environ`` only), so ``bnref.train`` can tell a torchrun launch and
catch :class:`ReplicaError` without importing torch.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

__all__ = ["ReplicaError", "torchrun_env"]


class ReplicaError(RuntimeError):
    """A process of :func:`bnref.torch.distributed.launch` failed, died or stopped answering. The message's first line
    says everything: the rank that went first and what happened to it (its error; "killed by
    SIGKILL (exit code -9)"; "is stopped (state T)"), then what the others did after it. Only
    when that rank raised a Python exception does its traceback follow, on the next lines."""


def torchrun_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Dict[str, Any]]:
    """``{"rank", "world", "local_rank", "master_addr", "master_port"}`` when this process was
    launched by torchrun (or any launcher that sets the same variables), else None.

    Launched means ``RANK`` or ``WORLD_SIZE`` is set; a launch must then set all of ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``: a partial one is a ``ValueError`` naming
    what is missing or malformed, never read as "not launched" (that process would start
    replicas of its own). ``LOCAL_RANK`` (the GPU of this process) defaults to ``RANK``, right on
    one machine, which is where a launcher that omits it can be. Reads ``os.environ`` unless
    ``environ`` is given; imports nothing, so a framework-free CLI can share it.
    """
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ValueError(f"a torchrun launch sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set")  # fmt: skip
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        raw = env.get(key, env["RANK"] if key == "LOCAL_RANK" else None)
        try:
            values[key] = int(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r} is not an integer (torchrun sets it)") from None
    rank, world, local_rank, port = (values[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"))
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK={local_rank} must be >= 0")
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port (1 to 65535)")
    return {"rank": rank, "world": world, "local_rank": local_rank, "master_addr": env["MASTER_ADDR"],
            "master_port": port}  # fmt: skip
