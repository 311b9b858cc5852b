"""Running bnref on ``torch.distributed``: processes on this machine, or a ``torchrun`` launch.

- :func:`launch` starts R processes (``spawn``), joins them into one process group (gloo on
  CPUs, NCCL with one GPU per process) over loopback with a timeout, runs ``worker(rank, world,
  send, *args)`` in each and returns their results in rank order. ``send(obj)`` streams an
  object to the parent as it happens (the training CLI's per-epoch lines). When a process
  fails, the others are stopped at once and the error names the rank: a dead peer never
  leaves the rest waiting in a collective.
- :func:`torchrun_env` reads the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`init_from_env` joins that group.

Every process group gets a timeout (``timeout_s``): a collective that waits longer (a peer that
hangs, mismatched collectives) raises instead of hanging forever.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "launch", "torchrun_env", "init_from_env", "backend_for", "free_port"]

#: seconds a collective may wait for its peers before the run fails
DEFAULT_TIMEOUT_S = 120.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    """gloo for CPU tensors, NCCL for CUDA tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def torchrun_env() -> Optional[Dict[str, Any]]:
    """``{"rank", "world", "local_rank"}`` when launched by torchrun (or any launcher that sets
    ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), else None."""
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if not all(k in os.environ for k in keys):
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return {"rank": rank, "world": world, "local_rank": local_rank}


def init_from_env(backend: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group torchrun describes (``env://``), with a timeout."""
    env = torchrun_env()
    if env is None:
        raise RuntimeError("not launched by torchrun: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set")
    dist.init_process_group(backend, init_method="env://", rank=env["rank"], world_size=env["world"],
                            timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip


def _entry(rank, world, port, backend, timeout_s, worker, args, results, threads):
    """One process: join the group, run the worker, report its result or its error."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
        try:
            value = worker(rank, world, lambda obj: results.put((rank, "message", obj)), *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "result", value))
    except BaseException as e:  # reported with its rank, then this process exits non-zero
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def launch(
    worker: Callable,
    replicas: int,
    args: tuple = (),
    *,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_message: Optional[Callable[[Any], None]] = None,
    threads: Optional[int] = None,
    deadline_s: Optional[float] = None,
) -> List[Any]:
    """Run ``worker(rank, world, send, *args)`` in ``replicas`` spawned processes joined into one
    ``backend`` process group; returns the workers' return values in rank order.

    ``worker`` and ``args`` must be picklable (a module-level function), and so must what it
    returns and sends: NumPy arrays rather than tensors (a tensor put on a multiprocessing queue
    is shared memory of a process that exits). ``send(obj)`` in a
    worker calls ``on_message(obj)`` here, in order. ``threads``: torch threads per process
    (default: the machine's cores shared out). Raises ``RuntimeError`` naming the rank when a
    worker fails or its process dies, and ``TimeoutError`` when the whole run takes longer than
    ``deadline_s`` (tests set one); the other processes are then stopped.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // replicas)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, replicas, port, backend, timeout_s, worker, args, results, threads),
                    name=f"bnref-rank{r}", daemon=False)  # fmt: skip
        for r in range(replicas)
    ]
    for p in procs:
        p.start()
    values: Dict[int, Any] = {}
    start = time.monotonic()
    try:
        while len(values) < replicas:
            if deadline_s is not None and time.monotonic() - start > deadline_s:
                waiting = [r for r in range(replicas) if r not in values]
                raise TimeoutError(f"ranks {waiting} of {replicas} did not finish within {deadline_s:g} s")
            try:
                rank, kind, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead:
                    time.sleep(0.5)  # its error report may still be in the queue
                    _drain_error(results, dead[0], procs)
                continue
            if kind == "message":
                if on_message is not None:
                    on_message(payload)
            elif kind == "result":
                values[rank] = payload
            else:
                raise RuntimeError(_failure_report(replicas, {rank: payload}, results))
        for p in procs:
            p.join(timeout=timeout_s)
        return [values[r] for r in range(replicas)]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)


def _drain_error(results, rank: int, procs) -> None:
    errors = {}
    _collect_errors(results, errors, wait_s=1.0)
    if not errors:
        raise RuntimeError(f"rank {rank} of {len(procs)} died (exit code {procs[rank].exitcode}) without "
                           "reporting an error")  # fmt: skip
    raise RuntimeError(_failure_report(len(procs), errors, results))


def _collect_errors(results, errors: Dict[int, str], wait_s: float) -> None:
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            r, kind, payload = results.get(timeout=0.1)
        except queue_mod.Empty:
            continue
        if kind == "error":
            errors.setdefault(r, payload)


def _failure_report(world: int, errors: Dict[int, str], results) -> str:
    """Every failed rank's error, the root cause first: when one rank fails, its peers fail
    after it with "connection closed/reset by peer" from the collective they were in."""
    _collect_errors(results, errors, wait_s=1.0)
    peer = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    ordered = sorted(errors.items(), key=lambda kv: (any(p in kv[1] for p in peer), kv[0]))
    rank, first = ordered[0]
    lines = [f"rank {rank} of {world} failed: {first.splitlines()[0]}"]
    lines += [f"  (rank {r} then failed: {e.splitlines()[0]})" for r, e in ordered[1:]]
    lines.append(f"rank {rank}'s traceback:\n{first}")
    return "\n".join(lines)
