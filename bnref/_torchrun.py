"""Launching torch replicas, the framework-free part: the torchrun environment, read once for
everyone (the CLI and the torch backend), and the error a failed replica is reported with.

No framework import (``os.environ`` only), so ``bnref.train`` can tell a torchrun launch and
catch :class:`ReplicaError` without importing torch.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Dict, Mapping, NoReturn, Optional

__all__ = ["ReplicaError", "torchrun_env", "exit_code", "exit_process", "run_and_exit"]


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


# --- how a replica process ends ---------------------------------------------------------------------
#
# A process that joined a gloo group must not end through the interpreter's finalization. gloo's
# worker threads outlive ``destroy_process_group`` (DDP keeps the group alive in C++: its threads
# were still there after DDP was collected, measured on torch 2.13), and the last collective's
# work is released by a worker thread, after ``wait()`` has returned. When that work holds a tensor
# Python has dropped, the release needs the GIL; taken while the interpreter finalizes, it ends the
# thread inside a destructor: "terminate called without an active exception", SIGABRT (a core's
# backtrace: ``ProcessGroupGloo::AsyncWork::~AsyncWork`` -> ``decref_pyobject`` -> ``take_gil`` ->
# ``pthread_exit``, the main thread in ``Py_FinalizeEx``). It killed torchrun's rank 1 after a
# finished run in 3 to 7 of 12 launches here. So a replica ends with :func:`exit_process`, as
# multiprocessing's forked children do: its files are written and closed, its output flushed,
# then ``os._exit``.


def exit_code(e: SystemExit) -> int:
    """The exit status the interpreter gives ``raise SystemExit(e.code)``: None is 0, an int is
    itself, anything else is printed on stderr and is 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def exit_process(code: int) -> NoReturn:
    """End this process now with ``code``: stdout and stderr flushed, then ``os._exit`` (no
    interpreter finalization, no ``atexit`` handlers). For a process whose files are closed and
    whose gloo threads may still run (see above)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to say on it
            pass
    os._exit(code)


def run_and_exit(main: Callable[[], Any]) -> NoReturn:
    """Run ``main()`` and :func:`exit_process` with the status the interpreter would have given:
    0 when it returns, :func:`exit_code` for a ``SystemExit``, 1 (traceback printed) for any other
    exception."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = exit_code(e)
    except BaseException:  # as the interpreter would report it
        traceback.print_exc()
        code = 1
    exit_process(code)
