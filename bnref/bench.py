"""Training-throughput benchmark: ``python -m bnref.bench --backend torch|jax|all [options]``.

Measures examples/second of LeNet-BN training with bnref's BN, the framework's built-in BN
and no BN, plus the seed-style baseline loop, interleaved in ONE run and reported as ratios
(these machines are noisy: only ratios measured side by side mean anything). Each
backend's ``bnref.<backend>.bench.main(argv)`` does the work; this is the dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnref.bench", add_help=False)
    p.add_argument("--backend", choices=("torch", "jax", "all"), default="all")
    args, rest = p.parse_known_args(argv)
    backends = ("torch", "jax") if args.backend == "all" else (args.backend,)
    status = 0
    for name in backends:
        print(f"=== {name}", flush=True)
        status |= int(importlib.import_module(f"bnref.{name}.bench").main(rest) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
