"""python -m bnref.experiments: each experiment's --quick run writes its figure and its numbers."""

import json

import pytest

from bnref import experiments


def test_momentum_port_probe_finds_the_flipped_momentum_that_training_loss_hides(tmp_path, capsys):
    result = experiments.main(["momentum-port", "--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "momentum-port.json").read_text())
    assert saved["experiment"] == "momentum-port" and saved["quick"] is True
    assert (tmp_path / "momentum-port.png").read_bytes()[:4] == b"\x89PNG"
    ratios = result["probe_ratio"]
    assert ratios["naive (momentum=0.1)"] == pytest.approx(9.0, rel=1e-3)  # 0.9 / 0.1: Flax keeps 0.1 of the old value
    assert ratios["fixed (momentum=0.9)"] == pytest.approx(1.0, rel=1e-3)
    assert result["max_train_loss_difference"] == 0.0  # training mode never reads the running statistics
    assert len(result["eval_acc"]["naive (momentum=0.1)"]) == len(result["eval_steps"]) > 1
    assert "wrote" in capsys.readouterr().out


def test_unknown_experiment_and_unwritable_out_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        experiments.main(["no-such", "--out", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        experiments.main(["momentum-port", "--quick", "--out", str(blocker / "sub")])
    assert e.value.code == 2


def test_fast_variance_collapses_where_two_pass_does_not(tmp_path):
    result = experiments.main(["fast-variance", "--quick", "--out", str(tmp_path)])
    assert (tmp_path / "fast-variance.png").exists() and (tmp_path / "fast-variance.json").exists()
    err = result["max_error"]
    ratios = result["ratios"]
    at = ratios.index(1e4)  # input mean 1e4 x its std, float32
    assert err["flax.linen (fast variance, default), float32"][at] > 1.0  # E[x^2] - E[x]^2 has cancelled
    assert err["bnref.jax (two-pass), float32"][at] < 1e-2
    assert err["flax.linen (use_fast_variance=False), float32"] == pytest.approx(err["bnref.jax (two-pass), float32"], abs=1e-6)
    assert max(err["bnref.jax (two-pass), float32"][:2]) < 1e-5 and max(err["bnref.jax (two-pass), bfloat16"]) < 0.05
