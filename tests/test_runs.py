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
    resumed = train.main(["--resume", str(tmp_path / "split"), "--epochs", "3", "--no-progress", "--data-dir",
                          str(tiny_fashion_dir)])  # fmt: skip
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
    resumed = train.main(["--resume", str(out), "--no-progress", "--data-dir", str(tiny_fashion_dir)])
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
def test_bad_run_flags_fail_before_any_work(argv, message, tiny_fashion_dir, tmp_path, capsys, usage_error):
    run = tmp_path / "run"
    train.main(_cli("torch", tiny_fashion_dir, "--epochs", "1", "--out", str(run)))
    capsys.readouterr()
    before = sorted(os.listdir(run)), (run / "metrics.jsonl").read_bytes()
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    err = usage_error(train.main, argv if "--out" not in argv or "--resume" in argv
                      else _cli("torch", tiny_fashion_dir, *argv)).err  # fmt: skip
    assert message in err
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
    resumed = train.main(["--resume", str(tmp_path / "split"), "--epochs", "2", "--no-progress", "--data-dir",
                          str(real_fashion_dir)])  # fmt: skip
    _same_training(resumed, whole)


# --- what an adversarial pass found at b02e4a9 -----------------------------------------------------------


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory, tiny_fashion_dir):
    """A finished 1-epoch torch run at lr 0.5, seed 7, to resume against (copied per test)."""
    out = tmp_path_factory.mktemp("runs") / "torch-run"
    train.main(_cli("torch", tiny_fashion_dir, "--epochs", "1", "--seed", "7", "--out", str(out)))
    return out


@pytest.fixture
def run_copy(torch_run, tmp_path):
    import shutil

    return shutil.copytree(torch_run, tmp_path / "run")


def _state(run):
    return {name: (run / name).read_bytes() for name in sorted(os.listdir(run))}


@pytest.mark.parametrize("typed,message", [
    (["--lr", "1.0"], "lr was 0.5 in that run, not 1.0"),
    (["--seed", "0"], "seed was 7 in that run, not 0"),
    (["--backend", "jax"], "backend was 'torch' in that run, not 'jax'"),
    (["--batch-size", "256"], "batch_size was 64 in that run, not 256"),
], ids=["lr-default", "seed-default", "backend-default", "batch-default"])  # fmt: skip
def test_resume_compares_what_was_typed_even_when_it_is_the_default(typed, message, run_copy, tiny_fashion_dir,
                                                                    usage_error):
    """At b02e4a9 a flag typed with argparse's default value was dropped before the comparison: the
    run trained on with the saved values, exit 0."""
    before = _state(run_copy)
    err = usage_error(train.main, ["--resume", str(run_copy), "--epochs", "2", "--data-dir", str(tiny_fashion_dir),
                                   *typed]).err  # fmt: skip
    assert message in err
    assert _state(run_copy) == before


def test_a_checkpoint_from_another_run_is_refused(run_copy, tiny_fashion_dir, tmp_path, capsys, usage_error):
    other = tmp_path / "other"
    train.main(_cli("torch", tiny_fashion_dir, "--epochs", "1", "--seed", "7", "--out", str(other)))  # same config
    (run_copy / "checkpoint").write_bytes((other / "checkpoint").read_bytes())  # copied in
    capsys.readouterr()
    before = _state(run_copy)
    out, err = usage_error(train.main, ["--resume", str(run_copy), "--epochs", "2", "--data-dir",
                                        str(tiny_fashion_dir)])  # fmt: skip
    assert "belongs to another run" in err and "data:" not in out  # before any data loads
    assert _state(run_copy) == before


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "jax-checkpoint", "bn-changed", "not-json", "unknown-key"])
def test_a_checkpoint_or_config_that_cannot_resume_is_one_line_before_any_data_loads(damage, run_copy, tiny_fashion_dir,
                                                                                    usage_error):
    ck, cfg = run_copy / "checkpoint", run_copy / "config.json"
    saved = json.loads(cfg.read_text())
    if damage == "corrupt":
        ck.write_bytes(b"\x00" * 300)
    elif damage == "truncated":
        ck.write_bytes(ck.read_bytes()[:500])
    elif damage == "jax-checkpoint":
        from flax import serialization

        ck.write_bytes(serialization.msgpack_serialize({"epoch": 1, "state": {}, "history": "[]"}))
    elif damage == "bn-changed":
        saved["config"]["bn"] = "none"  # the checkpoint holds BN layers this config does not build
        cfg.write_text(json.dumps(saved))
    elif damage == "not-json":
        cfg.write_text('{"config": {"backend": "torch"')
    else:
        saved["config"]["colour"] = "red"
        cfg.write_text(json.dumps(saved))
    before = _state(run_copy)
    out, err = usage_error(train.main, ["--resume", str(run_copy), "--epochs", "2", "--data-dir", str(tiny_fashion_dir),
                                        "--no-progress"])  # fmt: skip
    expected = {"corrupt": "not a readable torch checkpoint", "truncated": "not a readable torch checkpoint",
                "jax-checkpoint": "not a readable torch checkpoint", "bn-changed": "does not fit this run's model",
                "not-json": "not readable as JSON", "unknown-key": "unknown config key(s) colour"}[damage]  # fmt: skip
    assert expected in err and "Traceback" not in err, err
    assert str(run_copy) in err.splitlines()[-1] and "data:" not in out
    assert _state(run_copy) == before


def test_a_run_directory_is_locked_while_a_process_trains_in_it(run_copy, tiny_fashion_dir, tmp_path, usage_error):
    """At b02e4a9 resuming a run that was still training interleaved both logs (epochs 1,2,3,5,4,6,...)."""
    holder = runs.RunDir.open(str(run_copy))
    holder.lock()  # another process's flock: a second open file description conflicts just the same
    try:
        before = _state(run_copy)
        err = usage_error(train.main, ["--resume", str(run_copy), "--epochs", "2", "--data-dir",
                                       str(tiny_fashion_dir)]).err  # fmt: skip
        assert "is in use: another process is training in it" in err
        assert _state(run_copy) == before
        # Two new runs racing for one --out: the second finds it taken (checked again under the lock).
        race = tmp_path / "race"
        race.mkdir()
        taken = runs.RunDir(str(race))
        taken.lock()
        err = usage_error(train.main, _cli("torch", tiny_fashion_dir, "--epochs", "1", "--out", str(race))).err
        assert "is in use" in err and os.listdir(race) == []
        taken.release()
    finally:
        holder.release()
    train.main(["--resume", str(run_copy), "--epochs", "2", "--data-dir", str(tiny_fashion_dir), "--no-progress"])
    assert [m["epoch"] for m in runs.read_metrics(str(run_copy))] == [1, 2]  # released: resumable again


@pytest.mark.parametrize("content", ["tf-checkpoint", "notes", "subdir"])
def test_out_refuses_a_directory_holding_files_bnref_did_not_write(content, tiny_fashion_dir, tmp_path, usage_error):
    """At b02e4a9 `--out DIR` without a config.json overwrote the user's `checkpoint` (TensorFlow's
    checkpoint index has that name), `metrics.jsonl`, `curves.png`."""
    d = tmp_path / "mine"
    d.mkdir()
    if content == "tf-checkpoint":
        (d / "checkpoint").write_text('model_checkpoint_path: "ckpt-12"\n')
    elif content == "notes":
        (d / "metrics.jsonl").write_text('{"mine": 1}\n')
    else:
        (d / "sub").mkdir()
    before = {p.name: p.read_bytes() if p.is_file() else None for p in d.iterdir()}
    out, err = usage_error(train.main, _cli("torch", tiny_fashion_dir, "--epochs", "1", "--out", str(d)))
    assert "is not empty" in err and "holds no bnref run" in err and "TrainConfig" not in out
    assert {p.name: p.read_bytes() if p.is_file() else None for p in d.iterdir()} == before


def test_out_that_is_a_file_is_refused_before_any_work(tiny_fashion_dir, tmp_path, usage_error):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        assert "not a directory" in usage_error(train.main, _cli("torch", tiny_fashion_dir, "--out", str(out))).err
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_in_an_unwritable_directory_is_refused_before_any_work(tiny_fashion_dir, tmp_path, usage_error):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = usage_error(train.main, _cli("torch", tiny_fashion_dir, "--out", str(locked / "run"))).err
    assert "is not writable" in err


def test_resume_takes_outputs_and_data_from_the_command_line_never_from_config_json(run_copy, tiny_fashion_dir, tmp_path,
                                                                                   usage_error):
    """A run directory someone sent: its config.json names a --plot, a --json and a data_dir
    elsewhere. At b02e4a9 resume wrote those files and trained on that data."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = run_copy / "config.json"
    saved = json.loads(cfg.read_text())
    saved["config"].update(plot=str(elsewhere / "p.png"), json=str(elsewhere / "m.json"))
    cfg.write_text(json.dumps(saved))
    train.main(["--resume", str(run_copy), "--epochs", "2", "--data-dir", str(tiny_fashion_dir), "--no-progress"])
    assert os.listdir(elsewhere) == []
    # The data: the command line's or the default search, and it must be what the run trained on.
    other = data_dir_with_other_data(tmp_path)
    err = usage_error(train.main, ["--resume", str(run_copy), "--epochs", "3", "--data-dir", str(other)]).err
    assert "that run trained on" in err and "pass --data-dir with the run's data" in err
    assert [m["epoch"] for m in runs.read_metrics(str(run_copy))] == [1, 2]


def data_dir_with_other_data(tmp_path):
    from bnref import data

    return data.write_fashion_mnist(tmp_path / "other-data", data.synthetic(512, 256, seed=9))


def test_config_json_records_the_device_used_not_auto(run_copy):
    saved = json.loads((run_copy / "config.json").read_text())
    assert saved["device"] == "cpu" and saved["config"]["device"] == "auto" and len(saved["run_id"]) == 32


@pytest.mark.parametrize("damage,message", [
    ("no-metrics", "metrics.jsonl: no such file"),
    ("no-test-acc", "metrics.jsonl: line 1 has no 'test_acc'"),
    ("half-written", "metrics.jsonl: line 2 is not valid JSON (the last line: half-written"),
], ids=["no-metrics", "no-test-acc", "half-written"])  # fmt: skip
def test_compare_names_the_file_and_line_of_a_damaged_run(damage, message, run_copy, tmp_path, usage_error):
    metrics = run_copy / "metrics.jsonl"
    if damage == "no-metrics":
        metrics.unlink()
    elif damage == "no-test-acc":
        metrics.write_text('{"epoch": 1, "loss": 0.5}\n')
    else:
        metrics.write_text(metrics.read_text() + '{"epoch": 2, "loss": 0.')
    err = usage_error(train.main, ["--compare", str(run_copy), "--plot", str(tmp_path / "c.png")]).err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "c.png").exists()


def test_a_jax_run_refuses_a_torch_checkpoint_and_another_layout(tiny_fashion_dir, tmp_path, capsys, usage_error):
    run = tmp_path / "jax-run"
    train.main(_cli("jax", tiny_fashion_dir, "--epochs", "1", "--out", str(run)))
    torch_run = tmp_path / "torch-run"
    train.main(_cli("torch", tiny_fashion_dir, "--epochs", "1", "--out", str(torch_run)))
    good = (run / "checkpoint").read_bytes()
    (run / "checkpoint").write_bytes((torch_run / "checkpoint").read_bytes())
    capsys.readouterr()
    resume = ["--resume", str(run), "--epochs", "2", "--data-dir", str(tiny_fashion_dir), "--no-progress"]
    assert "not a readable JAX checkpoint" in usage_error(train.main, resume).err
    (run / "checkpoint").write_bytes(good)
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["bn"] = "none"
    (run / "config.json").write_text(json.dumps(cfg))
    assert "does not fit this run's model (--bn none" in usage_error(train.main, resume).err
    cfg["config"]["bn"] = "bnref"
    (run / "config.json").write_text(json.dumps(cfg))
    train.main(resume)  # the real one resumes
    assert [m["epoch"] for m in runs.read_metrics(str(run))] == [1, 2]


def test_resuming_a_run_to_an_epoch_it_has_passed_is_an_error_not_a_silent_no_op(run_copy, tiny_fashion_dir,
                                                                                  usage_error):
    before = _state(run_copy)
    for epochs in (["--epochs", "1"], []):  # the run's own target (1) is reached too
        err = usage_error(train.main, ["--resume", str(run_copy), "--data-dir", str(tiny_fashion_dir), *epochs]).err
        assert "checkpoint is at epoch 1, so --epochs 1 leaves nothing to train" in err
    assert _state(run_copy) == before


def test_a_run_without_a_data_digest_resumes_and_says_its_data_is_not_checked(run_copy, tiny_fashion_dir, capsys):
    cfg = run_copy / "config.json"
    saved = json.loads(cfg.read_text())
    del saved["data_sha256"]  # as an older bnref wrote it
    cfg.write_text(json.dumps(saved))
    train.main(["--resume", str(run_copy), "--epochs", "2", "--data-dir", str(tiny_fashion_dir), "--no-progress"])
    assert "records no digest of its data" in capsys.readouterr().err
    assert [m["epoch"] for m in runs.read_metrics(str(run_copy))] == [1, 2]


@pytest.mark.parametrize("backend", ["torch", "jax", "nnx"])
def test_train_from_python_returns_the_metrics_and_the_model_that_earned_them(backend, tmp_path):
    """bnref.training.train: the run directory it writes, and its model evaluates to the last test accuracy."""
    from bnref import data
    from bnref.config import TrainConfig
    from bnref.training import load_trained, train as train_from_python

    ds = data.synthetic(n_train=256, n_test=128, seed=1)
    trained = train_from_python(TrainConfig(backend=backend, epochs=2, batch_size=64, progress=False), ds,
                                out=str(tmp_path / "run"))  # fmt: skip
    assert [m["epoch"] for m in trained.history] == [1, 2] and trained.run_dir == str(tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint", "config.json", "curves.png", "metrics.jsonl"]
    if backend == "torch":
        from bnref.torch.train import evaluate, load_tensors

        assert not trained.model.training and trained.variables is None
        acc = evaluate(trained.model, *load_tensors(ds.test_images, ds.test_labels, __import__("torch").device("cpu")))
    elif backend == "jax":
        import jax.numpy as jnp

        from bnref.jax.train import prepare_images

        assert sorted(trained.variables) == ["batch_stats", "params"]
        logits = trained.model.apply(trained.variables, jnp.asarray(prepare_images(ds.test_images)), train=False)
        acc = float(np.mean(np.asarray(logits).argmax(-1) == ds.test_labels))
    else:
        import jax.numpy as jnp

        from bnref.jax.train import prepare_images

        trained.model.eval()
        acc = float(np.mean(np.asarray(trained.model(jnp.asarray(prepare_images(ds.test_images)))).argmax(-1) == ds.test_labels))
    assert acc == pytest.approx(trained.history[-1]["test_acc"], abs=1e-12)
    again = load_trained(trained.run_dir)
    assert again.config == trained.config and [m["loss"] for m in again.history] == [m["loss"] for m in trained.history]


def test_train_from_python_refuses_a_used_directory_and_load_trained_an_unfinished_run(tmp_path):
    from bnref import data
    from bnref.config import TrainConfig
    from bnref.training import load_trained, train as train_from_python

    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("the user's")
    with pytest.raises(ValueError, match="is not empty"):
        train_from_python(TrainConfig(backend="torch", epochs=1, progress=False), data.synthetic(64, 32), out=str(used))
    assert sorted(os.listdir(used)) == ["mine.txt"] and (used / "mine.txt").read_text() == "the user's"
    with pytest.raises(ValueError, match="no such|not a"):
        load_trained(str(tmp_path / "nothing"))


def test_drawing_a_figure_leaves_matplotlib_s_backend_and_pyplot_alone(tmp_path):
    """A notebook that trained a run (curves.png) showed no figure after it: _io switched the
    process's backend to Agg. Checked in a fresh process whose backend is another one."""
    import subprocess
    import sys

    code = ("import matplotlib, matplotlib.pyplot as plt\nfrom bnref import _io\n"
            f"fig, ax = _io.new_figure(2)\nax[0].plot([1, 2])\n_io.save_figure(fig, {str(tmp_path / 'f.png')!r})\n"
            "print(matplotlib.get_backend(), plt.get_fignums())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MPLBACKEND": "svg"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "[]"]
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
