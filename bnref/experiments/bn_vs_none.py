"""``bn-vs-none`` (default both backends): d2l's claim that BN converges faster; LeNet with and
without BN (:func:`bn_vs_none`, its figure :func:`_plot_bn_vs_none`)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from bnref import _io
from bnref.experiments._common import BASE_BATCH, BASE_LR, _curves, _dataset, _save


def bn_vs_none(quick: bool, data_dir: Optional[str] = None, seed: int = 0, backends: Sequence[str] = ("torch", "jax"),
               synthetic: bool = False) -> Dict:
    """d2l's claim that BatchNorm makes LeNet converge faster. The same LeNet (sigmoids, d2l's
    initialization) with bnref's BN after every conv/linear layer but the last (d2l's
    convention) and without BN, trained by ``bnref.training.train_and_evaluate`` in each of
    ``backends`` with d2l's BN-chapter defaults, lr 1.0, batch 256, SGD; training loss and test
    accuracy per epoch. (d2l's own BN-free LeNet chapter trains at lr 0.9: one lr for both here,
    so BN is the only difference.)"""
    from bnref.config import TrainConfig
    from bnref.training import train_and_evaluate

    epochs, batch, n_train, n_test = (3, 64, 1024, 500) if quick else (10, BASE_BATCH, None, None)
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    out: Dict = {"epochs": epochs, "lr": BASE_LR, "batch_size": batch, "data": data.source,
                 "train_examples": len(data.train_labels), "test_examples": len(data.test_labels), "runs": {}}  # fmt: skip
    for backend in backends:
        for bn, label in (("bnref", "BN"), ("none", "no BN")):
            config = TrainConfig(backend=backend, bn=bn, epochs=epochs, lr=BASE_LR, batch_size=batch, seed=seed,
                                 progress=False)  # fmt: skip
            run = out["runs"][f"{backend}, {label}"] = _curves(train_and_evaluate(config, data))
            print(f"{backend}, {label}: loss {run['loss'][-1]:.3f}, test acc {run['test_acc'][-1]:.3f}", flush=True)
    return out


def _plot_bn_vs_none(result: Dict, path: str) -> None:
    fig, (loss, acc) = _io.new_figure(2)
    epochs = range(1, result["epochs"] + 1)
    for name, run in result["runs"].items():
        style = ("o" if name.startswith("torch") else "s") + ("-" if name.endswith(", BN") else "--")
        loss.plot(epochs, run["loss"], style, label=name)
        acc.plot(epochs, run["test_acc"], style, label=name)
    loss.set_ylabel("training loss (mean over the epoch)"), acc.set_ylabel("test accuracy")
    for ax in (loss, acc):
        ax.set_xlabel("epoch"), ax.set_xticks(epochs), ax.grid(True), ax.legend(fontsize="small")
    fig.suptitle(f"LeNet with and without BatchNorm (lr {result['lr']}, batch {result['batch_size']}, {result['train_examples']} "
                 "training examples)")  # fmt: skip
    _save(fig, path, result)
