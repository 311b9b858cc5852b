"""Training-throughput benchmark: ``python -m bnref.bench --backend torch|jax|all [options]``.

Measures examples/second of LeNet-BN training with bnref's BN, the framework's built-in BN
and no BN, plus the seed-style baseline loop, interleaved in ONE run and reported as ratios
(these machines are noisy: only ratios measured side by side mean anything). Each
backend's ``bench_args`` / ``bench`` (``bnref.backends``) does the work; this is the dispatcher.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from bnref import _cli, _io, backends


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse every selected backend's options first and load the data (a bad option or missing
    data fails before any measurement), run them in turn, then write ``--json`` once: one backend's results, or
    ``{"torch": ..., "jax": ...}`` for ``--backend all``."""
    p = argparse.ArgumentParser(prog="python -m bnref.bench", add_help=False)
    p.add_argument("--backend", choices=(*backends.REGISTRY, "all"), default="all")
    p.add_argument("--json", dest="json_path", default=None, help="write the measurements to this JSON file")
    _cli.add_data_options(p, "the training examples (throughput does not depend on which): ")
    args, rest = p.parse_known_args(argv)
    if args.json_path is not None:
        try:
            _io.check_output_paths({"--json": args.json_path})
        except ValueError as e:
            p.error(str(e))
    names = tuple(backends.REGISTRY) if args.backend == "all" else (args.backend,)
    modules = {name: backends.load(name) for name in names}
    parsed = {name: m.bench_args(rest) for name, m in modules.items()}  # all validated up front
    data = _cli.load_data(p, args)  # before any measurement; each backend takes what it needs of it
    for options in parsed.values():
        options.data = data
    results = {}
    for name, m in modules.items():
        print(f"=== {name}", flush=True)
        results[name] = m.bench(parsed[name])
    if args.json_path is not None:
        _io.write_json(args.json_path, results if len(results) > 1 else results[names[0]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
