"""build_data: dispatch, stratified subsets, val split (with clipping), mean/std."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmpnas.config import DataConfig
from cmpnas.data import factory
from cmpnas.data.factory import DATA_SOURCES, build_data
from cmpnas.errors import CmpnasError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def test_registry_covers_every_config_name():
    names = typing.get_args(DataConfig.model_fields["name"].annotation)
    assert set(DATA_SOURCES) == set(names)


def test_fashion_mnist_subsets_val_clip_and_stats(tiny_idx_dir, tiny_idx_arrays):
    cfg = DataConfig(root=str(tiny_idx_dir), download=False, subset_train=50, subset_test=20, val_size=5000)
    bundle = build_data(cfg)
    # 50 of 100 train (5 per class), val clipped to 20% of 50 = 10 (1 per class), 20 of 30 test (2 per class).
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 20)
    assert torch.bincount(bundle.train.labels).tolist() == [4] * 10
    assert torch.bincount(bundle.val.labels).tolist() == [1] * 10
    assert torch.bincount(bundle.test.labels).tolist() == [2] * 10
    info = bundle.describe()
    assert info["counts"] == {"train": 40, "val": 10, "test": 20}
    assert any("val_size clipped from 5000 to 10" in n for n in info["notes"])
    assert bundle.num_classes == 10 and bundle.class_names[9] == "Ankle boot"
    assert bundle.train.images.shape[1:] == (1, 28, 28)
    # The images are the fixture's: each one's pixels/label pair occurs in the source arrays.
    src = {
        arr.tobytes(): int(lbl)
        for arr, lbl in zip(tiny_idx_arrays["train_images"], tiny_idx_arrays["train_labels"], strict=True)
    }
    for ds in (bundle.train, bundle.val):
        for i in range(len(ds)):
            img, label = ds[i]
            assert src[img[0].numpy().tobytes()] == label
    # Train and val are disjoint.
    train_keys = {bundle.train.images[i].numpy().tobytes() for i in range(len(bundle.train))}
    assert not any(bundle.val.images[i].numpy().tobytes() in train_keys for i in range(len(bundle.val)))
    # mean/std from the train split, hand-computed with numpy.
    pixels = bundle.train.images.numpy().astype(np.float64) / 255.0
    assert bundle.mean[0] == pytest.approx(pixels.mean(), abs=1e-9)
    assert bundle.std[0] == pytest.approx(pixels.std(), abs=1e-9)


def test_build_is_deterministic_and_seed_sensitive(tiny_idx_dir):
    cfg = DataConfig(root=str(tiny_idx_dir), download=False, subset_train=60, val_size=10, seed=2)
    a, b = build_data(cfg), build_data(cfg)
    c = build_data(cfg.model_copy(update={"seed": 3}))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.val.images, c.val.images)


def test_subset_larger_than_data_is_noted(tiny_idx_dir):
    bundle = build_data(DataConfig(root=str(tiny_idx_dir), download=False, subset_test=1000, val_size=0))
    assert len(bundle.test) == 30 and len(bundle.val) == 0 and len(bundle.train) == 100
    assert any("subset_test=1000" in n for n in bundle.notes)
    assert bundle.describe()["class_counts"]["val"] == [0] * 10


def test_fashion_mnist_rgb_and_resize(tiny_idx_dir):
    bundle = build_data(
        DataConfig(root=str(tiny_idx_dir), download=False, in_chans=3, image_size=14, val_size=10)
    )
    img, _ = bundle.train[0]
    assert img.shape == (3, 14, 14) and img.dtype == torch.uint8
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert bundle.in_chans == 3 and bundle.image_size == 14 and len(bundle.mean) == 3
    # The bright class band (rows 2k..2k+4 at 28 px) lands on rows k..k+2 after halving.
    label = bundle.train[0][1]
    assert img[0, label + 1].float().mean() > 150


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist missing"
)
def test_real_fashion_mnist_with_subsets(monkeypatch):
    monkeypatch.delenv("CMPNAS_DATA", raising=False)
    bundle = build_data(DataConfig(subset_train=1000, subset_test=500, val_size=5000, download=False))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (800, 200, 500)
    assert torch.bincount(bundle.test.labels).tolist() == [50] * 10
    assert 0.2 < bundle.mean[0] < 0.4 and 0.25 < bundle.std[0] < 0.45


def test_synthetic_via_factory():
    bundle = build_data(DataConfig(name="synthetic", subset_train=200, subset_test=50, val_size=30))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (170, 30, 50)
    assert bundle.name == "synthetic" and bundle.num_classes == 10


def _tree(root: Path, classes: int, per_class: int) -> Path:
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((6, 6), 20 * k + i, np.uint8)).save(root / f"c{k}" / f"{i}.png")
    return root


def test_folder_via_factory_with_open_set(tmp_path):
    root = _tree(tmp_path / "imgs", classes=4, per_class=10)
    cfg = DataConfig(name="folder", root=str(root), image_size=8, open_set=True, open_set_test_fraction=0.25)
    bundle = build_data(cfg)
    assert bundle.open_set and bundle.num_classes == 3
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (24, 6, 10)
    assert set(bundle.test.labels.tolist()) == {3}
    assert set(bundle.train.labels.tolist()) == set(bundle.val.labels.tolist()) == {0, 1, 2}
    assert bundle.describe()["class_counts"]["test"] == [0, 0, 0, 10]


def test_csv_via_factory(tmp_path):
    _tree(tmp_path, classes=2, per_class=5)
    rows = [f"c{k}/{i}.png,c{k}" for k in range(2) for i in range(5)]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    bundle = build_data(DataConfig(name="csv", root=str(tmp_path / "m.csv"), image_size=8, val_size=2))
    # 8 training images: val_size=2 is clipped to 20% of them, i.e. 1.
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (7, 1, 2)
    assert any("clipped from 2 to 1" in n for n in bundle.notes)
    assert bundle.class_names == ["c0", "c1"]


def test_missing_roots_are_user_errors():
    with pytest.raises(CmpnasError, match="data.root"):
        build_data(DataConfig(name="csv"))
    with pytest.raises(CmpnasError, match="data.root"):
        build_data(DataConfig(name="folder"))


def test_unknown_source_name(monkeypatch):
    cfg = DataConfig()
    monkeypatch.setattr(factory, "DATA_SOURCES", {})
    with pytest.raises(CmpnasError, match="Unknown data.name"):
        build_data(cfg)


def test_open_set_refused_where_the_source_has_no_classes_to_hold_out():
    with pytest.raises(CmpnasError, match="open_set is not supported for data.name=synthetic"):
        build_data(DataConfig(name="synthetic", open_set=True))


def test_fashion_mnist_open_set_holds_classes_out_of_training(tiny_idx_dir, tiny_idx_arrays):
    # 10 classes, 30 % held out -> 3; val = their 10 training images each, test = their 3 test images each
    d = build_data(DataConfig(root=str(tiny_idx_dir), open_set=True, val_size=1000))
    assert d.open_set and d.num_classes == 7
    assert sorted(set(d.train.labels.tolist())) == list(range(7))
    assert sorted(set(d.val.labels.tolist())) == sorted(set(d.test.labels.tolist())) == [7, 8, 9]
    assert (len(d.train), len(d.val), len(d.test)) == (70, 30, 9)
    # the renumbering keeps names with their images: every val image is one of its class's training images
    held = [factory.fashion_mnist.CLASS_NAMES.index(n) for n in d.class_names[7:]]
    train_x, train_y = tiny_idx_arrays["train_images"], tiny_idx_arrays["train_labels"]
    for img, label in zip(d.val.images[:, 0].numpy(), d.val.labels.tolist(), strict=True):
        original = held[label - 7]
        assert any(np.array_equal(img, x) for x in train_x[train_y == original])
    assert d.class_names[:7] == [n for n in factory.fashion_mnist.CLASS_NAMES if factory.fashion_mnist.CLASS_NAMES.index(n) not in held]


def test_digits_source_closed_and_open_set():
    pytest.importorskip("sklearn")
    d = build_data(DataConfig(name="digits"))
    assert (len(d.train) + len(d.val), len(d.test)) == (1438, 359)  # round(0.2 x 1,797) held out for test
    assert d.train.images.dtype == torch.uint8 and tuple(d.train.images.shape[1:]) == (1, 28, 28)
    assert sorted(set(d.test.labels.tolist())) == list(range(10))
    o = build_data(DataConfig(name="digits", open_set=True))
    assert o.num_classes == 7 and set(o.val.labels.tolist()) == set(o.test.labels.tolist()) == {7, 8, 9}
