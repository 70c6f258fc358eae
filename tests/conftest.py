"""Shared test fixtures. Keep each fixture tiny (the whole suite runs on 2 shared CPU cores)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

# No network at test time: Hugging Face / timm must never try to download.
os.environ["HF_HUB_OFFLINE"] = "1"

FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as gzipped IDX, byte by byte from the spec (independent of cmpnas' reader)."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + np.ascontiguousarray(array).tobytes())


@pytest.fixture
def tiny_idx_arrays() -> dict[str, np.ndarray]:
    """A Fashion-MNIST-shaped toy set: 10 classes, 10 train + 3 test images each, 28x28 uint8.

    Class k is a bright horizontal band at rows 2k..2k+4 over seeded noise, so it is learnable.
    """
    rng = np.random.default_rng(1234)

    def make(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        images = rng.integers(0, 60, size=(labels.size, 28, 28), dtype=np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k : 2 * k + 5, :] = 200
        return images, labels

    train_images, train_labels = make(10)
    test_images, test_labels = make(3)
    return {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }


@pytest.fixture
def tiny_idx_dir(tmp_path: Path, tiny_idx_arrays: dict[str, np.ndarray]) -> Path:
    """A folder holding the four Fashion-MNIST .gz files (IDX format) with :func:`tiny_idx_arrays`."""
    folder = tmp_path / "tiny-fashion-mnist"
    folder.mkdir()
    for key, name in FASHION_FILES.items():
        write_idx_gz(folder / name, tiny_idx_arrays[key])
    return folder
