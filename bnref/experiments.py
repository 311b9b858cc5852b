"""BatchNorm experiments with figures: ``python -m bnref.experiments NAME [--quick] --out DIR``.

Each experiment answers one question a learner asks and writes ``DIR/NAME.png`` (the figure) and
``DIR/NAME.json`` (the numbers behind it). ``--quick`` uses little data and few steps (under a
minute; what the tests run); without it, the full run (the README's figures).

Experiments so far:

- ``momentum-port``: the classic porting bug. ``torch.nn.BatchNorm2d(momentum=0.1)`` ported to
  ``flax.linen.BatchNorm(momentum=0.1)``: 0.1 weights the NEW batch in PyTorch and the OLD value
  in Flax. The training loss cannot show it (in training mode the running statistics play no
  part), eval accuracy shows it only a little, and a one-step probe shows it at once: Flax's
  running-mean update over torch's is 0.9 / 0.1 = 9 with the bug, 1 with ``momentum=0.9``.
- ``fast-variance``: Flax's default ``use_fast_variance=True`` (``E[x^2] - E[x]^2``) against a
  two-pass variance, as the input's mean grows next to its spread, in float32 and bfloat16.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

import numpy as np

from bnref import _io, spec

__all__ = ["EXPERIMENTS", "momentum_port", "main"]


def momentum_port(quick: bool, data_dir: Optional[str] = None, seed: int = 0) -> Dict:
    """Port a torch LeNet-BN (torch.nn BN, ``momentum=0.1``) to Flax twice, with
    ``momentum=0.1`` copied as is (the bug) and with ``momentum=0.9`` (the fix); probe one step,
    then train both ports on the same batches and evaluate them as they go."""
    import jax.numpy as jnp
    import optax
    import torch

    from bnref import convert
    from bnref.data import real_or_synthetic
    from bnref.jax import train as jtrain
    from bnref.jax.models import LeNetBN as FlaxLeNetBN
    from bnref.torch import train as ttrain
    from bnref.torch.models import LeNetBN as TorchLeNetBN

    steps, batch, lr, n_train, n_test = (40, 64, 0.1, 2560, 1000) if quick else (468, 256, 0.1, 60000, 10000)
    data = real_or_synthetic(data_dir, n_train=n_train, n_test=n_test, seed=seed)
    X, y = data.train_images[:n_train], data.train_labels[:n_train]
    Xt, yt = jnp.asarray(jtrain.prepare_images(data.test_images[:n_test])), jnp.asarray(data.test_labels[:n_test])
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(X)) for _ in range(steps * batch // len(X) + 1)])
    batches = [order[i * batch : (i + 1) * batch] for i in range(steps)]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tmodel = TorchLeNetBN(bn="builtin", convention="torch")  # torch.nn.BatchNorm: momentum=0.1
    variables = convert.torch_to_flax(tmodel.state_dict())
    ports = {"naive (momentum=0.1)": 0.1, "fixed (momentum=0.9)": 0.9}  # flax.linen's momentum = decay

    # The probe: one training step on the first batch, from the same state in both frameworks.
    old = tmodel.bn1.running_mean.detach().numpy().copy()
    ttrain.train_step(tmodel, torch.optim.SGD(tmodel.parameters(), lr=lr), *ttrain.load_tensors(X[batches[0]], y[batches[0]],
                      torch.device("cpu")))  # fmt: skip
    torch_delta = tmodel.bn1.running_mean.detach().numpy() - old
    out: Dict = {"steps": steps, "batch_size": batch, "lr": lr, "data": data.source, "probe_ratio": {},
                 "train_loss": {}, "eval_acc": {}, "eval_steps": []}  # fmt: skip
    eval_every = max(1, steps // 8)
    for name, momentum in ports.items():
        conv = spec.Convention(decay=momentum, eps=1e-5, running_var="biased")
        model = FlaxLeNetBN(bn="builtin", convention=conv)
        state = jtrain.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                         batch_stats=variables["batch_stats"], tx=optax.sgd(lr))  # fmt: skip
        losses, accs, at = [], [], []
        for k, idx in enumerate(batches, start=1):
            state, loss, _ = jtrain.train_step(state, jnp.asarray(jtrain.prepare_images(X[idx])), jnp.asarray(y[idx]))
            losses.append(float(loss))
            if k == 1:
                flax_delta = np.asarray(state.batch_stats["bn1"]["mean"]) - old
                out["probe_ratio"][name] = float(np.median(flax_delta / torch_delta))
            if k % eval_every == 0 or k == steps:
                accs.append(jtrain.evaluate(state, Xt, yt))
                at.append(k)
        out["train_loss"][name], out["eval_acc"][name], out["eval_steps"] = losses, accs, at
    naive, fixed = (out["train_loss"][n] for n in ports)
    out["max_train_loss_difference"] = float(np.max(np.abs(np.array(naive) - np.array(fixed))))
    return out


def _plot_momentum_port(result: Dict, path: str) -> None:
    fig, (loss, acc) = _io.new_figure(2)
    for (name, losses), style in zip(result["train_loss"].items(), ("-", "--")):
        loss.plot(range(1, len(losses) + 1), losses, style, label=name)
    loss.set_xlabel("step"), loss.set_ylabel("training loss"), loss.grid(True), loss.legend(fontsize="small")
    loss.set_title(f"training loss: identical (max diff {result['max_train_loss_difference']:.1g})")
    for (name, accs), style in zip(result["eval_acc"].items(), ("o-", "s--")):
        ratio = result["probe_ratio"][name]
        acc.plot(result["eval_steps"], accs, style, label=f"{name}: probe ratio {ratio:.2f}")
    acc.set_xlabel("step"), acc.set_ylabel("eval accuracy (running statistics)"), acc.grid(True)
    acc.legend(fontsize="small")
    acc.set_title("eval accuracy (probe: Flax / torch update)")
    fig.suptitle("torch BatchNorm(momentum=0.1) ported to flax.linen.BatchNorm")
    _io.save_figure(fig, path)


def fast_variance(quick: bool, data_dir: Optional[str] = None, seed: int = 0) -> Dict:
    """BatchNorm's error in training mode (max |y - exact normalization of the input as given|)
    for inputs of std 1 and growing mean, float32 and bfloat16: flax.linen.BatchNorm with its
    default ``use_fast_variance=True`` (``E[x^2] - E[x]^2``), flax.linen with
    ``use_fast_variance=False`` and bnref.jax (two-pass)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bnref.jax import BatchNorm

    ratios = np.logspace(0, 5, 6 if quick else 21)  # input mean / input std
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((256, 8))
    layers = {"flax.linen (fast variance, default)": lambda dt: nn.BatchNorm(use_running_average=False, dtype=dt),
              "flax.linen (use_fast_variance=False)": lambda dt: nn.BatchNorm(use_running_average=False, dtype=dt,
                                                                                use_fast_variance=False),
              "bnref.jax (two-pass)": lambda dt: BatchNorm(use_running_average=False, dtype=dt)}  # fmt: skip
    out: Dict = {"ratios": ratios.tolist(), "max_error": {}}
    for dtype in ("float32", "bfloat16"):
        for name, make in layers.items():
            layer = make(jnp.dtype(dtype))
            errors = []
            for r in ratios:
                x = jnp.asarray(r + noise, dtype)  # mean r, std 1 before rounding to dtype
                y, _ = layer.apply(layer.init(jax.random.key(0), x), x, mutable=["batch_stats"])
                # The exact normalization (float64) of the input as it is, rounded to dtype: in
                # bfloat16 at large means the rounding itself has eaten the spread.
                xr = np.asarray(x, np.float64)
                exact = (xr - xr.mean(0)) / np.sqrt(xr.var(0) + 1e-5)
                errors.append(float(np.max(np.abs(np.asarray(y, np.float64) - exact))))
            out["max_error"][f"{name}, {dtype}"] = errors
    return out


def _plot_fast_variance(result: Dict, path: str) -> None:
    fig, ax = _io.new_figure(1)
    for name, err in result["max_error"].items():
        style = ("o-" if "two-pass" in name else "^:" if "False" in name else "s--")
        ax.loglog(result["ratios"], np.maximum(err, 1e-8), style, label=name, ms=4)
    ax.set_xlabel("input mean / input std"), ax.set_ylabel("max |y - exact| (floored at 1e-8)"), ax.grid(True)
    ax.legend(fontsize="x-small")
    ax.set_title("BatchNorm's variance: E[x²] - E[x]² vs two-pass")
    _io.save_figure(fig, path)


#: name -> (run(quick, data_dir, seed) -> numbers, plot(numbers, path))
EXPERIMENTS: Dict[str, tuple] = {"momentum-port": (momentum_port, _plot_momentum_port),
                                 "fast-variance": (fast_variance, _plot_fast_variance)}  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(prog="python -m bnref.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(EXPERIMENTS))
    p.add_argument("--quick", action="store_true", help="little data, few steps (under a minute)")
    p.add_argument("--out", required=True, help="directory for NAME.png and NAME.json")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (synthetic data if absent)")
    args = p.parse_args(argv)
    png, js = (os.path.join(args.out, f"{args.name}.{ext}") for ext in ("png", "json"))
    try:
        os.makedirs(args.out, exist_ok=True)
        _io.check_output_paths({"figure": png, "numbers": js}, figures=("figure",))
    except (OSError, ValueError) as e:
        p.error(str(e))
    run, plot = EXPERIMENTS[args.name]
    result = run(args.quick, args.data_dir)
    _io.write_json(js, {"experiment": args.name, "quick": args.quick, **result})
    plot(result, png)
    print(f"wrote {png} and {js}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
