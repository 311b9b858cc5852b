"""bnref's SyncBatchNorm and its launcher (bnref.torch.distributed) on gloo processes: against the
spec's sharded semantics (unequal and empty shards), without a process group, conversion, errors
that name the rank (a rank that raises, dies or stops: the launcher names it and never hangs),
torchrun's environment, what torch DDP does to plain BatchNorm's buffers, and the invariant that
proves it: R-replica training with synchronized BN equals one replica on the same global
batches, in this process and from the training CLI (--replicas, --resume, torchrun).

The spec's sharded semantics on their own (NumPy only) are in tests/test_spec.py; JAX's data
parallelism, and parity's --replicas runs (both frameworks against the spec), in
tests/test_jax_distributed.py.

Multi-process tests spawn gloo processes on loopback; each launch has a deadline (and every
collective a timeout), each subprocess a timeout, and every test a hard limit (:func:`limit`
from tests/_helpers.py, enforced by conftest's ``hard_limit`` with SIGALRM), so nothing can
hang the suite. Each subprocess and each multi-process training run says on the terminal what
it runs and how long it took (conftest's ``say``, ``timed`` and ``run_logged``: pytest's output
capture is suspended for those lines), so a run of this file never sits silent for minutes.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _helpers import limit, make_shards

from bnref import spec, testing
from bnref.torch import BatchNorm2d, LeNetBN
from bnref.torch._runners import run_sync_bn
from bnref.torch.distributed import ReplicaError, launch
from bnref.torch.sync import SyncBatchNorm

pytestmark = pytest.mark.usefixtures("torch_one_thread", "hard_limit")

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
import test_torch_distributed as t
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


def _leaves_a_mark_at_exit(rank, world, send, marks):
    import atexit

    atexit.register(lambda: open(os.path.join(marks, f"finalized-{rank}"), "w").close())
    torch.distributed.barrier()
    return rank


@limit(120)
def test_launched_processes_end_without_the_interpreter_s_finalization(tmp_path):
    # gloo's threads outlive destroy_process_group and can abort a finalizing interpreter
    # (bnref._torchrun): a replica ends with os._exit once its result is through the pipe, so its
    # atexit handlers never run, and the result still arrives
    assert launch(_leaves_a_mark_at_exit, 2, (str(tmp_path),), timeout_s=30, deadline_s=90, threads=1) == [0, 1]
    assert sorted(os.listdir(tmp_path)) == []


def _exit_of(main):
    from bnref import _torchrun

    codes = []

    class Exited(Exception):
        pass

    def fake_exit(code):
        codes.append(code)
        raise Exited

    original = _torchrun.exit_process
    _torchrun.exit_process = fake_exit
    try:
        with pytest.raises(Exited):
            _torchrun.run_and_exit(main)
    finally:
        _torchrun.exit_process = original
    return codes[0]


def _raise(e):
    def main():
        raise e

    return main


def test_run_and_exit_gives_the_status_the_interpreter_would(capsys):
    assert _exit_of(lambda: None) == 0
    assert _exit_of(_raise(SystemExit(2))) == 2
    assert _exit_of(_raise(SystemExit(None))) == 0
    assert _exit_of(_raise(SystemExit("error: bad flag"))) == 1
    assert "error: bad flag" in capsys.readouterr().err
    assert _exit_of(_raise(RuntimeError("boom"))) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err


@pytest.mark.parametrize("launched", [True, False], ids=["torchrun", "not-launched"])
def test_a_torchrun_process_of_the_cli_ends_with_os_exit(launched, tmp_path):
    # under torchrun, bnref.train's cli ends through run_and_exit: the status is the parser's 2, and
    # an atexit handler never runs; launched by hand, the interpreter finalizes as usual
    script = ("import atexit, sys; atexit.register(lambda: print('finalized', flush=True)); "
              "from bnref.train import cli; sys.argv = ['bnref.train', '--backend', 'jax']; sys.exit(cli())")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN}
    if launched:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    else:
        script = script.replace("'jax'", "'jax', '--epochs', '0'")  # a parser error without torchrun too
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert ("finalized" in proc.stdout) is not launched, proc.stdout
    assert ("a torchrun launch trains with --backend torch" in proc.stderr) is launched, proc.stderr


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
def test_cli_bad_replica_flags_fail_before_data_loads(argv, message, tmp_path, usage_error):
    from bnref import train

    err = usage_error(train.main, ["--backend", "torch", "--data-dir", str(tmp_path / "absent"), "--no-download",
                                   *argv]).err  # fmt: skip
    assert message in err


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
