"""The pipeline's index stage: a run's dataset split (Fashion-MNIST rows, an in-memory set, a folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cmpnas.serving.index import GalleryIndex
from cmpnas.stages import index_dataset

CLASSES = ("stripes", "checks", "blobs")  # the gallery_dir fixture: 12 images per class folder


@pytest.mark.filterwarnings("ignore:skipped 1 unreadable image")  # the gallery's deliberately broken file
def test_build_index_from_data_configs(
    tmp_path: Path, models: Any, tiny_idx_dir: Path, gallery_dir: Path
) -> None:
    from cmpnas.config import DataConfig

    fm = index_dataset(
        models.gallery, DataConfig(root=str(tiny_idx_dir), subset_test=12), "test", tmp_path / "fm"
    )
    assert fm["count"] == 12 and fm["dataset"] == "fashion_mnist/test" and fm["index_type"] == "flat"
    assert GalleryIndex.load(tmp_path / "fm").items[11].id == "fashion_mnist/test/000011"

    syn = index_dataset(
        models.gallery,
        DataConfig(name="synthetic", subset_train=50, subset_test=20),
        "test",
        tmp_path / "syn",
    )
    assert syn["count"] == 20
    index = GalleryIndex.load(tmp_path / "syn")
    assert (
        index.items[3].id == "synthetic/test/000003"
        and index.thumbnail_image("synthetic/test/000003") is None
    )

    folder = index_dataset(
        models.gallery, DataConfig(name="folder", root=str(gallery_dir)), "test", tmp_path / "folder"
    )
    index = GalleryIndex.load(tmp_path / "folder")
    assert folder["count"] == len(index) >= 3 and folder["skipped_unreadable"] == 0
    # small folders are held in memory by the data package (no paths): ids name rows, labels classes
    assert index.items[0].id == "folder/test/000000" and {it.label for it in index.items} == set(CLASSES)
