"""``eval-stats`` (JAX): through training, test accuracy with the running statistics (EMA), precise
population statistics and batch statistics (:func:`eval_stats`, its figure :func:`_plot_eval_stats`)."""

from __future__ import annotations

from typing import Dict, Optional

from bnref import _io
from bnref.experiments._common import BASE_BATCH, BASE_LR, _dataset, _jax_sgd, _JaxProbe, _save


def eval_stats(quick: bool, data_dir: Optional[str] = None, seed: int = 0, synthetic: bool = False) -> Dict:
    """Through training (bnref.jax's LeNet-BN, d2l's defaults: lr 1.0, batch 256, decay 0.9),
    test accuracy three ways, several times per epoch: with the running statistics (the EMA
    eval mode uses), with precise population statistics recomputed over a fixed sample of
    training examples with the weights as they are, and with batch statistics (BN left in
    training mode at test time) on test batches of the training batch size and of 16."""
    from bnref.jax.models import LeNetBN
    from bnref.schedule import batch_slices

    epochs, batch, n_train, n_test, precise, per_epoch = (2, 64, 1024, 500, 500, 2) if quick else (10, BASE_BATCH, None, None, 10000, 3)
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    model = LeNetBN(bn="bnref", convention="d2l")
    probe = _JaxProbe(model, data, precise_examples=precise, batch_sizes=(batch, 16), seed=seed)
    steps_per_epoch = len(batch_slices(len(data.train_labels), batch))
    probes = _jax_sgd(model, data, lr=BASE_LR, batch_size=batch, steps=epochs * steps_per_epoch, seed=seed,
                      every=steps_per_epoch // per_epoch,
                      probe=lambda step, state: {"step": step, "epoch": step / steps_per_epoch, **probe(state)})  # fmt: skip
    return {"epochs": epochs, "lr": BASE_LR, "batch_size": batch, "data": data.source, "precise_examples": precise,
            "eval_batch_sizes": [batch, 16], "train_examples": len(data.train_labels),
            "test_examples": len(data.test_labels), "probes": probes}  # fmt: skip


def _plot_eval_stats(result: Dict, path: str) -> None:
    fig, ax = _io.new_figure(1, size=(7.5, 4.2))
    probes = result["probes"]
    x = [p["epoch"] for p in probes]
    ax.plot(x, [p["acc_running"] for p in probes], "o-", ms=3, label="running statistics (EMA, eval mode)")
    ax.plot(x, [p["acc_precise"] for p in probes], "s-", ms=3, label=f"precise population statistics ({result['precise_examples']} training examples)")
    for b, style in zip(result["eval_batch_sizes"], ("^--", "v:")):
        ax.plot(x, [p["acc_batch"][str(b)] for p in probes], style, ms=3, label=f"batch statistics, test batches of {b}")
    ax.set_xlabel("epoch"), ax.set_ylabel("test accuracy"), ax.grid(True), ax.legend(fontsize="small")
    ax.set_title(f"LeNet-BN (bnref.jax), lr {result['lr']}, batch {result['batch_size']}: three ways to evaluate")
    _save(fig, path, result)
