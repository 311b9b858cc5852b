"""JAX's data parallelism: replicas are devices (host devices on a CPU, set before JAX starts: a
subprocess) that train with synchronized BN (axis_name under shard_map) like one device, the
CLI's --replicas beyond the devices, multi-process JAX (jax.distributed.initialize, CPU
collectives over gloo: processes that train like one device, a peer that never joins, bad
process flags) and the coordinator's port (bnref.jax.distributed.check_coordinator); and
``python -m bnref.parity --replicas``, which runs bnref.jax and flax.linen with axis_name on 2
host devices and bnref.torch's SyncBatchNorm on 2 gloo processes against the spec and one device.

The spec's sharded semantics (NumPy only) are in tests/test_spec.py, torch's data parallelism
in tests/test_torch_distributed.py.

Every test has a hard limit (:func:`limit` from tests/_helpers.py, enforced by conftest's
``hard_limit`` with SIGALRM) and each subprocess a timeout, so nothing can hang the suite; each
subprocess says on the terminal what it runs and how long it took (conftest's ``timed`` and
``run_logged``), so a run of this file never sits silent for minutes.
"""

import contextlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from _helpers import limit

pytestmark = pytest.mark.usefixtures("hard_limit")

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


def test_jax_replicas_beyond_the_devices_is_a_clear_error(usage_error):
    import jax

    from bnref import train

    n = len(jax.devices("cpu"))
    err = usage_error(train.main, ["--backend", "jax", "--replicas", str(2 * n), "--batch-size", str(4 * n), "--device",
                                   "cpu"]).err  # fmt: skip
    assert f"needs {2 * n} cpu devices; JAX has {n}" in err


# --- parity's --replicas: both frameworks against the spec and against one device (a subprocess each) --------


@limit(330)
def test_parity_replicas_compares_every_implementation_with_the_spec(run_logged):
    """`python -m bnref.parity --replicas 2` (a subprocess: it provides 2 JAX host devices before JAX
    starts): bnref.torch's SyncBatchNorm on 2 gloo processes for equal, unequal and empty shards;
    bnref.jax and flax.linen, bnref.nnx and flax.nnx with axis_name on 2 devices for equal shards
    (shard_map's shards are equal; the other cells say so); torch.nn's SyncBatchNorm is CUDA-only."""
    import json

    cmd = [sys.executable, "-m", "bnref.parity", "--replicas", "2", "--preset", "d2l", "--dtype", "float64", "--json"]
    proc = run_logged(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cells = {(c["layout"].split()[0], c["impl"]): c for c in json.loads(proc.stdout)}
    for sharding in ("equal", "unequal", "empty"):
        assert cells[(sharding, "bnref.torch")]["status"] == "pass"
        assert "CUDA only" in cells[(sharding, "torch.nn")]["reason"]
    for impl in ("bnref.jax", "flax.linen", "bnref.nnx", "flax.nnx"):  # NNX's layers under the same harness
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
        (["--backend", "torch", "--num-processes", "2", "--coordinator", "h:1"], "num_processes is the JAX and Flax NNX backends' multi-process runtime"),
    ],
    ids=["no-coordinator", "no-port", "bad-id", "replicas", "lone-coordinator", "torch"],
)
def test_cli_bad_process_flags_fail_before_joining(argv, message, tmp_path, usage_error):
    from bnref import train

    err = usage_error(train.main, ["--backend", "jax", "--data-dir", str(tmp_path / "absent"), "--no-download",
                                   *argv]).err  # fmt: skip
    assert message in err and "joining" not in err


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

    from bnref.jax.distributed import check_coordinator
    from bnref.torch.distributed import free_port

    with _listening("127.0.0.1") as port:
        with pytest.raises(ValueError, match=f"port {port} is already in use"):
            check_coordinator(_process_config(port, 0))
        check_coordinator(_process_config(port, 1))  # process 1 connects there: the port is meant to be taken
    check_coordinator(_process_config(free_port(), 0))  # free: no error, and nothing left bound
    assert not jax.distributed.is_initialized()
