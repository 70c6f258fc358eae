"""Fashion-MNIST: a checked IDX reader, the local lookup order, and an optional torchvision download.

The project's machines get the data from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``). The reader checks the IDX header, unlike the upstream
``mnist_reader.py`` which skips it by a fixed offset, so a truncated or corrupt file is reported as
such instead of surfacing later as a reshape error or garbage pixels.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cmpnas.data.base import split_train_val
from cmpnas.errors import CmpnasError

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "FILES",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "split_train_val",
    "user_cache_dir",
]

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "CMPNAS_DATA"
INSTALL_HINT = (
    "run `sudo apt-get install dataset-fashion-mnist`, or set CMPNAS_DATA (or data.root) to a folder "
    "holding the four Fashion-MNIST .gz files"
)
_REPAIR_HINT = (
    "reinstall the data (`sudo apt-get install --reinstall dataset-fashion-mnist`) or, if the file is in "
    "a cache or data folder of yours, delete it so it is fetched again"
)
# IDX dtype codes -> big-endian numpy dtypes (LeCun's MNIST page).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_IDX_BYTES = 1 << 34  # 16 GiB: a header asking for more is corrupt, not a real dataset


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a gzipped or plain IDX file into a native-endian array, validating the whole layout.

    Checks: magic (two zero bytes, known dtype code, ndim >= 1), the dimension sizes, and that the
    data size is exactly the product of the dimensions (no truncation, no trailing bytes).
    """
    p = Path(path)
    try:
        with open(p, "rb") as raw:
            is_gzip = raw.read(2) == _GZIP_MAGIC
    except OSError as exc:
        raise CmpnasError(f"Cannot open IDX file '{p}': {exc.strerror or exc}.", _REPAIR_HINT) from None
    if p.suffix == ".gz" and not is_gzip:
        raise _corrupt(p, "it ends in .gz but is not gzip data")
    opener = gzip.open if is_gzip else open
    try:
        with opener(p, "rb") as fh:
            return _read_idx_stream(fh, p)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise _corrupt(p, f"the gzip stream is truncated or damaged ({exc})") from None
    except OSError as exc:
        raise _corrupt(p, f"read error ({exc})") from None


def _read_idx_stream(fh: BinaryIO, path: Path) -> np.ndarray:
    magic = fh.read(4)
    if len(magic) < 4:
        raise _corrupt(path, f"it is only {len(magic)} bytes long, shorter than the 4-byte IDX magic")
    zero, code, ndim = struct.unpack(">HBB", magic)
    if zero != 0:
        raise _corrupt(path, f"bad IDX magic {magic.hex()} (the first two bytes must be 00 00)")
    if code not in _IDX_DTYPES:
        raise _corrupt(path, f"unknown IDX dtype code 0x{code:02x} (expected one of 08 09 0b 0c 0d 0e)")
    if ndim == 0:
        raise _corrupt(path, "the IDX header declares 0 dimensions")
    dims_raw = fh.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise _corrupt(path, f"the header is truncated (expected {ndim} dimension sizes)")
    shape = struct.unpack(f">{ndim}I", dims_raw)
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize
    if expected > _MAX_IDX_BYTES:
        raise _corrupt(path, f"the header declares an implausible shape {shape}")
    buf = np.empty(expected, dtype=np.uint8)
    view, got = memoryview(buf), 0
    while got < expected:
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    if got < expected:
        raise _corrupt(path, f"the data is truncated: {got} of {expected} bytes for shape {shape}")
    if fh.read(1):
        raise _corrupt(path, f"it has bytes after the {expected} bytes that shape {shape} needs")
    array = buf.view(dtype).reshape(shape)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


def _corrupt(path: Path, what: str) -> CmpnasError:
    return CmpnasError(f"IDX file '{path}' is unusable: {what}.", _REPAIR_HINT)


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cmpnas/fashion-mnist`` (default ``~/.cache/cmpnas/fashion-mnist``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "cmpnas" / "fashion-mnist"


def _file_in(folder: Path, name: str) -> Path | None:
    """The file ``name`` in ``folder``, gzipped or already extracted (torchvision keeps both)."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _locate_in(folder: Path) -> Path | None:
    """``folder`` itself, its ``fashion-mnist/`` subfolder, or torchvision's ``FashionMNIST/raw`` layout."""
    for candidate in (folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"):
        if all(_file_in(candidate, name) for name in FILES.values()):
            return candidate
    return None


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder holding the four Fashion-MNIST files, or ``None`` if no default location has them.

    Order: ``root`` (an explicit root that lacks the files is an error, not skipped), ``$CMPNAS_DATA``
    (the folder or its ``fashion-mnist/`` subfolder; a general data folder, so skipped when it lacks
    them), the Debian package folder, then the user cache.
    """
    if root is not None:
        folder = Path(root).expanduser()
        found = _locate_in(folder)
        if found is None:
            missing = [n for n in FILES.values() if not _file_in(folder, n)]
            state = "does not exist" if not folder.exists() else f"lacks {', '.join(missing)}"
            raise CmpnasError(
                f"data.root '{folder}' {state}, so Fashion-MNIST cannot be read from it.",
                "point data.root at the folder holding the four Fashion-MNIST .gz files, or remove it to use "
                f"the default locations ($CMPNAS_DATA, {DEBIAN_DIR}, {user_cache_dir()})",
            )
        return found
    for folder in _default_locations():
        found = _locate_in(folder)
        if found is not None:
            return found
    return None


def _default_locations() -> list[Path]:
    env = os.environ.get(ENV_VAR)
    env_dirs = [Path(env).expanduser()] if env else []
    return [*env_dirs, DEBIAN_DIR, user_cache_dir()]


def _download(cache: Path) -> tuple[Path | None, str]:
    """Try torchvision's downloader into the user cache; returns (folder, failure reason)."""
    try:
        from torchvision.datasets import FashionMNIST

        cache.mkdir(parents=True, exist_ok=True)
        FashionMNIST(root=str(cache), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure (offline, HTTP, disk) means "no download"
        return None, f"{type(exc).__name__}: {exc}".strip()
    found = _locate_in(cache)
    return (found, "") if found else (None, f"torchvision finished but the files are not under {cache}")


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x uint8 [N,28,28], train_y int64 [N], test_x, test_y)`` from the first location found."""
    folder = find_fashion_mnist(root)
    reason = "downloading is disabled (data.download=false)"
    if folder is None and download:
        folder, reason = _download(user_cache_dir())
        reason = f"the download failed ({reason})" if reason else reason
    if folder is None:
        looked = ", ".join(str(p) for p in _default_locations())
        raise CmpnasError(f"Fashion-MNIST was not found (looked in: {looked}) and {reason}.", INSTALL_HINT)
    arrays = {key: read_idx(_file_in(folder, name)) for key, name in FILES.items()}  # type: ignore[arg-type]
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        _check_pair(folder, split, images, labels)
        out += [images, labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def _check_pair(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """The files parse as IDX; check they are also what Fashion-MNIST must look like."""
    problem = None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        problem = (
            f"{split} images have dtype {images.dtype} and shape {images.shape}, expected uint8 [N,28,28]"
        )
    elif labels.dtype != np.uint8 or labels.ndim != 1:
        problem = f"{split} labels have dtype {labels.dtype} and shape {labels.shape}, expected uint8 [N]"
    elif labels.shape[0] != images.shape[0]:
        problem = f"{split} has {images.shape[0]} images but {labels.shape[0]} labels"
    elif labels.size and int(labels.max()) >= len(CLASS_NAMES):
        problem = f"{split} labels go up to {int(labels.max())}, but Fashion-MNIST has 10 classes"
    if problem:
        raise CmpnasError(f"The Fashion-MNIST files in '{folder}' do not match: {problem}.", _REPAIR_HINT)
