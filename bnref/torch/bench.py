"""PyTorch training-throughput benchmark: ``python -m bnref.bench --backend torch [options]``.

Training examples/second of LeNet-BN (batch 256, SGD lr 1.0), variants set up once and then
measured in interleaved rounds (each round runs every variant for ``--steps`` steps),
reporting per-variant medians and the medians of the per-round ratios, which are what these
noisy machines can measure:

- ``bnref``: bnref's training loop (``bnref.torch.train.train_steps``: data on the device,
  index-sliced shuffled batches, on-device metrics) with bnref's from-scratch BN;
- ``torch.nn``: the same loop with ``torch.nn.BatchNorm1d/2d``;
- ``none``: the same loop, no BN (the floor BN's cost sits on);
- ``seed``: the seed's own code (``bnref.torch._seed``: d2l's from-scratch BN and
  ``train_ch6`` loop over a shuffling DataLoader with 4 workers, ``float()`` syncs per step);
- ``<bn>+compiled``, ``<bn>+bfloat16``, ``<bn>+compiled+bfloat16`` (``<bn>``: bnref, torch.nn
  or none): that loop with fit's ``--compile`` step (``bnref.torch.compiled``: inductor, on CUDA
  with CUDA graphs) and/or its ``--precision bfloat16`` (autocast). A compiled variant is
  compiled ahead of the rounds (``CompiledStep.warm_up``, then undone), and its compile seconds
  are reported in their own column, never in a rate.

``--variants`` chooses (``all``: every one); the default, :data:`DEFAULT_VARIANTS`, adds the
compiled bnref and torch.nn loops and bnref in bfloat16 to the four eager float32 ones (on this
2-core CPU inductor compiles each compiled variant in about 30 s the first time, 3-5 s from its
cache). Targets (issue 3): ``bnref / torch.nn >= 0.9`` and ``bnref / seed >= 1.5``; the other
ratios (:data:`COMPARISONS`: compiled / eager, bfloat16 / float32) are reported without a target.
The seed's loader is started (and its workers spawned) during warm-up; a new DataLoader iterator
(one per d2l epoch) is only started again if an epoch's batches run out, so the seed is
measured at its steady-state speed. TF32 is off unless ``--tf32`` (as in ``fit``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import time
import warnings
from typing import Dict, List, Optional

import torch

from bnref._cli import int_at_least, non_negative_float, positive_int
from bnref.torch import _seed
from bnref.torch.compiled import check_compile_support, synchronize
from bnref.torch.train import (float32_matmuls, load_tensors, make_model, make_step, resolve_device, run_steps,
                               train_steps)  # fmt: skip

#: the BN of each loop variant (``bnref.config.BN_CHOICES``' names)
BNS = {"bnref": "bnref", "torch.nn": "builtin", "none": "none"}
#: what a loop variant's name may add to its BN: fit's --compile step and --precision bfloat16
SUFFIXES = ("", "+compiled", "+bfloat16", "+compiled+bfloat16")
VARIANTS = ("bnref", "torch.nn", "none", "seed") + tuple(
    f"{bn}{suffix}" for suffix in SUFFIXES[1:] for bn in BNS)  # fmt: skip
DEFAULT_VARIANTS = ("bnref", "torch.nn", "none", "seed", "bnref+compiled", "torch.nn+compiled", "bnref+bfloat16")
TARGETS = {("bnref", "torch.nn"): 0.9, ("bnref", "seed"): 1.5}
#: ratios reported without a target, where both variants were measured
COMPARISONS = (("bnref+compiled", "bnref"), ("torch.nn+compiled", "torch.nn"), ("none+compiled", "none"),
               ("bnref+compiled", "torch.nn+compiled"), ("bnref+bfloat16", "bnref"), ("torch.nn+bfloat16", "torch.nn"),
               ("bnref+bfloat16", "torch.nn+bfloat16"), ("bnref+compiled+bfloat16", "bnref+compiled"),
               ("torch.nn+compiled+bfloat16", "torch.nn+compiled"))  # fmt: skip


def describe(variant: str) -> Dict:
    """``{"bn", "compiled", "precision"}`` of a loop variant's name (``"bnref+compiled"``:
    bnref's BN, compiled, float32); ``ValueError`` for a name not in :data:`VARIANTS` or ``seed``."""
    if variant not in VARIANTS or variant == "seed":
        raise ValueError(f"not a loop variant: {variant!r}")
    bn, *extras = variant.split("+")
    return {"bn": bn, "compiled": "compiled" in extras, "precision": "bfloat16" if "bfloat16" in extras else "float32"}


class _BnrefLoop:
    """bnref's training loop (the code ``fit`` runs: ``train_steps`` added up by ``run_steps``)
    with the given BN, step (eager or compiled) and precision, epoch after epoch in bnref's
    example order. :meth:`prepare` compiles a compiled step (and undoes that step)."""

    def __init__(self, bn: str, images, labels, batch_size: int, device: torch.device, *, compiled: bool = False,
                 precision: str = "float32"):  # fmt: skip
        from bnref.config import TrainConfig

        self.model = make_model(TrainConfig(backend="torch", bn=bn)).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)
        self.X, self.y = load_tensors(images, labels, device)
        self.step = make_step(self.model, self.optimizer, device, compile=compiled, precision=precision)
        self.steps = train_steps(self.model, self.optimizer, self.X, self.y, seed=0, batch_size=batch_size,
                                 epochs=itertools.count(1), step=self.step)  # fmt: skip
        self.batch = min(batch_size, self.X.shape[0])  # train_steps' batch
        self.device = device
        self.compile_seconds = 0.0

    def prepare(self) -> float:
        """Compile now (a compiled step; eager: nothing); the seconds it took."""
        self.compile_seconds = self.step.warm_up(self.X, self.y, torch.arange(self.batch, device=self.device))
        return self.compile_seconds

    def run(self, steps: int) -> int:
        loss_sum, correct, seen, _, _ = run_steps(itertools.islice(self.steps, steps), self.device)
        loss_sum.item(), correct.item()  # what fit reads at the end of an epoch
        return seen


@contextlib.contextmanager
def _quiet_worker_warning():
    # torch warns that d2l's 4 loader workers exceed a 2-core machine's; that is the seed's
    # choice, measured as it is (and printed in the report).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        yield


class _SeedLoop:
    """The seed's code: d2l's LeNet-BN and ``train_ch6`` loop over a DataLoader."""

    def __init__(self, images, labels, batch_size: int, device: torch.device, workers: Optional[int]):
        torch.manual_seed(0)
        self.net = _seed.lenet_bn()
        self.net.apply(_seed.init_weights)
        self.net.to(device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=1.0)
        self.loss = torch.nn.CrossEntropyLoss()
        with _quiet_worker_warning():
            self.loader = _seed.make_loader(images, labels, batch_size, workers)
        self.device = device
        self.iterator = self._new_iterator()

    def _new_iterator(self):
        with _quiet_worker_warning():
            return iter(self.loader)

    def run(self, steps: int) -> int:
        self.net.train()
        metric = _seed.Accumulator(3)
        for _ in range(steps):
            try:
                X, y = next(self.iterator)
            except StopIteration:  # d2l's next epoch: a new iterator (and new workers)
                self.iterator = self._new_iterator()
                X, y = next(self.iterator)
            _seed.train_step(self.net, self.optimizer, self.loss, metric, X, y, self.device)
        return int(metric[2])

    def close(self):
        self.iterator = None  # shuts the worker processes down


def _seed_server(conn, images, labels, batch_size, device, workers, threads):
    """The seed's loop in a process of its own, answering ``("run", steps)`` with examples seen."""
    if threads is not None:
        torch.set_num_threads(threads)
    loop = _SeedLoop(images, labels, batch_size, torch.device(device), workers)
    conn.send(loop.loader.num_workers)
    try:
        while True:
            cmd, steps = conn.recv()
            if cmd != "run":
                break
            conn.send(loop.run(steps))
    finally:
        loop.close()


class _SeedInOwnProcess:
    """:class:`_SeedLoop` run in a spawned process.

    The seed's DataLoader forks 4 worker processes. Forked in the measuring process, they
    made the variants timed after them slower (copy-on-write page faults and a disturbed
    allocator: measured bnref / torch.nn 0.88 with the seed in-process, 0.94-1.02 without
    it), so the seed gets a process of its own, as it has when d2l's code runs. Its steps
    are timed here, around the request, like every other variant's.
    """

    def __init__(self, images, labels, batch_size, device, workers, threads):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_seed_server,  # not a daemon: it forks its loader workers
                                args=(child, images, labels, batch_size, str(device), workers, threads))  # fmt: skip
        self.proc.start()
        child.close()
        self.num_workers = self.conn.recv()

    def run(self, steps: int) -> int:
        self.conn.send(("run", steps))
        return self.conn.recv()

    def close(self):
        self.conn.send(("stop", 0))
        self.proc.join(timeout=30)
        self.conn.close()


def parse_args(argv=None) -> argparse.Namespace:
    """The torch benchmark's options; a bad value is argparse's one-line error (exit 2)."""
    p = argparse.ArgumentParser(prog="python -m bnref.bench --backend torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive_int, default=40, help="training steps per variant per round")
    p.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds (medians over these)")
    p.add_argument("--warmup", type=int_at_least(0), default=5, help="untimed steps per variant first")
    p.add_argument("--batch-size", type=int_at_least(2), default=256)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, gpu/cuda or cuda:N")
    p.add_argument("--tf32", action="store_true", help="allow TF32 float32 matmuls/convolutions on GPUs (off: as fit)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--workers", type=int_at_least(0), default=None,
                   help="the seed's DataLoader workers (default: d2l's get_dataloader_workers() = 4)")
    p.add_argument("--settle", type=non_negative_float, default=0.5,
                   help="seconds to wait after each seed round for its loader workers to go idle")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, or 'all'; default {','.join(DEFAULT_VARIANTS)}; choose from {VARIANTS}")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurements (BN forward+backward in fresh processes; on CUDA each "
                        "variant's warm-up peak)")  # fmt: skip
    args = p.parse_args(argv)
    args.variants = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    bad = set(args.variants) - set(VARIANTS)
    if bad:
        p.error(f"unknown variants {sorted(bad)}; choose from {VARIANTS}")
    if not args.variants:
        p.error(f"--variants names no variant; choose from {VARIANTS}")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"--variants names a variant twice: {args.variants}")
    try:
        args.device = resolve_device(args.device)
        if any(describe(v)["compiled"] for v in args.variants if v != "seed"):
            check_compile_support(args.device.type)
    except ValueError as e:
        p.error(str(e))
    return args


def run(args: argparse.Namespace) -> Dict:
    """Measure, print the table and the ratios; returns the measurements (for ``--json``)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with float32_matmuls(args.tf32):
        return _run(args)


def _run(args: argparse.Namespace) -> Dict:
    device = args.device
    ds = args.data  # the dispatcher's (bnref.bench): Fashion-MNIST, or --synthetic; throughput is the same on either
    images, labels, source = ds.train_images, ds.train_labels, ds.source
    print(f"LeNet-BN training throughput: batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds "
          f"(interleaved), {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, data {source}, "
          f"TF32 {'on' if args.tf32 else 'off'}", flush=True)  # fmt: skip
    loops = {}
    for v in args.variants:
        if v == "seed":
            loops[v] = _SeedInOwnProcess(images, labels, args.batch_size, device, args.workers, args.threads)
        else:
            d = describe(v)
            loops[v] = _BnrefLoop(BNS[d["bn"]], images, labels, args.batch_size, device, compiled=d["compiled"],
                                  precision=d["precision"])  # fmt: skip
    compile_seconds: Dict[str, float] = {}
    peak_mib: Dict[str, float] = {}  # CUDA: each variant's peak allocated memory over its warm-up
    try:
        for v, loop in loops.items():  # compile (compiled variants), then warm up: allocator, kernels, loader workers
            if isinstance(loop, _BnrefLoop) and describe(v)["compiled"]:
                print(f"(compiling {v} ...)", flush=True)
                compile_seconds[v] = loop.prepare()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            loop.run(args.warmup) if args.warmup else None
            if device.type == "cuda" and isinstance(loop, _BnrefLoop):
                peak_mib[v] = torch.cuda.max_memory_allocated(device) / 2**20
        rates: Dict[str, List[float]] = {v: [] for v in loops}
        names = list(loops)
        for r in range(args.rounds):
            # Rotate the order every round: a variant's speed depends a little on which one ran
            # just before it (allocator and cache state, the seed's loader workers), so each
            # follows each other one equally often.
            for v in names[r % len(names):] + names[: r % len(names)]:
                loop = loops[v]
                synchronize(device)
                t0 = time.perf_counter()
                seen = loop.run(args.steps)
                synchronize(device)
                rates[v].append(seen / (time.perf_counter() - t0))
                if v == "seed" and args.settle > 0:
                    # The seed's loader workers now refill their prefetch queue in the
                    # background; let them, so that their work is not timed as the next
                    # variant's (a precaution: no effect was measurable on this CPU).
                    time.sleep(args.settle)
    finally:
        if "seed" in loops:
            loops["seed"].close()
    if "seed" in loops:
        print(f"(seed: its own process, DataLoader with {loops['seed'].num_workers} workers, as d2l, on {os.cpu_count()} CPUs)")
    width = max(10, *(len(v) for v in rates))
    print(f"{'variant':{width}s} {'examples/sec (median)':>22s} {'min':>10s} {'max':>10s} {'compile s':>10s}")
    for v, rs in rates.items():
        compiled = f"{compile_seconds[v]:10.1f}" if v in compile_seconds else f"{'-':>10s}"
        print(f"{v:{width}s} {statistics.median(rs):22.1f} {min(rs):10.1f} {max(rs):10.1f} {compiled}")
    ratios = {}
    for (a, b), target in TARGETS.items():
        if a in rates and b in rates:
            ratios[f"{a}/{b}"] = ratio = _ratio(rates[a], rates[b])
            verdict = "met" if ratio >= target else "NOT met"
            print(f"ratio {a} / {b}: {ratio:.2f} (target >= {target}: {verdict})")
    for a, b in COMPARISONS:
        if a in rates and b in rates:
            ratios[f"{a}/{b}"] = ratio = _ratio(rates[a], rates[b])
            print(f"ratio {a} / {b}: {ratio:.2f}")
    variants = {}
    for v, rs in rates.items():
        variants[v] = {**({"bn": "seed", "compiled": False, "precision": "float32"} if v == "seed" else describe(v)),
                       "examples_per_sec_median": statistics.median(rs), "examples_per_sec_min": min(rs),
                       "examples_per_sec_max": max(rs), "examples_per_sec": rs,
                       "compile_seconds": compile_seconds.get(v, 0.0)}  # fmt: skip
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    memory = _bn_memory(device) if args.memory else None
    if peak_mib:
        print("peak CUDA memory over each variant's warm-up (torch.cuda.max_memory_allocated): "
              + ", ".join(f"{v} {m:.1f} MiB" for v, m in peak_mib.items()))  # fmt: skip
    return {"device": str(device), "device_kind": kind, "peak_memory_mib": peak_mib, "bn_memory": memory, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "steps": args.steps, "rounds": args.rounds, "data": source, "tf32": args.tf32, "torch": torch.__version__,
            "examples_per_sec": rates, "variants": variants, "ratios": ratios}  # fmt: skip


def _bn_memory(device: torch.device) -> Dict:
    """bnref's and torch.nn's training-mode BN forward+backward peak memory on a 256 MiB float32
    NCHW input (:func:`bnref.torch.memory.compare_peak_memory`, a fresh process each), printed."""
    from bnref.torch.memory import compare_peak_memory

    m = compare_peak_memory(device=str(device))
    print(f"BN forward+backward peak memory, 256 MiB float32 NCHW input on {device} ({m['bnref']['method']}): "
          f"bnref {m['bnref']['peak_mib']:.0f} MiB, torch.nn {m['torch.nn']['peak_mib']:.0f} MiB, "
          f"ratio {m['ratio']:.2f} (target <= 1.1)")  # fmt: skip
    return m


def _ratio(a: List[float], b: List[float]) -> float:
    """The median of the per-round (side-by-side) ratios ``a[r] / b[r]``."""
    return statistics.median(x / y for x, y in zip(a, b))
