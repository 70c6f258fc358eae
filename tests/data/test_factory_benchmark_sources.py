"""build_data for the benchmark sources: DeepFashion2 item crops and an ImageFolder of aligned faces."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_protocols import DeepFashion2Fixture, make_deepfashion2_fixture  # noqa: E402

from cmpnas.config import DataConfig  # noqa: E402
from cmpnas.data.factory import build_data  # noqa: E402
from cmpnas.errors import CmpnasError  # noqa: E402


@pytest.fixture(scope="module")
def df2(tmp_path_factory: pytest.TempPathFactory) -> DeepFashion2Fixture:
    root = tmp_path_factory.mktemp("df2")
    make_deepfashion2_fixture(root, split="train", n_pairs=4)
    return make_deepfashion2_fixture(root, split="validation", n_pairs=3)


def _df2(df2: DeepFashion2Fixture, **options) -> DataConfig:
    options = {"val_size": 2, **options}
    return DataConfig(name="deepfashion2", root=str(df2.root), image_size=16, in_chans=3, **options)


def test_deepfashion2_category_labels_share_classes_across_splits(df2) -> None:
    bundle = build_data(_df2(df2, label="category"))
    # 4 pairs: 5 consumer images (pair 3 adds a style-0 item, pairs 2 and 4 a style-2 item) + 8 shop images
    assert len(bundle.train) + len(bundle.val) == 8 + 12
    assert bundle.num_classes == 13 and not bundle.open_set
    assert bundle.class_names[0] == "category1" and bundle.class_names[12] == "category13"
    assert int(bundle.test.labels.max()) < 13
    # the fixture's category ids: pair p -> p % 13 + 1 (its style-1 items), 9 for every second item
    assert set(bundle.test.labels.tolist()) == {1, 2, 3, 4, 8}  # validation: pairs 1..4


def test_deepfashion2_identity_labels_make_an_open_set_test(df2) -> None:
    bundle = build_data(_df2(df2))
    # train identities: (p, 1) for p = 1..5 and (p, 2) for p = 2, 4
    assert bundle.num_classes == 7 and bundle.open_set
    assert bundle.class_names[:2] == ["pair1_style1", "pair2_style1"] and "pair2_style2" in bundle.class_names
    # validation (3 pairs + a consumer-only pair 4): (p, 1) for p = 1..4 and (p, 2) for p = 2, 4,
    # numbered after the training classes
    assert sorted(set(bundle.test.labels.tolist())) == list(range(7, 13))
    assert len(bundle.class_names) == 13 and bundle.class_names[7] == "pair1_style1"
    image, _ = bundle.test[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8


def test_deepfashion2_max_images_and_margin(df2) -> None:
    bundle = build_data(_df2(df2, max_images=3, label="category", margin=0.1, val_size=0))
    # train images 1..3 are the consumer images of pairs 1..3: items 1 / 1+3 / 1+2
    assert len(bundle.train) == 5 and any("first 3 annotation files" in note for note in bundle.notes)


def test_deepfashion2_needs_a_root() -> None:
    with pytest.raises(CmpnasError, match="data.root"):
        build_data(DataConfig(name="deepfashion2"))


def _faces(root: Path, identities: int, per_identity: int) -> Path:
    for k in range(identities):
        (root / f"id{k:03d}").mkdir(parents=True)
        for i in range(per_identity):
            colour = (40 * k, 255 - 40 * k, 10 * i)
            Image.new("RGB", (20, 20), colour).save(root / f"id{k:03d}" / f"{i}.jpg")
    return root


def test_ijbc_train_is_an_image_folder_of_identities(tmp_path: Path) -> None:
    root = _faces(tmp_path / "faces", identities=4, per_identity=5)
    bundle = build_data(DataConfig(name="ijbc_train", root=str(root), image_size=112, in_chans=3, val_size=3))
    assert bundle.class_names == ["id000", "id001", "id002", "id003"]
    # one image per identity held out for test, then 3 of the remaining 16 for val
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (13, 3, 4)
    assert bundle.train[0][0].shape == (3, 112, 112)
    assert not any("112px" in note for note in bundle.notes)


def test_ijbc_train_open_set_max_images_and_size_note(tmp_path: Path) -> None:
    root = _faces(tmp_path / "faces", identities=4, per_identity=5)
    cfg = DataConfig(name="ijbc_train", root=str(root), image_size=16, max_images=15, open_set=True,
                     open_set_test_fraction=0.34, val_size=2)  # fmt: skip
    bundle = build_data(cfg)
    # the first 15 images in folder order: identities 0..2; one of them is test-only
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 15
    assert bundle.open_set and bundle.num_classes == 2 and np.unique(bundle.test.labels).tolist() == [2]
    assert any("3x112px" in note for note in bundle.notes)
