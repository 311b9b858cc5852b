"""Data-parallel BatchNorm: the spec's sharded semantics, bnref's SyncBatchNorm on gloo processes
(unequal and empty shards), conversion, errors that name the rank, and the invariant that proves
it: R-replica training with synchronized BN equals one replica on the same global batches.

Multi-process tests spawn gloo processes on loopback; each launch has a deadline (and every
collective a timeout), each subprocess a timeout, and every test a hard limit (:func:`limit`,
SIGALRM), so nothing can hang the suite. Each subprocess and each multi-process training run
says on the terminal what it runs and how long it took (pytest's output capture is suspended
for those lines), so a run of this file never sits silent for minutes.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _helpers import make_shards

from bnref import spec, testing
from bnref.torch import BatchNorm2d, LeNetBN
from bnref.torch._runners import run_sync_bn
from bnref.torch.distributed import ReplicaError, launch
from bnref.torch.sync import SyncBatchNorm

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# --- guards: a hard limit per test, and progress on the terminal ------------------------------------------

#: seconds a test of this file may take unless it says otherwise with @limit
DEFAULT_LIMIT_S = 120


def limit(seconds: int):
    """Give a test a hard limit of ``seconds`` (default :data:`DEFAULT_LIMIT_S`), enforced by
    :func:`_hard_limit`: past it, the test fails (and the launcher's cleanup kills its processes)."""

    def mark(test):
        test.limit_s = seconds
        return test

    return mark


class _Overrun(BaseException):
    """Raised by SIGALRM: a BaseException, so that no ``except Exception`` in the code under test
    swallows it."""


@pytest.fixture(autouse=True)
def _hard_limit(request):
    seconds = getattr(request.function, "limit_s", DEFAULT_LIMIT_S)

    def overrun(signum, frame):
        raise _Overrun(f"{request.node.name} ran past its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, overrun)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def say(request):
    """``say(text)``: one line on the terminal now, also under pytest's default output capture."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def write(text):
        line = f"    [{request.node.name}] {text}"
        suspended = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
        with suspended:
            if tr is not None:
                tr.write_line(line)
            else:
                print(line, file=sys.__stderr__, flush=True)

    return write


@pytest.fixture
def timed(say):
    """``with timed("what"):`` says what starts, and when it ends how long it took."""

    @contextlib.contextmanager
    def block(what):
        say(f"{what} ...")
        t0 = time.monotonic()
        outcome = "failed"
        try:
            yield
            outcome = "done"
        finally:
            say(f"{outcome} in {time.monotonic() - t0:.1f} s: {what}")

    return block


@pytest.fixture
def run_logged(say):
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=...)`` that says what it runs
    and, when it ends, its exit status and how long it took."""

    def run(cmd, timeout, **kwargs):
        shown = " ".join(str(c) if len(str(c)) < 60 else "<script>" for c in cmd).replace(sys.executable, "python")
        say(f"running (limit {timeout} s): {shown}")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired:
            say(f"timed out after {time.monotonic() - t0:.1f} s: {shown}")
            raise
        say(f"exit status {proc.returncode} after {time.monotonic() - t0:.1f} s: {shown}")
        return proc

    return run

# --- SyncBatchNorm on gloo processes -------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(5, 2), (3, 0, 4)], ids=["2-unequal", "3-with-empty"])
@pytest.mark.parametrize("preset", ["torch", "d2l"])
@limit(300)
def test_sync_batch_norm_on_processes_matches_the_spec(sizes, preset):
    shards = make_shards(sizes)
    rng = np.random.default_rng(2)
    dys = [rng.standard_normal(s.shape) for s in shards]
    g, b, rm, rv = rng.random(3) + 0.5, rng.standard_normal(3), rng.standard_normal(3), rng.random(3) + 0.5
    conv = spec.preset(preset)
    results = run_sync_bn(shards, dys, g, b, rm, rv, conv, "float64", steps=2, timeout_s=60)["replicas"]
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


# --- a rank that dies or stops: the launcher names it, and never hangs ------------------------------------


def _killed_on_rank_one(rank, world, send, survivor_waits_s):
    torch.distributed.barrier()  # both are in the group
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(survivor_waits_s)  # 0: already in the collective when its peer dies; else the death is seen first
    torch.distributed.barrier()


@pytest.mark.parametrize("survivor_waits_s", [0.0, 1.5], ids=["survivor-in-a-collective", "survivor-computing"])
def test_a_killed_rank_is_named_with_its_exit_code_not_the_survivor(survivor_waits_s):
    with pytest.raises(ReplicaError) as e:
        launch(_killed_on_rank_one, 2, (survivor_waits_s,), timeout_s=30, deadline_s=90, threads=1)
    message = str(e.value)
    assert message.startswith("rank 1 of 2 died: killed by SIGKILL (exit code -9)"), message
    assert "\n" not in message and "Traceback" not in message, message  # one line: the survivor's traceback is noise
    assert "rank 0 of 2" not in message, message


def _stopped_on_rank_one(rank, world, send):
    torch.distributed.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # as `kill -STOP`: alive, holds its sockets, never answers
    torch.distributed.barrier()


# In a subprocess: the hang this guards against was at the interpreter's exit (multiprocessing joins
# its non-daemon children there, without a timeout), after the launcher had already raised.
STOPPED_RANK = r"""
import sys, time
sys.path.insert(0, sys.argv[1])  # the workers live in this test module
import test_distributed as t
from bnref.torch.distributed import launch
t0 = time.monotonic()
deadline = None if sys.argv[3] == "none" else float(sys.argv[3])
try:
    launch(t._stopped_on_rank_one, 2, timeout_s=float(sys.argv[2]), deadline_s=deadline, threads=1)
except Exception as e:
    print(f"{type(e).__name__}: {e}", flush=True)
print(f"raised after {time.monotonic() - t0:.1f} s", flush=True)
"""


@pytest.mark.parametrize(
    "timeout_s,deadline_s,expected",
    [
        (5, "none", r"ReplicaError: rank 1 of 2 did not answer \(pid (\d+) is stopped, state T\), killed; then rank 0 "
                    r"failed: .*"),
        # a deadline well past the processes' start (seconds on a loaded 2-core machine): rank 1 is stopped by then
        (120, "40", r"TimeoutError: ranks \[0, 1\] of 2 did not finish within 40 s \(rank 0: pid \d+ is running, state "
                  r"\w, killed; rank 1: pid (\d+) is stopped, state T, killed\)"),
    ],
    ids=["peer-collective-times-out", "launch-deadline"],
)
@limit(200)
def test_a_stopped_rank_is_named_and_killed_and_the_launcher_exits(timeout_s, deadline_s, expected, run_logged):
    import re

    here = os.path.dirname(os.path.abspath(__file__))
    proc = run_logged([sys.executable, "-c", STOPPED_RANK, here, str(timeout_s), deadline_s], timeout=170,
                      env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]  # it exited: nothing left to join
    message, took = proc.stdout.strip().splitlines()[-2:]
    found = re.fullmatch(expected, message)
    assert found, message
    assert float(took.split()[2]) < 90, took  # collective timeout or deadline + bounded waits, not forever
    pid = int(found.group(1))  # the stopped one, killed and reaped by the launcher
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def _spawned_children(pid):
    """Pids of the multiprocessing-spawned children of ``pid`` (the replicas), oldest first."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:  # not the resource tracker, also a child
            found.append(int(entry))
    return sorted(found)  # started rank 0 first, then rank 1: increasing pids (no wrap-around in one test)


@limit(300)
def test_cli_a_killed_replica_is_named_with_its_exit_code(tiny_fashion_dir, timed):
    """`python -m bnref.train --backend torch --replicas 2` with replica 1 killed (SIGKILL) mid-run:
    the error names rank 1 and its exit code, not rank 0's lost connection."""
    cmd = [sys.executable, "-m", "bnref.train", "--backend", "torch", "--replicas", "2", "--data-dir",
           str(tiny_fashion_dir), "--epochs", "200", "--batch-size", "64", "--no-progress", "--no-out"]  # fmt: skip
    with timed("python -m bnref.train --backend torch --replicas 2, replica 1 killed after epoch 1"):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        try:
            for line in proc.stdout:  # both replicas are training once epoch 1 is reported
                if line.startswith("epoch 1/"):
                    break
            children = _spawned_children(proc.pid)
            assert len(children) == 2, children
            os.kill(children[1], signal.SIGKILL)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 1
    assert "rank 1 of 2 died: killed by SIGKILL (exit code -9)" in err, err[-3000:]
    assert "rank 0 of 2" not in err and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 of 2 died"), err[-3000:]  # one line


# --- torchrun's environment: one reader, and a partial launch is an error -----------------------------------

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    "environ,expected",
    [
        ({}, None),
        (TORCHRUN, {"rank": 1, "world": 2, "local_rank": 1, "master_addr": "127.0.0.1", "master_port": 29500}),
        ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"},
         {"rank": 1, "world": 2, "local_rank": 1, "master_addr": "127.0.0.1", "master_port": 29500}),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT are not set"),
        ({**TORCHRUN, "MASTER_PORT": ""}, "MASTER_PORT is not set"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK is not set"),
        ({**TORCHRUN, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({**TORCHRUN, "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
        ({**TORCHRUN, "RANK": "2"}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
        ({**TORCHRUN, "WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ],
    ids=["not-launched", "torchrun", "no-local-rank", "no-master", "empty-port", "no-rank", "world-not-int",
         "local-rank-not-int", "rank-out-of-range", "world-0", "port-out-of-range"],
)
def test_torchrun_env_reads_a_launch_and_refuses_a_partial_one(environ, expected, monkeypatch):
    from bnref.torch.distributed import torchrun_env

    for k in TORCHRUN:
        monkeypatch.delenv(k, raising=False)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            torchrun_env()
    else:
        assert torchrun_env() == expected


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
@limit(600)
def test_synchronized_replicas_train_like_one_device(replicas, small_data, single_replica, timed):
    one, one_history = single_replica
    with timed(f"training on {replicas} gloo processes, 5 epochs"):
        many, history = _train_losses(replicas, True, small_data)
    assert len(many) == len(one) == 100
    diff = np.abs(many - one)
    assert diff.max() < 1e-4, f"max |loss difference| {diff.max():.2e} over 100 steps"
    assert [m["test_acc"] for m in history] == pytest.approx([m["test_acc"] for m in one_history], abs=1 / 60 + 1e-9)
    assert history[-1]["device"] == f"{replicas} x cpu"


# --- the command line ------------------------------------------------------------------------------------


@limit(600)
def test_cli_replicas_spawns_processes_and_only_rank_0_reports(tiny_fashion_dir, tmp_path, capsys, timed):
    """2 processes: rank 0 reports, with precise BN; the run directory gets rank 0's checkpoint,
    and --resume continues it on 2 processes again."""
    from bnref import runs, train

    out, run = tmp_path / "metrics.json", tmp_path / "run"
    with timed("python -m bnref.train --backend torch --replicas 2 --epochs 1 (in this process)"):
        history = train.main(["--backend", "torch", "--replicas", "2", "--data-dir", str(tiny_fashion_dir), "--epochs",
                              "1", "--batch-size", "64", "--no-progress", "--json", str(out), "--precise-bn", "--out",
                              str(run)])  # fmt: skip
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 1 and lines[-1].endswith("on 2 x cpu") and "(precise; EMA " in lines[-1]
    import json

    saved = json.loads(out.read_text())
    assert saved["config"]["replicas"] == 2 and saved["config"]["sync_bn"] is True
    assert [m["epoch"] for m in saved["history"]] == [1] == [m["epoch"] for m in history]
    with timed("python -m bnref.train --resume RUN --epochs 2 (2 processes, in this process)"):
        resumed = train.main(["--resume", str(run), "--epochs", "2", "--no-progress", "--data-dir", str(tiny_fashion_dir)])
    assert [m["epoch"] for m in resumed] == [1, 2] == [m["epoch"] for m in runs.read_metrics(str(run))]
    assert resumed[0]["step_losses"] == history[0]["step_losses"] and resumed[1]["test_acc_precise"] is not None


@limit(300)
def test_torchrun_launch(tiny_fashion_dir, tmp_path, run_logged):
    out = tmp_path / "metrics.json"
    from bnref.torch.distributed import free_port

    port = str(free_port())  # a static rendezvous on a free loopback port (nothing shared with other runs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0", "--master-addr",
           "127.0.0.1", "--master-port", port, "--nproc-per-node", "2",
           "-m", "bnref.train", "--backend", "torch", "--data-dir", str(tiny_fashion_dir), "--epochs", "1",
           "--batch-size", "64", "--no-progress", "--json", str(out)]  # fmt: skip
    proc = run_logged(cmd, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
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


@limit(450)
def test_jax_synchronized_replicas_train_like_one_device(run_logged):
    import json

    proc = run_logged([sys.executable, "-c", JAX_EQUIVALENCE], timeout=400)
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


@limit(330)
def test_parity_replicas_compares_every_implementation_with_the_spec(run_logged):
    """`python -m bnref.parity --replicas 2` (a subprocess: it provides 2 JAX host devices before JAX
    starts): bnref.torch's SyncBatchNorm on 2 gloo processes for equal, unequal and empty shards;
    bnref.jax and flax.linen with axis_name on 2 devices for equal shards (shard_map's shards
    are equal; the other cells say so); torch.nn's SyncBatchNorm is CUDA-only."""
    import json

    cmd = [sys.executable, "-m", "bnref.parity", "--replicas", "2", "--preset", "d2l", "--dtype", "float64", "--json"]
    proc = run_logged(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cells = {(c["layout"].split()[0], c["impl"]): c for c in json.loads(proc.stdout)}
    for sharding in ("equal", "unequal", "empty"):
        assert cells[(sharding, "bnref.torch")]["status"] == "pass"
        assert "CUDA only" in cells[(sharding, "torch.nn")]["reason"]
    for impl in ("bnref.jax", "flax.linen"):
        assert cells[("equal", impl)]["status"] == "pass"
        assert cells[("unequal", impl)]["status"] == "not expressible"
    assert set(cells[("equal", "bnref.jax")]["errors"]) >= {"forward/y", "backward/dx", "backward/dgamma", "eval/y"}


@limit(330)
def test_parity_trajectory_replicas_is_one_device_to_1e_10_in_float64(run_logged):
    """`python -m bnref.parity --trajectory --replicas 2 --dtype float64`: LeNet-BN trained 100 steps
    by torch DDP + bnref's SyncBatchNorm on 2 gloo processes and by bnref.jax with axis_name under
    shard_map on 2 devices equals one device to 1e-10 (loss at every step, final weights and
    running statistics); without synchronization both frameworks differ from one device, and
    from each other only by rounding (local BN means the same thing in both)."""
    import json

    cmd = [sys.executable, "-m", "bnref.parity", "--trajectory", "--replicas", "2", "--dtype", "float64",
           "--batch-size", "12", "--lr", "0.5", "--steps", "100", "--json"]  # fmt: skip
    proc = run_logged(cmd, timeout=300)
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


def _jax_processes(argv, n, timed, timeout=240):
    """Run ``python -m bnref.train --backend jax`` as ``n`` processes of one JAX run on loopback;
    returns each one's (returncode, stdout, stderr), in process order. ``timeout``: for all of
    them together."""
    from bnref.torch.distributed import free_port

    coordinator = f"127.0.0.1:{free_port()}"
    with timed(f"{n} processes of python -m bnref.train --backend jax --coordinator {coordinator} (limit {timeout} s)"):
        procs = [subprocess.Popen([sys.executable, "-m", "bnref.train", "--backend", "jax", *argv, "--coordinator",
                                   coordinator, "--num-processes", str(n), "--process-id", str(i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]  # fmt: skip
        end = time.monotonic() + timeout
        try:
            outputs = [p.communicate(timeout=max(1.0, end - time.monotonic())) for p in procs]
            return [(p.returncode, *o) for p, o in zip(procs, outputs)]
        finally:
            for p in procs:
                p.kill()
                p.wait(timeout=30)


@limit(300)
def test_jax_processes_train_like_one_device(tiny_fashion_dir, tmp_path, timed):
    """Two processes joined by jax.distributed.initialize (one CPU device each, collectives over
    gloo) train with synchronized BN like one device, step for step; only process 0 reports."""
    import json

    from bnref.data import load_fashion_mnist
    from bnref.jax.train import fit
    from bnref.train import TrainConfig

    out, run = tmp_path / "metrics.json", tmp_path / "run"
    common = ["--data-dir", str(tiny_fashion_dir), "--epochs", "2", "--batch-size", "64", "--lr", "0.5", "--no-progress",
              "--precise-bn"]  # fmt: skip
    (rc0, out0, err0), (rc1, out1, err1) = _jax_processes([*common, "--json", str(out), "--out", str(run)], 2, timed)
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


@limit(150)
def test_a_jax_process_whose_peer_never_joins_is_aborted_not_left_waiting(tiny_fashion_dir, run_logged):
    from bnref.torch.distributed import free_port

    cmd = [sys.executable, "-m", "bnref.train", "--backend", "jax", "--data-dir", str(tiny_fashion_dir),
           "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "0", "--join-timeout", "2"]
    proc = run_logged(cmd, timeout=120)
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


# --- the coordinator's port: process 0 listens there, so it must be free -------------------------------------


@contextlib.contextmanager
def _listening(host):
    """A socket listening on ``host``, on a port the system picks: someone else's server."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"], ids=["loopback", "all-interfaces"])
@limit(150)
def test_cli_a_coordinator_port_in_use_is_a_clear_error_before_jax_starts(host, tiny_fashion_dir, run_logged):
    """Process 0 of a multi-process JAX run with its --coordinator port taken: JAX 0.10 crashed it
    (SIGSEGV) in under a second; bnref says so instead, exit status 2, before joining."""
    with _listening(host) as port:
        cmd = [sys.executable, "-m", "bnref.train", "--backend", "jax", "--data-dir", str(tiny_fashion_dir),
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0", "--join-timeout", "5"]
        proc = run_logged(cmd, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert errors == [f"python -m bnref.train: error: --coordinator 127.0.0.1:{port}: port {port} is already in use; "
                      "process 0 listens there (pick a free port for the whole run)"], proc.stderr[-3000:]  # fmt: skip
    assert "Traceback" not in proc.stderr and "Failed to add port" not in proc.stderr  # JAX never tried


def _process_config(port, process_id):
    from bnref.train import TrainConfig

    return TrainConfig(backend="jax", replicas=2, batch_size=4, coordinator=f"127.0.0.1:{port}", num_processes=2,
                       process_id=process_id)  # fmt: skip


def test_check_coordinator_refuses_a_taken_port_for_process_0_only():
    import jax

    from bnref.jax.train import check_coordinator
    from bnref.torch.distributed import free_port

    with _listening("127.0.0.1") as port:
        with pytest.raises(ValueError, match=f"port {port} is already in use"):
            check_coordinator(_process_config(port, 0))
        check_coordinator(_process_config(port, 1))  # process 1 connects there: the port is meant to be taken
    check_coordinator(_process_config(free_port(), 0))  # free: no error, and nothing left bound
    assert not jax.distributed.is_initialized()
