"""Shared test fixtures. Keep each fixture tiny (the whole suite runs on 2 shared CPU cores)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def pattern_image(kind: str, seed: int, size: int = 40) -> Image.Image:
    """A distinct RGB picture per (kind, seed): stripes, checks or a blob, plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4, 12)
    if kind == "stripes":
        base = np.sin(2 * np.pi * (yy + rng.uniform(0, 10)) / period)
    elif kind == "checks":
        base = np.sign(np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period))
    else:
        cy, cx = rng.uniform(8, size - 8, 2)
        base = 2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(3, 8) ** 2)) - 1
    gray = (base + 1) * 110 + rng.normal(0, 12, (size, size))
    rgb = np.stack([gray, gray * rng.uniform(0.6, 1.0), gray * rng.uniform(0.6, 1.0)], -1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="session")
def pattern():  # type: ignore[no-untyped-def]
    """The picture generator ``pattern(kind, seed)`` (kind: stripes, checks or blob), e.g. of the serving
    tests' gallery, where item ``kind/NNN.png`` is seed 100*class+N."""
    return pattern_image


# ----------------------------------------------------------------------------------------------------
# Tiny end-to-end fixtures (config, data, a trained gallery): synthetic data and resnet_small nets, so a whole
# train-gallery / train-query / supernet / search stage runs in about a second on one thread.

TINY_GALLERY_MODEL = {
    "backbone": "resnet_small",
    "backbone_kwargs": {"widths": [8, 16], "depths": [1, 1], "strides": [1, 2]},
    "embed_dim": 16,
}
TINY_QUERY_MODEL = {
    "backbone": "resnet_small",
    "backbone_kwargs": {"widths": [4, 8], "depths": [1, 1], "strides": [2, 2]},
    "embed_dim": 16,
}
TINY_SPACE = {
    "stem_channels": 8,
    "stage_repeats": [1, 1],
    "stage_widths": [16, 32],
    "stage_strides": [2, 2],
    "last_channels": 32,
    "channel_scales": [0.5, 1.0],
}


def tiny_train_section(**overrides: object) -> dict:
    """A TrainConfig section for ~6 steps per epoch on the tiny data (one thread, frequent logs)."""
    return {"epochs": 1, "batch_size": 50, "warmup_epochs": 0.1, "log_every": 2, "threads": 1, **overrides}


def tiny_config_raw() -> dict:
    """Raw (YAML-like) config: synthetic data (300 pool / 100 test / 50 val), tiny models, tiny SPOS space."""
    import copy

    return copy.deepcopy(
        {
            "data": {"name": "synthetic", "subset_train": 300, "subset_test": 100, "val_size": 50},
            "gallery": TINY_GALLERY_MODEL,
            "gallery_train": tiny_train_section(epochs=2),
            "query": TINY_QUERY_MODEL,
            "query_train": tiny_train_section(),
            "compat": {"mode": "bct"},
            "nas": {
                "space": TINY_SPACE,
                "budget_cost_reduction": 5,
                "supernet_train": tiny_train_section(),
                # 6 steps on the tiny synthetic data leave paths a few points above chance: the search's health
                # floor is chance itself here (the refusal is tested with the default floor)
                "supernet": {"min_skill": 0.0, "health_paths": 4},
                "retrain": tiny_train_section(),
                "study_train": tiny_train_section(epochs=0.5),
                "study_archs": 1,
                "search": {
                    "population": 4,
                    "generations": 2,
                    "parents": 2,
                    "mutations": 2,
                    "crossovers": 2,
                    "recal_images": 64,
                    "recal_batch": 32,
                    "val_images": 50,
                },
            },
            "run": {"baselines": [], "latency_repeats": 3},
            "eval_batch_size": 256,
        }
    )


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (2 shared cores; bitwise-reproducible CPU kernels)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_raw() -> dict:
    return tiny_config_raw()


@pytest.fixture
def tiny_config(tiny_raw: dict):
    from cmpnas.config import build_config

    return build_config(tiny_raw)


@pytest.fixture(scope="session")
def tiny_data():
    """The DataBundle of :func:`tiny_config_raw` (built once; datasets are read-only)."""
    from cmpnas.config import build_config
    from cmpnas.data.factory import build_data

    return build_data(build_config(tiny_config_raw()).data)


@pytest.fixture(scope="session")
def tiny_gallery(tmp_path_factory: pytest.TempPathFactory, tiny_data) -> Path:
    """A gallery trained 2 epochs on the tiny data; returns its model.safetensors (read-only)."""
    import torch

    from cmpnas.config import build_config
    from cmpnas.stages import train_gallery

    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("tiny-gallery")
    train_gallery(build_config(tiny_config_raw()), out, data=tiny_data)
    torch.set_num_threads(before)
    return out / "model.safetensors"


@pytest.fixture
def tiny_train():
    """:func:`tiny_train_section` for tests (test modules must not ``import conftest``: several exist)."""
    return tiny_train_section


@pytest.fixture(scope="session")
def tiny_raw_factory():
    """:func:`tiny_config_raw` for module/session-scoped fixtures (each call returns a fresh copy)."""
    return tiny_config_raw
