"""Shared fixtures and strict numerics for the whole suite.

- Warnings are errors (pyproject's ``filterwarnings``).
- On a GPU, TF32 matmuls/convolutions are switched off so float32 means float32.
- ``tiny_fashion_dir``: small, learnable Fashion-MNIST look-alike IDX files (written with
  bnref's own writers), for training smoke tests that run the real CLI.
- ``real_fashion_dir``: the true dataset when present (Debian's dataset-fashion-mnist, or
  $BNREF_DATA_DIR), else the test is skipped with the reason.
"""

import os
import sys

import numpy as np
import pytest


def pytest_configure(config):
    if "torch" in sys.modules or _importable("torch"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def synthetic_fashion(n, seed):
    """``n`` 28x28 uint8 images whose class (0..9) is a bright 7x7 block at a class-specific
    place plus noise: learnable in a few steps, so a smoke test can see the loss fall."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int64)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for k in range(10):
        r, c = divmod(k, 4)
        images[labels == k, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] = 230
    return images, labels


@pytest.fixture(scope="session")
def tiny_fashion_dir(tmp_path_factory):
    from bnref import data

    d = tmp_path_factory.mktemp("tiny-fashion-mnist")
    for prefix, n, seed in (("train", 512, 0), ("t10k", 256, 1)):
        images, labels = synthetic_fashion(n, seed)
        data.write_idx_images(d / f"{prefix}-images-idx3-ubyte.gz", images)
        data.write_idx_labels(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return d


@pytest.fixture(scope="session")
def real_fashion_dir():
    from bnref import data

    d = data.find_data_dir()  # explicit dir, $BNREF_DATA_DIR, cache, Debian's package
    if d is None:
        pytest.skip("real Fashion-MNIST files not present (apt-get install dataset-fashion-mnist, or set BNREF_DATA_DIR)")
    return d
