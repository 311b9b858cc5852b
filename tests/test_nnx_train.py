"""``--backend nnx``: LeNet-BN in Flax NNX trained by the JAX backend's loop (bnref.nnx.train) and by
NNX's own ``nnx.jit`` / ``nnx.Optimizer`` step, against ``--backend jax`` from the same seed: the
same initial weights, example order and, step for step, the same losses; the CLI's run directory,
checkpoint and exact resume; steps per call; bfloat16; synchronized replicas over a device mesh;
the run a diagnose loads."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import limit
from flax import nnx

from bnref import train as cli
from bnref.config import TrainConfig
from bnref.data import synthetic
from bnref.jax import train as jtrain
from bnref.nnx import train as ntrain
from bnref.nnx.models import LeNetBN
from bnref.nnx.variables import linen_variables, load_linen
from bnref.schedule import batch_slices, epoch_permutation

pytestmark = pytest.mark.usefixtures("hard_limit")


@pytest.fixture(scope="module")
def data():
    return synthetic(512, 256, seed=4)


def _config(**kw):
    return TrainConfig(**{"backend": "nnx", "epochs": 2, "batch_size": 64, "lr": 0.5, "progress": False, **kw})


def _losses(history):
    return [m["step_losses"] for m in history]


@pytest.mark.parametrize("bn", ["bnref", "builtin", "none"])
def test_nnx_follows_the_jax_backend_step_for_step(bn, data):
    """The same network, initial weights and example order: linen's and NNX's runs agree to the bit
    on a CPU (the NNX model's arithmetic is linen's, op for op)."""
    epochs = 2 if bn == "bnref" else 1
    nnx_run = ntrain.fit(_config(bn=bn, epochs=epochs), data, lambda m: None)
    jax_run = jtrain.fit(_config(backend="jax", bn=bn, epochs=epochs), data, lambda m: None)
    assert _losses(nnx_run) == _losses(jax_run)
    assert [m["test_acc"] for m in nnx_run] == [m["test_acc"] for m in jax_run]
    assert len(nnx_run) == epochs and len(nnx_run[0]["step_losses"]) == 8


def test_a_different_seed_is_a_different_trajectory(data):
    a = ntrain.fit(_config(epochs=1), data, lambda m: None)
    b = ntrain.fit(_config(epochs=1, seed=1), data, lambda m: None)
    assert _losses(a) != _losses(b)


def test_the_initial_model_holds_linen_s_initial_weights_for_the_seed():
    config = _config(seed=3)
    model = ntrain.initial_model(config)
    linen = jtrain.make_model(config).init(jax.random.key(3), jnp.zeros((1, 28, 28, 1)), train=False)
    chex = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), linen_variables(model), dict(linen))
    assert all(jax.tree.leaves(chex)) and len(jax.tree.leaves(chex)) == 26  # 5 layers x 2 + 4 BN x (2 params + 2 stats)


def test_nnx_s_own_step_equals_the_backend_s_loop(data):
    """bnref.nnx.train.train_step (nnx.jit over an nnx.Optimizer, the model in train() mode) on the
    batches fit takes: fit's losses, and its weights and statistics after the epoch."""
    config = _config(epochs=1)
    history = ntrain.fit(config, data, lambda m: None)
    model = ntrain.initial_model(config)
    optimizer = ntrain.optimizer_for(model, config.lr)
    model.train()
    X = jtrain.prepare_images(data.train_images)
    y = np.asarray(data.train_labels, np.int32)
    perm = epoch_permutation(config.seed, 1, len(y))
    losses = []
    for start, size in batch_slices(len(y), config.batch_size):
        idx = perm[start:start + size]
        loss, _ = ntrain.train_step(model, optimizer, jnp.asarray(X[idx]), jnp.asarray(y[idx]))
        losses.append(float(loss))
    np.testing.assert_allclose(losses, history[0]["step_losses"], rtol=1e-6, atol=1e-7)
    model.eval()
    logits = ntrain.eval_step(model, jnp.asarray(jtrain.prepare_images(data.test_images)))
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(data.test_labels)))
    assert abs(acc - history[0]["test_acc"]) <= 2 / len(data.test_labels)
    assert model.bn1.use_running_average is True  # eval() reached the BN layers


def test_linen_face_returns_the_updated_statistics_and_changes_nothing_it_was_given():
    face = ntrain.make_model(_config())
    x = jnp.asarray(np.random.default_rng(0).random((8, 28, 28, 1)), jnp.float32)
    variables = face.init(jax.random.key(0), x[:1])
    before = jax.tree.map(np.asarray, variables)
    logits, updates = face.apply(variables, x, train=True, mutable=["batch_stats"])
    linen_logits, linen_updates = jtrain.make_model(_config()).apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(linen_logits))
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], dict(linen_updates["batch_stats"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), before)
    assert not np.array_equal(updates["batch_stats"]["bn1"]["mean"], before["batch_stats"]["bn1"]["mean"])
    np.testing.assert_array_equal(np.asarray(face.apply(variables, x, train=False)),
                                  np.asarray(jtrain.make_model(_config()).apply(variables, x, train=False)))  # fmt: skip


def test_load_linen_refuses_variables_of_another_model_naming_the_path_and_changes_nothing():
    model = LeNetBN(rngs=nnx.Rngs(0))
    good = linen_variables(model)
    before = jax.tree.map(np.asarray, good)
    wrong = jax.tree.map(lambda a: a, good)
    wrong["params"]["fc1"]["kernel"] = jnp.zeros((10, 120))
    with pytest.raises(ValueError, match=r"params/fc1/kernel: shape \(10, 120\) in the linen variables, \(256, 120\)"):
        load_linen(model, wrong)
    missing = {"params": {k: v for k, v in good["params"].items() if k != "conv2"}, "batch_stats": good["batch_stats"]}
    with pytest.raises(ValueError, match="params/conv2/bias: the NNX model has it, the linen variables do not"):
        load_linen(model, missing)
    with pytest.raises(ValueError, match=r"collections \['cache'\]"):
        load_linen(model, {**good, "cache": {}})
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, linen_variables(model)), before)


@pytest.mark.parametrize("k", [3])
def test_steps_per_call_are_bit_identical_to_one_step_per_call(k, data):
    """K steps in one lax.scan call: bit for bit one step per call, as linen's (nnx.Conv's
    out_sharding=None once sent its convolution to lax's, which rounds differently in a scan)."""
    one = ntrain.fit(_config(), data, lambda m: None)
    fused = ntrain.fit(_config(steps_per_call=k), data, lambda m: None)
    assert _losses(fused) == _losses(one)


def test_bfloat16_trains_in_bfloat16_with_float32_state_and_stays_near_linen_s(data):
    config = _config(precision="bfloat16", epochs=1)
    face = ntrain.make_model(config)
    x = jnp.asarray(jtrain.prepare_images(data.train_images[:16]))
    variables = face.init(jax.random.key(0), x[:1])
    logits, _ = face.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.bfloat16
    nnx_run = ntrain.fit(config, data, lambda m: None)
    jax_run = jtrain.fit(_config(backend="jax", precision="bfloat16", epochs=1), data, lambda m: None)
    np.testing.assert_allclose(nnx_run[0]["step_losses"], jax_run[0]["step_losses"], rtol=0.05)
    assert np.all(np.isfinite(nnx_run[0]["step_losses"]))


def _run_cli(data_dir, *extra):
    return cli.main(["--backend", "nnx", "--data-dir", str(data_dir), "--epochs", "2", "--batch-size", "64",
                     "--no-progress", "--train-limit", "256", "--test-limit", "128", *extra])  # fmt: skip


def test_cli_trains_checkpoints_resumes_and_loads_the_run(tiny_fashion_dir, tmp_path, capsys):
    from bnref import backends
    from bnref.train import TIMING_KEYS

    whole = _run_cli(tiny_fashion_dir, "--out", str(tmp_path / "whole"))
    assert "epoch 2" in capsys.readouterr().out
    _run_cli(tiny_fashion_dir, "--epochs", "1", "--out", str(tmp_path / "part"))
    resumed = cli.main(["--resume", str(tmp_path / "part"), "--epochs", "2", "--no-progress", "--data-dir",
                        str(tiny_fashion_dir)])  # fmt: skip
    drop = lambda h: [{k: v for k, v in m.items() if k not in TIMING_KEYS and k != "epochs"} for m in h]  # noqa: E731
    assert drop(resumed) == drop(whole)
    jax_run = cli.main(["--backend", "jax", "--data-dir", str(tiny_fashion_dir), "--epochs", "2", "--batch-size", "64",
                        "--no-progress", "--train-limit", "256", "--test-limit", "128", "--no-out"])  # fmt: skip
    assert _losses(jax_run) == _losses(whole)
    model, variables = backends.load("nnx").load_run(_config(), str(tmp_path / "whole" / "checkpoint"))
    assert variables is None and isinstance(model, LeNetBN)
    saved = jtrain.checkpoint_variables(str(tmp_path / "whole" / "checkpoint"))
    np.testing.assert_array_equal(np.asarray(model.bn2.var[...]), saved["batch_stats"]["bn2"]["var"])
    with pytest.raises(ValueError, match="not a checkpoint of this run's NNX model"):
        backends.load("nnx").load_run(_config(bn="none"), str(tmp_path / "whole" / "checkpoint"))


NNX_REPLICAS = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import numpy as np
from bnref.data import synthetic
from bnref.config import TrainConfig
from bnref.nnx.train import fit

data = synthetic(480, 64, seed=3)
def losses(replicas):
    config = TrainConfig(backend="nnx", epochs=1, batch_size=24, lr=0.5, replicas=replicas, sync_bn=True,
                         progress=False)
    return np.concatenate([m["step_losses"] for m in fit(config, data, lambda m: None)])
one, two = losses(1), losses(2)
print(json.dumps({"steps": len(one), "sync2": float(np.max(np.abs(two - one)))}))
"""


@limit(300)
def test_nnx_synchronized_replicas_over_a_mesh_train_like_one_device(run_logged):
    import json

    proc = run_logged([sys.executable, "-c", NNX_REPLICAS], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == 20 and out["sync2"] < 1e-4, out
