"""Train LeNet-BN on Fashion-MNIST with either backend: ``python -m bnref.train --backend jax``.

A thin CLI over :func:`bnref.training.train_and_evaluate` (the shape of Flax's
``examples/*/main.py``): ``main(argv)`` parses the flags into a frozen :class:`TrainConfig`,
prints it, and calls it. The top floor of bnref's layers: it imports everything it needs
(the config, the registry ``bnref.backends``, run directories, the training library) and
nothing imports it. The backend is the registry's; this module owns the flags, the run
directory's creation, resumption and lock, and which process speaks.

Defaults are those of d2l's chapter "Batch Normalization" (the edition with lr 1.0; d2l-en 1.x
trains at lr 0.1, batch 128): lr 1.0, batch 256, 10 epochs, SGD,
cross-entropy, the from-scratch BN with d2l's running-average convention (decay 0.9,
biased running variance), so the torch and JAX runs train the same network the same way.
The config is :mod:`bnref.config`'s and the schedule :mod:`bnref.schedule`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Dict, List, Optional, Sequence

from bnref import _io, backends, spec
from bnref._cli import MAX_SEED, finite_positive_float, positive_int, seed
from bnref._torchrun import ReplicaError
# The config and the schedule live in the leaves below this CLI (the backends import them from
# there); their names stay importable from here for the code and tests that know them here.
from bnref.config import BACKENDS, BN_CHOICES, PRECISE_VARIANTS, PRECISIONS, TIMING_KEYS, TrainConfig  # noqa: F401
from bnref.schedule import (NonFiniteLoss, batch_slices, check_finite_loss, epoch_metrics,  # noqa: F401
                            epoch_permutation, precise_batch_indices)
# The library this CLI runs (bnref.training), importable from here too, as the tests know it.
from bnref.training import check_data, figure_title, format_epoch, load_data, plot_history, train_and_evaluate  # noqa: F401


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The config from the command line. Every bad value, an unusable output path and an
    unavailable device are argparse's one-line error (exit status 2), before any data loads."""
    return parse_command(argv)[0]


def parse_command(argv: Optional[Sequence[str]] = None):
    """``(config, run_options)``: :func:`parse_args`'s config, and ``{"out", "no_out", "resume",
    "compare", "device"}`` (the run directory to create, none, the :class:`bnref.runs.RunDir` to
    resume, the runs to compare, the device resolved from ``--device``). With ``--resume`` the
    config is the run's own, except ``bnref.runs.RESUMABLE`` (``--epochs``, the data, progress and
    output flags), which come from the command line only; any other flag typed with a value other
    than the run's is an error, and so is a checkpoint that cannot resume the run (another run's,
    another backend's, corrupt). The resumed directory is then locked."""
    p = _parser()
    args = vars(p.parse_args(argv))
    options = {k: args.pop(k) for k in ("out", "no_out", "resume", "compare")}
    if options["compare"] is not None:
        return None, _compare_options(p, options, args)
    if options["resume"] is not None:
        if options["out"] is not None or options["no_out"]:
            p.error("--resume DIR continues DIR: it takes no --out / --no-out")
        from bnref import runs

        try:
            run = options["resume"] = runs.RunDir.open(options["resume"])  # main resumes this one
            run.require_checkpoint()
            # What the user typed, not what differs from argparse's defaults: `--lr 1.0` on a run
            # trained at lr 0.3 is a contradiction even though 1.0 is the default.
            typed = {k: v for k, v in _typed_options(argv).items() if k not in options}
            args = dataclasses.asdict(run.resumed_config(typed, args))
        except (ValueError, OSError) as e:
            p.error(str(e))
    try:
        launched = launched_world()
    except ValueError as e:
        p.error(str(e))
    if launched is not None and args["replicas"] not in (None, launched):
        p.error(f"--replicas {args['replicas']} contradicts the launcher's WORLD_SIZE={launched}")
    args["replicas"] = args["replicas"] or launched or args["num_processes"]
    if launched is not None and backends.get(args["backend"]).processes != "torchrun":
        torchrun = [name for name, b in backends.REGISTRY.items() if b.processes == "torchrun"]
        p.error(f"a torchrun launch trains with --backend {' or '.join(torchrun)}")
    try:
        config = TrainConfig(**args)
        config.check_outputs()
        registered = backends.get(config.backend)
        registered.before_start(config)  # e.g. XLA's host devices, which JAX reads when it starts
        backend = registered.load()
        options["device"] = backend.prepare(config)  # processes joined, devices checked
        if options["resume"] is not None:  # a checkpoint that cannot resume this run fails here, not after loading data
            done = backend.check_checkpoint(options["resume"].checkpoint, config, options["resume"].run_id)
            if done >= config.epochs:
                raise ValueError(f"--resume {options['resume'].path}: its checkpoint is at epoch {done}, so --epochs "
                                 f"{config.epochs} leaves nothing to train (give a larger --epochs)")  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    if options["out"] is not None:
        from bnref import runs

        try:
            runs.check_new_run_dir(options["out"])
        except ValueError as e:
            p.error(f"--out {e}")
    if options["resume"] is not None and speaks(config):
        try:
            options["resume"].lock()  # last: nothing after it can fail and leave the lock held
        except ValueError as e:
            p.error(str(e))
    return config, options


def _typed_options(argv: Optional[Sequence[str]]) -> Dict:
    """The options present on the command line, with their parsed values (absent ones left out)."""
    q = _parser()
    for action in q._actions:
        action.default = argparse.SUPPRESS
    return vars(q.parse_args(argv))


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m bnref.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--lr", type=finite_positive_float, default=d.lr, help="learning rate (finite, > 0)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=">= 2 with BatchNorm")
    p.add_argument("--seed", type=seed, default=d.seed, help=f"in [0, {MAX_SEED}]")
    p.add_argument("--device", default=d.device, help="auto (a GPU when there is one), cpu, cuda/gpu, or e.g. cuda:1")
    p.add_argument("--bn", choices=BN_CHOICES, default=d.bn, help="which BatchNorm layers LeNet gets: bnref (this project's, written from scratch; default), "
                   "builtin (the framework's own, torch.nn.BatchNorm2d/1d or Flax's BatchNorm, as in d2l's "
                   "'concise implementation'), or none (LeNet without BatchNorm)")
    p.add_argument("--convention", choices=sorted(spec.PRESETS), default=d.convention)
    p.add_argument("--data-dir", default=d.data_dir, help="directory with the four Fashion-MNIST IDX .gz files")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download the data")
    p.add_argument("--train-limit", type=positive_int, default=None, help="use only the first N training examples")
    p.add_argument("--test-limit", type=positive_int, default=None, help="use only the first N test examples")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--plot", default=None, help="save the loss/accuracy curves to this image file (after every epoch)")
    p.add_argument("--json", default=None, help="write the per-epoch metrics to this JSON file (after every epoch)")
    p.add_argument("--replicas", type=positive_int, default=None,
                   help="data parallel over R replicas: torch processes (gloo on CPU, NCCL with one GPU each), "
                        "JAX devices (R host devices on a CPU); under torchrun, its WORLD_SIZE")  # fmt: skip
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="synchronized BatchNorm statistics across replicas (default: on when R > 1)")
    pp = p.add_argument_group("precise BN: evaluate with statistics recomputed after each epoch (weights fixed)")
    pp.add_argument("--precise-bn", action="store_true", help="recompute, evaluate with them; report EMA's too")
    pp.add_argument("--precise-batches", type=positive_int, default=None, help="over this many training batches "
                    "(default: all)")
    pp.add_argument("--precise-variant", choices=PRECISE_VARIANTS, default=d.precise_variant,
                    help="population (exact, lower layers in eval mode) or batch_average (update_bn / PreciseBN)")
    sp = p.add_argument_group("speed (same training, faster; bfloat16 and TF32 trade precision for it)")
    sp.add_argument("--steps-per-call", type=positive_int, default=None, metavar="K",
                    help="JAX: K training steps in one compiled call (lax.scan), the same numbers as 1 "
                         "(default: 1 on a CPU, the whole epoch on a GPU)")  # fmt: skip
    sp.add_argument("--compile", action="store_true",
                    help="PyTorch: torch.compile the training step (on CUDA with CUDA graphs)")
    sp.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                    help="compute dtype of convolutions and matmuls; parameters, BN statistics and the optimizer "
                         "state stay float32")  # fmt: skip
    sp.add_argument("--tf32", action="store_true", help="allow TF32 float32 matmuls/convolutions on GPUs (off: exact "
                    "float32, as parity needs)")  # fmt: skip
    jp = p.add_argument_group("multi-process JAX (jax.distributed.initialize; run one command per process)")
    jp.add_argument("--coordinator", default=None, help="HOST:PORT where process 0 listens")
    jp.add_argument("--num-processes", type=positive_int, default=1, help="number of processes (>= 2)")
    jp.add_argument("--process-id", type=int, default=0, help="this process, in [0, --num-processes)")
    jp.add_argument("--join-timeout", dest="join_timeout_s", type=positive_int, default=d.join_timeout_s,
                    help="seconds to wait for every process to join; then JAX aborts the process")
    rp = p.add_argument_group("run directories")
    rp.add_argument("--out", default=None, help="the run directory: config.json, metrics.jsonl, curves.png, checkpoint "
                    "(default: $BNREF_RUNS_DIR or runs/, then <backend>-<bn>-<UTC timestamp>)")
    rp.add_argument("--no-out", action="store_true", help="write no run directory")
    rp.add_argument("--resume", default=None, metavar="DIR", help="continue DIR's run from its last checkpoint to --epochs")
    rp.add_argument("--compare", nargs="+", default=None, metavar="DIR",
                    help="draw these runs' curves in one figure (--plot FILE, default compare.png) and exit")
    return p


def _compare_options(p, options, args) -> Dict:
    if options["out"] is not None or options["resume"] is not None:
        p.error("--compare draws finished runs: it takes no --out / --resume")
    figure = args.get("plot") or "compare.png"
    try:
        _io.check_output_paths({"--plot": figure}, figures=("--plot",))
        from bnref import runs

        for d in options["compare"]:
            runs.RunDir.open(d)
            if not runs.read_metrics(d, need=("loss", "test_acc")):
                raise ValueError(f"{d} has no finished epoch to compare")
    except ValueError as e:
        p.error(str(e))
    return {**options, "figure": figure}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    """Parse, print the config and the data used, train with one line per epoch; returns the
    per-epoch metrics. A data problem (not found, corrupt, too small, not the data a resumed run
    trained on) is one line on stderr and exit status 2 (bad input); a non-finite loss, exit 1."""
    config, options = parse_command(argv)
    from bnref import runs

    if config is None:  # --compare
        try:
            runs.compare(options["compare"], options["figure"])
        except ValueError as e:  # checked while parsing; a run changed since
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"wrote {options['figure']} ({len(options['compare'])} runs)")
        return []
    say = print if speaks(config) else (lambda *a, **k: None)  # several processes: only the first speaks
    say(config, flush=True)
    from bnref.data import DataNotFoundError, describe_source

    run = options["resume"]
    try:
        try:
            data = load_data(config)
            if run is not None:
                run.check_data(data)  # the data the run trained on, or an error: never other data silently
        except (DataNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        say(f"data: {describe_source(data)}", flush=True)
        if run is not None:
            run.resuming, run.readonly = True, not speaks(config)
            say(f"resuming {run.path}", flush=True)
            if run.saved.get("data_sha256") is None:  # written before runs recorded their data
                say(f"note: {run.config_file} records no digest of its data (an older bnref wrote it): that this is "
                    "the data it trained on is not checked", file=sys.stderr, flush=True)  # fmt: skip
        elif not options["no_out"] and speaks(config):  # the other processes of a run neither log nor checkpoint
            path = options["out"] or runs.default_run_dir(config)
            try:
                run = runs.RunDir.create(path, config, argv if argv is not None else sys.argv[1:], data,
                                         options["device"])  # fmt: skip
            except ValueError as e:  # e.g. another run took the directory since the flags were checked
                print(f"error: --out {e}", file=sys.stderr)
                raise SystemExit(2) from None
            say(f"run directory: {run.path}", flush=True)
        try:
            return train_and_evaluate(config, data, on_epoch=lambda m: say(format_epoch(m), flush=True), run=run)
        except NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except ReplicaError as e:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)  # names the rank that failed first, and how
            raise SystemExit(1) from None
    finally:
        if run is not None:
            run.release()


def launched_world() -> Optional[int]:
    """``WORLD_SIZE`` when this process was started by torchrun (or a launcher like it), else None;
    ``ValueError`` for a partial or malformed launch environment (``bnref._torchrun``)."""
    from bnref._torchrun import torchrun_env

    env = torchrun_env()
    return None if env is None else env["world"]


def launched_rank() -> Optional[int]:
    """``RANK`` under torchrun, else None."""
    from bnref._torchrun import torchrun_env

    env = torchrun_env()
    return None if env is None else env["rank"]


def speaks(config: TrainConfig) -> bool:
    """Whether this process prints and writes files: the only process, torchrun's rank 0, or
    process 0 of a multi-process JAX run."""
    return launched_rank() in (None, 0) and config.process_id == 0


def cli() -> int:
    """The ``bnref-train`` console script (and ``python -m bnref.train``): exit status 0. A
    process torchrun launched ends through ``bnref._torchrun.run_and_exit`` (``os._exit`` once
    its files are closed: gloo's threads can abort an interpreter that finalizes around them)."""
    try:
        launched = launched_world() is not None
    except ValueError:  # a partial launch environment: main's parser says so (exit 2)
        launched = False
    if launched:
        from bnref._torchrun import run_and_exit

        run_and_exit(lambda: main(sys.argv[1:]))
    main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(cli())
