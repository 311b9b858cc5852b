"""Data-parallel BatchNorm: the spec's sharded semantics, bnref's SyncBatchNorm on gloo processes
(unequal and empty shards), conversion, errors that name the rank, and the invariant that proves
it: R-replica training with synchronized BN equals one replica on the same global batches.

Multi-process tests spawn gloo processes on loopback; each launch has a deadline (and every
collective a timeout), so nothing can hang.
"""

import os

import numpy as np
import pytest
import torch

from bnref import spec, testing
from bnref.torch import BatchNorm2d, LeNetBN
from bnref.torch._runners import run_sync
from bnref.torch.distributed import launch
from bnref.torch.sync import SyncBatchNorm

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# --- the spec --------------------------------------------------------------------------------------------


def _shards(sizes, c=3, seed=0, offset=5.0):
    rng = np.random.default_rng(seed)
    return [offset + (1 + np.arange(c)).reshape(1, c, 1) * rng.standard_normal((n, c, 4)) for n in sizes]


SIZES = {"equal": (4, 4), "unequal": (5, 2, 1), "empty-shard": (3, 0, 4)}


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("preset", ["torch", "d2l"])
def test_spec_sync_equals_single_device_on_the_concatenation(sizes, preset):
    shards = _shards(sizes)
    rng = np.random.default_rng(1)
    g, b, rm, rv = rng.random(3) + 0.5, rng.standard_normal(3), rng.standard_normal(3), rng.random(3) + 0.5
    dys = [rng.standard_normal(s.shape) for s in shards]
    ys, new_rm, new_rv = spec.sync_batch_norm_train(shards, g, b, rm, rv, preset)
    dxs, dg, db = spec.sync_batch_norm_grad(shards, g, dys, preset)
    whole = np.concatenate(shards)
    y, rm1, rv1 = spec.batch_norm_train(whole, g, b, rm, rv, preset)
    dx, dg1, db1 = spec.batch_norm_grad(whole, g, np.concatenate(dys), preset)
    testing.assert_close({"y": np.concatenate(ys), "running_mean": new_rm, "running_var": new_rv, "dx": np.concatenate(dxs),
                          "dgamma": dg, "dbeta": db},
                         {"y": y, "running_mean": rm1, "running_var": rv1, "dx": dx, "dgamma": dg1, "dbeta": db1},
                         context=f"spec sync vs concatenation, {preset}", dtype="float64")  # fmt: skip


def test_spec_merge_is_stable_where_one_pass_is_not():
    shards = [1e8 + 0.01 * np.random.default_rng(r).standard_normal((50, 2)) for r in range(3)]
    stats = [spec.shard_stats(s) for s in shards]
    n, mean, var = spec.merge_stats(*zip(*stats))
    whole = np.concatenate(shards)
    np.testing.assert_allclose(var, whole.var(0), rtol=1e-6)  # two-pass per shard, exact merge
    one_pass = np.mean(whole**2, 0) - np.mean(whole, 0) ** 2
    assert np.abs(one_pass - whole.var(0)).max() > 1e-3  # the formula bnref avoids is far off here


def test_spec_local_keeps_one_running_average_per_replica():
    shards = _shards((4, 4), offset=0.0)
    shards[1] = shards[1] + 10.0  # replicas see different data
    ys, rms, rvs = spec.local_batch_norm_train(shards, None, None, [np.zeros(3)] * 2, [np.ones(3)] * 2, "d2l")
    for s, y, m in zip(shards, ys, rms):
        np.testing.assert_allclose(y, spec.batch_norm_train(s, None, None, None, None, "d2l")[0])
        np.testing.assert_allclose(m, 0.1 * s.mean((0, 2)))
    assert np.abs(rms[0] - rms[1]).min() > 0.5  # the running statistics drift apart


def test_spec_bad_shards_raise():
    with pytest.raises(ValueError, match="shard 1 has shape"):
        spec.sync_batch_norm_train([np.ones((2, 3)), np.ones((2, 4))], None, None, None, None, "torch")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        spec.sync_batch_norm_train([np.ones((1, 3)), np.ones((0, 3))], None, None, None, None, "torch")


# --- SyncBatchNorm on gloo processes -------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(5, 2), (3, 0, 4)], ids=["2-unequal", "3-with-empty"])
@pytest.mark.parametrize("preset", ["torch", "d2l"])
def test_sync_batch_norm_on_processes_matches_the_spec(sizes, preset):
    shards = _shards(sizes)
    rng = np.random.default_rng(2)
    dys = [rng.standard_normal(s.shape) for s in shards]
    g, b, rm, rv = rng.random(3) + 0.5, rng.standard_normal(3), rng.standard_normal(3), rng.random(3) + 0.5
    conv = spec.preset(preset)
    results = run_sync(shards, dys, g, b, rm, rv, conv, steps=2, timeout_s=60)
    spec_rm, spec_rv = rm, rv
    for step in range(2):
        ys, spec_rm, spec_rv = spec.sync_batch_norm_train(shards, g, b, spec_rm, spec_rv, conv)
        dxs, dg, db = spec.sync_batch_norm_grad(shards, g, dys, conv)
        for r, res in enumerate(results):
            got = res["steps"][step]
            context = f"torch SyncBatchNorm, rank {r} of {len(shards)}, {preset}, step {step}"
            testing.assert_close({"y": got["y"], "dx": got["dx"], "running_mean": got["running_mean"],
                                  "running_var": got["running_var"]},
                                 {"y": ys[r], "dx": dxs[r], "running_mean": spec_rm, "running_var": spec_rv},
                                 context=context, dtype="float64")  # fmt: skip
        # Each replica's weight/bias gradient is its own shard's sum (DDP averages them); summed: the spec's.
        testing.assert_close({"dgamma": sum(res["steps"][step]["dgamma"] for res in results),
                              "dbeta": sum(res["steps"][step]["dbeta"] for res in results)},
                             {"dgamma": dg, "dbeta": db}, context=f"summed over replicas, step {step}", dtype="float64")
    for r, res in enumerate(results):  # eval: the (identical) running statistics
        expected = spec.batch_norm_eval(shards[r], g, b, spec_rm, spec_rv, conv)
        testing.assert_close({"eval_y": res["eval_y"]}, {"eval_y": expected}, context=f"eval, rank {r}", dtype="float64")
        assert res["num_batches_tracked"] == 2


def test_sync_batch_norm_without_a_process_group_is_local_batch_norm():
    torch.manual_seed(0)
    sync, local = SyncBatchNorm(3, convention="d2l"), BatchNorm2d(3, convention="d2l")
    x = torch.randn(4, 3, 2, 2) * 2 + 1
    torch.testing.assert_close(sync(x), local(x))
    for k, v in local.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[k], v)
    assert isinstance(sync, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(sync, torch.nn.SyncBatchNorm)  # DDP refuses those on CPU modules


@pytest.mark.parametrize("bn", ["bnref", "builtin"])
def test_convert_sync_batchnorm_keeps_state_keys_and_convention(bn):
    model = LeNetBN(bn=bn, convention="d2l" if bn == "bnref" else "torch")
    model(torch.rand(8, 1, 28, 28))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    for i in range(1, 5):
        layer = getattr(converted, f"bn{i}")
        assert type(layer) is SyncBatchNorm
        assert layer._running_var_estimator == ("biased" if bn == "bnref" else "unbiased")
    after = converted.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)


def _different_channels(rank, world, send):
    layer = SyncBatchNorm(3 + rank)
    layer(torch.randn(4, 3 + rank, 2))


def _fails_on_rank_one(rank, world, send):
    if rank == 1:
        raise ValueError("boom on rank one")
    torch.distributed.barrier()  # rank 0 would wait here forever without the launcher


def test_channel_counts_that_differ_between_ranks_are_a_clear_error():
    with pytest.raises(RuntimeError, match=r"differ in channel count across replicas \(rank 0: 3, rank 1: 4\)"):
        launch(_different_channels, 2, timeout_s=30, deadline_s=90, threads=1)


def test_a_failing_rank_stops_the_others_and_is_named():
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed: ValueError: boom on rank one"):
        launch(_fails_on_rank_one, 2, timeout_s=30, deadline_s=90, threads=1)


# --- the invariant: R replicas with synchronized BN = one replica --------------------------------------


def _train_losses(replicas, sync, data, epochs=5):
    from bnref.train import TrainConfig
    from bnref.torch.train import fit

    config = TrainConfig(backend="torch", epochs=epochs, batch_size=24, lr=0.5, replicas=replicas, sync_bn=sync,
                         progress=False, convention="d2l")  # fmt: skip
    history = fit(config, data, lambda m: None)
    return np.concatenate([m["step_losses"] for m in history]), history


@pytest.fixture(scope="module")
def small_data():
    from bnref.data import synthetic

    return synthetic(480, 60, seed=3)  # 20 global batches of 24 per epoch: 100 steps in 5 epochs


@pytest.fixture(scope="module")
def single_replica(small_data):
    return _train_losses(1, False, small_data)


@pytest.mark.parametrize("replicas", [2, 3])
def test_synchronized_replicas_train_like_one_device(replicas, small_data, single_replica):
    one, one_history = single_replica
    many, history = _train_losses(replicas, True, small_data)
    assert len(many) == len(one) == 100
    diff = np.abs(many - one)
    assert diff.max() < 1e-4, f"max |loss difference| {diff.max():.2e} over 100 steps"
    assert [m["test_acc"] for m in history] == pytest.approx([m["test_acc"] for m in one_history], abs=1 / 60 + 1e-9)
    assert history[-1]["device"] == f"{replicas} x cpu"


# --- the command line ------------------------------------------------------------------------------------


def test_cli_replicas_spawns_processes_and_only_rank_0_reports(tiny_fashion_dir, tmp_path, capsys):
    """2 processes: rank 0 reports, with precise BN; the run directory gets rank 0's checkpoint,
    and --resume continues it on 2 processes again."""
    from bnref import runs, train

    out, run = tmp_path / "metrics.json", tmp_path / "run"
    history = train.main(["--backend", "torch", "--replicas", "2", "--data-dir", str(tiny_fashion_dir), "--epochs", "1",
                          "--batch-size", "64", "--no-progress", "--json", str(out), "--precise-bn", "--out", str(run)])  # fmt: skip
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 1 and lines[-1].endswith("on 2 x cpu") and "(precise; EMA " in lines[-1]
    import json

    saved = json.loads(out.read_text())
    assert saved["config"]["replicas"] == 2 and saved["config"]["sync_bn"] is True
    assert [m["epoch"] for m in saved["history"]] == [1] == [m["epoch"] for m in history]
    resumed = train.main(["--resume", str(run), "--epochs", "2", "--no-progress"])
    assert [m["epoch"] for m in resumed] == [1, 2] == [m["epoch"] for m in runs.read_metrics(str(run))]
    assert resumed[0]["step_losses"] == history[0]["step_losses"] and resumed[1]["test_acc_precise"] is not None


def test_torchrun_launch(tiny_fashion_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "metrics.json"
    from bnref.torch.distributed import free_port

    port = str(free_port())  # a static rendezvous on a free loopback port (nothing shared with other runs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0", "--master-addr",
           "127.0.0.1", "--master-port", port, "--nproc-per-node", "2",
           "-m", "bnref.train", "--backend", "torch", "--data-dir", str(tiny_fashion_dir), "--epochs", "1",
           "--batch-size", "64", "--no-progress", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**__import__("os").environ,
                          "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 1 and lines[0].endswith("on 2 x cpu"), proc.stdout  # rank 0 only
    import json

    assert json.loads(out.read_text())["config"]["replicas"] == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--replicas", "3", "--batch-size", "64"], "batch_size 64 is not divisible by replicas 3"),
        (["--replicas", "4", "--batch-size", "4", "--no-sync-bn"], "unsynchronized BatchNorm needs at least 2"),
    ],
    ids=["not-divisible", "local-bn-slice-of-1"],
)
def test_cli_bad_replica_flags_fail_before_data_loads(argv, message, tmp_path, capsys):
    from bnref import train

    with pytest.raises(SystemExit) as e:
        train.main(["--backend", "torch", "--data-dir", str(tmp_path / "absent"), "--no-download", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


# --- JAX: replicas are devices (host devices on a CPU, set before JAX starts: a subprocess) -------------

JAX_EQUIVALENCE = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np
from bnref.data import synthetic
from bnref.train import TrainConfig
from bnref.jax.train import fit

data = synthetic(480, 64, seed=3)  # batch 24... JAX needs R | 24 for R in 2, 4: batch 24 -> 20 steps an epoch

def losses(replicas, sync):
    config = TrainConfig(backend="jax", epochs=5, batch_size=24, lr=0.5, replicas=replicas, sync_bn=sync,
                         progress=False, convention="d2l")
    history = fit(config, data, lambda m: None)
    return np.concatenate([m["step_losses"] for m in history]), [m["test_acc"] for m in history]

one, acc1 = losses(1, False)
out = {"steps": len(one)}
for r in (2, 4):
    many, acc = losses(r, True)
    out[f"sync{r}"] = float(np.max(np.abs(many - one)))
    out[f"acc{r}"] = float(np.max(np.abs(np.array(acc) - np.array(acc1))))
local, _ = losses(4, False)
out["local4"] = float(np.max(np.abs(local - one)))

# Resume a data-parallel run with local BN (per-device statistics in the checkpoint).
import tempfile
from bnref.runs import RunDir
def run_in(path, epochs, resuming):
    run = RunDir(path)
    run.resuming = resuming
    config = TrainConfig(backend="jax", epochs=epochs, batch_size=24, lr=0.5, replicas=2, sync_bn=False, progress=False)
    fit(config, data, lambda m: run.history.append(m), run=run)
    return run.history
d = tempfile.mkdtemp()
run_in(d, 1, False)
resumed = run_in(d, 2, True)
whole = fit(TrainConfig(backend="jax", epochs=2, batch_size=24, lr=0.5, replicas=2, sync_bn=False, progress=False),
            data, lambda m: None)
out["resume"] = [m["step_losses"] for m in resumed] == [m["step_losses"] for m in whole] and \
    [m["test_acc"] for m in resumed] == [m["test_acc"] for m in whole]
print(json.dumps(out))
"""


def test_jax_synchronized_replicas_train_like_one_device():
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", JAX_EQUIVALENCE], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == 100
    assert out["sync2"] < 1e-4 and out["sync4"] < 1e-4, out  # max |loss difference| over 100 steps
    assert out["acc2"] <= 1 / 64 and out["acc4"] <= 1 / 64, out
    assert out["local4"] > 1e-3, out  # unsynchronized BN on slices of 6 trains differently
    assert out["resume"] is True, out  # 2 devices, local BN: resumed = uninterrupted, bit for bit


def test_jax_replicas_beyond_the_devices_is_a_clear_error(capsys):
    import jax

    from bnref import train

    n = len(jax.devices("cpu"))
    with pytest.raises(SystemExit) as e:
        train.main(["--backend", "jax", "--replicas", str(2 * n), "--batch-size", str(4 * n), "--device", "cpu"])
    assert e.value.code == 2 and f"needs {2 * n} cpu devices; JAX has {n}" in capsys.readouterr().err


# --- what the frameworks do (the README's table) ------------------------------------------------------------


def _ddp_plain_bn(rank, world, send):
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=0.1)
    ddp = DistributedDataParallel(bn)  # broadcast_buffers=True, torch's default
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randn(8, 3, generator=g) + 5 * rank for _ in range(2)]
    ddp(xs[0]).sum().backward()
    after_first = bn.running_mean.clone()
    gathered = [torch.empty(3) for _ in range(world)]
    torch.distributed.all_gather(gathered, after_first)
    ddp(xs[1]).sum().backward()
    # NumPy, not tensors: a tensor sent through the result queue lives in this process's shared memory
    return {"after_first": [t.numpy() for t in gathered], "after_second": bn.running_mean.detach().numpy().copy(),
            "batch_mean": xs[1].mean(0).numpy()}


def test_torch_ddp_overwrites_every_replicas_buffers_with_rank_0s_at_each_forward():
    results = launch(_ddp_plain_bn, 2, timeout_s=30, deadline_s=90, threads=1)
    first = results[0]["after_first"]
    assert not np.allclose(first[0], first[1])  # each replica updated its own
    for r, res in enumerate(results):  # the second forward started from rank 0's statistics everywhere
        np.testing.assert_allclose(res["after_second"], 0.9 * first[0] + 0.1 * res["batch_mean"], rtol=1e-6, atol=1e-6)


def test_parity_replicas_compares_every_implementation_with_the_spec():
    """`python -m bnref.parity --replicas 2` (a subprocess: it provides 2 JAX host devices before JAX
    starts): bnref.torch's SyncBatchNorm on 2 gloo processes for equal, unequal and empty shards;
    bnref.jax and flax.linen with axis_name on 2 devices for equal shards (shard_map's shards
    are equal; the other cells say so); torch.nn's SyncBatchNorm is CUDA-only."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bnref.parity", "--replicas", "2", "--preset", "d2l", "--dtype", "float64", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cells = {(c["layout"].split()[0], c["impl"]): c for c in json.loads(proc.stdout)}
    for sharding in ("equal", "unequal", "empty"):
        assert cells[(sharding, "bnref.torch")]["status"] == "pass"
        assert "CUDA only" in cells[(sharding, "torch.nn")]["reason"]
    for impl in ("bnref.jax", "flax.linen"):
        assert cells[("equal", impl)]["status"] == "pass"
        assert cells[("unequal", impl)]["status"] == "not expressible"
    assert set(cells[("equal", "bnref.jax")]["errors"]) >= {"forward/y", "backward/dx", "backward/dgamma", "eval/y"}


def test_parity_trajectory_replicas_is_one_device_to_1e_10_in_float64():
    """`python -m bnref.parity --trajectory --replicas 2 --dtype float64`: LeNet-BN trained 100 steps
    by torch DDP + bnref's SyncBatchNorm on 2 gloo processes and by bnref.jax with axis_name under
    shard_map on 2 devices equals one device to 1e-10 (loss at every step, final weights and
    running statistics); without synchronization both frameworks differ from one device, and
    from each other only by rounding (local BN means the same thing in both)."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bnref.parity", "--trajectory", "--replicas", "2", "--dtype", "float64",
           "--batch-size", "12", "--lr", "0.5", "--steps", "100", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["passed"] and len(report["rows"]) == 100
    got = {(c["left"], c["right"]): c for c in report["replicas"]["comparisons"]}
    for pair in [("torch_sync", "torch"), ("jax_sync", "jax"), ("torch_sync", "jax_sync")]:
        c = got[pair]
        assert c["passed"] and max(c["max_loss_diff"], c["weight_diff"], c["stat_diff"]) < 1e-10, c
    for pair in [("torch_local", "torch"), ("jax_local", "jax")]:
        assert got[pair]["passed"] is None and got[pair]["max_loss_diff"] > 1e-3, got[pair]
    # Local BN on slices this small amplifies rounding ~10x a step (measured with 3 slices of 4:
    # 1e-14 at step 5, 2e-12 at step 10, 0.2 by step 100), so the two frameworks' local runs are
    # compared at the start only.
    local = np.array([[r["loss_torch_local"], r["loss_jax_local"]] for r in report["rows"][:10]])
    assert np.abs(local[:, 0] - local[:, 1]).max() < 1e-9


# --- multi-process JAX: jax.distributed.initialize, CPU collectives over gloo ----------------------------


def _jax_processes(argv, n, timeout=240):
    """Run ``python -m bnref.train --backend jax`` as ``n`` processes of one JAX run on loopback;
    returns each one's (returncode, stdout, stderr), in process order."""
    import subprocess
    import sys

    from bnref.torch.distributed import free_port

    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "bnref.train", "--backend", "jax", *argv, "--coordinator",
                               coordinator, "--num-processes", str(n), "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


def test_jax_processes_train_like_one_device(tiny_fashion_dir, tmp_path):
    """Two processes joined by jax.distributed.initialize (one CPU device each, collectives over
    gloo) train with synchronized BN like one device, step for step; only process 0 reports."""
    import json

    from bnref.data import load_fashion_mnist
    from bnref.jax.train import fit
    from bnref.train import TrainConfig

    out, run = tmp_path / "metrics.json", tmp_path / "run"
    common = ["--data-dir", str(tiny_fashion_dir), "--epochs", "2", "--batch-size", "64", "--lr", "0.5", "--no-progress",
              "--precise-bn"]  # fmt: skip
    (rc0, out0, err0), (rc1, out1, err1) = _jax_processes([*common, "--json", str(out), "--out", str(run)], 2)
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    lines = [l for l in out0.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 2 and lines[-1].endswith("on 2 x cpu in 2 processes"), out0
    assert "epoch " not in out1  # process 1 trains silently
    many = json.loads(out.read_text())["history"]
    one = fit(TrainConfig(backend="jax", epochs=2, batch_size=64, lr=0.5, progress=False, precise_bn=True),
              load_fashion_mnist(str(tiny_fashion_dir)), lambda m: None)  # fmt: skip
    diff = np.abs(np.concatenate([m["step_losses"] for m in many]) - np.concatenate([m["step_losses"] for m in one]))
    assert len(diff) == 16 and diff.max() < 1e-4, diff.max()
    assert [m["test_acc_precise"] for m in many] == [m["test_acc_precise"] for m in one]
    assert sorted(os.listdir(run)) == ["checkpoint", "config.json", "curves.png", "metrics.jsonl"]  # process 0's


def test_a_jax_process_whose_peer_never_joins_is_aborted_not_left_waiting(tiny_fashion_dir):
    import subprocess
    import sys

    from bnref.torch.distributed import free_port

    cmd = [sys.executable, "-m", "bnref.train", "--backend", "jax", "--data-dir", str(tiny_fashion_dir),
           "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "0", "--join-timeout", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "process 0 of 2: joining at 127.0.0.1:" in proc.stderr and "DEADLINE_EXCEEDED" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--num-processes", "2"], "coordinator must be HOST:PORT"),
        (["--num-processes", "2", "--coordinator", "localhost"], "coordinator must be HOST:PORT"),
        (["--num-processes", "2", "--coordinator", "h:1", "--process-id", "2"], "process_id must be an int in [0, num_processes=2)"),
        (["--num-processes", "2", "--coordinator", "h:1", "--replicas", "3"], "replicas 3 must be a multiple of num_processes 2"),
        (["--coordinator", "h:1"], "a coordinator address needs num_processes >= 2"),
        (["--backend", "torch", "--num-processes", "2", "--coordinator", "h:1"], "num_processes is the JAX backend's"),
    ],
    ids=["no-coordinator", "no-port", "bad-id", "replicas", "lone-coordinator", "torch"],
)
def test_cli_bad_process_flags_fail_before_joining(argv, message, tmp_path, capsys):
    from bnref import train

    with pytest.raises(SystemExit) as e:
        train.main(["--backend", "jax", "--data-dir", str(tmp_path / "absent"), "--no-download", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "joining" not in err
