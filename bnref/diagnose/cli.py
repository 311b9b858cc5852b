"""``python -m bnref.diagnose``: :func:`bnref.diagnose.report.bn_report` on two checkpoints, a
PyTorch model's and its Flax port's (linen or NNX): two bnref run directories (``--backend
torch`` and ``--backend jax`` / ``nnx``, LeNet-BN), or a user's two models from their factories
(``--torch-model`` / ``--flax-model``) and checkpoint files.

Every file and option is read, and both models run once, inside :func:`_inputs`: whatever is
wrong with them becomes a ``ValueError`` of one line naming the file (or option) and the
problem, exit status 2, before the report starts. Exit status 1 means findings, and only that.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Mapping, Optional, Sequence

import numpy as np

from bnref import _cli
from bnref.diagnose.report import bn_report

__all__ = ["main"]


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _factory(spec_: str, what: str, base: type, base_name: str):
    """``package.module:factory`` imported and called; the model it returns must be a ``base``."""
    mod, _, attr = spec_.partition(":")
    if not mod or not attr:
        raise ValueError(f"{what} {spec_}: must be 'package.module:factory'")
    try:
        module = importlib.import_module(mod)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise ValueError(f"{what} {spec_}: cannot import {mod} ({_cli.first_line(e)})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"{what} {spec_}: module {mod} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"{what} {spec_}: {mod}.{attr} is a {type(fn).__name__}, not a function returning a model")
    try:
        model = fn()
    except Exception as e:
        raise ValueError(f"{what} {spec_}: {attr}() raised {_cli.first_line(e)}") from None
    if not isinstance(model, base):
        raise ValueError(f"{what} {spec_}: {attr}() returned a {type(model).__name__}, not a {base_name}")
    return model


def _load_run(path: str, accepted: tuple):
    """A bnref run directory (or its checkpoint file) of one of the ``accepted`` backends ->
    (module, weights or None: an NNX model holds its own, checkpoint path); ``ValueError``
    naming the file for anything that is not such a run."""
    import os

    from bnref import runs

    if not os.path.exists(path):
        raise ValueError(f"{path}: no such run directory or checkpoint")
    run_dir = path if os.path.isdir(path) else os.path.dirname(path) or "."
    run = runs.RunDir.open(run_dir)
    config = run.train_config()
    if config.backend not in accepted:
        raise ValueError(f"{run_dir} is a {config.backend} run; a {' or '.join(accepted)} run goes here")
    checkpoint = run.require_checkpoint()
    from bnref import backends

    model, variables = backends.load(config.backend).load_run(config, checkpoint)
    return model, (None if variables is None else _check_variables(variables, checkpoint)), checkpoint


def _check_variables(variables, where: str):
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        raise ValueError(f"{where}: holds no 'params' collection (a msgpack of {{'params': ..., 'batch_stats': ...}} "
                         "goes here)")  # fmt: skip
    return variables


def _sample_from_data(n: int, data_dir: Optional[str], synthetic: bool, seed: int) -> np.ndarray:
    """``n`` test images (seeded choice) of Fashion-MNIST, or of the synthetic stand-in when
    asked for (``--synthetic``): never one in place of the other."""
    import os

    from bnref import data

    try:
        d = data.load_or_synthetic(data_dir, synthetic_data=synthetic, n_train=2, n_test=n, seed=seed)
    except FileNotFoundError:  # DataNotFoundError: its several lines, said in one
        if data_dir is not None:
            state = "no such directory" if not os.path.isdir(data_dir) else "does not hold the Fashion-MNIST files"
            raise ValueError(f"--data-dir {data_dir}: {state} ({', '.join(data.FILES.values())}); or pass "
                             "--synthetic for the synthetic stand-in") from None  # fmt: skip
        looked = ", ".join(str(p) for p in data.candidate_dirs())
        raise ValueError(f"no Fashion-MNIST files found (looked in {looked}): pass --data-dir DIR, set "
                         "BNREF_DATA_DIR, or pass --synthetic for the synthetic stand-in") from None  # fmt: skip
    except ValueError as e:  # a corrupt file: the message names it
        raise ValueError(_one_line(e)) from None
    if n > len(d.test_images):
        raise ValueError(f"-n {n}: {d.source} has only {len(d.test_images)} test images")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(d.test_images), n, replace=False)
    return (np.asarray(d.test_images[idx], np.float32) / 255.0)[:, None]  # (N, 1, 28, 28), as training sees it


def _input_shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"--input-shape {text!r}: one example's shape as positive integers, torch layout "
                         "(C,H,W / C,L / F), e.g. 3,32,32")  # fmt: skip
    return shape


def _torch_state(path: str):
    import os

    import torch

    if not os.path.isfile(path):
        raise ValueError(f"{path}: {'is a directory' if os.path.isdir(path) else 'no such file'}, not a torch.save'd "
                         "state_dict (bnref run directories go without --torch-model/--flax-model)")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, another format, or objects weights_only refuses to build
        raise ValueError(f"{path}: not a torch.save'd state_dict that loads with weights_only=True "
                         f"({_cli.first_line(e)})") from None  # fmt: skip
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):  # a training checkpoint
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state_dict (parameter names -> tensors)")
    return state


def _flax_variables(path: str):
    import os

    from flax import serialization

    if not os.path.isfile(path):
        raise ValueError(f"{path}: {'is a directory' if os.path.isdir(path) else 'no such file'}, not a "
                         "flax.serialization msgpack file")  # fmt: skip
    with open(path, "rb") as f:
        raw = f.read()
    try:
        variables = serialization.msgpack_restore(raw)
    except Exception as e:  # truncated, extra data, not msgpack at all, nesting too deep
        raise ValueError(f"{path}: not a flax.serialization msgpack file ({_cli.first_line(e)})") from None
    return _check_variables(variables, path)


def _load_user_models(args):
    """(torch module, Flax module, variables, sample, torch file, Flax file) from the factories."""
    import flax.linen as fnn
    import torch
    from flax import nnx

    shape = _input_shape(args.input_shape)
    tm = _factory(args.torch_model, "--torch-model", torch.nn.Module, "torch.nn.Module")
    state = _torch_state(args.torch_checkpoint)
    try:
        tm.load_state_dict(state)
    except Exception as e:  # missing or unexpected keys, shapes that differ, values that are not tensors
        raise ValueError(f"{args.torch_checkpoint}: does not fit the model of --torch-model {args.torch_model} "
                         f"({type(e).__name__}: {_one_line(e)})") from None  # fmt: skip
    fm = _factory(args.flax_model, "--flax-model", (fnn.Module, nnx.Module), "flax.linen.Module or flax.nnx.Module")
    variables = _flax_variables(args.flax_checkpoint)
    x = np.random.default_rng(args.seed).standard_normal((args.batch_size, *shape)).astype(np.float32)
    return tm.eval(), fm, variables, x


def _check_models_run(tm, fm, variables, x, torch_file: str, flax_file: str) -> None:
    """Each model once, in evaluation mode, on the sample: a model that does not take this
    input, or variables that do not fit the Flax model, named by file before the report."""
    import copy

    import torch

    from bnref.convert import channels_last

    net = copy.deepcopy(tm).eval()
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    try:
        with torch.no_grad():
            net(torch.as_tensor(x, dtype=dtype))
    except Exception as e:
        raise ValueError(f"{torch_file}: the torch model fails on a sample batch of shape {x.shape} "
                         f"({_cli.first_line(e)})") from None  # fmt: skip
    from bnref.convert import as_linen, is_nnx

    xf = channels_last(x)
    if is_nnx(fm):  # its own state, or the file's linen variables (checked: every path and shape)
        fm, variables, _, _ = as_linen(fm, variables, flax_file)
    try:
        fm.apply(variables, xf, train=False)
    except Exception as e:
        raise ValueError(f"{flax_file}: the Flax model with these variables fails on a sample batch of shape "
                         f"{xf.shape} ({_cli.first_line(e)})") from None  # fmt: skip


def _inputs(args):
    """Everything the report needs, read and checked: ``(tm, fm, variables, x, torch file, Flax file)``."""
    if args.torch_model is None:
        from bnref import backends

        tm, _, t_file = _load_run(args.torch_checkpoint, ("torch",))
        flax_runs = ("jax",) + tuple(b.name for b in backends.REGISTRY.values() if "jax" in b.builds_on)  # NNX's too
        fm, variables, f_file = _load_run(args.flax_checkpoint, flax_runs)
        x = _sample_from_data(args.batch_size, args.data_dir, args.synthetic, args.seed)
    else:
        tm, fm, variables, x = _load_user_models(args)
        t_file, f_file = args.torch_checkpoint, args.flax_checkpoint
    _check_models_run(tm, fm, variables, x, t_file, f_file)
    return tm, fm, variables, x, t_file, f_file


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bnref.diagnose",
        description="Compare the BatchNorm layers of a PyTorch model and its Flax port, from two checkpoints.",
        epilog="Without --torch-model/--flax-model, TORCH and FLAX are bnref run directories (python -m bnref.train "
               "--out DIR) and the sample is N Fashion-MNIST test images (--data-dir, or where bnref.data finds "
               "them; never downloaded), or N images of the synthetic stand-in with --synthetic. With them, TORCH "
               "is a torch.save'd state_dict (or a dict holding it under 'model'), FLAX a flax.serialization msgpack "
               "file of {'params', 'batch_stats'}, the factories build the two models, and the sample is N "
               "standard-normal inputs of --input-shape. Exit status: 0 when nothing is found, 1 when something "
               "is, 2 on bad input (one line naming the file or option).",
    )  # fmt: skip
    p.add_argument("torch_checkpoint", metavar="TORCH")
    p.add_argument("flax_checkpoint", metavar="FLAX")
    p.add_argument("--torch-model", metavar="MODULE:FACTORY", help="a function returning the torch module")
    p.add_argument("--flax-model", metavar="MODULE:FACTORY", help="a function returning the Flax module (linen or NNX)")
    p.add_argument("--input-shape", metavar="C,H,W", help="one example's shape, torch layout (with the factories)")
    p.add_argument("-n", "--batch-size", type=_cli.int_at_least(2), default=64,
                   help="examples in the sample batch, at least 2 (default 64)")  # fmt: skip
    p.add_argument("--seed", type=_cli.seed, default=0)
    p.add_argument("--data-dir", default=None, help="the Fashion-MNIST directory (bnref runs); it must hold the files")
    p.add_argument("--synthetic", action="store_true",
                   help="sample the synthetic stand-in instead of Fashion-MNIST (bnref runs)")  # fmt: skip
    args = p.parse_args(argv)
    if (args.torch_model is None) != (args.flax_model is None):
        p.error("give both --torch-model and --flax-model, or neither (bnref run directories)")
    if args.torch_model is not None:
        if not args.input_shape:
            p.error("--input-shape is needed with --torch-model/--flax-model")
        if args.data_dir is not None or args.synthetic:
            p.error("--data-dir and --synthetic choose the sample of bnref run directories; with --torch-model/"
                    "--flax-model the sample is standard-normal inputs of --input-shape")  # fmt: skip
    elif args.input_shape:
        p.error("--input-shape goes with --torch-model/--flax-model; a bnref run's input is a 1x28x28 image")
    if args.synthetic and args.data_dir is not None:
        p.error("--synthetic and --data-dir exclude each other: the synthetic stand-in reads no files")
    try:
        tm, fm, variables, x, t_file, f_file = _inputs(args)
    except (OSError, ValueError, ImportError) as e:
        print(f"python -m bnref.diagnose: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        report = bn_report(tm, fm, variables, x)
    except ValueError as e:  # the models cannot be compared (layers without a partner, no BN layer): both files
        print(f"python -m bnref.diagnose: {t_file} / {f_file}: {_one_line(e)}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.ok else 1
