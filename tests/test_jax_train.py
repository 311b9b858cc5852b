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
