"""bnref.diagnose: the BN bugs of a PyTorch <-> Flax port, found on a model bnref has never seen."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import torch
from flax import serialization
from test_convert import FlaxCNN, TorchCNN, _sample, _trained
from torch import nn as tnn

from bnref import convert, diagnose

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def trained():
    """A trained torch CNN (torch.nn BN, momentum 0.1), a batch, and its weights converted to Flax."""
    tm = _trained(TorchCNN(), SHAPE)
    x = _sample(SHAPE, n=16)
    return tm, x, convert.torch_to_flax(tm, FlaxCNN(), x)


def _kinds(items):
    return sorted({f.kind for f in items})


def test_a_correct_port_has_no_findings_and_notes_the_estimator_torch_nn_and_flax_linen_cannot_share(trained):
    tm, x, variables = trained
    report = diagnose.bn_report(tm, FlaxCNN(momentum=0.9), variables, x)
    assert report.ok and report.findings == []
    assert [c.torch_layer for c in report.layers] == ["features.1", "features.5", "head.2"]
    assert all(c.decay == pytest.approx((0.9, 0.9), abs=1e-4) and c.inputs_agree for c in report.layers)
    assert _kinds(report.notes) == ["running_var"] and len(report.notes) == 3
    assert "No BatchNorm differences found." in str(report)


def test_the_flipped_momentum_is_found_on_every_layer(trained):
    tm, x, variables = trained
    report = diagnose.bn_report(tm, FlaxCNN(momentum=0.1), variables, x)  # torch's 0.1 copied as is
    assert _kinds(report.findings) == ["decay"] and len(report.findings) == 3
    assert all(c.decay == pytest.approx((0.9, 0.1), abs=1e-4) for c in report.layers)
    message = report.findings[0].message
    assert "9x as far" in message and "momentum=0.9" in message
    assert "[decay] features.1 / features_1, features.5 / features_5, head.2 / head_2" in str(report)


def test_a_flax_loop_that_never_keeps_the_batch_stats_update_is_found():
    """Both ports trained 20 steps from the same weights on the same batches; the Flax loop
    applies with mutable=['batch_stats'] but throws the update away."""
    tm = TorchCNN()
    x = _sample(SHAPE, n=16)
    fm = FlaxCNN()
    variables = convert.torch_to_flax(tm.eval(), fm, x)
    rng = np.random.default_rng(0)
    data = [(2 * rng.standard_normal((16, *SHAPE)).astype(np.float32) + 1, rng.integers(0, 10, 16)) for _ in range(20)]
    opt = torch.optim.SGD(tm.parameters(), lr=0.05)
    tm.train()
    for xb, yb in data:
        opt.zero_grad()
        tnn.functional.cross_entropy(tm(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
        opt.step()
    tm.eval()
    params, stats, tx = variables["params"], variables["batch_stats"], optax.sgd(0.05)
    opt_state = tx.init(params)

    def loss_fn(p, xb, yb):
        logits, _updates = fm.apply({"params": p, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()  # the bug: _updates dropped

    grad = jax.jit(jax.grad(loss_fn))
    for xb, yb in data:
        grads = grad(params, convert.channels_last(xb), yb)
        updates, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
    report = diagnose.bn_report(tm, fm, {"params": params, "batch_stats": stats}, 2 * x + 1)
    stale = [f for f in report.findings if f.kind == "stats"]
    assert stale and "initial values" in stale[0].message and "mutable=['batch_stats']" in stale[0].message
    assert "decay" not in _kinds(report.findings)  # the update itself is right; only keeping it is missing


def test_eps_1e3_against_1e5_is_found(trained):
    tm, x, variables = trained
    report = diagnose.bn_report(tm, FlaxCNN(epsilon=1e-3), variables, x)
    assert _kinds(report.findings) == ["eps"] and "epsilon=1e-05" in report.findings[0].message


def test_flax_fast_variance_cancelling_is_found(trained):
    tm, x, variables = trained
    report = diagnose.bn_report(tm, FlaxCNN(), variables, 3000 + x)  # mean large next to the spread
    stats = [f for f in report.findings if f.kind == "stats"]
    assert stats and all("use_fast_variance=False" in f.message for f in stats)


class TorchSmall(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = tnn.Conv2d(3, 8, 3, padding=1), tnn.BatchNorm2d(8), tnn.Linear(8 * 16 * 16, 4)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


class FlaxSmall(nn.Module):
    axis: int = -1
    mode: str = "tied"  # "running" / "batch": the BN layer always uses its running / the batch's statistics

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), padding=1, name="conv")(x)
        ura = {"tied": not train, "running": True, "batch": False}[self.mode]
        x = nn.BatchNorm(use_running_average=ura, axis=self.axis, momentum=0.9, name="bn")(x)
        return nn.Dense(4, name="fc")(nn.relu(x).reshape(x.shape[0], -1))


def test_a_flax_layer_normalizing_another_axis_is_found():
    x = _sample(SHAPE, n=8)
    fm = FlaxSmall(axis=1)  # NCHW habit on NHWC data: normalizes H
    variables = fm.init(jax.random.key(0), convert.channels_last(x), train=False)
    report = diagnose.bn_report(_trained(TorchSmall(), SHAPE), fm, variables, x)
    assert _kinds(report.findings) == ["axis"] and "axis=-1" in report.findings[0].message
    assert report.layers == []  # nothing else is comparable on that pair


@pytest.mark.parametrize("mode, call", [("running", "training"), ("batch", "evaluation")])
def test_a_mode_not_tied_to_train_is_found(mode, call):
    tm, x = _trained(TorchSmall(), SHAPE), _sample(SHAPE, n=8)
    variables = convert.torch_to_flax(tm, FlaxSmall(), x)
    report = diagnose.bn_report(tm, FlaxSmall(mode=mode), variables, x)
    assert _kinds(report.findings) == ["mode"] and f"in the {call} call" in report.findings[0].message
    assert "use_running_average" in report.findings[0].message


@pytest.mark.parametrize("torch_conv, flax_conv, expect", [("d2l", "d2l", []), ("torch", "d2l", ["running_var"])])
def test_bnref_layers_estimator_is_a_choice_so_a_mismatch_is_a_finding(torch_conv, flax_conv, expect):
    from bnref import spec
    from bnref.jax.models import LeNetBN as FlaxLeNetBN
    from bnref.torch.models import LeNetBN as TorchLeNetBN

    torch.manual_seed(0)
    tm = TorchLeNetBN(convention=torch_conv).eval()
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    fm = FlaxLeNetBN(convention=spec.PRESETS[flax_conv])
    report = diagnose.bn_report(tm, fm, convert.torch_to_flax(tm.state_dict()), x)
    assert _kinds(report.findings) == expect and report.notes == []


def make_torch():  # factories for the CLI test: python -m bnref.diagnose --torch-model test_diagnose:make_torch
    return TorchCNN()


def make_flax_flipped():
    return FlaxCNN(momentum=0.1)


def test_cli_on_two_checkpoints_of_a_users_models(trained, tmp_path, capsys):
    tm, x, variables = trained
    torch.save(tm.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.msgpack").write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))
    argv = [str(tmp_path / "model.pt"), str(tmp_path / "model.msgpack"), "--torch-model", "test_diagnose:make_torch",
            "--flax-model", "test_diagnose:make_flax_flipped", "--input-shape", "3,16,16", "-n", "16"]  # fmt: skip
    assert diagnose.main(argv) == 1
    out = capsys.readouterr().out
    assert "3 findings" in out and "[decay]" in out
    with pytest.raises(SystemExit) as e:  # one factory without the other: a usage error
        diagnose.main(argv[:2] + ["--torch-model", "test_diagnose:make_torch"])
    assert e.value.code == 2 and "give both" in capsys.readouterr().err


def test_cli_on_two_bnref_runs(tmp_path, capsys):
    from bnref import train

    common = ["--epochs", "1", "--train-limit", "512", "--test-limit", "64", "--batch-size", "64", "--no-progress"]
    train.main(["--backend", "torch", "--out", str(tmp_path / "t"), *common])
    train.main(["--backend", "jax", "--out", str(tmp_path / "j"), *common])
    train.main(["--backend", "torch", "--out", str(tmp_path / "u"), "--convention", "torch", *common])
    capsys.readouterr()
    assert diagnose.main([str(tmp_path / "t"), str(tmp_path / "j"), "-n", "32"]) == 0
    assert "No BatchNorm differences found." in capsys.readouterr().out
    assert diagnose.main([str(tmp_path / "u"), str(tmp_path / "j"), "-n", "32"]) == 1  # unbiased vs biased (d2l)
    assert "[running_var]" in capsys.readouterr().out
    assert diagnose.main([str(tmp_path / "j"), str(tmp_path / "t")]) == 2  # a JAX run where the torch one goes
    assert "is a jax run" in capsys.readouterr().err
    assert diagnose.main([str(tmp_path / "nope"), str(tmp_path / "j")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_a_data_parallel_local_bn_checkpoint_gives_the_device_averaged_statistics(tmp_path):
    """A data-parallel JAX run with local BN saves one set of statistics per device (stacked);
    the report takes what that run's evaluation uses, their mean across devices."""
    from bnref.jax import train as jtrain

    params = {"bn1": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)}}
    per_device = {"bn1": {"mean": np.array([[0.0, 1, 2], [2, 3, 4]], np.float32), "var": np.full((2, 3), 4, np.float32)}}
    jtrain.save_checkpoint(str(tmp_path / "ck"), {"params": params, "opt_state": {}, "batch_stats": per_device}, 1, [])
    variables = jtrain.checkpoint_variables(str(tmp_path / "ck"), per_device_stats=True)
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["mean"], [1, 2, 3])
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], params["bn1"]["scale"])
    assert jtrain.checkpoint_variables(str(tmp_path / "ck"))["batch_stats"]["bn1"]["mean"].shape == (2, 3)
