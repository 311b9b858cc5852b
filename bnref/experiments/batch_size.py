"""``batch-size`` (JAX): batch :data:`BATCH_SIZES` on one budget of training examples, lr per
:data:`~bnref.experiments._common.LR_RULE` (:func:`batch_size`, its figure :func:`_plot_batch_size`)."""

from __future__ import annotations

from typing import Dict, Optional

from bnref import _io
from bnref.experiments._common import LR_RULE, _batch_axis, _dataset, _jax_sgd, _JaxProbe, _save, scaled_lr

BATCH_SIZES = (4, 16, 64, 256, 512)


def batch_size(quick: bool, data_dir: Optional[str] = None, seed: int = 0, synthetic: bool = False) -> Dict:
    """BatchNorm at batch sizes 4 ... 512 on a fixed budget of training examples (the same
    number of examples for every batch size, so batch 4 takes 128 times the steps of batch
    512), lr per :data:`LR_RULE`: bnref.jax's LeNet-BN (d2l's convention: decay 0.9, biased
    running variance). At the end of each third of the budget, test accuracy with the running
    statistics (the EMA) and with precise population statistics, and the gap between the two
    sets of statistics per BN layer (see :class:`_JaxProbe`)."""
    from bnref.jax.models import LeNetBN

    sizes, epochs, n_train, n_test, precise, probes = (
        ((4, 64), 2, 1024, 500, 500, 1) if quick else (BATCH_SIZES, 3, None, None, 10000, 3))
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    budget = epochs * len(data.train_labels)
    model = LeNetBN(bn="bnref", convention="d2l")
    probe = _JaxProbe(model, data, precise_examples=precise, seed=seed)
    out: Dict = {"batch_sizes": list(sizes), "lr": [scaled_lr(b) for b in sizes], "lr_rule": LR_RULE,
                 "budget_examples": budget, "epochs": epochs, "data": data.source, "precise_examples": precise,
                 "test_examples": len(data.test_labels), "probes": {}}  # fmt: skip
    for b in sizes:
        steps = budget // b
        out["probes"][str(b)] = _jax_sgd(model, data, lr=scaled_lr(b), batch_size=b, steps=steps, seed=seed,
                                         every=-(-steps // probes), probe=lambda step, state, b=b: {
                                             "step": step, "examples": step * b, **probe(state)})  # fmt: skip
        last = out["probes"][str(b)][-1]
        print(f"batch {b}: test acc {last['acc_running']:.3f} (running), {last['acc_precise']:.3f} (precise)", flush=True)
    return out


def _plot_batch_size(result: Dict, path: str) -> None:
    fig, (acc, gap) = _io.new_figure(2)
    sizes = result["batch_sizes"]
    final = [result["probes"][str(b)][-1] for b in sizes]
    acc.plot(sizes, [p["acc_running"] for p in final], "o-", label="running statistics (EMA)")
    acc.plot(sizes, [p["acc_precise"] for p in final], "s--", label="precise (population) statistics")
    acc.set_ylabel("test accuracy"), acc.set_title(f"after {result['budget_examples']} training examples")
    for layer, style in zip(final[0]["running_var_rel_error"], ("o-", "s-", "^--", "v--")):
        gap.plot(sizes, [p["running_var_rel_error"][layer] for p in final], style, label=layer)
    gap.set_yscale("log"), gap.set_ylabel("|running / population var - 1|")
    gap.set_title("running variance vs population, per BN layer")
    for ax in (acc, gap):
        _batch_axis(ax, sizes, "batch size (lr = min(B, 256) / 256)")
        ax.grid(True, alpha=0.4), ax.legend(fontsize="small")
    fig.suptitle("LeNet-BN (bnref.jax) at batch sizes 4-512, one budget of examples")
    _save(fig, path, result)
