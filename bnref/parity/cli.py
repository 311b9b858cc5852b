"""The command ``python -m bnref.parity`` (:func:`main`; ``__main__`` runs it): the matrix,
``--trajectory``, ``--replicas R``, ``--conventions-table``, and the report of a matrix
(:func:`_report`: the table or JSON, and the exit status)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from typing import Optional, Sequence

from bnref import _cli, _io, backends, spec
from bnref._cli import finite_positive_float, int_at_least, positive_int
from bnref.parity.matrix import DTYPES, FULL_DTYPES, IMPLEMENTATIONS, conventions_table, format_table, matrix
from bnref.parity.replicas import REPLICA_IMPLEMENTATIONS, replicas_matrix
from bnref.parity.trajectory import _stand_in_sizes, format_trajectory, trajectory


#: the first line of the package's docstring
DESCRIPTION = "Proof that PyTorch and JAX compute the same BatchNorm: ``python -m bnref.parity``."


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnref.parity", description=DESCRIPTION)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--preset", action="append", choices=sorted(spec.PRESETS), help="only these presets (repeatable)")
    p.add_argument("--impl", action="append", choices=sorted(IMPLEMENTATIONS), help="only these implementations")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="only these dtypes (matrix); trajectory dtype "
                   "(float32 or float64)")
    p.add_argument("--device", default="cpu", help="trajectory: where both train: cpu (default), auto (a GPU when "
                   "there is one), cuda or cuda:N; the matrix and the replicas run on the CPU")
    p.add_argument("--precision", choices=spec.PRECISIONS, default="float32",
                   help="trajectory: train as --precision does (bfloat16: float32 parameters and statistics)")
    p.add_argument("--conventions-table", action="store_true", help="print the README conventions table and exit")
    p.add_argument("--trajectory", action="store_true", help="train LeNet-BN in both frameworks and compare")
    p.add_argument("--steps", type=positive_int, default=100, help="trajectory: number of SGD steps")
    p.add_argument("--lr", type=finite_positive_float, default=1.0, help="trajectory: learning rate (finite, > 0)")
    p.add_argument("--batch-size", type=int_at_least(2), default=256, help="trajectory: batch size (>= 2)")
    p.add_argument("--convention", choices=sorted(spec.PRESETS), default="d2l", help="trajectory: BN convention")
    p.add_argument("--nnx", action="store_true", help="trajectory: also train bnref.nnx's LeNet-BN the NNX way (nnx.jit, "
                   "nnx.Optimizer) from the same weights and compare it with the linen side step by step")
    _cli.add_data_options(p, "trajectory: ")
    p.add_argument("--replicas", type=int_at_least(2), default=None,
                   help="data parallel: spec vs bnref.torch SyncBatchNorm on R processes vs bnref.jax / flax.linen / "
                        "bnref.nnx / flax.nnx with axis_name on R devices, for equal, unequal and empty shards")  # fmt: skip
    args = p.parse_args(argv)
    if args.replicas is not None:
        if args.trajectory and (args.batch_size % args.replicas or args.batch_size // args.replicas < 2):
            p.error(f"--batch-size {args.batch_size} must split into --replicas {args.replicas} equal slices of at "
                    "least 2 examples")  # fmt: skip
        backends.provide_host_devices(args.replicas)  # R JAX devices on a CPU, before JAX starts
    if args.replicas is not None and not args.trajectory:
        start = time.perf_counter()
        if args.dtype and set(args.dtype) - set(FULL_DTYPES):
            p.error(f"--replicas compares --dtype {' or '.join(FULL_DTYPES)}")
        results = replicas_matrix(args.replicas, presets=args.preset or ("torch", "d2l"), dtypes=args.dtype or FULL_DTYPES,
                                  impls=[i for i in REPLICA_IMPLEMENTATIONS if not args.impl or i in args.impl])  # fmt: skip
        return _report(results, args.json, start)
    if args.conventions_table:
        print(conventions_table())
        return 0
    if args.trajectory:
        dtype = (args.dtype or ["float32"])[-1]
        if dtype not in FULL_DTYPES:
            p.error(f"--trajectory trains in --dtype {' or '.join(FULL_DTYPES)}; for bfloat16 use --precision bfloat16")
        if args.replicas is not None and args.device != "cpu":
            p.error("--replicas run as CPU processes and devices: no --device")
        try:
            from bnref.jax.train import resolve_device as jax_device
            from bnref.torch.train import resolve_device as torch_device

            torch_device(args.device), jax_device(args.device)
        except ValueError as e:
            p.error(str(e))
        if args.precision != "float32" and (dtype != "float32" or args.replicas is not None):
            p.error("--precision bfloat16 trains float32 parameters on one device: no --dtype float64, no --replicas")
        ds = _cli.load_data(p, args, file=sys.stderr if args.json else None, **_stand_in_sizes(args.batch_size, 0))
        if len(ds.train_labels) < args.batch_size:
            p.error(f"--batch-size {args.batch_size} exceeds the {len(ds.train_labels)} training examples of {ds.source}")
        report = trajectory(args.steps, dtype=dtype, lr=args.lr, batch_size=args.batch_size,
                            convention=args.convention, replicas=args.replicas, data=ds,
                            precision=args.precision, device=args.device, nnx=args.nnx)  # fmt: skip
        print(_io.dumps(report) if args.json else format_trajectory(report))
        return 0 if report["passed"] else 1
    start = time.perf_counter()
    results = matrix(
        presets=args.preset or tuple(spec.PRESETS),
        dtypes=args.dtype or DTYPES,
        impls=args.impl or tuple(IMPLEMENTATIONS),
    )
    return _report(results, args.json, start)


def _report(results, as_json: bool, start: float) -> int:
    failed = [r for r in results if not r.passed]
    if as_json:
        print(_io.dumps([asdict(r) for r in results]))
    else:
        print(format_table(results))
        counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "not expressible")}
        print(f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['not expressible']} not expressible "
              f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
        for r in failed:
            print(f"FAIL {r.reason}")
    return 1 if failed else 0

