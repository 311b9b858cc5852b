"""The shared training CLI: config validation, the d2l-style line, --plot and --json."""

import json
import os
import re

import numpy as np

import pytest

from bnref import train


def test_epoch_line_uses_d2l_wording():
    m = {"epoch": 3, "epochs": 10, "loss": 0.4021, "train_acc": 0.8551, "test_acc": 0.7523,
         "examples_per_sec": 13290.12, "device": "cpu"}  # fmt: skip
    assert train.format_epoch(m) == (
        "epoch 3/10: loss 0.402, train acc 0.855, test acc 0.752, 13290.1 examples/sec on cpu"
    )


def test_defaults_are_the_seeds():
    c = train.TrainConfig()
    assert (c.lr, c.batch_size, c.epochs, c.bn, c.convention) == (1.0, 256, 10, "bnref", "d2l")


BAD = {
    "backend": ({"backend": "mxnet"}, "backend must be one of"),
    "bn": ({"bn": "layer"}, "bn must be one of"),
    "convention": ({"convention": "pytorch"}, "unknown convention preset"),
    "epochs": ({"epochs": 0}, "epochs must be an int >= 1"),
    "batch_size": ({"batch_size": 1}, "batch_size must be an int >= 2 .BatchNorm needs two values"),
    "batch_size-none": ({"batch_size": 0, "bn": "none"}, "batch_size must be an int >= 1"),
    "lr": ({"lr": 0.0}, "lr must be a finite number > 0"),
    "lr-nan": ({"lr": float("nan")}, "lr must be a finite number > 0"),
    "lr-inf": ({"lr": float("inf")}, "lr must be a finite number > 0"),
    "train_limit": ({"train_limit": 1}, "train_limit must be an int >= 2"),
    "test_limit": ({"test_limit": 0}, "test_limit must be an int >= 1"),
    "seed": ({"seed": -1}, r"seed must be an int in \[0, 4294967295\]"),
    # issue 18's speed options: refused where the backend or the run cannot honour them
    "precision": ({"precision": "float16"}, r"precision must be one of \('float32', 'bfloat16'\)"),
    "compile-not-bool": ({"backend": "torch", "compile": 1}, "compile must be True or False"),
    "tf32-not-bool": ({"tf32": "yes"}, "tf32 must be True or False"),
    "compile-jax": ({"backend": "jax", "compile": True}, "the jax backend's steps are always compiled"),
    "compile-replicas": ({"backend": "torch", "compile": True, "replicas": 2}, "compile is for one device"),
    "bf16-replicas": ({"backend": "jax", "precision": "bfloat16", "replicas": 2}, "precision bfloat16 is for one device"),
    "steps-per-call-torch": ({"backend": "torch", "steps_per_call": 4}, "the torch backend takes one step per call"),
    "steps-per-call-zero": ({"backend": "jax", "steps_per_call": 0}, "steps_per_call must be an int >= 1"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_is_rejected_with_its_name(name):
    kwargs, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**kwargs)


def test_cli_reports_bad_values_and_exits_2(usage_error):
    err = usage_error(train.main, ["--backend", "torch", "--lr", "-1"]).err
    assert "argument --lr: must be a finite number > 0, got -1" in err


BAD_FLAGS = {  # each must be argparse's one-line error (exit 2) before any data loads
    "lr-nan": (["--lr", "nan"], "argument --lr: must be a finite number > 0"),
    "lr-inf": (["--lr", "inf"], "argument --lr: must be a finite number > 0"),
    "train-limit-1": (["--train-limit", "1"], "train_limit must be an int >= 2"),
    "batch-size-1": (["--batch-size", "1"], "batch_size must be an int >= 2"),
    "seed-negative": (["--seed", "-1"], r"argument --seed: must be in \[0, 4294967295\]"),
    "epochs-zero": (["--epochs", "0"], "argument --epochs: must be >= 1"),
    "device-cuda": (["--device", "cuda"], "device 'cuda' is not available"),
    "device-unknown": (["--device", "tpu7"], "device 'tpu7'"),
    "precision-unknown": (["--precision", "float16"], "argument --precision: invalid choice"),
    "steps-per-call-zero": (["--steps-per-call", "0"], "argument --steps-per-call: must be >= 1"),
    "plot-format": (["--plot", "{tmp}/curves.xyz"], "unknown image format '.xyz'"),
    "plot-dir-missing": (["--plot", "{tmp}/no/such/dir/c.png"], "does not exist"),
    "plot-is-dir": (["--plot", "{tmp}"], "is a directory"),
    "same-file": (["--plot", "{tmp}/out.png", "--json", "{tmp}/out.png"], "name the same file"),
}


@pytest.mark.parametrize("backend", ["torch", "jax", "nnx"])
@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_fail_before_data_loads(case, backend, tmp_path, usage_error, monkeypatch):
    """On main at 7b1ede4 several of these trained first, or crashed with a traceback after
    loading the data; here the data directory does not even exist, so any attempt to load
    it would be a different error (exit status 1)."""
    if case == "device-cuda" and backend == "torch":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    if case == "device-cuda" and backend in ("jax", "nnx"):
        import jax

        if any(d.platform == "gpu" for d in jax.devices()):
            pytest.skip("this machine has a GPU")
    argv, message = BAD_FLAGS[case]
    argv = [a.format(tmp=tmp_path) for a in argv]
    err = usage_error(train.main, ["--backend", backend, "--data-dir", str(tmp_path / "absent"), "--no-download",
                                   *argv]).err  # fmt: skip
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "absent").exists()


@pytest.mark.parametrize("download", [True, False], ids=["download", "no-download"])
def test_missing_data_is_one_line_and_exit_2(tmp_path, usage_error, download):
    """Bad input (exit 2, as every other bad flag; b02e4a9 said 1). A --data-dir that does not exist
    is a typo: at b02e4a9 the run created it and tried to download into it."""
    err = usage_error(train.main, ["--backend", "torch", "--data-dir", str(tmp_path / "absent"),
                                   *([] if download else ["--no-download"])]).err  # fmt: skip
    assert err.startswith("error: Fashion-MNIST files not found") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err
    assert not (tmp_path / "absent").exists()


def test_empty_test_split_is_a_clear_error(tmp_path, usage_error):
    from bnref import data

    d = data.synthetic(64, 8)
    empty = data.FashionMNIST(d.train_images, d.train_labels, d.test_images[:0], d.test_labels[:0], source="x")
    directory = data.write_fashion_mnist(tmp_path / "empty-test", empty)
    err = usage_error(train.main, ["--backend", "torch", "--data-dir", str(directory), "--no-download"]).err
    assert "the test split is empty" in err


def test_plot_and_json_are_written(tiny_fashion_dir, tmp_path, capsys):
    plot, record = tmp_path / "curves.png", tmp_path / "metrics.json"
    history = train.main(["--backend", "torch", "--data-dir", str(tiny_fashion_dir), "--epochs", "2",
                          "--batch-size", "64", "--no-progress", "--plot", str(plot), "--json", str(record)])  # fmt: skip
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(record.read_text())
    assert saved["config"]["backend"] == "torch" and saved["history"] == history
    out = capsys.readouterr().out
    assert out.startswith("TrainConfig(backend='torch'")
    assert f"data: {tiny_fashion_dir} (NOT the Fashion-MNIST release" in out  # which data, verified or not


def test_outputs_are_rewritten_after_every_epoch_and_survive_a_crash(tiny_fashion_dir, tmp_path, monkeypatch):
    """A crash in epoch 2 keeps epoch 1's metrics and figure (on main at 7b1ede4 they were
    written only after all training)."""
    from bnref.torch import train as ttrain

    real_evaluate = ttrain.evaluate
    calls = []

    def evaluate_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during epoch 2's evaluation
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ttrain, "evaluate", evaluate_then_crash)
    plot, record = tmp_path / "curves.svg", tmp_path / "metrics.json"
    config = train.TrainConfig(backend="torch", epochs=3, batch_size=64, progress=False, plot=str(plot),
                               json=str(record), data_dir=str(tiny_fashion_dir))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config)
    saved = json.loads(record.read_text())
    assert [m["epoch"] for m in saved["history"]] == [1]
    assert plot.read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.svg", "metrics.json"]  # no temp files left


def test_json_write_is_atomic_old_contents_survive_a_failed_write(tmp_path, monkeypatch):
    from bnref import _io

    path = tmp_path / "metrics.json"
    _io.write_json(path, {"history": [1, 2]})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        _io.write_json(path, {"history": [1, 2, 3]})
    assert json.loads(path.read_text()) == {"history": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_json_is_strict_nan_becomes_null_and_is_named():
    from bnref import _io

    text = _io.dumps({"history": [{"epoch": 1, "loss": float("nan"), "test_acc": 0.5, "rates": [1.0, float("inf")]}]})
    assert "NaN" not in text and "Infinity" not in text
    epoch = json.loads(text)["history"][0]
    assert epoch["loss"] is None and epoch["rates"] == [1.0, None] and epoch["nonfinite"] == ["loss", "rates"]


def test_figure_title_names_the_bn_actually_used():
    assert train.figure_title(train.TrainConfig(bn="none")) == "LeNet (no BN, jax)"
    assert "bnref BN, d2l" in train.figure_title(train.TrainConfig())


def test_limits_cut_the_data(tiny_fashion_dir):
    data = train.load_data(train.TrainConfig(data_dir=str(tiny_fashion_dir), train_limit=100, test_limit=30))
    assert len(data.train_images) == 100 and len(data.test_labels) == 30


def test_batches_are_full_and_the_remainder_waits_for_the_next_shuffle():
    assert train.batch_slices(10, 4) == [(0, 4), (4, 4)]
    assert len(train.batch_slices(60000, 256)) == 234 and train.batch_slices(60000, 256)[-1] == (233 * 256, 256)
    assert train.batch_slices(3, 256) == [(0, 3)]  # fewer than a batch: all of them
    with pytest.raises(ValueError, match="at least 2 examples"):
        train.batch_slices(1, 256)
    for bad in (0, -4, 2.5, True):  # the step iterators take any batch_size: a clear error, not n // 0
        with pytest.raises(ValueError, match=rf"batch_size must be an int >= 1, got {bad!r}"):
            train.batch_slices(10, bad)


def test_epoch_permutation_is_seeded_per_epoch_and_a_permutation():
    a = train.epoch_permutation(0, 1, 100)
    np.testing.assert_array_equal(a, train.epoch_permutation(0, 1, 100))
    assert not np.array_equal(a, train.epoch_permutation(0, 2, 100))
    assert sorted(a) == list(range(100))


# --- precise BN in training ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "jax", "nnx"])
def test_precise_bn_reports_both_accuracies_and_trains_exactly_as_without(backend, tiny_fashion_dir, capsys):
    base = ["--backend", backend, "--data-dir", str(tiny_fashion_dir), "--epochs", "2", "--batch-size", "64",
            "--no-progress", "--lr", "0.5"]  # fmt: skip
    plain = train.main(base)
    capsys.readouterr()
    precise = train.main(base + ["--precise-bn", "--precise-batches", "4"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch ")]
    assert all("(precise; EMA " in l for l in lines) and len(lines) == 2
    for p, q in zip(precise, plain):
        assert p["step_losses"] == q["step_losses"]  # the running averages are put back: same training
        assert p["test_acc_ema"] == q["test_acc"] and p["test_acc"] == p["test_acc_precise"]
    # On this data the recomputed statistics beat the EMA after the first epoch (0.094 / 0.184 vs 1.0 seen).
    assert precise[0]["test_acc_precise"] > precise[0]["test_acc_ema"]


def test_precise_batch_indices_take_the_epochs_first_full_batches():
    config = train.TrainConfig(batch_size=4, precise_bn=True, precise_batches=2)
    perm = np.arange(10)[::-1]
    assert [list(i) for i in train.precise_batch_indices(config, perm)] == [[9, 8, 7, 6], [5, 4, 3, 2]]
    every = train.precise_batch_indices(train.TrainConfig(batch_size=4, precise_bn=True), perm)
    assert len(every) == 2  # full batches only, as training


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--precise-batches", "3"], "precise_batches needs precise_bn"),
        (["--precise-bn", "--bn", "none"], "--bn none has none"),
        (["--precise-bn", "--precise-variant", "ema"], "invalid choice: 'ema'"),
        (["--precise-bn", "--precise-batches", "0"], "must be"),
    ],
    ids=["batches-alone", "no-bn", "variant", "zero"],
)
def test_bad_precise_flags_fail_before_data_loads(argv, message, tmp_path, usage_error):
    err = usage_error(train.main, ["--backend", "torch", "--data-dir", str(tmp_path / "absent"), "--no-download",
                                   *argv]).err  # fmt: skip
    assert message in err


def test_more_precise_batches_than_the_data_has_is_a_data_error(tiny_fashion_dir, usage_error):
    err = usage_error(train.main, ["--backend", "torch", "--data-dir", str(tiny_fashion_dir), "--batch-size", "64",
                                   "--precise-bn", "--precise-batches", "9"]).err  # fmt: skip
    assert "--precise-batches 9: the training split has 8 batch(es) of 64" in err


def test_one_progress_bar_helper_is_off_unless_asked():
    from bnref import _progress

    items = [1, 2, 3]
    assert _progress.bar(items, "x", False) is items  # no tqdm at all when off
    from tqdm.auto import tqdm

    shown = _progress.bar(items, "epoch 1/1", True)  # a tqdm bar (itself silent when stderr is not a terminal)
    assert isinstance(shown, tqdm) and list(shown) == items
