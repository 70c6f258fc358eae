"""DeepFashion2 in its official on-disk format: per-image annotation JSON -> clothing items -> crops.

Layout (as the DeepFashion2 release ships it): ``<root>/<split>/image/000001.jpg`` and ``<root>/<split>/annos/000001.json``.
Each annotation has two image-level keys (``source``, ``pair_id``); every other key is an item
(``item1``, ``item2``, ... not necessarily contiguous). We follow the ground-truth-box variant of the
consumer-to-shop protocol: items are cropped with their annotated boxes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cmpnas.data.base import ImageDataset
from cmpnas.errors import CmpnasError

SPLITS = ("train", "validation", "test")
SOURCES = ("user", "shop")
NUM_CATEGORIES = 13
_IMAGE_LEVEL_KEYS = ("source", "pair_id")
_ITEM_KEY = re.compile(r"item(\d+)")
_FORMAT_HINT = (
    "each DeepFashion2 annotation is a JSON object with 'source' ('user' or 'shop'), an integer "
    "'pair_id' and items 'item1', 'item2', ... each holding integer 'category_id' (1-13) and "
    "'style' (>= 0) and 'bounding_box' [x1, y1, x2, y2] with x2 > x1 and y2 > y1"
)


@dataclass(frozen=True)
class Item:
    """One annotated clothing item (an image may hold several)."""

    item_id: str  # "{image_id:06d}_item{n}": unique within a split
    image_id: int  # int(file stem), as the official evaluation uses it
    image_path: Path
    source: Literal["user", "shop"]  # user = consumer photo (query side), shop = gallery side
    pair_id: int
    style: int  # 0 = can never be a positive; > 0 separates styles within one pair_id
    category_id: int  # 1..13
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in absolute pixels (top-left, bottom-right)

    @property
    def identity(self) -> tuple[int, int] | None:
        """Retrieval identity (pair_id, style); None for style 0, which has no positives by definition."""
        return (self.pair_id, self.style) if self.style > 0 else None


def item_id_for(image_id: int, item_number: int) -> str:
    return f"{image_id:06d}_item{item_number}"


def read_deepfashion2(root: str | os.PathLike[str], split: str, max_images: int | None = None) -> list[Item]:
    """Parse every annotation of ``split`` into items, ordered by image id then item number.

    ``max_images`` keeps only the first N annotation files (smoke runs on the 390k-image train split).
    """
    if split not in SPLITS:
        raise CmpnasError(f"unknown DeepFashion2 split {split!r}.", f"use one of {', '.join(SPLITS)}.")
    split_dir = Path(root) / split
    annos_dir, image_dir = split_dir / "annos", split_dir / "image"
    if not annos_dir.is_dir():
        extra = " (the test split's annotations are not public)" if split == "test" else ""
        raise CmpnasError(
            f"DeepFashion2 annotation folder {annos_dir} not found{extra}.",
            f"point the root at the folder that holds '{split}/annos/*.json' and '{split}/image/*.jpg'.",
        )
    if not image_dir.is_dir():
        raise CmpnasError(
            f"DeepFashion2 image folder {image_dir} not found.",
            f"unpack the '{split}' images so that '{split}/image/000001.jpg' sits next to '{split}/annos'.",
        )
    annotation_files = sorted(
        (p for p in annos_dir.iterdir() if p.suffix == ".json"), key=_image_id_from_stem
    )
    if not annotation_files:
        raise CmpnasError(
            f"no annotation files (*.json) in {annos_dir}.", "unpack the DeepFashion2 annotations there."
        )
    if max_images is not None:
        annotation_files = annotation_files[:max_images]
    image_names = {entry.name for entry in os.scandir(image_dir)}  # one listing instead of one stat per image
    items: list[Item] = []
    for path in annotation_files:
        image_path = image_dir / f"{path.stem}.jpg"
        if image_path.name not in image_names:
            raise CmpnasError(
                f"DeepFashion2 annotation {path} has no image {image_path}.",
                "restore the image or remove its annotation file.",
            )
        items.extend(parse_annotation(path, image_path))
    return items


def parse_annotation(path: Path, image_path: Path) -> list[Item]:
    """Items of one annotation file, sorted by item number (validated; errors name file and item key)."""
    image_id = _image_id_from_stem(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CmpnasError(
            f"DeepFashion2 annotation {path} is not valid JSON ({exc}).",
            "re-extract the file from the DeepFashion2 archive.",
        ) from None
    if not isinstance(record, dict):
        raise CmpnasError(f"DeepFashion2 annotation {path} is not a JSON object.", f"{_FORMAT_HINT}.")
    source = record.get("source")
    if source not in SOURCES:
        raise CmpnasError(
            f"DeepFashion2 annotation {path}: 'source' is {source!r}, expected 'user' or 'shop'.",
            f"fix the file; {_FORMAT_HINT}.",
        )
    pair_id = _require_int(record, "pair_id", path, None)
    numbered: list[tuple[int, str]] = []
    for key in record:
        if key in _IMAGE_LEVEL_KEYS:
            continue
        match = _ITEM_KEY.fullmatch(key)
        if match is None:
            raise CmpnasError(
                f"DeepFashion2 annotation {path}: unexpected key {key!r} "
                "(neither 'source', 'pair_id' nor 'itemN').",
                f"fix the file; {_FORMAT_HINT}.",
            )
        number = int(match.group(1))
        if any(number == seen for seen, _ in numbered):
            raise CmpnasError(
                f"DeepFashion2 annotation {path}: two keys name item number {number} ({key!r}).",
                f"fix the file; {_FORMAT_HINT}.",
            )
        numbered.append((number, key))
    items = []
    for number, key in sorted(numbered):
        items.append(_parse_item(record[key], path, key, image_id, number, image_path, source, pair_id))
    return items


def _parse_item(
    raw: Any, path: Path, key: str, image_id: int, number: int, image_path: Path, source: str, pair_id: int
) -> Item:
    if not isinstance(raw, dict):
        raise CmpnasError(f"DeepFashion2 annotation {path}, {key}: not a JSON object.", f"{_FORMAT_HINT}.")
    category_id = _require_int(raw, "category_id", path, key)
    if not 1 <= category_id <= NUM_CATEGORIES:
        raise CmpnasError(
            f"DeepFashion2 annotation {path}, {key}: category_id {category_id} "
            f"is outside 1..{NUM_CATEGORIES}.",
            f"fix the file; {_FORMAT_HINT}.",
        )
    style = _require_int(raw, "style", path, key)
    if style < 0:
        raise CmpnasError(
            f"DeepFashion2 annotation {path}, {key}: style {style} is negative.",
            f"fix the file; {_FORMAT_HINT}.",
        )
    box = raw.get("bounding_box")
    valid_numbers = isinstance(box, list) and len(box) == 4
    valid_numbers = valid_numbers and all(_is_number(v) and np.isfinite(v) for v in box)
    if not valid_numbers or not (box[2] > box[0] and box[3] > box[1]):
        raise CmpnasError(
            f"DeepFashion2 annotation {path}, {key}: bounding_box {box!r} is not [x1, y1, x2, y2] "
            "with x2 > x1 and y2 > y1.",
            f"fix the box or remove the item; {_FORMAT_HINT}.",
        )
    return Item(
        item_id=item_id_for(image_id, number),
        image_id=image_id,
        image_path=image_path,
        source=source,  # type: ignore[arg-type]
        pair_id=pair_id,
        style=style,
        category_id=category_id,
        bbox=(box[0], box[1], box[2], box[3]),
    )


def _image_id_from_stem(path: Path) -> int:
    if not path.stem.isdigit():
        raise CmpnasError(
            f"DeepFashion2 file {path} is not named by its image number (e.g. 000001.json).",
            "remove the stray file from the annos folder.",
        )
    return int(path.stem)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require_int(record: dict[str, Any], key: str, path: Path, item_key: str | None) -> int:
    where = f"{path}, {item_key}" if item_key else str(path)
    if key not in record:
        raise CmpnasError(
            f"DeepFashion2 annotation {where}: missing key {key!r}.", f"fix the file; {_FORMAT_HINT}."
        )
    value = record[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CmpnasError(
            f"DeepFashion2 annotation {where}: {key!r} is {value!r}, expected an integer.",
            f"fix the file; {_FORMAT_HINT}.",
        )
    return value


def identity_classes(items: Sequence[Item]) -> list[tuple[int, int]]:
    """Sorted distinct (pair_id, style>0) identities; a label is the index into this list."""
    return sorted({item.identity for item in items if item.identity is not None})


class DeepFashion2Crops(ImageDataset):
    """Ground-truth-box crops as ``(uint8 tensor [C, H, W], int label)`` for the training loop.

    ``label="identity"``: class = (pair_id, style) remapped to 0..N-1 (consumer and shop crops of one
    product share it); style-0 items have no identity and are left out (see ``.items``).
    ``label="category"``: class = category_id - 1 (0..12), every item kept.
    ``margin`` widens the box by that fraction of its width/height on each side (clipped to the image).
    Crops are resized to a square ``image_size`` without keeping the aspect ratio.
    """

    def __init__(
        self,
        items: Sequence[Item],
        image_size: int,
        in_chans: int = 3,
        margin: float = 0.0,
        label: Literal["identity", "category"] = "identity",
    ) -> None:
        if in_chans not in (1, 3):
            raise CmpnasError(f"in_chans={in_chans} is not supported.", "use 1 (grayscale) or 3 (RGB).")
        if image_size < 1:
            raise CmpnasError(f"image_size={image_size} must be positive.", "use e.g. 224.")
        if margin < 0:
            raise CmpnasError(f"margin={margin} must be >= 0.", "use 0.0 for the exact box or e.g. 0.1.")
        if label == "identity":
            self.classes: list[Any] = identity_classes(items)
            index = {identity: i for i, identity in enumerate(self.classes)}
            self.items = [item for item in items if item.identity is not None]
            labels = [index[item.identity] for item in self.items]  # type: ignore[index]
        elif label == "category":
            self.classes = list(range(1, NUM_CATEGORIES + 1))
            self.items = list(items)
            labels = [item.category_id - 1 for item in self.items]
        else:
            raise CmpnasError(f"unknown label kind {label!r}.", "use 'identity' or 'category'.")
        if not self.items:
            raise CmpnasError(
                "no DeepFashion2 items to crop (with label='identity' only items with style > 0 count).",
                "check the split and the item filter.",
            )
        self.image_size = image_size
        self.in_chans = in_chans
        self.margin = margin
        self.label_kind = label
        self.labels = torch.tensor(labels, dtype=torch.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        crop = load_crop(item, self.image_size, self.in_chans, self.margin)
        array = np.asarray(crop, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), int(self.labels[index])


def load_crop(item: Item, image_size: int, in_chans: int = 3, margin: float = 0.0) -> Image.Image:
    """The item's box (plus margin, clipped to the image) resized to image_size x image_size."""
    try:
        with Image.open(item.image_path) as image:
            image = image.convert("L" if in_chans == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise CmpnasError(
            f"cannot read DeepFashion2 image {item.image_path} ({exc}).", "re-extract or remove the image."
        ) from None
    x1, y1, x2, y2 = item.bbox
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    left, top = max(0, int(np.floor(x1 - dx))), max(0, int(np.floor(y1 - dy)))
    right, bottom = min(image.width, int(np.ceil(x2 + dx))), min(image.height, int(np.ceil(y2 + dy)))
    if right <= left or bottom <= top:
        raise CmpnasError(
            f"DeepFashion2 item {item.item_id}: box {list(item.bbox)} lies outside its "
            f"{image.width}x{image.height} image {item.image_path}.",
            "fix the bounding_box in its annotation file.",
        )
    return image.crop((left, top, right, bottom)).resize((image_size, image_size), Image.Resampling.BILINEAR)
