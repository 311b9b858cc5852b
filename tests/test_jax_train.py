"""JAX training: the shared CLI end to end, the reusable train-state pieces, the benchmark."""

import re
import time

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from bnref import train as cli
from bnref.jax import bench
from bnref.jax import train as jtrain

EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+): loss (\d+\.\d{3}), train acc (\d\.\d{3}), test acc (\d\.\d{3}), "
    r"(\d+\.\d) examples/sec on cpu$"
)


def _run_cli(data_dir, *extra):
    return cli.main(
        ["--backend", "jax", "--data-dir", str(data_dir), "--epochs", "2", "--batch-size", "64", "--no-progress", *extra]
    )


def _deterministic(history):
    from bnref.train import TIMING_KEYS

    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]


def test_cli_trains_and_prints_d2l_lines(tiny_fashion_dir, capsys):
    history = _run_cli(tiny_fashion_dir)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2
    for i, line in enumerate(lines, start=1):
        m = EPOCH_LINE.match(line)
        assert m, line
        assert (int(m[1]), int(m[2])) == (i, 2)
    assert history[-1]["train_acc"] > 0.3 and history[-1]["test_acc"] > 0.3  # chance: 0.1
    assert history[-1]["loss"] < history[0]["loss"]
    again = _run_cli(tiny_fashion_dir)  # same seed, same data -> the same curve
    assert _deterministic(again) == _deterministic(history)


@pytest.mark.parametrize("bn", ["builtin", "none"])
def test_cli_other_bn_choices_run(tiny_fashion_dir, bn):
    history = _run_cli(tiny_fashion_dir, "--bn", bn, "--epochs", "1", "--train-limit", "200")
    assert len(history) == 1 and np.isfinite(history[0]["loss"])




def test_train_step_updates_stats_eval_step_does_not():
    model = jtrain.LeNetBN()
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.random((32, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 32), jnp.int32)
    state = jtrain.create_train_state(model, jax.random.key(0), 0.1, X[:1])
    np.testing.assert_array_equal(state.batch_stats["bn1"]["mean"], np.zeros(6))  # init: untouched
    logits = jtrain.eval_step(state, X)
    assert logits.shape == (32, 10)
    before = jax.tree.map(np.asarray, state.batch_stats)
    state, loss, correct = jtrain.train_step(state, X, y)
    assert state.step == 1 and np.isfinite(float(loss)) and 0 <= int(correct) <= 32
    assert not np.array_equal(np.asarray(state.batch_stats["bn1"]["mean"]), before["bn1"]["mean"])


def test_resolve_device():
    assert jtrain.resolve_device("cpu").platform == "cpu"
    assert jtrain.device_name(jtrain.resolve_device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        jtrain.resolve_device("tpu-ish")


def test_bench_runs_end_to_end(capsys):
    from bnref import bench as dispatcher  # the command; bnref.jax.bench is the backend's part

    assert dispatcher.main(["--backend", "jax", "--steps", "2", "--rounds", "1", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ratio bnref BN / flax BN: \d+\.\d{3}", out, re.M), out
    assert re.search(r"^ratio bnref loop / flax-examples loop: \d+\.\d{3}", out, re.M), out
    assert "peak device memory, all variants together (JAX keeps one peak per device): not reported by the cpu backend" in out
    assert re.search(r"^ratio fastest float32 variant of bnref's loop \(.+\) / flax-examples loop: \d+\.\d{3} "
                     r"\(target >= 1.2: (met|NOT met)\)$", out, re.M), out  # fmt: skip
    assert re.search(r"^distance to the limit: 1.69 MFLOP per training example", out, re.M), out
    for name in bench.VARIANTS:
        assert re.search(rf"{re.escape(name)}: +\d+\.\d examples/sec", out), out


@pytest.mark.slow
def test_real_fashion_mnist_reaches_80_percent(real_fashion_dir):
    # d2l defaults (lr 1.0, batch 256), seed 0, measured on the 2-core CPU (~13 s an epoch):
    # test acc 0.742, 0.832, 0.853 after epochs 1-3. At lr 1.0 eval accuracy swings by a few
    # points from one epoch to the next (the running statistics, decay 0.9, trail weights
    # that move fast; seed 1 read 0.810 after epoch 2, torch's seed 1 0.734), so the test asks
    # that the run reaches 0.80 within 3 epochs and that training accuracy is there too.
    t0 = time.perf_counter()
    history = cli.main(["--backend", "jax", "--data-dir", str(real_fashion_dir), "--epochs", "3", "--no-progress"])
    print(f"3 epochs on Fashion-MNIST in {time.perf_counter() - t0:.1f} s: {history}")
    assert max(m["test_acc"] for m in history) >= 0.80, history
    assert history[-1]["train_acc"] >= 0.80, history


def test_train_steps_is_fit_s_loop_one_step_per_batch_in_the_schedule_s_order():
    """The step iterator (what fit, the experiments and the benchmark run): one Step per batch,
    numbered within each epoch, over the examples of epoch_permutation(seed, epoch), in the full
    batches of batch_slices, with the epoch's totals on the device; the same states as
    train_step on those batches by hand."""
    import itertools

    from bnref.jax.models import LeNetBN
    from bnref.schedule import batch_slices, epoch_permutation

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8), rng.integers(0, 10, 100).astype(np.int32)
    X, y = jnp.asarray(jtrain.prepare_images(images)), jnp.asarray(labels)
    make = lambda: jtrain.create_train_state(LeNetBN(), jax.random.key(0), 0.1, X[:1])  # noqa: E731
    steps, params = [], []
    for s in itertools.islice(jtrain.train_steps(make(), X, y, seed=3, batch_size=32, epochs=itertools.count(1)), 5):
        steps.append((s.epoch, s.step, s.steps, float(s.loss), np.asarray(s.totals), np.asarray(s.perm)))
        params.append(jax.tree.map(np.asarray, s.state.params))  # before the next step donates the state
    assert [t[:3] for t in steps] == [(1, 1, 3), (1, 2, 3), (1, 3, 3), (2, 1, 3), (2, 2, 3)]
    np.testing.assert_array_equal(steps[3][5], epoch_permutation(3, 2, 100))
    state, losses = make(), []
    for epoch, (start, size) in [(1, b) for b in batch_slices(100, 32)] + [(2, b) for b in batch_slices(100, 32)[:2]]:
        idx = epoch_permutation(3, epoch, 100)[start : start + size]
        state, loss, _ = jtrain.train_step(state, X[idx], y[idx])
        losses.append(float(loss))
    np.testing.assert_allclose([t[3] for t in steps], losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params[-1],
                 jax.tree.map(np.asarray, state.params))  # fmt: skip
    # totals: the epoch's loss sum and number correct so far, restarting each epoch
    assert steps[2][4][0] == pytest.approx(32 * sum(t[3] for t in steps[:3]), rel=1e-5)
    assert steps[3][4][0] == pytest.approx(32 * steps[3][3], rel=1e-5)


# --- issue 18: several steps per compiled call, bfloat16, TF32 ------------------------------------


def _fused_run(steps_per_call, epochs=(1, 2), n=300, batch_size=32):
    """Losses of every step and the final weights/statistics of train_steps at K steps per call."""
    from bnref.config import TrainConfig

    rng = np.random.default_rng(0)
    X = jnp.asarray(jtrain.prepare_images(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
    y = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
    state = jtrain.create_train_state(jtrain.make_model(TrainConfig()), jax.random.key(0), 0.5, X[:1])
    losses, numbering, calls = [], [], []
    for s in jtrain.train_steps(state, X, y, seed=0, batch_size=batch_size, epochs=epochs, steps_per_call=steps_per_call):
        losses.append(float(s.loss))
        numbering.append((s.epoch, s.step, s.steps, s.index))
        if s.ends_call:
            calls.append(int(s.call_losses.shape[0]))
            final = jax.tree.map(np.asarray, (s.state.params, s.state.batch_stats))
    return losses, numbering, calls, final


@pytest.mark.parametrize("k", [2, 4, 9])
def test_k_steps_per_call_are_bit_identical_to_one_step_per_call(k):
    """K steps in one lax.scan call: every step's loss and the final weights and statistics equal
    one step per call bit for bit, the epoch's steps numbered as before, in calls of K steps and a
    shorter last call (9 batches an epoch)."""
    ref_losses, ref_numbering, ref_calls, ref_final = _fused_run(1)
    losses, numbering, calls, final = _fused_run(k)
    assert [t[:3] for t in numbering] == [t[:3] for t in ref_numbering] and len(losses) == 18
    assert ref_calls == [1] * 18
    per_epoch = [k] * (9 // k) + ([9 % k] if 9 % k else [])
    assert calls == per_epoch * 2
    assert [t[3] for t in numbering[:9]] == [j for c in per_epoch for j in range(c)]
    assert losses == ref_losses
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ref_final)):
        np.testing.assert_array_equal(a, b)


def test_with_lax_s_own_convolution_a_scanned_step_rounds_differently():
    """Why LeNet-BN's convolutions take their gradients from bnref.jax.conv: with lax's own, one
    step inside a scan differs from the same step jitted alone (measured 1.2e-7 on the CPU,
    jaxlib 0.10.2), with bnref.jax.conv's it does not, and the two convolutions agree exactly."""
    from bnref.jax.models import LeNetBN

    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.random((64, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 64), jnp.int32)

    def scanned(state):
        return jax.lax.scan(lambda s, _: (jtrain._loss_and_updates(s, X, y)[0], None), state, None, length=1)[0]

    def after(model, step):
        state = jtrain.create_train_state(model, jax.random.key(0), 0.5, X[:1])
        return [np.asarray(a) for a in jax.tree.leaves(jax.jit(step)(state).params)]

    plain = lambda s: jtrain._loss_and_updates(s, X, y)[0]  # noqa: E731
    ours, lax_own = LeNetBN(), LeNetBN(canonical_conv_grads=False)
    for a, b in zip(after(ours, plain), after(ours, scanned)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(after(ours, plain), after(lax_own, plain)):
        np.testing.assert_array_equal(a, b)  # the same numbers as lax's at the top level
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(after(lax_own, plain), after(lax_own, scanned)))
    if worst == 0.0:
        pytest.skip("this XLA compiles lax's convolution gradients alike inside a scan: the workaround is moot here")
    assert worst < 1e-5


def test_a_fused_run_that_skipped_a_step_would_fail_the_comparison():
    """The bit-identity test can fail: the same run one step short differs."""
    ref = _fused_run(1)[3]
    short = _fused_run(4, n=268)[3]  # 8 batches an epoch instead of 9
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(ref)))


def test_steps_per_call_defaults_per_platform_and_is_capped_by_the_epoch():
    cpu = jtrain.resolve_device("cpu")
    assert jtrain.resolve_steps_per_call(None, cpu, 234) == jtrain.DEFAULT_STEPS_PER_CALL["cpu"] == 1
    assert jtrain.resolve_steps_per_call(500, cpu, 234) == 234 and jtrain.resolve_steps_per_call(8, cpu, 234) == 8

    class Gpu:
        platform = "gpu"

    assert jtrain.resolve_steps_per_call(None, Gpu(), 234) == 234  # the whole epoch in one call
    with pytest.raises(ValueError, match="steps_per_call must be an int >= 1"):
        next(jtrain.train_steps(None, jnp.zeros((64, 28, 28, 1)), jnp.zeros(64, jnp.int32), seed=0, batch_size=32,
                                epochs=(1,), steps_per_call=0))  # fmt: skip


def test_cli_steps_per_call_trains_checkpoints_and_resumes(tiny_fashion_dir, tmp_path):
    """--steps-per-call 3 through the CLI: the same curve as one step per call, bit for bit, and a
    run directory whose resume continues it exactly (the run's own K, from its config)."""
    args = ["--train-limit", "256", "--test-limit", "128", "--batch-size", "32"]
    one = _run_cli(tiny_fashion_dir, *args, "--no-out")
    fused = _run_cli(tiny_fashion_dir, *args, "--steps-per-call", "3", "--out", str(tmp_path / "run"))
    assert [m["step_losses"] for m in fused] == [m["step_losses"] for m in one]
    assert len(fused[0]["step_losses"]) == 8
    part = _run_cli(tiny_fashion_dir, *args, "--steps-per-call", "3", "--epochs", "1", "--out", str(tmp_path / "part"))
    resumed = cli.main(["--resume", str(tmp_path / "part"), "--epochs", "2", "--no-progress", "--data-dir", str(tiny_fashion_dir)])
    drop = lambda h: [{k: v for k, v in m.items() if k != "epochs"} for m in _deterministic(h)]  # noqa: E731
    assert drop(resumed) == drop(fused) and drop(part) == drop(fused[:1])


def test_steps_per_call_is_refused_with_one_line_where_it_cannot_apply(usage_error, tiny_fashion_dir):
    for extra, message in ((["--backend", "torch"], "the torch backend takes one step per call"),
                           (["--replicas", "2"], "steps_per_call is for one device")):  # fmt: skip
        err = usage_error(cli.main, ["--data-dir", str(tiny_fashion_dir), "--steps-per-call", "2", *extra]).err
        assert message in err and len(err.strip().splitlines()[-1]) > 20


def test_bfloat16_computes_in_bfloat16_and_keeps_parameters_and_statistics_in_float32():
    from bnref.config import TrainConfig

    model = jtrain.make_model(TrainConfig(precision="bfloat16"))
    X = jnp.asarray(np.random.default_rng(0).random((16, 28, 28, 1)), jnp.float32)
    state = jtrain.create_train_state(model, jax.random.key(0), 0.1, X[:1])
    logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, X, train=True,
                               mutable=["batch_stats"])  # fmt: skip
    assert logits.dtype == jnp.bfloat16
    state, loss, _ = jtrain.train_step(state, X, jnp.zeros(16, jnp.int32))
    assert loss.dtype == jnp.float32
    dtypes = {a.dtype for a in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
              if jnp.issubdtype(a.dtype, jnp.floating)}  # fmt: skip
    assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_bfloat16_trains_to_within_003_of_float32(real_fashion_dir):
    """--precision bfloat16 on a short real run: test accuracy within 0.03 of float32's. lr 0.3: at
    d2l's lr 1.0 two epochs' test accuracy swings by ~0.05 from the running statistics alone
    (measured: float32 0.744, bfloat16 0.697 with equal train accuracy 0.744/0.745); at 0.3,
    3 epochs: float32 0.799, bfloat16 0.801."""
    args = ["--data-dir", str(real_fashion_dir), "--epochs", "3", "--train-limit", "12800", "--test-limit", "2000",
            "--lr", "0.3", "--no-progress", "--no-out", "--backend", "jax"]  # fmt: skip
    f32 = cli.main(args)
    bf16 = cli.main([*args, "--precision", "bfloat16"])
    print(f"float32 {[m['test_acc'] for m in f32]}, bfloat16 {[m['test_acc'] for m in bf16]}")
    assert f32[-1]["test_acc"] > 0.6
    assert abs(bf16[-1]["test_acc"] - f32[-1]["test_acc"]) <= 0.03, (f32, bf16)
    assert bf16[-1]["loss"] != f32[-1]["loss"]  # it did train in bfloat16


def test_matmul_precision_is_float32_unless_tf32_is_asked():
    with jtrain.matmul_precision(False):
        assert jax.config.jax_default_matmul_precision == "float32"
    with jtrain.matmul_precision(True):
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"
