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


def test_cli_on_two_checkpoints_of_a_users_models(trained, tmp_path, capsys, usage_error):
    tm, x, variables = trained
    torch.save(tm.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.msgpack").write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))
    argv = [str(tmp_path / "model.pt"), str(tmp_path / "model.msgpack"), "--torch-model", "test_diagnose:make_torch",
            "--flax-model", "test_diagnose:make_flax_flipped", "--input-shape", "3,16,16", "-n", "16"]  # fmt: skip
    assert diagnose.main(argv) == 1
    out = capsys.readouterr().out
    assert "3 findings" in out and "[decay]" in out
    err = usage_error(diagnose.main, argv[:2] + ["--torch-model", "test_diagnose:make_torch"]).err
    assert "give both" in err  # one factory without the other: a usage error


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


# --- non-finite values and degenerate samples ------------------------------------------------------


def _nan_at(tree, path, index=0):
    """A NumPy copy of ``tree`` with a NaN at ``index`` of the leaf at ``path`` (a tuple of keys)."""
    out = jax.tree.map(np.array, tree)
    leaf = out
    for key in path:
        leaf = leaf[key]
    leaf[np.unravel_index(index, leaf.shape)] = np.nan  # (reshape(-1) of a transposed kernel is a copy)
    return out


def test_a_flax_port_whose_weights_are_all_nan_is_a_finding_not_a_pass(trained):
    tm, x, variables = trained
    nan = jax.tree.map(lambda a: np.full_like(np.asarray(a), np.nan), variables)
    report = diagnose.bn_report(tm, FlaxCNN(), nan, x)
    assert not report.ok and _kinds(report.findings) == ["nonfinite"] and len(report.findings) == 3
    assert all(f.message.startswith("the Flax layer's stored scale holds") for f in report.findings)
    assert "No BatchNorm differences found." not in str(report)


@pytest.mark.parametrize("side", ["torch", "flax"])
def test_a_nan_running_variance_is_found_on_its_own_side(trained, side):
    import copy

    tm, x, variables = trained
    if side == "torch":
        tm = copy.deepcopy(tm)
        with torch.no_grad():
            tm.features[1].running_var[0] = float("nan")
    else:
        variables = _nan_at(variables, ("batch_stats", "features_1", "var"))
    report = diagnose.bn_report(tm, FlaxCNN(), variables, x)
    first = report.findings[0]
    assert _kinds(report.findings) == ["nonfinite"] and first.torch_layer == "features.1"
    want = "the torch layer's stored running_var" if side == "torch" else "the Flax layer's stored batch_stats var"
    assert first.message.startswith(want), first.message
    # the layers above see the NaN in their input in evaluation: reported as coming from below, on the same side
    assert all(f.message.startswith("the torch" if side == "torch" else "the Flax") for f in report.findings)
    assert all("a layer below it produced them" in f.message for f in report.findings[1:])


def test_a_nan_above_the_last_bn_layer_is_found_in_the_models_output(trained):
    tm, x, variables = trained
    report = diagnose.bn_report(tm, FlaxCNN(), _nan_at(variables, ("params", "head_4", "kernel")), x)
    assert [(f.kind, f.torch_layer) for f in report.findings] == [("nonfinite", "(output)")]
    assert report.findings[0].message.startswith("the Flax model's output in the training call")


def test_a_sample_of_identical_examples_is_refused(trained):
    tm, x, variables = trained
    with pytest.raises(ValueError, match="examples of sample_input are all identical"):
        diagnose.bn_report(tm, FlaxCNN(momentum=0.1), variables, np.ones_like(x))


def test_a_layer_whose_input_has_no_spread_is_a_sample_finding_and_hides_no_decay(trained):
    """The head's Linear weights zeroed: head.2's input is its bias, the same for every example.
    That layer's mode cannot be checked (a finding of its own, not a false 'mode'), and the
    flipped momentum is still found on every layer, that one included."""
    import copy

    tm, x, _ = trained
    tm = copy.deepcopy(tm)
    with torch.no_grad():
        tm.head[1].weight.zero_()
    variables = convert.torch_to_flax(tm, FlaxCNN(), x)
    report = diagnose.bn_report(tm, FlaxCNN(momentum=0.1), variables, x)
    assert _kinds(report.findings) == ["decay", "sample"]
    assert sorted(f.torch_layer for f in report.findings if f.kind == "decay") == ["features.1", "features.5", "head.2"]
    assert [f.torch_layer for f in report.findings if f.kind == "sample"] == ["head.2"]
    fixed = diagnose.bn_report(tm, FlaxCNN(momentum=0.9), variables, x)
    assert _kinds(fixed.findings) == ["sample"] and not fixed.ok  # a check not made is not a pass


def test_models_without_batchnorm_are_refused():
    x = _sample((5,), n=4)
    fm = nn.Dense(3)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        diagnose.bn_report(tnn.Sequential(tnn.Linear(5, 3)), fm, fm.init(jax.random.key(0), x), x,
                           train_kwargs={}, eval_kwargs={})  # fmt: skip


# --- the command line: bad input is exit status 2 and one line naming the file ---------------------


def make_flax_small():
    return FlaxSmall()


def make_flax_without_head_bn():
    from test_convert import FlaxCNNAutoNames

    return FlaxCNNAutoNames(head_bn=False)


def make_not_a_model():
    return 3


def make_raises():
    raise RuntimeError("factory exploded")


NOT_CALLABLE = (1, 2)


class Hostile:
    """Unpickling this would call print: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def _check_one_line_error(rc, err, names):
    assert rc == 2, err
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("python -m bnref.diagnose: ") and names in err, err


@pytest.fixture(scope="module")
def user_files(trained, tmp_path_factory):
    """model.pt and model.msgpack of the trained CNN, and the argv of the factory form."""
    tm, x, variables = trained
    d = tmp_path_factory.mktemp("user-models")
    torch.save(tm.state_dict(), d / "model.pt")
    (d / "model.msgpack").write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))
    return d


def _user_case(case, d):
    """(argv, the file or option the message must name, a phrase of the problem)."""
    pt, mp = str(d / "model.pt"), str(d / "model.msgpack")
    tf, ff, shape = "test_diagnose:make_torch", "test_diagnose:make_flax_flipped", "3,16,16"

    def argv(t=pt, f=mp, torch_model=tf, flax_model=ff, input_shape=shape):
        return [t, f, "--torch-model", torch_model, "--flax-model", flax_model, "--input-shape", input_shape, "-n", "8"]

    def write(name, content):
        (d / name).write_bytes(content)
        return str(d / name)

    if case == "models whose layers do not pair":
        fm = make_flax_without_head_bn()
        v = fm.init(jax.random.key(0), np.zeros((2, 16, 16, 3), np.float32), train=False)
        bad = write("no-head-bn.msgpack", serialization.msgpack_serialize(jax.tree.map(np.asarray, v)))
        return argv(f=bad, flax_model="test_diagnose:make_flax_without_head_bn"), f"{pt} / {bad}", "no partner"
    if case == "variables that do not fit the Flax model":
        return argv(flax_model="test_diagnose:make_flax_small"), mp, "the Flax model with these variables fails"
    if case == "corrupt torch checkpoint":
        return argv(t=write("corrupt.pt", b"\x80\x02garbage" * 10)), str(d / "corrupt.pt"), "not a torch.save'd"
    if case == "hostile torch checkpoint":
        torch.save({"model": Hostile()}, d / "hostile.pt")
        return argv(t=str(d / "hostile.pt")), str(d / "hostile.pt"), "weights_only=True"
    if case == "the msgpack given as the torch checkpoint":
        return argv(t=mp), mp, "not a torch.save'd state_dict"
    if case == "a tensor, not a state_dict":
        torch.save(torch.zeros(3), d / "tensor.pt")
        return argv(t=str(d / "tensor.pt")), str(d / "tensor.pt"), "holds a Tensor, not a state_dict"
    if case == "another model's state_dict":
        torch.save(TorchSmall().state_dict(), d / "small.pt")
        return argv(t=str(d / "small.pt")), str(d / "small.pt"), "does not fit the model of --torch-model"
    if case == "msgpack with extra data":
        bad = write("extra.msgpack", (d / "model.msgpack").read_bytes() + b"\x01\x02")
        return argv(f=bad), bad, "not a flax.serialization msgpack file"
    if case == "truncated msgpack":
        bad = write("short.msgpack", (d / "model.msgpack").read_bytes()[:100])
        return argv(f=bad), bad, "not a flax.serialization msgpack file"
    if case == "msgpack of something else":
        bad = write("list.msgpack", serialization.msgpack_serialize({"weights": [1, 2]}))
        return argv(f=bad), bad, "holds no 'params' collection"
    if case == "missing torch checkpoint":
        return argv(t=str(d / "nope.pt")), str(d / "nope.pt"), "no such file"
    if case == "non-callable factory":
        return argv(torch_model="test_diagnose:NOT_CALLABLE"), "--torch-model test_diagnose:NOT_CALLABLE", "not a function"
    if case == "factory not there":
        return argv(flax_model="test_diagnose:nope"), "--flax-model test_diagnose:nope", "has no 'nope'"
    if case == "module not there":
        return argv(torch_model="no_such_module_xyz:f"), "--torch-model no_such_module_xyz:f", "cannot import"
    if case == "factory returning no model":
        return argv(flax_model="test_diagnose:make_not_a_model"), "--flax-model", "returned a int, not a flax.linen"
    if case == "factory raising":
        return argv(torch_model="test_diagnose:make_raises"), "--torch-model", "factory exploded"
    if case == "malformed input shape":
        return argv(input_shape="3,x"), "--input-shape '3,x'", "positive integers"
    if case == "input shape the model does not take":
        return argv(input_shape="3,8"), pt, "the torch model fails on a sample batch of shape (8, 3, 8)"
    raise AssertionError(case)


USER_CASES = ["models whose layers do not pair", "variables that do not fit the Flax model", "corrupt torch checkpoint",
              "hostile torch checkpoint", "the msgpack given as the torch checkpoint", "a tensor, not a state_dict",
              "another model's state_dict", "msgpack with extra data", "truncated msgpack", "msgpack of something else",
              "missing torch checkpoint", "non-callable factory", "factory not there", "module not there",
              "factory returning no model", "factory raising", "malformed input shape",
              "input shape the model does not take"]  # fmt: skip


@pytest.mark.parametrize("case", USER_CASES)
def test_cli_bad_user_files_are_exit_2_with_one_line_naming_the_file(case, user_files, capsys):
    argv, names, problem = _user_case(case, user_files)
    capsys.readouterr()
    rc = diagnose.main(argv)
    out, err = capsys.readouterr()
    _check_one_line_error(rc, err, names)
    assert problem in err.split(names, 1)[1] and "unpickled!" not in out


def test_cli_bad_input_through_the_real_command(user_files):
    """The process itself: exit status 2, one line, no traceback (the msgpack with extra data
    used to end in 'unpack(b) received extra data' with no file named)."""
    import os
    import subprocess
    import sys

    argv, names, _ = _user_case("msgpack with extra data", user_files)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "bnref.diagnose", *argv], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    _check_one_line_error(done.returncode, done.stderr, names)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_fashion_dir):
    """A torch and a JAX bnref run directory (1 short epoch on the tiny IDX files)."""
    from bnref import train

    d = tmp_path_factory.mktemp("runs")
    common = ["--epochs", "1", "--train-limit", "128", "--test-limit", "32", "--batch-size", "32", "--no-progress",
              "--data-dir", str(tiny_fashion_dir)]  # fmt: skip
    train.main(["--backend", "torch", "--out", str(d / "t"), *common])
    train.main(["--backend", "jax", "--out", str(d / "j"), *common])
    return d / "t", d / "j", tiny_fashion_dir


def _edit_config(run, edit):
    import json

    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))


def _run_case(case, t, j, data_dir, tmp):
    """(argv, what the message must name, a phrase of the problem), on copies of the runs."""
    import shutil

    from bnref.runs import CHECKPOINT

    tc, jc = tmp / "t", tmp / "j"
    shutil.copytree(t, tc), shutil.copytree(j, jc)
    argv = [str(tc), str(jc), "-n", "16", "--data-dir", str(data_dir)]
    if case == "unknown config key":
        _edit_config(tc, lambda c: c["config"].update(warp_drive=True))
        return argv, str(tc / "config.json"), "unknown config key(s) warp_drive"
    if case == "config without its 'config'":
        _edit_config(jc, lambda c: c.pop("config"))
        return argv, str(jc / "config.json"), "config"  # after the file's name: bnref.runs may say it first
    if case == "config not JSON":
        (tc / "config.json").write_text("{not json")
        return argv, str(tc / "config.json"), "JSON"
    if case == "config with a bad value":
        _edit_config(jc, lambda c: c["config"].update(bn="weird"))
        return argv, str(jc / "config.json"), "bn must be one of"
    if case == "corrupt torch checkpoint":
        (tc / CHECKPOINT).write_bytes(b"\x00" * 64)
        return argv, str(tc / CHECKPOINT), "not a checkpoint of this run's torch model"
    if case == "hostile torch checkpoint":
        torch.save({"model": Hostile(), "epoch": 1, "history": []}, tc / CHECKPOINT)
        return argv, str(tc / CHECKPOINT), "not a checkpoint of this run's torch model"
    if case == "a JAX checkpoint in the torch run":
        shutil.copy(jc / CHECKPOINT, tc / CHECKPOINT)
        return argv, str(tc / CHECKPOINT), "not a checkpoint of this run's torch model"
    if case == "malformed JAX checkpoint":
        (jc / CHECKPOINT).write_bytes((jc / CHECKPOINT).read_bytes() + b"\x00")
        return argv, str(jc / CHECKPOINT), "not a checkpoint of this run's Flax model"
    if case == "a torch checkpoint in the JAX run":
        shutil.copy(tc / CHECKPOINT, jc / CHECKPOINT)
        return argv, str(jc / CHECKPOINT), "not a checkpoint of this run's Flax model"
    if case == "a run of another model":
        _edit_config(tc, lambda c: c["config"].update(bn="none"))  # LeNet without BN, its checkpoint with BN
        return argv, str(tc / CHECKPOINT), "not a checkpoint of this run's torch model"
    if case == "a data dir that does not exist":
        return argv[:-2] + ["--data-dir", str(tmp / "typo")], f"--data-dir {tmp / 'typo'}: no such directory", "--synthetic"
    if case == "a data dir without the files":
        (tmp / "empty").mkdir()
        return argv[:-2] + ["--data-dir", str(tmp / "empty")], f"--data-dir {tmp / 'empty'}", "does not hold the Fashion-MNIST"
    raise AssertionError(case)


RUN_CASES = ["unknown config key", "config without its 'config'", "config not JSON", "config with a bad value",
             "corrupt torch checkpoint", "hostile torch checkpoint", "a JAX checkpoint in the torch run",
             "malformed JAX checkpoint", "a torch checkpoint in the JAX run", "a run of another model",
             "a data dir that does not exist", "a data dir without the files"]  # fmt: skip


@pytest.mark.parametrize("case", RUN_CASES)
def test_cli_bad_runs_and_data_dirs_are_exit_2_with_one_line_naming_the_file(case, two_runs, tmp_path, capsys):
    argv, names, problem = _run_case(case, *two_runs, tmp_path)
    capsys.readouterr()
    rc = diagnose.main(argv)
    out, err = capsys.readouterr()
    _check_one_line_error(rc, err, names)
    assert problem in err.split(names, 1)[1] and out == "" and "unpickled!" not in out


def test_cli_synthetic_is_explicit_and_excludes_a_data_dir(two_runs, tiny_fashion_dir, capsys, usage_error):
    t, j = map(str, two_runs[:2])
    assert diagnose.main([t, j, "-n", "16", "--synthetic"]) == 0
    assert "No BatchNorm differences found." in capsys.readouterr().out
    assert diagnose.main([t, j, "-n", "16", "--data-dir", str(tiny_fashion_dir)]) == 0  # a directory that holds them
    capsys.readouterr()
    err = usage_error(diagnose.main, [t, j, "--synthetic", "--data-dir", str(tiny_fashion_dir)]).err
    assert "exclude each other" in err
