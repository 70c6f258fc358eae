"""DeepFashion2 reader and crop dataset on a generated fixture in the official format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_protocols import GREY, DeepFashion2Fixture, make_deepfashion2_fixture  # noqa: E402

from cmpnas.data.deepfashion2 import DeepFashion2Crops, Item, read_deepfashion2  # noqa: E402
from cmpnas.errors import CmpnasError  # noqa: E402


@pytest.fixture(scope="module")
def df2(tmp_path_factory: pytest.TempPathFactory) -> DeepFashion2Fixture:
    return make_deepfashion2_fixture(tmp_path_factory.mktemp("df2"))


@pytest.fixture(scope="module")
def items(df2: DeepFashion2Fixture) -> list[Item]:
    return read_deepfashion2(df2.root, "validation")


def test_reader_returns_every_item_with_its_image_level_fields(
    df2: DeepFashion2Fixture, items: list[Item]
) -> None:
    expected = [
        (f"{image.image_id:06d}_item{item.number}", image.source, image.pair_id, item.style, item.category_id)
        for image in sorted(df2.images, key=lambda im: im.image_id)
        for item in sorted(image.items, key=lambda it: it.number)
    ]
    got = [(i.item_id, i.source, i.pair_id, i.style, i.category_id) for i in items]
    assert got == expected
    assert len(items) == 38
    assert sum(i.source == "shop" for i in items) == 24


def test_item_numbers_need_not_be_contiguous(items: list[Item]) -> None:
    # consumer image 2 (pair 2) has items 1 and 3, no item 2
    in_image_2 = [i.item_id for i in items if i.image_id == 2]
    assert in_image_2 == ["000002_item1", "000002_item3"]


def test_fields_of_one_item(df2: DeepFashion2Fixture, items: list[Item]) -> None:
    item = next(i for i in items if i.item_id == "000002_item3")
    assert item.image_id == 2
    assert item.source == "user" and item.pair_id == 2 and item.style == 2 and item.category_id == 9
    assert item.bbox == (34, 6, 60, 58)
    assert item.image_path == df2.root / "validation" / "image" / "000002.jpg"
    assert item.identity == (2, 2)


def test_max_images_keeps_the_first_annotation_files(df2: DeepFashion2Fixture) -> None:
    assert {i.image_id for i in read_deepfashion2(df2.root, "validation", max_images=3)} == {1, 2, 3}


def _rewrite(df2: DeepFashion2Fixture, tmp_path: Path, mutate) -> tuple[Path, Path]:
    """Copy the fixture and apply ``mutate(record) -> record | str`` to image 2's annotation."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(df2.root, root)
    path = root / "validation" / "annos" / "000002.json"
    record = json.loads(path.read_text())
    new = mutate(record)
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    return root, path


def _drop(key):
    def mutate(record):
        del record[key]
        return record

    return mutate


def _set_item(field, value, item="item3"):
    def mutate(record):
        if value is None:
            del record[item][field]
        else:
            record[item][field] = value
        return record

    return mutate


MALFORMED = {
    "missing source": (_drop("source"), None),
    "unknown source": (lambda r: {**r, "source": "consumer"}, None),
    "missing pair_id": (_drop("pair_id"), None),
    "pair_id not an integer": (lambda r: {**r, "pair_id": "two"}, None),
    "missing style": (_set_item("style", None), "item3"),
    "missing category_id": (_set_item("category_id", None), "item3"),
    "category out of range": (_set_item("category_id", 14), "item3"),
    "negative style": (_set_item("style", -1), "item3"),
    "missing bounding_box": (_set_item("bounding_box", None), "item3"),
    "bbox with 3 numbers": (_set_item("bounding_box", [1, 2, 3]), "item3"),
    "bbox x2 <= x1": (_set_item("bounding_box", [30, 6, 30, 58]), "item3"),
    "bbox y2 <= y1": (_set_item("bounding_box", [30, 58, 40, 6]), "item3"),
    "bbox with a string": (_set_item("bounding_box", [1, 2, "3", 4]), "item3"),
    "item not an object": (lambda r: {**r, "item3": [1, 2]}, "item3"),
    "unexpected key": (lambda r: {**r, "comment": "x"}, "comment"),
    "item number twice": (lambda r: {**r, "item03": r["item3"]}, "item03"),
    "invalid JSON": (lambda r: '{"source": "user", ', None),
    "not an object": (lambda r: "[1, 2]", None),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_annotation_names_the_file_and_item(
    df2: DeepFashion2Fixture, tmp_path: Path, case: str
) -> None:
    mutate, key = MALFORMED[case]
    root, path = _rewrite(df2, tmp_path, mutate)
    with pytest.raises(CmpnasError) as info:
        read_deepfashion2(root, "validation")
    message = str(info.value)
    assert str(path) in message
    if key is not None:
        assert key in message
    assert info.value.fix  # every error tells how to fix it


def test_missing_folders_and_images(df2: DeepFashion2Fixture, tmp_path: Path) -> None:
    with pytest.raises(CmpnasError, match="not public"):
        read_deepfashion2(df2.root, "test")
    with pytest.raises(CmpnasError, match="unknown DeepFashion2 split"):
        read_deepfashion2(df2.root, "val")
    root, _ = _rewrite(df2, tmp_path, lambda r: r)
    (root / "validation" / "image" / "000005.jpg").unlink()
    with pytest.raises(CmpnasError, match="000005"):
        read_deepfashion2(root, "validation")


def test_identity_crops_share_labels_across_consumer_and_shop(items: list[Item]) -> None:
    dataset = DeepFashion2Crops(items, image_size=16)
    assert all(item.style > 0 for item in dataset.items)
    assert len(dataset) == sum(item.style > 0 for item in items) == 33
    assert dataset.num_classes == 13  # 8 style-1 + 4 style-2 + pair 9
    assert dataset.labels.dtype == torch.int64 and dataset.labels.shape == (33,)
    assert sorted(set(dataset.labels.tolist())) == list(range(13))
    by_identity: dict[tuple[int, int], set[int]] = {}
    for item, label in zip(dataset.items, dataset.labels.tolist(), strict=True):
        by_identity.setdefault((item.pair_id, item.style), set()).add(label)
    assert all(len(labels) == 1 for labels in by_identity.values())
    assert len({next(iter(v)) for v in by_identity.values()}) == len(by_identity)
    pair2_style2 = [i for i, item in enumerate(dataset.items) if (item.pair_id, item.style) == (2, 2)]
    assert {item.source for item in (dataset.items[i] for i in pair2_style2)} == {"user", "shop"}


def test_crop_is_the_painted_box(df2: DeepFashion2Fixture, items: list[Item]) -> None:
    dataset = DeepFashion2Crops(items, image_size=24)
    colour_of = {f"{image.image_id:06d}_item{item.number}": item.colour for image, item in df2.items()}
    for index in (0, 1, 5, len(dataset) - 1):
        image, label = dataset[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 24)
        assert label == int(dataset.labels[index])
        mean = image.float().mean(dim=(1, 2)).numpy()
        np.testing.assert_allclose(mean, colour_of[dataset.items[index].item_id], atol=6)


def test_margin_takes_in_background_and_is_clipped(items: list[Item]) -> None:
    exact = DeepFashion2Crops(items, image_size=24)[0][0].float()
    wide = DeepFashion2Crops(items, image_size=24, margin=1.0)[0][0].float()  # clipped to the 64x64 image
    assert wide.shape == exact.shape
    # the wide crop holds grey background, so its mean moves towards grey
    assert (wide.mean(dim=(1, 2)) - GREY).abs().sum() < (exact.mean(dim=(1, 2)) - GREY).abs().sum() - 20


def test_category_labels_and_grayscale(items: list[Item]) -> None:
    dataset = DeepFashion2Crops(items, image_size=8, in_chans=1, label="category")
    assert len(dataset) == len(items)
    assert dataset.labels.tolist() == [item.category_id - 1 for item in items]
    image, _ = dataset[0]
    assert image.shape == (1, 8, 8)


def test_unreadable_image_and_box_outside_image(df2: DeepFashion2Fixture, tmp_path: Path, items) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    item = Item("000001_item1", 1, broken, "user", 1, 1, 1, (0, 0, 4, 4))
    with pytest.raises(CmpnasError, match="broken.jpg"):
        DeepFashion2Crops([item], image_size=8)[0]
    outside = Item("000001_item1", 1, items[0].image_path, "user", 1, 1, 1, (100, 100, 120, 120))
    with pytest.raises(CmpnasError, match="outside"):
        DeepFashion2Crops([outside], image_size=8)[0]


def test_invalid_dataset_arguments(items: list[Item]) -> None:
    with pytest.raises(CmpnasError):
        DeepFashion2Crops(items, image_size=8, label="colour")  # type: ignore[arg-type]
    with pytest.raises(CmpnasError):
        DeepFashion2Crops([i for i in items if i.style == 0], image_size=8)
    with pytest.raises(CmpnasError):
        DeepFashion2Crops(items, image_size=8, in_chans=2)
