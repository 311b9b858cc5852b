"""``activations`` (default both backends): what BN does to the activations, in pictures (issue 20;
Karpathy's makemore part 3 and CS231n's BN assignment draw the same). d2l's LeNet with and without
BN, with sigmoids and with ReLUs, trained on the same batches; at a fixed set of steps, the
pre-activations of its four hidden layers on a fixed probe batch: percentiles, per-channel spread,
the fraction of saturated sigmoids or dead ReLUs, histograms (:func:`activations`, its figure
:func:`_plot_activations`; the per-layer numbers :func:`_layer_stats`, the two backends' runs
:func:`_torch_run` and :func:`_jax_run`).

No framework at import time: torch, JAX and matplotlib are imported inside the functions.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from bnref import _io
from bnref.experiments._common import BASE_BATCH, BASE_LR, _dataset, _save

#: the hidden layers, in order: layer k feeds the k-th activation (through ``bn{k}`` with BN)
LAYERS = ("conv1", "conv2", "fc1", "fc2")
#: the percentiles of the pre-activations recorded at every probe
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
#: |z| beyond which a sigmoid counts as saturated: sigmoid(z) < 0.05 or > 0.95, z = ±ln 19
SATURATION_Z = math.log(19.0)
SATURATION = ("sigmoid(z) < 0.05 or > 0.95, i.e. |z| > ln 19 = 2.944, where sigmoid'(z) < 0.0475 (under a fifth "
              "of its maximum, 0.25): the fraction of all values (examples x positions x channels) of the layer")
DEAD = ("ReLU: the fraction of the layer's channels (conv) or units (fc) whose pre-activation is <= 0 for every "
        "example and position of the probe batch (no gradient flows through them for any of these inputs); "
        "'inactive': the fraction of all values <= 0")
#: the histograms' fixed bin edges; values beyond them are counted in the end bins
HIST_EDGES = np.linspace(-10.0, 10.0, 81)


def _record_steps(steps: int, steps_per_epoch: int, n: int) -> List[int]:
    """Step 0 (the initial network), about ``n`` log-spaced steps up to ``steps``, and the end of
    each epoch: where the probes are taken."""
    log = np.unique(np.round(np.geomspace(1, steps, n)).astype(int))
    return sorted({0, steps, *map(int, log), *range(steps_per_epoch, steps + 1, steps_per_epoch)})


def _layer_stats(z: np.ndarray, activation: str) -> Dict:
    """The numbers of one layer's pre-activations ``z`` (P, H, W, C) or (P, C), channels last:
    percentiles of all values, their mean and std, the per-channel mean and std (over examples
    and positions: what BN in training mode sets to 0 and 1 before gamma and beta), and the
    saturated fraction (sigmoid, :data:`SATURATION`) or the dead and inactive fractions (ReLU,
    :data:`DEAD`)."""
    z = np.asarray(z, np.float64)
    per_channel = z.reshape(-1, z.shape[-1])  # (P * H * W, C)
    mean_c, std_c = per_channel.mean(0), per_channel.std(0)
    out = {"percentiles": [_round(v) for v in np.percentile(z, PERCENTILES)], "mean": z.mean(), "std": z.std(),
           "channel_mean_max_abs": np.abs(mean_c).max(), "channel_std_min": std_c.min(), "channel_std_mean": std_c.mean(),
           "channel_std_max": std_c.max()}  # fmt: skip
    if activation == "sigmoid":
        out["saturated"] = np.mean(np.abs(z) > SATURATION_Z)
    else:
        out["dead"] = np.mean((per_channel <= 0).all(0))
        out["inactive"] = np.mean(z <= 0)
    return {k: v if k == "percentiles" else _round(v) for k, v in out.items()}


def _round(v) -> float:
    """6 significant digits: the numbers' JSON at a third of its size, nothing a figure or a
    test reads lost (the step-0 channel means of BN, ~1e-8, keep theirs)."""
    return float(f"{float(v):.6g}")


def _histogram(z: np.ndarray) -> List[int]:
    return np.histogram(np.clip(np.asarray(z, np.float64), HIST_EDGES[0], HIST_EDGES[-1]), HIST_EDGES)[0].tolist()


def _follow(run, *, steps: int, record: Sequence[int], hist_steps: Sequence[int], capture: Callable, activation: str):
    """Take ``steps`` steps of the training loop ``run`` (a backend's ``train_steps``), probing
    at step 0 and at each step of ``record``: ``capture(s)`` (``s`` the loop's step, None at step
    0) gives the four layers' pre-activations on the probe batch. Returns ``(probes, histograms,
    step_losses, last step)``."""
    probes, histograms, losses, s = [], {}, [], None

    def probe(step):
        zs = capture(s)
        probes.append({"step": step, **{layer: _layer_stats(z, activation) for layer, z in zip(LAYERS, zs)}})
        if step in hist_steps:
            histograms[str(step)] = {layer: _histogram(z) for layer, z in zip(LAYERS, zs)}

    probe(0)
    for step, s in enumerate(itertools.islice(run, steps), start=1):
        losses.append(s.loss)  # a device scalar, read after the run (no sync per step)
        if step in record:
            probe(step)  # before the next step (JAX: before it donates this step's state)
    return probes, histograms, [_round(v) for v in losses], s


def _torch_run(data, idx: np.ndarray, *, bn: str, activation: str, lr: float, batch: int, seed: int, **follow) -> Dict:
    """bnref.torch's LeNetBN trained by ``bnref.torch.train.train_steps`` (SGD); the pre-activations
    are read by forward hooks on ``bn1`` ... ``bn4`` (``nn.Identity`` without BN, so the hook sees
    the conv/linear output) of a copy in training mode: the copy's running statistics move, the
    model's do not."""
    import copy

    import torch

    from bnref.torch import train as ttrain
    from bnref.torch.models import LeNetBN

    cpu = torch.device("cpu")
    X, y = ttrain.load_tensors(data.train_images, data.train_labels, cpu)  # (N, 1, 28, 28), (N,)
    Xt, yt = ttrain.load_tensors(data.test_images, data.test_labels, cpu)
    Xp = X[torch.from_numpy(idx).long()]  # (P, 1, 28, 28) the probe batch
    with torch.random.fork_rng(devices=[]):  # as bnref.torch.train.make_model: the seed's weights, global RNG untouched
        torch.manual_seed(seed)
        model = LeNetBN(bn=bn, activation=activation)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def capture(_step) -> List[np.ndarray]:
        twin, seen = copy.deepcopy(model).train(), {}
        for k in range(1, 5):
            getattr(twin, f"bn{k}").register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
        with torch.no_grad():
            twin(Xp)
        return [np.moveaxis(seen[k].numpy(), 1, -1) for k in range(1, 5)]  # channels last, as JAX's: (P, H, W, C) / (P, C)

    run = ttrain.train_steps(model, optimizer, X, y, seed=seed, batch_size=batch, epochs=itertools.count(1))
    probes, histograms, losses, _ = _follow(run, capture=capture, activation=activation, **follow)
    return {"probes": probes, "histograms": histograms, "step_loss": losses, "test_acc": ttrain.evaluate(model, Xt, yt)}


def _jax_run(data, idx: np.ndarray, *, bn: str, activation: str, lr: float, batch: int, seed: int, **follow) -> Dict:
    """bnref.jax's (flax.linen) LeNetBN trained by ``bnref.jax.train.train_steps`` (SGD); the
    pre-activations are linen's ``capture_intermediates`` of the ``bn{k}`` modules' outputs (of
    ``conv1``, ``conv2``, ``fc1``, ``fc2`` without BN) in training mode, the updated
    ``batch_stats`` dropped: nothing in the state changes, and the model has no extra variables."""
    import jax
    import jax.numpy as jnp

    from bnref.jax import train as jtrain
    from bnref.jax.models import LeNetBN

    X, y = jnp.asarray(jtrain.prepare_images(data.train_images)), jnp.asarray(np.asarray(data.train_labels, np.int32))
    Xt, yt = jnp.asarray(jtrain.prepare_images(data.test_images)), jnp.asarray(np.asarray(data.test_labels, np.int32))
    Xp = X[jnp.asarray(idx)]  # (P, 28, 28, 1) the probe batch
    model = LeNetBN(bn=bn, activation=activation)
    state = jtrain.create_train_state(model, jax.random.key(seed), lr, X[:1])
    names = LAYERS if bn == "none" else tuple(f"bn{k}" for k in range(1, 5))

    @jax.jit
    def intermediates(params, batch_stats):
        _, variables = model.apply({"params": params, "batch_stats": batch_stats}, Xp, train=True,
                                   mutable=["batch_stats", "intermediates"],
                                   capture_intermediates=lambda m, method: method == "__call__" and m.name in names)  # fmt: skip
        return [variables["intermediates"][name]["__call__"][0] for name in names]

    def capture(s) -> List[np.ndarray]:
        st = state if s is None else s.state
        return [np.asarray(z) for z in intermediates(st.params, st.batch_stats)]

    run = jtrain.train_steps(state, X, y, seed=seed, batch_size=batch, epochs=itertools.count(1))
    probes, histograms, losses, last = _follow(run, capture=capture, activation=activation, **follow)
    return {"probes": probes, "histograms": histograms, "step_loss": losses,
            "test_acc": jtrain.evaluate(last.state, Xt, yt)}  # fmt: skip


#: each backend's run of one network (the two frameworks' own models and loops)
_RUNS = {"torch": _torch_run, "jax": _jax_run}


def activations(quick: bool, data_dir: Optional[str] = None, seed: int = 0, backends: Sequence[str] = ("torch", "jax"),
                synthetic: bool = False) -> Dict:
    """What BN does to the activations. d2l's LeNet (bnref's LeNetBN) with bnref's BN
    (``bn="bnref"``) and without (``bn="none"``), with sigmoids (d2l's) and with ReLUs, trained in
    each of ``backends`` by the backend's own loop (``train_steps``) on the same batches (the
    schedule's order for ``seed``) from the seed's initial weights (within a backend the same for
    all four networks: BN and the activation draw nothing; torch and JAX draw differently), at
    d2l's lr 1.0, batch 256. At step 0 and about 24 log-spaced steps (plus each epoch's end), the
    four hidden layers' pre-activations (the input of the k-th activation: ``bn{k}``'s output with
    BN, the conv/linear output without) on a fixed probe batch of training examples, BN in
    training mode (normalized by the probe batch's own statistics) without any state changing:
    :func:`_layer_stats` and, at step 0, the end of epoch 1 and the last step, histograms. Also
    each step's training loss and the test accuracy at the end (eval mode, running statistics).

    The full run is 3 epochs (702 steps), not the 10 of bn-vs-none: its 8 networks took 3.5 minutes
    on a 2-core CPU (torch at one thread), so 10 epochs would take over 10, and the story is in the
    first epochs (sigmoid LeNet without BN sits on its loss plateau at ln 10 through epoch 1). ``quick``: 1024 training examples,
    batch 64, 2 epochs (32 steps)."""
    from bnref.schedule import batch_slices, epoch_permutation

    epochs, batch, n_train, n_test, n_probe, n_log = (2, 64, 1024, 500, 256, 8) if quick else (3, BASE_BATCH, None, None, 512, 24)
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    steps_per_epoch = len(batch_slices(len(data.train_labels), batch))
    steps = epochs * steps_per_epoch
    record = _record_steps(steps, steps_per_epoch, n_log)
    hist_steps = [0, steps_per_epoch, steps] if epochs > 1 else [0, steps]
    idx = epoch_permutation(seed, 0, len(data.train_labels))[:n_probe]  # an "epoch 0" order: the same examples every time
    out: Dict = {"epochs": epochs, "steps": steps, "steps_per_epoch": steps_per_epoch, "lr": BASE_LR, "batch_size": batch,
                 "data": data.source, "train_examples": len(data.train_labels), "test_examples": len(data.test_labels),
                 "probe_examples": n_probe,
                 "probe": "the first probe_examples training examples of bnref.schedule.epoch_permutation(seed, 0, N), "
                          "the same at every probe; BN in training mode on them (their own statistics), nothing updated",
                 "pre_activation": "layer k's: the input of the k-th activation, bn{k}'s output (gamma * x_hat + beta) "
                                   "with BN, the conv/linear output without",
                 "layers": list(LAYERS), "percentiles": list(PERCENTILES), "saturation": SATURATION, "dead": DEAD,
                 "record_steps": record, "histogram_steps": hist_steps, "histogram_edges": HIST_EDGES.tolist(),
                 "runs": {}}  # fmt: skip
    follow = dict(lr=BASE_LR, batch=batch, seed=seed, steps=steps, record=record, hist_steps=hist_steps)
    for backend in backends:
        train = _RUNS[backend]
        for activation in ("sigmoid", "relu"):
            for bn, label in (("bnref", "BN"), ("none", "no BN")):
                run = train(data, idx, bn=bn, activation=activation, **follow)
                losses = run["step_loss"]
                run["epoch_loss"] = [float(np.mean(losses[i : i + steps_per_epoch])) for i in range(0, steps, steps_per_epoch)]
                name = f"{backend}, {activation}, {label}"
                out["runs"][name] = {"backend": backend, "activation": activation, "bn": bn, **run}
                key = "saturated" if activation == "sigmoid" else "dead"
                first, last = ([p[layer][key] for layer in LAYERS] for p in (run["probes"][0], run["probes"][-1]))
                print(f"{name}: last epoch's loss {run['epoch_loss'][-1]:.3f}, test acc {run['test_acc']:.3f}, {key} "
                      f"{' '.join(f'{v:.3f}' for v in first)} at step 0, {' '.join(f'{v:.3f}' for v in last)} at "
                      f"step {steps}", flush=True)  # fmt: skip
    return out


def _plot_activations(result: Dict, path: str) -> None:
    """Rows 1-2 (sigmoid, ReLU), one panel per layer: the pre-activations' 5-95 and 25-75
    percentile bands and median over the steps, BN and no BN on the same axes; row 3: the
    per-channel spread (std over the probe batch, mean over channels), the saturated and dead
    fractions, per layer; and the training loss of every run. All but the loss panel show the
    first backend's runs. (The histograms stay in the numbers: in this grid they repeat the bands.)"""
    fig, grid = _io.new_figure(4, size=(13.0 / 4, 10.0 / 3), rows=3)  # 13 x 10 inches in all
    runs = result["runs"]
    backend = next(iter(runs.values()))["backend"]
    colors, layer_colors = {"BN": "tab:blue", "no BN": "tab:orange"}, dict(zip(LAYERS, ("C0", "C1", "C2", "C3")))
    lo, q1, med, q3, hi = (result["percentiles"].index(q) for q in (5, 25, 50, 75, 95))
    for row, activation in enumerate(("sigmoid", "relu")):
        for ax, layer in zip(grid[row], LAYERS):
            for label, color in colors.items():
                probes = runs[f"{backend}, {activation}, {label}"]["probes"]
                steps = [p["step"] for p in probes]
                pc = np.array([p[layer]["percentiles"] for p in probes], dtype=float)  # (probes, percentiles)
                ax.fill_between(steps, pc[:, lo], pc[:, hi], color=color, alpha=0.18, lw=0)
                ax.fill_between(steps, pc[:, q1], pc[:, q3], color=color, alpha=0.4, lw=0)
                ax.plot(steps, pc[:, med], color=color, lw=1.8, label=label)
            for z in (-SATURATION_Z, SATURATION_Z) if activation == "sigmoid" else (0.0,):
                ax.axhline(z, color="gray", ls=":", lw=1)
            if activation == "relu":  # without BN conv1's values run to -60: a log scale beyond ±1
                ax.set_yscale("symlog", linthresh=1)
            ax.set_title(f"{activation}: {layer} pre-activation" + (" (symlog)" if activation == "relu" else ""),
                         fontsize="medium")  # fmt: skip
    grid[0][0].legend(title="median, 25-75%, 5-95%", fontsize="small", title_fontsize="small", loc="lower left")
    spread, sat, dead, loss = grid[2]
    for layer in LAYERS:
        for label, ls in (("BN", "-"), ("no BN", "--")):
            for ax, activation, key in ((spread, "sigmoid", "channel_std_mean"), (sat, "sigmoid", "saturated"),
                                        (dead, "relu", "dead")):  # fmt: skip
                probes = runs[f"{backend}, {activation}, {label}"]["probes"]
                ax.plot([p["step"] for p in probes], [p[layer][key] for p in probes], ls, color=layer_colors[layer],
                        label=layer if label == "BN" else None)  # fmt: skip
    spread.set_yscale("log"), spread.set_ylim(1e-3, 1e2)  # room above the curves for the legend
    spread.set_title("sigmoid: per-channel std across examples", fontsize="medium")
    sat.set_title("sigmoid: saturated (|z| > 2.94) fraction", fontsize="medium")
    dead.set_title("ReLU: dead channels (z <= 0 on all)", fontsize="medium")
    spread.legend(title="solid: BN, dashed: no BN", fontsize="x-small", title_fontsize="x-small", ncol=4,
                  loc="upper left", columnspacing=0.8, handlelength=1.2)  # fmt: skip
    for activation, ls in (("sigmoid", "-"), ("relu", "--")):
        for label, color in colors.items():
            same = [run for run in runs.values() if run["activation"] == activation and (run["bn"] != "none") == (label == "BN")]
            for run in same:  # the figure's backend bold and in the legend, the other thin
                mine = run["backend"] == backend
                loss.plot(range(1, len(run["step_loss"]) + 1), run["step_loss"], ls, color=color, lw=1.0 if mine else 0.5,
                          alpha=1.0 if mine else 0.5,
                          label=f"{activation}, {label}: " + " / ".join(f"{r['test_acc']:.2f}" for r in same) if mine else None)  # fmt: skip
    loss.axhline(math.log(10), color="gray", ls=":", lw=1)
    loss.set_title("training loss per step (- sigmoid, -- ReLU)", fontsize="medium")
    loss.set_ylim(0, 3.2)
    loss.legend(title="test acc (" + " / ".join(dict.fromkeys(r["backend"] for r in runs.values())) + ")", fontsize="x-small",
                title_fontsize="x-small", loc="lower left")  # fmt: skip
    for ax in grid.flat:
        ax.set_xscale("symlog", linthresh=1), ax.set_xlim(0, result["steps"]), ax.grid(True, alpha=0.3)
    for ax in grid[2]:
        ax.set_xlabel("training step")
    fig.suptitle(f"LeNet's pre-activations with and without BN ({backend}; a fixed probe batch of "
                 f"{result['probe_examples']}, BN in training mode; lr {result['lr']}, batch {result['batch_size']}, "
                 f"{result['epochs']} epochs)")  # fmt: skip
    _save(fig, path, result)

