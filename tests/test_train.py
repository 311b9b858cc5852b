"""The shared training CLI: config validation, the d2l-style line, --plot and --json."""

import json

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
    "epochs": ({"epochs": 0}, "epochs must be >= 1"),
    "batch_size": ({"batch_size": 0}, "batch_size must be >= 1"),
    "lr": ({"lr": 0.0}, "lr must be > 0"),
    "train_limit": ({"train_limit": 0}, "train_limit must be >= 1"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_is_rejected_with_its_name(name):
    kwargs, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**kwargs)


def test_cli_reports_bad_values_and_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--backend", "torch", "--lr", "-1"])
    assert e.value.code == 2
    assert "lr must be > 0" in capsys.readouterr().err


def test_plot_and_json_are_written(tiny_fashion_dir, tmp_path, capsys):
    plot, record = tmp_path / "curves.png", tmp_path / "metrics.json"
    history = train.main(["--backend", "torch", "--data-dir", str(tiny_fashion_dir), "--epochs", "2",
                          "--batch-size", "64", "--no-progress", "--plot", str(plot), "--json", str(record)])  # fmt: skip
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(record.read_text())
    assert saved["config"]["backend"] == "torch" and saved["history"] == history
    assert capsys.readouterr().out.startswith("TrainConfig(backend='torch'")


def test_limits_cut_the_data(tiny_fashion_dir):
    data = train.load_data(train.TrainConfig(data_dir=str(tiny_fashion_dir), train_limit=100, test_limit=30))
    assert len(data.train_images) == 100 and len(data.test_labels) == 30


def test_batches_are_full_and_the_remainder_waits_for_the_next_shuffle():
    assert train.batch_slices(10, 4) == [(0, 4), (4, 4)]
    assert len(train.batch_slices(60000, 256)) == 234 and train.batch_slices(60000, 256)[-1] == (233 * 256, 256)
    assert train.batch_slices(3, 256) == [(0, 3)]  # fewer than a batch: all of them
    with pytest.raises(ValueError, match="at least 2 examples"):
        train.batch_slices(1, 256)


def test_epoch_permutation_is_seeded_per_epoch_and_a_permutation():
    a = train.epoch_permutation(0, 1, 100)
    np.testing.assert_array_equal(a, train.epoch_permutation(0, 1, 100))
    assert not np.array_equal(a, train.epoch_permutation(0, 2, 100))
    assert sorted(a) == list(range(100))
