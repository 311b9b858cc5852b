"""The command ``python -m bnref.experiments NAME [--backend torch|jax] [--quick] --out DIR``
(:func:`main`; ``__main__`` runs it): the flags, the checks made before any work (the backend, the data options, the
output paths, the data), then :func:`bnref.experiments.run_experiment`."""

from __future__ import annotations

import argparse
import os
from typing import Dict, Optional, Sequence

from bnref import _cli, _io, backends
from bnref.experiments.registry import EXPERIMENTS, ExperimentConfig, run_experiment


#: the first line of the package's docstring
DESCRIPTION = "BatchNorm experiments with figures: ``python -m bnref.experiments NAME [--backend torch|jax] [--quick] --out DIR``."


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(prog="python -m bnref.experiments", description=DESCRIPTION)
    p.add_argument("name", choices=sorted(EXPERIMENTS))
    p.add_argument("--backend", choices=tuple(backends.REGISTRY), default=None,
                   help="run on this backend only, where the experiment can (default: its own, see the docstring)")
    p.add_argument("--quick", action="store_true", help="little data, few steps (seconds; what the tests run)")
    p.add_argument("--out", required=True, help="directory for NAME.png and NAME.json")
    _cli.add_data_options(p)
    args = p.parse_args(argv)
    exp = EXPERIMENTS[args.name]
    if args.backend is not None and args.backend not in exp.backends:
        p.error(f"--backend {args.backend}: {args.name} runs on {' and '.join(exp.default)} only: {exp.why}")
    if not exp.uses_data and (args.data_dir is not None or args.synthetic):
        p.error(f"{args.name} trains nothing and reads no data: it takes no --data-dir / --synthetic")
    config = ExperimentConfig(args.name, args.out, args.quick, (args.backend,) if args.backend else exp.default,
                              args.data_dir, synthetic=args.synthetic)  # fmt: skip
    try:
        _io.check_output_paths(dict(zip(("figure", "numbers"), config.paths)), figures=("figure",),
                               make_dirs=True)  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    print(config, flush=True)
    if exp.uses_data:  # the data is checked before any work (the experiment reads it again, at its own size)
        _cli.load_data(p, args, n_train=512, n_test=256, seed=config.seed)
    os.makedirs(config.out, exist_ok=True)
    result = run_experiment(config)
    print("wrote {} and {}".format(*config.paths))
    return result

