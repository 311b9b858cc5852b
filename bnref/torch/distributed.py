"""Running bnref on ``torch.distributed``: processes on this machine, or a ``torchrun`` launch.

- :func:`launch` starts R processes (``spawn``), joins them into one process group (gloo on
  CPUs, NCCL with one GPU per process) over loopback with a timeout, runs ``worker(rank, world,
  send, *args)`` in each and returns their results in rank order. ``send(obj)`` streams an
  object to the parent as it happens (the training CLI's per-epoch lines). When a process
  fails, dies or stops answering, the others are stopped at once and :class:`ReplicaError`
  names the rank that caused it (a survivor's "connection reset by peer" is a symptom, not the
  cause): a dead peer never leaves the rest waiting in a collective, and no wait of the
  launcher's is unbounded, its exit included.
- :func:`data_parallel`: a model made data parallel for one replica (DDP around it, its BN
  layers made :class:`bnref.torch.SyncBatchNorm`); the JAX twin is
  ``bnref.jax.distributed.data_parallel``.
- :func:`torchrun_env` reads the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), refusing a partial one;
  :func:`init_from_env` joins that group.

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

from bnref._torchrun import ReplicaError, exit_process, torchrun_env  # noqa: F401 - framework-free, shared with the CLI
import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "ReplicaError", "launch", "torchrun_env", "init_from_env", "backend_for", "free_port",
           "data_parallel"]

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


def init_from_env(backend: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group torchrun describes (``env://``), with a timeout."""
    env = torchrun_env()
    if env is None:
        raise RuntimeError("not launched by torchrun: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set")
    dist.init_process_group(backend, init_method="env://", rank=env["rank"], world_size=env["world"],
                            timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip


def data_parallel(model: torch.nn.Module, device: torch.device, sync_bn: bool):
    """``(model, net)`` for one replica of the current process group: ``model`` with every BN
    layer converted to :class:`bnref.torch.SyncBatchNorm` when ``sync_bn`` (state and
    conventions kept), and ``net``, that model wrapped in ``DistributedDataParallel`` (the one to
    train; ``model`` is the one whose state to read). The JAX twin is
    ``bnref.jax.distributed.data_parallel``."""
    from torch.nn.parallel import DistributedDataParallel

    from bnref.torch.sync import SyncBatchNorm

    if sync_bn:
        model = SyncBatchNorm.convert_sync_batchnorm(model)
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _entry(rank, world, port, backend, timeout_s, worker, args, results, threads):
    """One process: join the group, run the worker, report its result or its error, then end with
    ``exit_process`` once the report is through the pipe (exit status 0, or 1 after an error):
    not through the interpreter's finalization, which gloo's threads can abort
    (``bnref._torchrun``)."""
    code = 0
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
        try:
            value = worker(rank, world, lambda obj: results.put((rank, "message", obj)), *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "result", value))
    except BaseException as e:  # reported with its rank, then this process exits non-zero
        first = (str(e).strip().splitlines() or [""])[0]
        summary = f"{type(e).__name__}: {first}" if first else type(e).__name__
        results.put((rank, "error", (summary, traceback.format_exc())))
        code = 1
    results.close()
    results.join_thread()  # the queue's feeder thread has written everything put
    exit_process(code)


#: errors a rank raises because a *peer* went away or went silent: symptoms, never the cause
_PEER_SYMPTOMS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
                  "Timeout", "connection refused", "Connection refused")  # fmt: skip
#: seconds the launcher waits, once a rank has failed, for the others to fail or exit in turn (a
#: peer's death reaches them in milliseconds; a stopped one never answers), and then for each
#: signal (SIGTERM, then SIGKILL) to take effect: every wait is bounded
_SETTLE_S = 3.0
_STOP_S = 3.0


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
    (default: the machine's cores shared out).

    Failures: :class:`ReplicaError` when a worker raises, a process dies (killed, crashed, exited
    without a result) or, once a peer has failed, does not answer (stopped, stuck): it names the
    rank that caused it, not the survivors that then lost their connection or timed out.
    ``TimeoutError`` when the whole run takes longer than ``deadline_s`` (tests set one; a
    stopped rank is otherwise found when its peers' collectives time out, ``timeout_s``). Either
    way, and on success, every process is gone when this returns: asked to stop (SIGTERM), then
    killed (SIGKILL), each wait bounded; one that cannot be killed (uninterruptible sleep) is let
    go, so that the interpreter's exit, which joins child processes without a timeout, cannot
    hang on it, and the error says so.
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
    run = _Run(procs, results, on_message)
    try:
        for p in procs:
            p.start()
        start = time.monotonic()
        while len(run.values) < replicas:
            if deadline_s is not None and time.monotonic() - start > deadline_s:
                waiting = [r for r in range(replicas) if r not in run.values]
                raise TimeoutError(f"ranks {waiting} of {replicas} did not finish within {deadline_s:g} s"
                                   f"{run.stop_and_describe(waiting)}")  # fmt: skip
            if run.receive(timeout_s=0.2) or run.exited_early():
                run.receive_for(0.5)  # a dead process's last words (its error, or its result) may still be in the pipe
                if run.errors or run.exited_early():
                    raise ReplicaError(run.failure_report())
        # Every result is in: the processes are exiting. Bounded, as everything here.
        end = time.monotonic() + min(timeout_s, 30.0)
        for p in procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
        return [run.values[r] for r in range(replicas)]
    finally:
        run.stop()
        results.close()


class _Run:
    """What :func:`launch` knows about its processes: their results, errors and fates."""

    def __init__(self, procs, results, on_message):
        self.procs, self.results, self.on_message = procs, results, on_message
        self.values: Dict[int, Any] = {}
        self.errors: Dict[int, tuple] = {}  # rank -> (one-line summary, traceback)
        self.unkillable: List[int] = []

    def receive(self, timeout_s: float) -> bool:
        """Take one report off the queue (waiting up to ``timeout_s``); True if it was an error."""
        try:
            rank, kind, payload = self.results.get(timeout=timeout_s)
        except queue_mod.Empty:
            return False
        if kind == "message":
            if self.on_message is not None:
                self.on_message(payload)
        elif kind == "result":
            self.values[rank] = payload
        else:
            self.errors.setdefault(rank, payload)
        return kind == "error"

    def receive_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.receive(timeout_s=0.05)

    def exited_early(self) -> List[int]:
        """Ranks whose process has exited without a result or an error reaching us."""
        return [r for r, p in enumerate(self.procs)
                if p.exitcode is not None and r not in self.values and r not in self.errors]  # fmt: skip

    def _pending(self) -> List[int]:
        return [r for r, p in enumerate(self.procs) if r not in self.values and r not in self.errors and p.is_alive()]

    def failure_report(self) -> str:
        """One line: the rank that failed first and how, then what the others did."""
        end = time.monotonic() + _SETTLE_S  # the survivors fail in turn, or are silent: find out which
        while self._pending() and time.monotonic() < end:
            self.receive(timeout_s=0.05)
        self.receive_for(0.2)  # reports written just before their process exited
        world = len(self.procs)
        fates = {}  # rank -> (order, text): the cause sorts first
        for r, p in enumerate(self.procs):
            if r in self.errors:
                summary = self.errors[r][0]
                symptom = any(s in summary for s in _PEER_SYMPTOMS)
                fates[r] = (3 if symptom else 1, f"failed: {summary}")
            elif r in self.values:
                continue
            elif p.exitcode is not None:
                fates[r] = (0, f"died: {_exit_description(p.exitcode)}")
            else:
                fates[r] = (2, f"did not answer ({_process_state(p.pid)})")
        silent = [r for r, (order, _) in fates.items() if order == 2]
        self.stop()
        for r in silent:
            fates[r] = (2, fates[r][1] + (", killed" if r not in self.unkillable else ", could not be killed: left running"))
        ordered = sorted(fates.items(), key=lambda kv: (kv[1][0], kv[0]))
        (rank, (order, first)), rest = ordered[0], ordered[1:]
        line = f"rank {rank} of {world} {first}"
        if rest:
            line += "; then " + "; ".join(f"rank {r} {text}" for r, (_, text) in rest)
        if order == 1:  # a Python exception in the worker: its traceback is worth reading
            return f"{line}\nrank {rank}'s traceback:\n{self.errors[rank][1].rstrip()}"
        return line

    def stop_and_describe(self, ranks: List[int]) -> str:
        states = {r: _process_state(self.procs[r].pid) for r in ranks if self.procs[r].is_alive()}
        self.stop()
        told = [f"rank {r}: {state}" + (", could not be killed: left running" if r in self.unkillable else ", killed")
                for r, state in states.items()]  # fmt: skip
        return (" (" + "; ".join(told) + ")") if told else ""

    def stop(self) -> None:
        """End every process still running: SIGTERM, then SIGKILL, each wait bounded. A stopped
        process does not act on SIGTERM until continued, and one in uninterruptible sleep on
        nothing until it wakes: those are let go of (see :func:`launch`)."""
        import multiprocessing.process as mp_process

        for signal_them in ("terminate", "kill"):
            alive = [p for p in self.procs if p.pid is not None and p.is_alive()]
            if not alive:
                return
            for p in alive:
                getattr(p, signal_them)()
            end = time.monotonic() + _STOP_S
            for p in alive:
                p.join(timeout=max(0.0, end - time.monotonic()))
        for r, p in enumerate(self.procs):
            if p.pid is not None and p.is_alive():
                # multiprocessing joins its children at interpreter exit with no timeout; this one
                # would hang it forever (private, but the only handle there is on that join)
                mp_process._children.discard(p)
                if r not in self.unkillable:
                    self.unkillable.append(r)


def _exit_description(exitcode: int) -> str:
    """``killed by SIGKILL (exit code -9)``, ``exit code 3``."""
    if exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name} (exit code {exitcode})"
    if exitcode == 0:
        return "exited (exit code 0) without returning a result"
    return f"exit code {exitcode}, without reporting an error"


def _process_state(pid: int) -> str:
    """What ``/proc`` says a silent process is doing (Linux), e.g. ``pid 123 is stopped, state T``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # the field after the command name
    except (OSError, IndexError):
        return f"pid {pid}"
    what = {"T": "is stopped", "t": "is stopped by a debugger", "D": "is in uninterruptible sleep"}
    return f"pid {pid} {what.get(state, 'is running')}, state {state}"
