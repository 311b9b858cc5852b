"""``placement`` (torch): BN before vs after ReLU, and the bias right before BN (:func:`placement`, its
figure :func:`_plot_placement`); its models (:func:`_placement_lenet`), its training loop
(:func:`_torch_sgd`) and the bias-gradient hooks (:func:`_record_bias_grad_norms`)."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from bnref import _io
from bnref.experiments._common import BASE_BATCH, _curves, _dataset, _save

#: the two places of BN relative to the activation
ORDERS = {"bn-relu": "conv/linear -> BN -> ReLU", "relu-bn": "conv/linear -> ReLU -> BN"}


def _placement_lenet(order: str, bias: bool):
    """LeNet-BN's layers (d2l's sizes, average pooling) with ReLU, BN (bnref's, d2l's convention)
    before or after each hidden ReLU per ``order``; ``bias``: whether the four conv/linear layers
    that feed a BN block have a bias (the output layer always has one)."""
    from collections import OrderedDict

    from torch import nn

    from bnref.torch.layers import BatchNorm1d, BatchNorm2d

    layers: List[tuple] = []
    blocks = ((nn.Conv2d(1, 6, 5, bias=bias), BatchNorm2d(6, convention="d2l"), True),
              (nn.Conv2d(6, 16, 5, bias=bias), BatchNorm2d(16, convention="d2l"), True),
              (nn.Linear(256, 120, bias=bias), BatchNorm1d(120, convention="d2l"), False),
              (nn.Linear(120, 84, bias=bias), BatchNorm1d(84, convention="d2l"), False))  # fmt: skip
    for k, (linear, bn, pool) in enumerate(blocks, start=1):
        name = f"conv{k}" if pool else f"fc{k - 2}"
        pair = [(f"bn{k}", bn), (f"relu{k}", nn.ReLU())]
        layers += [(name, linear)] + (pair if order == "bn-relu" else pair[::-1])
        layers += [(f"pool{k}", nn.AvgPool2d(2))] if pool else []
        layers += [("flatten", nn.Flatten())] if k == 2 else []
    return nn.Sequential(OrderedDict(layers + [("fc3", nn.Linear(84, 10))]))  # (N, 1, 28, 28) -> (N, 10)


def _torch_sgd(model, data, *, lr: float, batch_size: int, epochs: int, seed: int) -> List[Dict]:
    """SGD on ``model`` by bnref.torch.train's epoch (``train_steps``: the schedule's example
    order, full batches, added up by ``run_steps``): per epoch the mean training loss, each
    step's loss and the test accuracy (eval mode). Not ``bnref.torch.train.fit``, which trains
    LeNet-BN only."""
    import torch

    from bnref.torch import train as ttrain

    cpu, dtype = torch.device("cpu"), next(model.parameters()).dtype
    X, y = ttrain.load_tensors(data.train_images, data.train_labels, cpu)  # (N, 1, 28, 28), (N,)
    Xt, yt = ttrain.load_tensors(data.test_images, data.test_labels, cpu)
    X, Xt = X.to(dtype), Xt.to(dtype)  # the model's dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    history = []
    for epoch in range(1, epochs + 1):
        steps = ttrain.train_steps(model, optimizer, X, y, seed=seed, batch_size=batch_size, epochs=(epoch,))
        loss_sum, _, seen, losses, _ = ttrain.run_steps(steps, cpu)
        history.append({"loss": float(loss_sum) / seen, "step_losses": [float(v) for v in losses],
                        "test_acc": ttrain.evaluate(model, Xt, yt)})  # fmt: skip
    return history


def placement(quick: bool, data_dir: Optional[str] = None, seed: int = 0, synthetic: bool = False) -> Dict:
    """Where BN goes, in torch: a ReLU LeNet with BN before the activation (conv -> BN -> ReLU)
    and after it (conv -> ReLU -> BN), from one seed's weights, on the same batches (lr 0.1,
    batch 256, SGD); and the bias of a conv/linear layer right before BN, which BN's mean
    subtraction cancels: its gradient norm at every step (BN -> ReLU: zero but for rounding;
    ReLU -> BN and the output layer: not), and the BN -> ReLU network trained again without
    those biases, from the same other weights, whose per-step training losses and final
    eval-mode test logits are compared with the biased network's.

    In float64, so that "the same to rounding" reads 1e-16, not float32's rounding amplified by
    training (two float32 runs whose sums round differently part after a few dozen steps, as any
    two would). The float32 size of the cancelled gradients is measured too, on the trained
    BN -> ReLU network: the max norm over 10 training batches."""
    import copy

    import torch

    from bnref.torch import train as ttrain
    from bnref.schedule import batch_slices

    epochs, batch, n_train, n_test = (2, 64, 1024, 500) if quick else (10, BASE_BATCH, None, None)
    lr = 0.1
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    steps_per_epoch = len(batch_slices(len(data.train_labels), batch))
    out: Dict = {"epochs": epochs, "lr": lr, "batch_size": batch, "dtype": "float64", "data": data.source,
                 "orders": ORDERS, "train_examples": len(data.train_labels), "runs": {}, "bias_grad_norm": {}}  # fmt: skip
    initial, trained, step_losses = {}, {}, {}
    for name, order, bias in (("bn-relu", "bn-relu", True), ("relu-bn", "relu-bn", True),
                              ("bn-relu, no bias before BN", "bn-relu", False)):  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _placement_lenet(order, bias).to(torch.float64)
        if not bias:  # the biased network's initial weights, without the biases
            model.load_state_dict({k: v for k, v in initial["bn-relu"].items() if k in model.state_dict()})
        initial[name] = {k: v.clone() for k, v in model.state_dict().items()}
        norms = _record_bias_grad_norms(model)
        history = _torch_sgd(model, data, lr=lr, batch_size=batch, epochs=epochs, seed=seed)
        trained[name], step_losses[name] = model, np.array([v for m in history for v in m["step_losses"]])
        out["runs"][name] = _curves(history, ("loss", "test_acc"))
        out["bias_grad_norm"][name] = {
            layer: {"max": max(v), "median": float(np.median(v)),
                    "per_epoch_max": [max(v[i : i + steps_per_epoch]) for i in range(0, len(v), steps_per_epoch)]}
            for layer, v in norms.items()}  # fmt: skip
    Xt, _ = ttrain.load_tensors(data.test_images, data.test_labels, torch.device("cpu"))
    with torch.inference_mode():
        biased, unbiased = (trained[k].eval()(Xt.double()) for k in ("bn-relu", "bn-relu, no bias before BN"))
    out["bias_vs_no_bias"] = {
        "max_step_loss_diff": float(np.max(np.abs(step_losses["bn-relu"] - step_losses["bn-relu, no bias before BN"]))),
        "max_test_logit_diff": float((biased - unbiased).abs().max()), "max_abs_test_logit": float(biased.abs().max())}  # fmt: skip
    model32 = copy.deepcopy(trained["bn-relu"]).float()  # a copy: a training-mode forward moves running statistics
    norms32 = _record_bias_grad_norms(model32)
    X, y = ttrain.load_tensors(data.train_images[: 10 * batch], data.train_labels[: 10 * batch], torch.device("cpu"))
    for i in range(0, len(y), batch):
        torch.nn.functional.cross_entropy(model32.train()(X[i : i + batch]), y[i : i + batch]).backward()
        model32.zero_grad()
    out["float32_bias_grad_norm"] = {layer: max(v) for layer, v in norms32.items()}
    return out


def _record_bias_grad_norms(model) -> Dict[str, list]:
    """``{layer: []}`` for each conv/linear layer of ``model`` with a bias, to which the norm of
    that bias's gradient is appended at every backward pass (a tensor hook)."""
    from torch import nn

    norms: Dict[str, list] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.register_hook(lambda g, store=norms.setdefault(name, []): store.append(float(g.norm())))
    return norms


def _plot_placement(result: Dict, path: str) -> None:
    fig, (acc, grad) = _io.new_figure(2)
    epochs = range(1, result["epochs"] + 1)
    for (name, run), style in zip(result["runs"].items(), ("o-", "s--", "x:")):
        acc.plot(epochs, run["test_acc"], style, label=name)
    same = result["bias_vs_no_bias"]
    acc.set_title(f"without the bias before BN: max |loss diff| {same['max_step_loss_diff']:.1g}", fontsize="medium")
    acc.set_xlabel("epoch"), acc.set_ylabel("test accuracy"), acc.grid(True), acc.legend(fontsize="small")
    for name, style in (("bn-relu", "-"), ("relu-bn", "--")):
        for (layer, norms), marker in zip(result["bias_grad_norm"][name].items(), "os^vx"):
            grad.semilogy(epochs, np.maximum(norms["per_epoch_max"], 1e-20), marker + style, label=f"{name}: {layer}.bias")
    grad.set_xlabel("epoch"), grad.set_ylabel("max over the epoch's steps of |d loss / d bias|")
    grad.set_title("bias gradients (solid: BN -> ReLU, dashed: ReLU -> BN)", fontsize="medium")
    grad.grid(True, alpha=0.4), grad.legend(fontsize="x-small", ncol=2, loc="center right")
    for ax in (acc, grad):
        ax.set_xticks(epochs)
    fig.suptitle(f"BN before or after ReLU, and the bias before BN (torch, lr {result['lr']}, batch {result['batch_size']})")
    _save(fig, path, result)
