"""Users' own images: an ImageFolder tree (``root/<class>/<image>``) or a CSV manifest.

Every image is checked when the dataset is built, so an unreadable file is reported (or skipped
with one counted warning) up front and never reaches the training loop.

Memory choice: when the set is small -- at most ``CACHE_MAX_IMAGES`` (50,000) images and at most
``CACHE_MAX_BYTES`` (2 GiB) once resized -- the check *is* a full decode into one in-memory uint8
tensor, so training never decodes again. Larger sets are checked with PIL's cheap ``verify()`` and
decoded per item by :class:`ImageFileDataset`.
"""

from __future__ import annotations

import contextlib
import csv
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from cmpnas.data.base import ImageDataset, SourceSplits, TensorImageDataset, _as_index_tensor, split_train_val
from cmpnas.data.transforms import to_8bit
from cmpnas.errors import CmpnasError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
SPLITS = ("train", "val", "test")
# Larger images are refused from their header, before decoding: a decompression bomb (a few kB that decode
# to gigabytes) must not take the machine's memory. ~6300x6300, as the service's default limit.
MAX_IMAGE_PIXELS = 40_000_000
CACHE_MAX_IMAGES = 50_000
CACHE_MAX_BYTES = 2 << 30
TEST_FRACTION = 0.2  # share of each class held out for test when the source names no splits
# Sub-seeds so the test split and the open-set class draw are independent of each other.
_SEED_TEST_SPLIT, _SEED_OPEN_SET = 11, 12

BadImagePolicy = Literal["skip", "error"]


class BadImageWarning(UserWarning):
    """Some images could not be read and were left out (``on_bad_image='skip'``)."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    class_name: str
    split: str | None  # "train" / "val" / "test", or None when the source does not say


class ImageTooLarge(ValueError):
    """An image declares more than :data:`MAX_IMAGE_PIXELS` pixels (a decompression bomb, or far too big)."""


@contextlib.contextmanager
def open_bounded(path: str | os.PathLike[str], max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """``Image.open`` that refuses more than ``max_pixels`` from the header, before anything is decoded.

    PIL's own bomb guard first only warns (89M pixels) and fails at 179M; here its warning is an error
    too, so an oversized file is never decoded and never prints a warning.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(path)  # closes the file itself if this raises
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"{width}x{height} = {width * height} pixels, over the {max_pixels}-pixel limit "
                "(a decompression bomb?)"
            )
        yield img


def load_image(path: str | os.PathLike[str], image_size: int, in_chans: int) -> torch.Tensor:
    """Decode one image to uint8 ``[C, S, S]``: EXIF-rotate, convert to L/RGB, fit to S x S.

    Fitting = resize the shorter side to S, then center-crop (``ImageOps.fit``). 16-bit images are
    scaled to 8 bits and CMYK / palette images converted (:func:`~cmpnas.data.transforms.to_8bit`).

    Raises whatever PIL raises (or :class:`ImageTooLarge`); callers turn that into a skip or a
    :class:`CmpnasError`.
    """
    with open_bounded(path) as img:
        img = ImageOps.exif_transpose(img)
        img = to_8bit(img).convert("L" if in_chans == 1 else "RGB")
        img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if in_chans == 1 else tensor.permute(2, 0, 1).contiguous()


def _verify_image(path: Path) -> None:
    with open_bounded(path) as img:
        img.verify()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return f"{type(exc).__name__}: {exc}"


class ImageFileDataset(ImageDataset):
    """Images decoded from disk on each access (sets too large to keep in memory)."""

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, image_size: int, in_chans: int) -> None:
        self.paths = list(paths)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.image_size = image_size
        self.in_chans = in_chans

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            image = load_image(path, self.image_size, self.in_chans)
        except Exception as exc:  # noqa: BLE001 - any decode failure is the same user-facing problem
            raise CmpnasError(
                f"Image '{path}' could not be read during training ({_reason(exc)}); it passed the check "
                "when the dataset was built, so it was probably changed or removed since.",
                "restore or delete the file and start the run again",
            ) from None
        return image, int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageFileDataset:
        idx = _as_index_tensor(indices, len(self))
        return ImageFileDataset(
            [self.paths[i] for i in idx.tolist()], self.labels[idx], self.image_size, self.in_chans
        )


# ----------------------------------------------------------------------------------------- sources


def scan_image_folder(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Records of ``root/<class>/**/<image>``, or of ``root/{train,val,test}/<class>/...`` if laid out so."""
    folder = _existing_dir(root, "folder")
    subdirs = _visible_subdirs(folder)
    names = {d.name for d in subdirs}
    if "train" in names and names <= set(SPLITS):
        records = [r for d in subdirs for r in _scan_classes(d, split=d.name)]
    else:
        records = _scan_classes(folder, split=None)
    if not records:
        raise CmpnasError(
            f"No images found under '{folder}' (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}).",
            "put images into one subfolder per class: <root>/<class>/<image>.png",
        )
    return records


def _scan_classes(folder: Path, split: str | None) -> list[ImageRecord]:
    class_dirs = _visible_subdirs(folder)
    if not class_dirs:
        raise CmpnasError(
            f"Folder '{folder}' has no class subfolders.",
            "arrange images as <root>/<class>/<image> (one subfolder per class)",
        )
    return [ImageRecord(p, class_dir.name, split) for class_dir in class_dirs for p in walk_images(class_dir)]


def walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively: the one listing every image-folder reader uses.

    Order is sorted and depth-first: a folder's files (by name) come before its subfolders (by name).
    Hidden files and folders (name starting with ".") are skipped; an image is a file whose suffix,
    lower-cased, is in :data:`IMAGE_EXTENSIONS`.
    """
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                files.append(Path(dirpath) / name)
    return files


def read_csv_manifest(csv_path: str | os.PathLike[str]) -> list[ImageRecord]:
    """Records of a ``path,label[,split]`` CSV (header required; relative paths are relative to the CSV)."""
    path = Path(csv_path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise CmpnasError(
            f"CSV manifest '{path}' {what}.",
            "set data.root to a CSV file with a header line path,label[,split] (or use data.name=folder)",
        )
    return [ImageRecord(row.path, row.label, row.split) for row in read_csv_rows(path)]


@dataclass(frozen=True)
class CsvRow:
    """One image row of a CSV image list."""

    line: int  # row number in the file, 1-based (blank rows and the header count)
    text: str  # the path cell as written (stripped)
    path: Path  # that path, ``~`` expanded; a relative one joined to the CSV's folder
    label: str  # "" when the row gives none (only with ``label_required=False``)
    split: str | None  # train / val / test (lower-cased), None without a split column


def read_csv_rows(
    csv_path: str | os.PathLike[str],
    *,
    header_required: bool = True,
    label_required: bool = True,
    split_column: bool = True,
) -> list[CsvRow]:
    """The rows of an image-list CSV ``path,label[,split]``: the one CSV reader of the data package.

    ``header_required``: the first (non-blank) line must name the columns (``path`` and ``label`` in any
    order, optionally ``split``) and at least one row must follow. Without it, a first line naming ``path``
    and ``label`` is still read as the header; otherwise every line is data with the columns ``path,label``
    by position, and a file without rows gives an empty list.
    ``label_required``: an empty label is an error (else it is read as ""). ``split_column``: read and check
    a ``split`` column named in the header (else it is ignored). Blank lines are skipped.
    """
    path = Path(csv_path).expanduser()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CmpnasError(f"CSV manifest '{path}' cannot be read: {exc}.", "save it as UTF-8 CSV") from None
    if header_required and not rows:
        raise CmpnasError(
            f"CSV manifest '{path}' is empty.", "add a header line path,label[,split] and one row per image"
        )
    # the header is the first non-blank line
    top = next((i for i, row in enumerate(rows) if any(cell.strip() for cell in row)), 0)
    header = [h.strip().lower() for h in rows[top]] if rows else []
    missing = [c for c in ("path", "label") if c not in header]
    if missing and header_required:
        raise CmpnasError(
            f"CSV manifest '{path}' lacks the column(s) {', '.join(missing)} (header: {','.join(rows[top])}).",
            "make the first line a header naming the columns: path,label[,split]",
        )
    if missing:  # no header: path,label by position
        col, body = {"path": 0, "label": 1}, top
    else:
        names = ("path", "label", "split") if split_column else ("path", "label")
        col, body = {name: header.index(name) for name in names if name in header}, top + 1
    records = []
    for line_no, row in enumerate(rows[body:], start=body + 1):
        if not any(cell.strip() for cell in row):
            continue
        cells = {name: (row[i].strip() if i < len(row) else "") for name, i in col.items()}
        if not cells["path"]:
            raise CmpnasError(
                f"CSV manifest '{path}' line {line_no}: the path is empty.", "give every row an image path"
            )
        if not cells["label"] and label_required:
            raise CmpnasError(
                f"CSV manifest '{path}' line {line_no}: the label of '{cells['path']}' is empty.",
                "give every row a class label (or remove the row)",
            )
        split = cells.get("split")
        if split is not None:
            split = split.lower()
            if split not in SPLITS:
                raise CmpnasError(
                    f"CSV manifest '{path}' line {line_no}: unknown split '{cells['split']}'.",
                    "use train, val or test in the split column (or drop the column to split automatically)",
                )
        image_path = Path(cells["path"]).expanduser()
        records.append(
            CsvRow(
                line_no,
                cells["path"],
                image_path if image_path.is_absolute() else path.parent / image_path,
                cells["label"],
                split,
            )
        )
    if header_required and not records:
        raise CmpnasError(f"CSV manifest '{path}' has a header but no rows.", "add one row per image")
    return records


# ---------------------------------------------------------------------------------------- assembly


def load_image_folder(root: str | os.PathLike[str], **options: Any) -> SourceSplits:
    """Splits from an ImageFolder tree; see :func:`build_source` for ``options``."""
    return build_source(scan_image_folder(root), **options)


def load_csv_manifest(csv_path: str | os.PathLike[str], **options: Any) -> SourceSplits:
    """Splits from a CSV manifest; see :func:`build_source` for ``options``."""
    return build_source(read_csv_manifest(csv_path), **options)


def build_source(
    records: list[ImageRecord],
    *,
    image_size: int = 28,
    in_chans: int = 1,
    open_set: bool = False,
    open_set_test_fraction: float = 0.3,
    on_bad_image: BadImagePolicy = "skip",
    seed: int = 0,
    test_fraction: float = TEST_FRACTION,
    cache_max_images: int = CACHE_MAX_IMAGES,
    cache_max_bytes: int = CACHE_MAX_BYTES,
) -> SourceSplits:
    """Check the images, number the classes and split; ``val`` is left to the factory unless given.

    Splits named by the source (CSV ``split`` column, ``train/val/test`` subfolders) are kept.
    Otherwise ``test_fraction`` of every class goes to test (stratified, seeded). With ``open_set``
    a seeded ``open_set_test_fraction`` of the *classes* forms the test set instead, and the
    training classes are numbered ``0..C-1`` with test classes after them.
    """
    has_splits = any(r.split is not None for r in records)
    if open_set and has_splits:
        raise CmpnasError(
            "data.open_set chooses the test set by class, but the data already names train/val/test splits.",
            "drop the split column / the train,val,test subfolders, or set data.open_set=false",
        )
    notes: list[str] = []
    records, cached = _check_images(
        records, image_size, in_chans, on_bad_image, cache_max_images, cache_max_bytes, notes
    )
    class_names, test_classes = _number_classes(records, open_set, open_set_test_fraction, seed)
    index_of = {name: i for i, name in enumerate(class_names)}
    labels = torch.tensor([index_of[r.class_name] for r in records], dtype=torch.int64)

    def make(idx: np.ndarray) -> ImageDataset:
        if cached is not None:
            return TensorImageDataset(cached[torch.as_tensor(idx)], labels[torch.as_tensor(idx)])
        return ImageFileDataset(
            [records[i].path for i in idx], labels[torch.as_tensor(idx)], image_size, in_chans
        )

    num_classes = len(class_names) - test_classes
    val = None
    if has_splits:
        split_of = np.array([r.split for r in records])
        for needed in ("train", "test"):
            if not (split_of == needed).any():
                raise CmpnasError(
                    f"The data names splits but none of its usable images is in '{needed}'.",
                    f"assign some images to {needed}, or drop the split column / split subfolders "
                    "to split automatically",
                )
        train_idx, test_idx = np.flatnonzero(split_of == "train"), np.flatnonzero(split_of == "test")
        if (split_of == "val").any():
            val = make(np.flatnonzero(split_of == "val"))
            notes.append("val split given by the source; data.val_size is not used")
    elif open_set:
        is_test = labels.numpy() >= num_classes
        train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        notes.append(f"open set: {test_classes} of {len(class_names)} classes are test-only")
    else:
        n_test = int(round(test_fraction * len(records)))
        train_idx, test_idx = split_train_val(labels, n_test, seed=[seed, _SEED_TEST_SPLIT])
        notes.append(
            f"no split given: {len(test_idx)} images ({test_fraction:.0%} per class) held out for test"
        )
    if len(train_idx) == 0:
        raise CmpnasError("No usable training images are left after splitting.", "add more images per class")
    return SourceSplits(
        train=make(train_idx),
        test=make(test_idx),
        val=val,
        class_names=class_names,
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=image_size,
        open_set=open_set,
        notes=notes,
    )


def _check_images(
    records: list[ImageRecord],
    image_size: int,
    in_chans: int,
    on_bad_image: BadImagePolicy,
    cache_max_images: int,
    cache_max_bytes: int,
    notes: list[str],
) -> tuple[list[ImageRecord], torch.Tensor | None]:
    """Decode (small sets, into a cache) or verify (large sets) every image; skip or raise on bad ones."""
    n = len(records)
    cache_it = n <= cache_max_images and n * in_chans * image_size * image_size <= cache_max_bytes
    cache = torch.empty((n, in_chans, image_size, image_size), dtype=torch.uint8) if cache_it else None
    good: list[int] = []
    bad: list[tuple[Path, str]] = []
    for i, record in enumerate(records):
        try:
            if cache is not None:
                cache[len(good)] = load_image(record.path, image_size, in_chans)
            else:
                _verify_image(record.path)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files; all mean "unreadable"
            if on_bad_image == "error":
                raise CmpnasError(
                    f"Image '{record.path}' cannot be read ({_reason(exc)}).",
                    "fix or remove that file, or set data.on_bad_image=skip to leave unreadable images out",
                ) from None
            bad.append((record.path, _reason(exc)))
            continue
        good.append(i)
    if bad:
        first_path, first_reason = bad[0]
        message = f"skipped {len(bad)} unreadable image(s) of {n} (first: {first_path}: {first_reason})"
        warnings.warn(message, BadImageWarning, stacklevel=3)
        notes.append(message)
    if not good:
        raise CmpnasError(
            f"None of the {n} images could be read.", "check the files are valid PNG/JPEG images"
        )
    if cache is not None:
        notes.append(
            f"{len(good)} images decoded and kept in memory ({len(good) * cache[0].numel() / 2**20:.1f} MiB)"
        )
        cache = cache[: len(good)].clone() if bad else cache
    else:
        notes.append(f"{len(good)} images verified; decoded from disk on each access (too many to cache)")
    return [records[i] for i in good], cache


def _number_classes(
    records: list[ImageRecord], open_set: bool, test_fraction: float, seed: int
) -> tuple[list[str], int]:
    """Class names in label order and how many of the last ones are test-only (open set)."""
    names = _sorted_class_names({r.class_name for r in records})
    if not open_set:
        return names, 0
    if len(names) < 2:
        raise CmpnasError(
            f"data.open_set needs at least 2 classes, but the data has {len(names)}.",
            "add more classes or set data.open_set=false",
        )
    n_test = min(len(names) - 1, max(1, int(round(test_fraction * len(names)))))
    picked = set(np.random.default_rng([seed, _SEED_OPEN_SET]).permutation(len(names))[:n_test].tolist())
    train_names = [c for i, c in enumerate(names) if i not in picked]
    test_names = [c for i, c in enumerate(names) if i in picked]
    return train_names + test_names, n_test


def _sorted_class_names(names: set[str]) -> list[str]:
    """Numeric order when every name is an integer ("2" before "10"), else alphabetical."""
    if all(_is_int(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _existing_dir(root: str | os.PathLike[str] | None, kind: str) -> Path:
    if root is None:
        raise CmpnasError(f"data.name={kind} needs data.root.", "set data.root to the image folder")
    folder = Path(root).expanduser()
    if not folder.exists():
        raise CmpnasError(f"Image folder '{folder}' does not exist.", "set data.root to an existing folder")
    if not folder.is_dir():
        hint = (
            "use data.name=csv for a CSV manifest"
            if folder.suffix.lower() == ".csv"
            else "point it at a folder"
        )
        raise CmpnasError(f"data.root '{folder}' is not a folder.", hint)
    return folder


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
