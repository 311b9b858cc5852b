"""``momentum-port`` (torch and JAX): the classic porting bug, ``torch.nn.BatchNorm2d(momentum=0.1)``
ported to ``flax.linen.BatchNorm(momentum=0.1)``, probed in one step and trained (:func:`momentum_port`,
its figure :func:`_plot_momentum_port`)."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from bnref import _io, spec
from bnref.experiments._common import _dataset, _save


def momentum_port(quick: bool, data_dir: Optional[str] = None, seed: int = 0, synthetic: bool = False) -> Dict:
    """Port a torch LeNet-BN (torch.nn BN, ``momentum=0.1``) to Flax twice, with
    ``momentum=0.1`` copied as is (the bug) and with ``momentum=0.9`` (the fix); probe one step,
    then train both ports on the same batches and evaluate them as they go."""
    import jax.numpy as jnp
    import optax
    import torch

    from bnref import convert
    from bnref.jax import train as jtrain
    from bnref.jax.models import LeNetBN as FlaxLeNetBN
    from bnref.torch import train as ttrain
    from bnref.torch.models import LeNetBN as TorchLeNetBN

    steps, batch, lr, n_train, n_test = (160, 64, 0.1, 10240, 1000) if quick else (468, 256, 0.1, 60000, 10000)
    data = _dataset(data_dir, n_train, n_test, seed, synthetic)
    X, y = data.train_images, data.train_labels
    Xt, yt = jnp.asarray(jtrain.prepare_images(data.test_images)), jnp.asarray(data.test_labels)
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
    eval_at = set(np.linspace(0, steps, 9)[1:].round().astype(int).tolist())  # 8 evenly spaced, the last step included
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
            if k in eval_at:
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
    _save(fig, path, result)
