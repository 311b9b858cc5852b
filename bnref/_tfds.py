"""Fashion-MNIST from tensorflow-datasets (``load_fashion_mnist(source="tfds")``), an optional source.

``tfds.data_source`` reads TFDS's prepared ArrayRecord files without TensorFlow (preparing them,
the first download, needs it: TFDS encodes the images to PNG with ``tf.image``). The import is
lazy: ``import bnref.data`` must not import tensorflow-datasets, and without it
``source="tfds"`` is an ``ImportError`` naming the extra to install.
"""

from __future__ import annotations

import os

import numpy as np


def load_arrays(data_dir: str | os.PathLike | None, download: bool) -> dict[str, np.ndarray]:
    """Both splits of TFDS's ``fashion_mnist`` as :class:`bnref.data.FashionMNIST`'s fields,
    ``{"train_images", "train_labels", "test_images", "test_labels"}``: images uint8
    ``(N, 28, 28)``, labels int64 ``(N,)``. ``data_dir`` is TFDS's own data directory;
    ``download`` is passed to TFDS."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "source='tfds' needs tensorflow-datasets and array-record: pip install 'bnref[tfds]'"
        ) from e
    arrays = {}
    for split in ("train", "test"):
        # data_source reads ArrayRecord files and decodes with NumPy/PIL, so unlike
        # tfds.load it needs no TensorFlow. Examples are read one at a time because
        # tfds.testing.mock_data's batched __getitems__ is broken (tfds 4.9.10).
        ds = tfds.data_source("fashion_mnist", split=split, data_dir=data_dir, download=download)
        examples = [ds[i] for i in range(len(ds))]
        # Each image is (28, 28, 1); drop the channel axis -> (N, 28, 28).
        arrays[f"{split}_images"] = np.stack([ex["image"][..., 0] for ex in examples])
        arrays[f"{split}_labels"] = np.array([ex["label"] for ex in examples], dtype=np.int64)  # (N,)
    return arrays
