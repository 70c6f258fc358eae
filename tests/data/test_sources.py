"""Image sources an index reads: folder, CSV, built-in dataset split (ids, labels, errors, re-rendering)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cmpnas.data.fashion_mnist import CLASS_NAMES
from cmpnas.data.folder import read_csv_manifest, scan_image_folder
from cmpnas.data.sources import (
    RAW_DATASETS,
    csv_source,
    dataset_source,
    folder_source,
    load_dataset_split,
    load_item_image,
    parse_dataset_item_id,
)
from cmpnas.errors import CmpnasError


def test_csv_source_relative_paths_and_header(tmp_path: Path, pattern: Any) -> None:
    for i in range(4):
        pattern("stripes", i).save(tmp_path / f"s{i}.png")
    (tmp_path / "list.csv").write_text("path,label\ns0.png,shirt\ns1.png,shirt\n\ns2.png,dress\n")
    src = csv_source(tmp_path / "list.csv")
    assert [(it.id, it.label) for it in src.items] == [
        ("s0.png", "shirt"),
        ("s1.png", "shirt"),
        ("s2.png", "dress"),
    ]
    assert src.items[2].path == str((tmp_path / "s2.png").resolve())
    assert src.load(2) is not None


def test_csv_source_without_header_or_labels(tmp_path: Path, pattern: Any) -> None:
    pattern("checks", 0).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.csv").write_text("../a.png,shirt\n../a.png\n")
    src = csv_source(tmp_path / "sub" / "list.csv")
    assert [(it.id, it.label) for it in src.items] == [("../a.png", "shirt"), ("../a.png", "")]
    assert src.items[0].path == str((tmp_path / "a.png").resolve())
    # the training reader shares the row reading, but needs the header and the labels
    with pytest.raises(CmpnasError, match="lacks the column"):
        read_csv_manifest(tmp_path / "sub" / "list.csv")


def test_missing_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CmpnasError, match="does not exist"):
        folder_source(tmp_path / "nope")
    with pytest.raises(CmpnasError, match="No image files"):
        folder_source(tmp_path)
    with pytest.raises(CmpnasError, match="does not exist"):
        csv_source(tmp_path / "nope.csv")
    with pytest.raises(CmpnasError, match="Unknown dataset") as err:
        dataset_source("imagenet")
    assert all(name in str(err.value) for name in RAW_DATASETS)
    (tmp_path / "header-only.csv").write_text("path,label\n")
    with pytest.raises(CmpnasError, match="has no rows"):
        csv_source(tmp_path / "header-only.csv")


def test_folder_source_lists_the_same_files_as_the_training_reader(tmp_path: Path, pattern: Any) -> None:
    cls = tmp_path / "shirts"
    (cls / "sub").mkdir(parents=True)
    (cls / ".thumbs").mkdir()
    pattern("stripes", 0).save(cls / "a.ppm")  # only the training reader's list used to have .ppm
    pattern("stripes", 1).save(cls / ".hidden.png")  # only folder_source used to list hidden files
    pattern("stripes", 2).save(cls / ".thumbs" / "c.png")
    pattern("stripes", 3).save(cls / "sub" / "d.png")
    pattern("stripes", 4).save(cls / "B.JPG")
    (cls / "notes.txt").write_text("not an image")
    served = [Path(it.path) for it in folder_source(tmp_path).items]
    trained = [r.path.resolve() for r in scan_image_folder(tmp_path)]
    assert served == trained
    assert sorted(p.name for p in served) == ["B.JPG", "a.ppm", "d.png"]
    assert [it.label for it in folder_source(tmp_path).items] == ["shirts", "shirts", "shirts/sub"]


def test_fashion_mnist_ids_labels_and_thumbnails(tiny_idx_dir: Path) -> None:
    images, labels = load_dataset_split("fashion_mnist", "test", str(tiny_idx_dir))
    assert images.shape == (30, 28, 28)  # the shared toy set: 3 test images per class
    src = dataset_source("fashion_mnist", "test", str(tiny_idx_dir), limit=20)
    assert len(src.items) == 20
    assert src.items[7].id == "fashion_mnist/test/000007"
    assert src.items[7].label == CLASS_NAMES[int(labels[7])]
    assert parse_dataset_item_id("fashion_mnist/test/000007") == ("fashion_mnist", "test", 7)
    assert parse_dataset_item_id("synthetic/test/000007") is None
    sources = [src.description]
    thumb = load_item_image("fashion_mnist/test/000013", "", sources)
    assert thumb is not None and thumb.mode == "L" and np.array_equal(np.asarray(thumb), images[13])
    assert load_item_image("fashion_mnist/test/000999", "", sources) is None  # past the split's end


def test_registered_rgb_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pattern: Any) -> None:
    rgb = np.stack([np.asarray(pattern("checks", i, size=12)) for i in range(5)])
    calls = []

    def toy(split: str, root: str | None, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        calls.append((split, root, download))
        return rgb, np.array([0, 1, 0, 1, 1]), ["round", "flat"]

    monkeypatch.setitem(RAW_DATASETS, "toy_rgb_sources_test", toy)
    src = dataset_source("toy_rgb_sources_test", "train", str(tmp_path), limit=3)
    assert [(it.id, it.label) for it in src.items] == [
        ("toy_rgb_sources_test/train/000000", "round"),
        ("toy_rgb_sources_test/train/000001", "flat"),
        ("toy_rgb_sources_test/train/000002", "round"),
    ]
    img = src.load(1)
    assert img is not None and img.mode == "RGB" and np.array_equal(np.asarray(img), rgb[1])
    again = load_item_image("toy_rgb_sources_test/train/000004", "", [src.description])
    assert again is not None and np.array_equal(np.asarray(again), rgb[4])
    assert calls[0] == ("train", str(tmp_path), True)
    with pytest.raises(CmpnasError, match="Unknown split"):
        dataset_source("toy_rgb_sources_test", "val")
