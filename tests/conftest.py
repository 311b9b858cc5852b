"""Shared fixtures and strict numerics for the whole suite.

- Warnings are errors (pyproject's ``filterwarnings``).
- On a GPU, TF32 matmuls/convolutions are switched off so float32 means float32.
- ``tiny_fashion_dir``: ``bnref.data.synthetic`` written as the four IDX files with bnref's
  own writers, for training smoke tests that run the real CLI.
- ``corrupt_fashion_dir``: those files with the training images corrupted (tools' error paths).
- ``real_fashion_dir``: the true dataset when present (Debian's dataset-fashion-mnist, or
  $BNREF_DATA_DIR), else the test is skipped with the reason.
"""

import os
import sys

import pytest


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
