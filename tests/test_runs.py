"""Run directories: --out (config.json, metrics.jsonl, curves.png, checkpoint), --resume, --compare,
compile time apart from examples/sec, and a non-finite loss stopping the run."""

import json
import os

import numpy as np
import pytest

from bnref import runs, train

TIMING = (*train.TIMING_KEYS, "epochs")  # and the epoch target at the time


def _cli(backend, data_dir, *extra):
    return ["--backend", backend, "--data-dir", str(data_dir), "--batch-size", "64", "--lr", "0.5", "--no-progress",
            *extra]  # fmt: skip


def _same_training(a, b):
    """Two histories equal in everything but timings (and the epoch target at the time)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_run_directory_holds_config_metrics_curves_and_a_checkpoint(backend, tiny_fashion_dir, tmp_path):
    out = tmp_path / "run"
    history = train.main(_cli(backend, tiny_fashion_dir, "--epochs", "2", "--out", str(out)))
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json", "curves.png", "metrics.jsonl"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["backend"] == backend and saved["config"]["epochs"] == 2
    assert "--out" in saved["argv"] and saved["versions"]["bnref"] and saved["versions"][backend]
    lines = runs.read_metrics(str(out))
    assert [m["epoch"] for m in lines] == [1, 2]
    for key in ("loss", "train_acc", "test_acc", "examples_per_sec", "compile_seconds", "wall_seconds", "step_losses"):
        assert key in lines[0], key
    _same_training(lines, history)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if backend == "torch":
        import torch

        ck = torch.load(out / "checkpoint", weights_only=True)
        assert ck["epoch"] == 2 and "conv1.weight" in ck["model"] and len(ck["history"]) == 2
    else:
        assert lines[0]["compile_seconds"] > 0 and lines[1]["compile_seconds"] == 0  # compiled ahead, apart


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_resume_gives_the_uninterrupted_runs_numbers(backend, tiny_fashion_dir, tmp_path):
    whole = train.main(_cli(backend, tiny_fashion_dir, "--epochs", "3", "--out", str(tmp_path / "whole")))
    train.main(_cli(backend, tiny_fashion_dir, "--epochs", "1", "--out", str(tmp_path / "split")))
    resumed = train.main(["--resume", str(tmp_path / "split"), "--epochs", "3", "--no-progress"])
    _same_training(resumed, whole)  # bit-identical losses and accuracies, epochs 1-3
    _same_training(runs.read_metrics(str(tmp_path / "split")), whole)
    assert json.loads((tmp_path / "split" / "config.json").read_text())["config"]["epochs"] == 1  # as started


def test_a_kill_while_checkpointing_leaves_the_previous_checkpoint_and_resume_redoes_the_epoch(
    tiny_fashion_dir, tmp_path, monkeypatch
):
    from bnref import _io

    out = tmp_path / "run"
    whole = train.main(_cli("torch", tiny_fashion_dir, "--epochs", "2", "--out", str(tmp_path / "whole")))
    real = _io.atomic_write_bytes

    def killed_at_epoch_two(path, data):
        if str(path).endswith("checkpoint") and killed_at_epoch_two.calls == 1:
            with open(str(path) + ".partial", "wb") as f:  # what a dying writer leaves: half a file, elsewhere
                f.write(data[: len(data) // 2])
            raise KeyboardInterrupt
        killed_at_epoch_two.calls += str(path).endswith("checkpoint")
        return real(path, data)

    killed_at_epoch_two.calls = 0
    monkeypatch.setattr(_io, "atomic_write_bytes", killed_at_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train.main(_cli("torch", tiny_fashion_dir, "--epochs", "2", "--out", str(out)))
    monkeypatch.setattr(_io, "atomic_write_bytes", real)
    import torch

    assert torch.load(out / "checkpoint", weights_only=True)["epoch"] == 1  # the previous one, whole
    assert len(runs.read_metrics(str(out))) == 2  # epoch 2 was logged before the kill ...
    resumed = train.main(["--resume", str(out), "--no-progress"])
    _same_training(resumed, whole)  # ... and is trained again from epoch 1's checkpoint, once in the log
    _same_training(runs.read_metrics(str(out)), whole)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_non_finite_loss_stops_the_run_naming_epoch_and_step(backend, tiny_fashion_dir, tmp_path, monkeypatch, capsys):
    import bnref.train as shared

    real = shared.check_finite_loss

    def nan_at_epoch_two_step_three(epoch, losses):
        losses = list(losses)
        if epoch == 2:
            losses[2] = float("nan")
        return real(epoch, losses)

    module = __import__(f"bnref.{backend}.train", fromlist=["x"])
    monkeypatch.setattr(module, "check_finite_loss", nan_at_epoch_two_step_three)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(_cli(backend, tiny_fashion_dir, "--epochs", "3", "--out", str(out)))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "epoch 2, step 3: the training loss is nan" in err
    assert [m["epoch"] for m in runs.read_metrics(str(out))] == [1]  # nothing of epoch 2 is kept


def test_check_finite_loss():
    train.check_finite_loss(1, [2.3, 1.0])
    with pytest.raises(train.NonFiniteLoss, match="epoch 4, step 2: the training loss is inf"):
        train.check_finite_loss(4, [2.3, float("inf"), float("nan")])


def test_compare_draws_several_runs_in_one_figure(tiny_fashion_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(_cli("torch", tiny_fashion_dir, "--epochs", "1", "--out", str(a)))
    train.main(_cli("torch", tiny_fashion_dir, "--epochs", "1", "--bn", "none", "--out", str(b)))
    figure = tmp_path / "both.png"
    assert train.main(["--compare", str(a), str(b), "--plot", str(figure)]) == []
    assert figure.read_bytes()[:4] == b"\x89PNG" and f"wrote {figure} (2 runs)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--compare", "{tmp}/nothing"], "is not a run directory"),
        (["--resume", "{tmp}/nothing"], "is not a run directory"),
        (["--resume", "{run}", "--lr", "0.1"], "lr was 0.5 in that run, not 0.1"),
        (["--resume", "{run}", "--out", "{tmp}/x"], "takes no --out"),
        (["--out", "{run}"], "already holds a run; resume it with --resume"),
    ],
    ids=["compare-not-a-run", "resume-not-a-run", "resume-other-lr", "resume-and-out", "out-exists"],
)
def test_bad_run_flags_fail_before_any_work(argv, message, tiny_fashion_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(_cli("torch", tiny_fashion_dir, "--epochs", "1", "--out", str(run)))
    capsys.readouterr()
    before = sorted(os.listdir(run)), (run / "metrics.jsonl").read_bytes()
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    with pytest.raises(SystemExit) as e:
        train.main(argv if "--out" not in argv or "--resume" in argv else _cli("torch", tiny_fashion_dir, *argv))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert (sorted(os.listdir(run)), (run / "metrics.jsonl").read_bytes()) == before


def test_default_run_directory_is_named_after_backend_and_bn_and_always_new(monkeypatch, tmp_path):
    monkeypatch.setenv(runs.RUNS_DIR_ENV, str(tmp_path / "runs"))
    config = train.TrainConfig(backend="jax", bn="builtin")
    paths = [runs.default_run_dir(config) for _ in range(3)]  # within the same second, most likely
    assert len(set(paths)) == 3 and all(os.path.isdir(p) and not os.listdir(p) for p in paths)
    for path in paths:
        assert os.path.dirname(path) == str(tmp_path / "runs") and os.path.basename(path).startswith("jax-builtin-")
        assert np.all([c.isdigit() or c == "-" for c in os.path.basename(path)[len("jax-builtin-"):]])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_resume_on_the_real_data_gives_the_uninterrupted_runs_numbers(backend, real_fashion_dir, tmp_path):
    """Fashion-MNIST, the first 6000 training and 2000 test examples, default lr and batch: 2
    epochs straight vs 1 epoch, then --resume to 2."""
    args = ["--backend", backend, "--data-dir", str(real_fashion_dir), "--train-limit", "6000", "--test-limit", "2000",
            "--no-progress"]  # fmt: skip
    whole = train.main([*args, "--epochs", "2", "--out", str(tmp_path / "whole")])
    train.main([*args, "--epochs", "1", "--out", str(tmp_path / "split")])
    _same_training(train.main(["--resume", str(tmp_path / "split"), "--epochs", "2", "--no-progress"]), whole)
