"""Image sources an index reads: a folder, a CSV, a built-in dataset split, a run's data config.

A :class:`GallerySource` is a list of :class:`Item` (id, path, label) plus a loader that turns item ``i``
into a PIL image (``None`` = unreadable, skip it). Folders and CSVs are listed with the same code the
training readers use (:func:`cmpnas.data.folder.walk_images`, :func:`cmpnas.data.folder.read_csv_rows`).

Built-in datasets are the raw arrays of :data:`RAW_DATASETS`; their items have ids
``name/split/NNNNNN`` naming the row in file order, so an image can be re-rendered from the id alone
(:func:`load_item_image`) without storing it anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cmpnas.config import DataConfig
from cmpnas.data.factory import build_data
from cmpnas.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from cmpnas.data.fashion_mnist import load_fashion_mnist
from cmpnas.data.folder import IMAGE_EXTENSIONS, open_bounded, read_csv_rows, walk_images
from cmpnas.errors import CmpnasError
from cmpnas.registry import Registry

__all__ = [
    "RAW_DATASETS",
    "RAW_SPLITS",
    "GallerySource",
    "Item",
    "array_to_pil",
    "config_source",
    "csv_source",
    "dataset_item_id",
    "dataset_source",
    "folder_source",
    "load_dataset_split",
    "load_item_image",
    "open_image",
    "parse_dataset_item_id",
]


@dataclass
class Item:
    id: str
    path: str
    label: str


@dataclass
class GallerySource:
    """Items to index plus a loader that turns item ``i`` into a PIL image (``None`` = unreadable, skip)."""

    description: dict[str, Any]
    items: list[Item]
    load: Callable[[int], Image.Image | None]


def open_image(path: str | Path) -> Image.Image | None:
    """The image at ``path``, fully decoded, or ``None`` if it cannot be read (or is a decompression bomb:
    more than :data:`~cmpnas.data.folder.MAX_IMAGE_PIXELS` pixels)."""
    try:
        with open_bounded(path) as im:
            im.load()
            return im.copy()
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ):
        return None


def array_to_pil(array: np.ndarray) -> Image.Image:
    """One uint8 row of a raw dataset: ``[H,W]`` -> mode "L", ``[H,W,3]`` -> "RGB"."""
    if array.ndim == 2:
        return Image.fromarray(array, mode="L")
    if array.ndim == 3 and array.shape[2] == 3:
        return Image.fromarray(array, mode="RGB")
    raise CmpnasError(
        f"A dataset image has shape {array.shape}; expected [H,W] (grayscale) or [H,W,3] (RGB).",
        "return uint8 [N,H,W] or [N,H,W,3] images from the RAW_DATASETS loader",
    )


# --------------------------------------------------------------------------------------------- files
def folder_source(root: str | Path) -> GallerySource:
    """Image files under ``root`` (as :func:`walk_images` lists them); id = relative path, label = its folder."""
    base = Path(root)
    if not base.is_dir():
        raise CmpnasError(
            f"Image folder '{base}' does not exist.", "pass --images DIR with image files in it"
        )
    files = walk_images(base)
    if not files:
        raise CmpnasError(
            f"No image files under '{base}'.", f"put {', '.join(sorted(IMAGE_EXTENSIONS))} files there"
        )
    items = [
        Item(
            p.relative_to(base).as_posix(),
            str(p.resolve()),
            p.parent.relative_to(base).as_posix() if p.parent != base else "",
        )
        for p in files
    ]
    return GallerySource(
        {"kind": "images", "root": str(base.resolve())}, items, lambda i: open_image(items[i].path)
    )


def csv_source(csv_path: str | Path) -> GallerySource:
    """A CSV of ``path,label`` rows (header optional, label optional); relative paths are relative to the
    CSV's folder. The id of an item is its path as written."""
    p = Path(csv_path)
    if not p.is_file():
        raise CmpnasError(f"CSV file '{p}' does not exist.", "pass --csv FILE with path,label rows")
    rows = read_csv_rows(p, header_required=False, label_required=False, split_column=False)
    if not rows:
        raise CmpnasError(f"CSV '{p}' has no rows.", "add path,label lines")
    items = [Item(r.text, str(r.path.resolve()), r.label) for r in rows]
    return GallerySource(
        {"kind": "csv", "path": str(p.resolve())}, items, lambda i: open_image(items[i].path)
    )


# --------------------------------------------------------------------------------------------- raw datasets
RawLoader = Callable[[str, str | None, bool], tuple[np.ndarray, np.ndarray, list[str]]]
RAW_SPLITS = ("train", "test")


def _fashion_mnist(split: str, root: str | None, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    train_x, train_y, test_x, test_y = load_fashion_mnist(root, download=download)
    images, labels = (train_x, train_y) if split == "train" else (test_x, test_y)
    return images, labels, list(FASHION_MNIST_CLASSES)


# name -> loader(split, root, download) -> (uint8 images [N,H,W] or [N,H,W,3] in file order, labels [N],
# class names). Rows are never subset or shuffled: dataset item ids and thumbnails refer to them.
RAW_DATASETS: Registry[RawLoader] = Registry("raw dataset", {"fashion_mnist": _fashion_mnist})


@lru_cache(maxsize=4)
def _raw_split(
    name: str, split: str, root: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if name not in RAW_DATASETS:
        raise CmpnasError(
            f"Unknown dataset '{name}'.", f"use one of {', '.join(RAW_DATASETS)}, or --images/--csv"
        )
    if split not in RAW_SPLITS:
        raise CmpnasError(f"Unknown split '{split}'.", "use --split train or --split test")
    return RAW_DATASETS[name](split, root, download)


def load_dataset_split(
    name: str, split: str, root: str | None = None, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,H,W] or [N,H,W,3], labels [N]) of a dataset split, raw rows in file order (ids and
    thumbnails refer to them, so no subsetting or shuffling here); cached because thumbnails re-render
    from it."""
    images, labels, _ = _raw_split(name, split, root, download)
    return images, labels


def dataset_item_id(name: str, split: str, index: int) -> str:
    return f"{name}/{split}/{index:06d}"


def parse_dataset_item_id(item_id: str) -> tuple[str, str, int] | None:
    """``(name, split, row)`` of a built-in dataset item id, or None for any other id."""
    parts = item_id.split("/")
    if len(parts) == 3 and parts[0] in RAW_DATASETS and parts[2].isdigit():
        return parts[0], parts[1], int(parts[2])
    return None


def dataset_source(
    name: str, split: str = "test", root: str | None = None, limit: int | None = None
) -> GallerySource:
    """A built-in dataset split; ids ``name/split/NNNNNN`` keep the row so thumbnails can be re-rendered."""
    images, labels, names = _raw_split(name, split, root, True)
    n = len(images) if limit is None else min(limit, len(images))
    items = [Item(dataset_item_id(name, split, i), "", names[int(labels[i])]) for i in range(n)]
    desc = {"kind": "dataset", "name": name, "split": split, "root": root}
    return GallerySource(desc, items, lambda i: array_to_pil(images[i]))


def load_item_image(
    item_id: str, path: str, sources_manifest: Sequence[Mapping[str, Any]] = ()
) -> Image.Image | None:
    """The image behind an indexed item, or None: a built-in dataset row is re-rendered (from the dataset
    root recorded in ``sources_manifest``, the source descriptions of an index), anything else is read from
    ``path``."""
    parsed = parse_dataset_item_id(item_id)
    if parsed is None:
        return open_image(path)
    name, split, row = parsed
    root = next(
        (s.get("root") for s in sources_manifest if s.get("kind") == "dataset" and s.get("name") == name),
        None,
    )
    images, _ = load_dataset_split(name, split, root)
    return array_to_pil(images[row]) if 0 <= row < len(images) else None


# --------------------------------------------------------------------------------------------- data config
def _tensor_to_pil(img: torch.Tensor) -> Image.Image:
    arr = img.numpy()
    return (
        Image.fromarray(arr[0], mode="L")
        if arr.shape[0] == 1
        else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    )


def config_source(data_cfg: DataConfig, split: str = "test") -> GallerySource:
    """The gallery for a run's :class:`~cmpnas.config.DataConfig` (what ``cmpnas run`` indexes).

    Built-in raw datasets (:data:`RAW_DATASETS`) train/test are read as raw rows (the whole split, or its
    first ``subset_test`` / ``subset_train`` rows) so ids name file rows and thumbnails re-render. Other sets
    come from ``build_data``: with their file paths when the dataset reads files lazily, else (in-memory sets,
    e.g. small folders) with ids ``name/split/NNNNNN`` and no thumbnails. To serve a folder with
    thumbnails, index it with ``cmpnas index --images DIR``.
    """
    if data_cfg.name in RAW_DATASETS and split in RAW_SPLITS:
        limit = data_cfg.subset_test if split == "test" else data_cfg.subset_train
        return dataset_source(data_cfg.name, split, data_cfg.root, limit)
    bundle = build_data(data_cfg)
    if split not in ("train", "val", "test"):
        raise CmpnasError(f"Unknown split '{split}'.", "use train, val or test")
    ds = getattr(bundle, split)
    names = list(bundle.class_names)
    labels = [names[int(v)] if int(v) < len(names) else str(int(v)) for v in ds.labels.tolist()]
    desc = {"kind": "data_config", "name": data_cfg.name, "split": split, "root": data_cfg.root}
    paths = getattr(ds, "paths", None)
    if paths is not None:
        base = Path(data_cfg.root or ".").resolve()
        base = base if base.is_dir() else base.parent
        ids = [
            Path(p).resolve().relative_to(base).as_posix()
            if Path(p).resolve().is_relative_to(base)
            else str(p)
            for p in paths
        ]
        items = [Item(i, str(Path(p).resolve()), lab) for i, p, lab in zip(ids, paths, labels, strict=True)]
        return GallerySource(desc, items, lambda i: open_image(items[i].path))
    items = [Item(f"{data_cfg.name}/{split}/{i:06d}", "", lab) for i, lab in enumerate(labels)]
    return GallerySource(desc, items, lambda i: _tensor_to_pil(ds[i][0]))
