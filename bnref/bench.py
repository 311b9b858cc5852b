"""Training-throughput benchmark: ``python -m bnref.bench --backend torch|jax|all [options]``.

Measures examples/second of LeNet-BN training with bnref's BN, the framework's built-in BN
and no BN, plus the seed-style baseline loop, interleaved in ONE run and reported as ratios
(these machines are noisy: only ratios measured side by side mean anything). Each
backend's ``bench_args`` / ``bench`` (``bnref.backends``) does the work; this is the dispatcher.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Dict, Optional, Sequence

from bnref import _cli, _io, backends, hardware


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
        if results[name].get("examples_per_sec"):
            results[name]["distance_to_peak"] = distance_to_peak(results[name])
            print(format_distance(results[name]["distance_to_peak"]), flush=True)
    if args.json_path is not None:
        _io.write_json(args.json_path, results if len(results) > 1 else results[names[0]])
    return 0


def distance_to_peak(result: Dict) -> Dict[str, Dict]:
    """Per variant of a backend's result: its median examples/sec as achieved FLOP/s of LeNet-BN
    training and the fraction of the device's peak (``bnref.hardware``), bfloat16 variants
    against the bfloat16 peak."""
    device = result.get("device_kind") or result.get("device", "cpu")
    rows = {}
    for variant, rate in result["examples_per_sec"].items():
        rate = statistics.median(rate) if isinstance(rate, list) else rate
        precision = "bfloat16" if "bfloat16" in variant else "float32"
        rows[variant] = hardware.fraction_of_peak(rate, device, precision, bool(result.get("tf32", False)))
    return rows


def format_distance(rows: Dict[str, Dict]) -> str:
    """The lines ``bench`` prints: the FLOPs per example, the peak used, each variant's fraction."""
    if not rows:
        return ""
    first = next(iter(rows.values()))
    out = [f"distance to the limit: {first['flops_per_example'] / 1e6:.2f} MFLOP per training example "
           f"(bnref.hardware); peak: {first['peak_source']}"]  # fmt: skip
    for variant, r in rows.items():
        frac = "peak unknown" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.2f} % of peak"
        peak = "" if r["peak_flops"] is None else f" of {r['peak_flops'] / 1e12:.3g} TFLOP/s"
        out.append(f"  {variant:>26}: {r['achieved_flops'] / 1e9:8.2f} GFLOP/s achieved, {frac}{peak}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
