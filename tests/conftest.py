"""Shared fixtures and strict numerics for the whole suite.

- Warnings are errors (pyproject's ``filterwarnings``).
- On a GPU, TF32 matmuls/convolutions are switched off so float32 means float32.
- ``tiny_fashion_dir``: ``bnref.data.synthetic`` written as the four IDX files with bnref's
  own writers, for training smoke tests that run the real CLI.
- ``corrupt_fashion_dir``: those files with the training images corrupted (tools' error paths).
- ``real_fashion_dir``: the true dataset when present (Debian's dataset-fashion-mnist, or
  $BNREF_DATA_DIR), else the test is skipped with the reason.
- ``usage_error``: ``usage_error(main, argv)`` runs a command's ``main`` and checks it exits with
  status 2 (a bad flag or bad input, refused before any work); returns what it printed, for the
  test's own checks of the message.
- ``hard_limit`` (the distributed tests ask for it in their ``pytestmark``): a test's hard time
  limit, SIGALRM, ``_helpers.DEFAULT_LIMIT_S`` unless the test says otherwise with
  ``@_helpers.limit(seconds)``.
- ``say``, ``timed``, ``run_logged``: progress on the terminal, under pytest's output capture,
  for tests that run subprocesses or multi-process training for minutes.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from _helpers import DEFAULT_LIMIT_S


def pytest_configure(config):
    if "torch" in sys.modules or _importable("torch"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    # Training runs write a run directory by default (runs/...): keep the suite's out of the tree.
    import tempfile

    os.environ["BNREF_RUNS_DIR"] = tempfile.mkdtemp(prefix="bnref-test-runs-")


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="session")
def tiny_fashion_dir(tmp_path_factory):
    from bnref import data

    return data.write_fashion_mnist(tmp_path_factory.mktemp("tiny-fashion-mnist"), data.synthetic(512, 256))


@pytest.fixture
def corrupt_fashion_dir(tmp_path):
    """``tmp_path/corrupt``: the four files, the training images replaced by bytes that are not
    IDX (a bad magic number), for the tools' "corrupt --data-dir" tests."""
    from bnref import data

    d = data.write_fashion_mnist(tmp_path / "corrupt", data.synthetic(64, 16))
    (d / data.FILES["train_images"]).write_bytes(b"not an IDX file at all")
    return d


@pytest.fixture(scope="session")
def real_fashion_dir():
    from bnref import data

    d = data.find_data_dir()  # explicit dir, $BNREF_DATA_DIR, cache, Debian's package
    if d is None:
        pytest.skip("real Fashion-MNIST files not present (apt-get install dataset-fashion-mnist, or set BNREF_DATA_DIR)")
    return d


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module's tests: on a shared 2-core machine, OpenMP threads that
    wait for each other under load made the training tests 5x slower (measured); results
    are the same either way."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def usage_error(capsys):
    """``usage_error(main, argv)``: ``main(argv)`` must exit with status 2 (``SystemExit(2)``:
    argparse's usage errors and bnref's own bad-input errors); returns ``capsys.readouterr()``
    (``.out``, ``.err``), what it printed, for the test to check the message."""

    def run(main, argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        captured = capsys.readouterr()
        assert e.value.code == 2, f"exit status {e.value.code!r}, not 2; stderr: {captured.err[-3000:]}"
        return captured

    return run


# --- guards for the multi-process tests: a hard limit per test, and progress on the terminal -----------


class _Overrun(BaseException):
    """Raised by SIGALRM: a BaseException, so that no ``except Exception`` in the code under test
    swallows it."""


@pytest.fixture
def hard_limit(request):
    """Fail the test past its limit: ``limit_s`` set on it by ``_helpers.limit``, else
    :data:`_helpers.DEFAULT_LIMIT_S` (and the launcher's cleanup kills its processes)."""
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
