"""python -m bnref.experiments: each experiment's --quick run writes its figure and its numbers."""

import json

import pytest

from bnref import data, experiments

#: the real Fashion-MNIST when present (as in CI), else the synthetic stand-in, asked for explicitly
DATA = ["--data-dir", str(data.find_data_dir())] if data.find_data_dir() is not None else ["--synthetic"]


def test_momentum_port_probe_finds_the_flipped_momentum_that_training_loss_hides(tmp_path, capsys):
    result = experiments.main(["momentum-port", "--quick", "--out", str(tmp_path), *DATA])
    saved = json.loads((tmp_path / "momentum-port.json").read_text())
    assert saved["experiment"] == "momentum-port" and saved["quick"] is True
    assert (tmp_path / "momentum-port.png").read_bytes()[:4] == b"\x89PNG"
    ratios = result["probe_ratio"]
    assert ratios["naive (momentum=0.1)"] == pytest.approx(9.0, rel=1e-3)  # 0.9 / 0.1: Flax keeps 0.1 of the old value
    assert ratios["fixed (momentum=0.9)"] == pytest.approx(1.0, rel=1e-3)
    assert result["max_train_loss_difference"] == 0.0  # training mode never reads the running statistics
    assert len(result["eval_acc"]["naive (momentum=0.1)"]) == len(result["eval_steps"]) > 1
    # Past the fixed port's EMA warm-up (its running statistics start at 0 / 1 and keep 0.9 of
    # them per step), the fix is ahead: at b02e4a9 the quick run stopped at 40 steps and its
    # figure showed the bug far ahead, the opposite of the full run's lesson.
    naive, fixed = (result["eval_acc"][k] for k in ("naive (momentum=0.1)", "fixed (momentum=0.9)"))
    assert result["eval_steps"][2] >= 50 and sum(fixed[2:]) >= sum(naive[2:]), (naive, fixed)
    assert "wrote" in capsys.readouterr().out


def test_unknown_experiment_and_unwritable_out_are_clear_errors(tmp_path, usage_error):
    assert "invalid choice" in usage_error(experiments.main, ["no-such", "--out", str(tmp_path)]).err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    usage_error(experiments.main, ["momentum-port", "--quick", "--out", str(blocker / "sub")])


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


@pytest.mark.parametrize("argv, message", [
    (["placement", "--backend", "jax"], "placement runs on torch only"),
    (["batch-size", "--backend", "torch"], "batch-size runs on jax only"),
    (["momentum-port", "--backend", "torch"], "momentum-port runs on torch and jax only"),
])  # fmt: skip
def test_a_backend_the_experiment_cannot_honour_is_a_clear_error(argv, message, tmp_path, usage_error):
    assert message in usage_error(experiments.main, [*argv, "--quick", "--out", str(tmp_path)]).err
    assert not list(tmp_path.iterdir())  # refused before any work


def _run(name, tmp_path, *argv):
    """``experiments.main`` on ``name --quick``; returns the numbers as written to NAME.json."""
    experiments.main([name, "--quick", "--out", str(tmp_path), *DATA, *argv])
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["experiment"] == name and saved["quick"] is True
    return saved


def test_bn_vs_none_bn_has_left_the_plateau_that_plain_lenet_sits_on(tmp_path, torch_one_thread):
    result = _run("bn-vs-none", tmp_path)
    assert result["backends"] == ["torch", "jax"]  # the default: both
    runs = result["runs"]
    assert set(runs) == {"torch, BN", "torch, no BN", "jax, BN", "jax, no BN"}
    for run in runs.values():
        assert [len(run[k]) for k in ("loss", "train_acc", "test_acc")] == [result["epochs"]] * 3
    for backend in ("torch", "jax"):
        # Sigmoid LeNet without BN stays at chance, loss ln(10) = 2.30, for its first hundreds
        # of steps (d2l's curves; real and synthetic data alike); with BN it has left it.
        assert runs[f"{backend}, no BN"]["loss"][-1] > 2.2
        assert runs[f"{backend}, BN"]["loss"][-1] < 1.5


def test_bn_vs_none_backend_flag_runs_that_backend_only(tmp_path, torch_one_thread):
    result = _run("bn-vs-none", tmp_path, "--backend", "torch")
    assert result["backends"] == ["torch"] and set(result["runs"]) == {"torch, BN", "torch, no BN"}


def test_batch_size_spends_one_budget_of_examples_at_every_batch_size(tmp_path):
    result = _run("batch-size", tmp_path)
    assert experiments.scaled_lr(4) == 1 / 64 and experiments.scaled_lr(256) == experiments.scaled_lr(512) == 1.0
    sizes = result["batch_sizes"]
    assert len(sizes) > 1 and result["lr"] == [experiments.scaled_lr(b) for b in sizes]
    for b in sizes:
        last = result["probes"][str(b)][-1]
        assert last["examples"] == result["budget_examples"] and last["step"] == result["budget_examples"] // b
        assert 0 <= last["acc_running"] <= 1 and 0 <= last["acc_precise"] <= 1
        for gap in ("running_var_rel_error", "running_mean_error"):
            assert set(last[gap]) == {"bn1", "bn2", "bn3", "bn4"} and all(0 <= v < 1e3 for v in last[gap].values())


def test_eval_stats_three_evaluations_and_the_ema_forgetting_its_start(tmp_path):
    result = _run("eval-stats", tmp_path)
    probes = result["probes"]
    assert [p["step"] for p in probes] == [8, 16, 24, 32]  # quick: 2 epochs of 16 steps, a probe every half epoch
    for p in probes:
        assert set(p["acc_batch"]) == {str(b) for b in result["eval_batch_sizes"]}
        assert all(0 <= a <= 1 for a in (p["acc_running"], p["acc_precise"], *p["acc_batch"].values()))
    # The running averages start at (0, 1) and keep 0.9^k of that after k steps: 43% at the
    # first probe, 3% at the last; every layer's running variance is nearer the population's.
    first, last = probes[0]["running_var_rel_error"], probes[-1]["running_var_rel_error"]
    assert all(last[layer] < first[layer] for layer in first)


def test_placement_bias_before_bn_gets_no_gradient_and_changes_nothing(tmp_path, torch_one_thread):
    result = _run("placement", tmp_path)
    assert set(result["runs"]) == {"bn-relu", "relu-bn", "bn-relu, no bias before BN"}
    grad = {name: {layer: g["max"] for layer, g in layers.items()} for name, layers in result["bias_grad_norm"].items()}
    before_bn = ("conv1", "conv2", "fc1", "fc2")
    assert max(grad["bn-relu"][layer] for layer in before_bn) < 1e-12  # float64: rounding only
    assert min(grad["relu-bn"][layer] for layer in before_bn) > 1e-3  # a ReLU between: a real gradient
    assert grad["bn-relu"]["fc3"] > 1e-3 and set(grad["bn-relu, no bias before BN"]) == {"fc3"}
    assert result["bias_vs_no_bias"]["max_step_loss_diff"] < 1e-12  # the same training, to rounding
    assert max(result["float32_bias_grad_norm"][layer] for layer in before_bn) < 1e-3  # float32's rounding


def test_sync_bn_trains_like_one_device_and_local_bn_does_not(tmp_path):
    from bnref.parity import REPLICA_TOLERANCE

    result = _run("sync-vs-local", tmp_path)
    assert result["backends"] == ["jax"] and result["replicas"] == 8
    for p in result["per_replica"]:
        runs = result["runs"]["jax"][str(p)]
        assert runs["sync BN"]["max_step_loss_diff"] < REPLICA_TOLERANCE["float32"]
        assert runs["local BN"]["max_step_loss_diff"] > 1e-2  # 4 examples per replica: other statistics
        assert len(runs["single device"]["test_acc"]) == result["epochs"]


@pytest.mark.parametrize("where", ["empty", "typo", "corrupt"])
def test_data_that_is_not_there_is_an_error_never_synthetic_data(where, tmp_path, usage_error, corrupt_fashion_dir):
    """On main at b02e4a9 an empty or mistyped --data-dir trained on synthetic data, exit 0, BN at
    100% test accuracy, and only the JSON said so."""
    d = corrupt_fashion_dir if where == "corrupt" else tmp_path / where
    if where == "empty":
        d.mkdir()
    out = tmp_path / "out"
    err = usage_error(experiments.main, ["bn-vs-none", "--quick", "--out", str(out), "--data-dir", str(d)]).err
    assert str(d) in err and "Traceback" not in err, err
    assert "--synthetic runs on the synthetic stand-in instead" in err
    assert not out.exists()  # nothing made, nothing written


def test_synthetic_data_is_explicit_and_the_figure_says_so(tmp_path, capsys):
    saved = _run_with(tmp_path, "momentum-port", "--synthetic")
    assert saved["data"].startswith("synthetic(") and "NOT Fashion-MNIST" in capsys.readouterr().out
    assert experiments._caption(saved).endswith("NOT Fashion-MNIST (--synthetic)")


def test_an_experiment_without_data_refuses_data_options(tmp_path, usage_error):
    err = usage_error(experiments.main, ["fast-variance", "--quick", "--out", str(tmp_path), "--synthetic"]).err
    assert "reads no data" in err


def _run_with(tmp_path, name, *argv):
    experiments.main([name, "--quick", "--out", str(tmp_path), *argv])
    return json.loads((tmp_path / f"{name}.json").read_text())


def _activations(tmp_path, backend):
    """``activations --quick`` on one backend (its four networks); the numbers as written."""
    result = _run("activations", tmp_path, "--backend", backend)
    assert result["backends"] == [backend]
    assert set(result["runs"]) == {f"{backend}, {act}, {bn}" for act in ("sigmoid", "relu") for bn in ("BN", "no BN")}
    assert "|z| > ln 19" in result["saturation"] and result["record_steps"][0] == 0
    return result


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_activations_bn_standardizes_every_layer_and_plain_lenet_loses_its_spread(backend, tmp_path, torch_one_thread):
    result = _activations(tmp_path, backend)
    runs, layers = result["runs"], result["layers"]
    for name, run in runs.items():
        probes = run["probes"]
        assert [p["step"] for p in probes] == result["record_steps"] and len(run["step_loss"]) == result["steps"]
        assert 0 <= run["test_acc"] <= 1 and set(run["histograms"]) == {str(s) for s in result["histogram_steps"]}
        for hist in run["histograms"].values():  # every value counted (the end bins take those beyond the edges)
            assert [sum(hist[layer]) for layer in layers] == [result["probe_examples"] * n for n in (3456, 1024, 120, 84)]
        if name.endswith(", BN"):
            # Training-mode BN: each channel at mean 0, std 1 over the probe batch (gamma 1, beta 0
            # at step 0: exactly, but for eps); later gamma and beta move it, but not far.
            for layer in layers:
                first = probes[0][layer]
                assert first["channel_mean_max_abs"] < 1e-4 and 0.99 < first["channel_std_min"] <= first["channel_std_max"] < 1.0001
                assert all(abs(p[layer]["percentiles"][3]) < 0.5 and 0.5 < p[layer]["std"] < 2 for p in probes), layer
    for act in ("sigmoid", "relu"):
        # Without BN the examples' differences fade layer by layer (per-channel std at fc2 two
        # orders of magnitude under BN's 1): the network's output barely depends on its input.
        plain = runs[f"{backend}, {act}, no BN"]["probes"][0]
        assert plain["fc2"]["channel_std_mean"] < 0.1 < plain["conv1"]["channel_std_mean"], plain
    bn_sig, bn_relu = runs[f"{backend}, sigmoid, BN"]["probes"][0], runs[f"{backend}, relu, BN"]["probes"][0]
    # N(0, 1) has 0.3% beyond ±2.94; measured 0.2-0.7% on Fashion-MNIST, up to 3.7% on the blocky synthetic images
    assert all(bn_sig[layer]["saturated"] < 0.05 for layer in layers)
    assert all(bn_relu[layer]["dead"] == 0 for layer in layers)  # mean 0, std 1: every channel has positive values
    assert "dead" in runs[f"{backend}, relu, no BN"]["probes"][-1]["fc2"]
    # Plain sigmoid LeNet sits on the plateau at ln 10 (bn-vs-none); with BN it has left it.
    assert runs[f"{backend}, sigmoid, no BN"]["epoch_loss"][-1] > 2.2 > 1.6 > runs[f"{backend}, sigmoid, BN"]["epoch_loss"][-1]


def test_activations_backend_it_cannot_use_is_one_line_saying_why(tmp_path, usage_error):
    err = usage_error(experiments.main, ["activations", "--backend", "nnx", "--quick", "--out", str(tmp_path)]).err
    last = err.strip().splitlines()[-1]  # argparse's usage lines, then the one error line
    assert last.startswith("python -m bnref.experiments: error: --backend nnx: activations runs on torch and jax only: ")
    assert "NNX" in last and "Traceback" not in err and not list(tmp_path.iterdir())


def test_lenet_activation_option_keeps_the_variables_and_names_a_bad_value():
    """``activation=`` (what ``activations`` trains with): the same variables whatever the choice,
    so every checkpoint and converter still fits; a bad value is a ValueError that names it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bnref.jax.models import LeNetBN as LinenLeNet
    from bnref.nnx.models import LeNetBN as NNXLeNet
    from bnref.torch.models import LeNetBN as TorchLeNet

    assert TorchLeNet(activation="relu").state_dict().keys() == TorchLeNet().state_dict().keys()
    x = jnp.zeros((1, 28, 28, 1))
    shapes = [jax.tree_util.tree_map(jnp.shape, LinenLeNet(activation=a).init(jax.random.key(0), x, train=False))
              for a in ("sigmoid", "relu")]  # fmt: skip
    assert shapes[0] == shapes[1]
    assert float(jnp.abs(NNXLeNet(rngs=nnx.Rngs(0), activation="relu")(x + 1, train=False)).sum()) > 0
    for make in (lambda: TorchLeNet(activation="tanh"), lambda: NNXLeNet(rngs=nnx.Rngs(0), activation="tanh"),
                 lambda: LinenLeNet(activation="tanh").init(jax.random.key(0), x, train=False)):  # fmt: skip
        with pytest.raises(ValueError, match="'tanh'"):
            make()
