"""IDX reader, Fashion-MNIST lookup order and the no-data error."""

from __future__ import annotations

import gzip
import shutil
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cmpnas.data import fashion_mnist as fm
from cmpnas.errors import CmpnasError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist is not installed"
)


@pytest.fixture
def isolated_lookup(tmp_path, monkeypatch):
    """No env var, an empty Debian folder and an empty user cache: only what a test adds is found."""
    monkeypatch.delenv("CMPNAS_DATA", raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path


# ---------------------------------------------------------------------------------- real data


@needs_debian
def test_read_idx_debian_test_set_matches_documented_facts():
    images = fm.read_idx(DEBIAN / "t10k-images-idx3-ubyte.gz")
    labels = fm.read_idx(DEBIAN / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert int(images[0].sum(dtype=np.int64)) == 33456
    assert images.mean() == pytest.approx(73.1466, abs=1e-4)
    assert np.bincount(labels).tolist() == [1000] * 10


@needs_debian
def test_read_idx_debian_train_labels_and_shape():
    labels = fm.read_idx(DEBIAN / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,)
    assert labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert np.bincount(labels).tolist() == [6000] * 10
    # The image header alone: 00 00 08 03 | 60000 | 28 | 28 (reading all 47 MB is left to the factory test).
    with gzip.open(DEBIAN / "train-images-idx3-ubyte.gz", "rb") as fh:
        assert fh.read(16) == bytes.fromhex("00000803 0000ea60 0000001c 0000001c")


# ---------------------------------------------------------------------------------- tiny files


def test_read_idx_round_trips_fixture(tiny_idx_dir, tiny_idx_arrays):
    for key, name in fm.FILES.items():
        got = fm.read_idx(tiny_idx_dir / name)
        np.testing.assert_array_equal(got, tiny_idx_arrays[key])
        assert got.flags.writeable


def test_read_idx_plain_file_and_big_endian_int16(tmp_path):
    # Hand-written bytes: int16 (code 0x0B), 2x3, big-endian values.
    values = [1, -2, 300, -400, 32767, -32768]
    path = tmp_path / "plain.idx"
    path.write_bytes(bytes([0, 0, 0x0B, 2]) + struct.pack(">2I", 2, 3) + struct.pack(">6h", *values))
    got = fm.read_idx(path)
    assert got.shape == (2, 3)
    assert got.dtype == np.int16 and got.dtype.isnative
    assert got.ravel().tolist() == values


def _gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (bytes([1, 0, 8, 1]) + struct.pack(">I", 2) + b"\x00\x01", "first two bytes"),
        (bytes([0, 0, 7, 1]) + struct.pack(">I", 2) + b"\x00\x01", "dtype code 0x07"),
        (bytes([0, 0, 8, 0]), "0 dimensions"),
        (bytes([0, 0, 8, 3]) + struct.pack(">I", 5), "header is truncated"),
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x00\x01", "truncated: 2 of 5"),
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + b"\x00\x01\x02", "bytes after"),
        (b"\x00\x00", "shorter than the 4-byte"),
    ],
)
def test_read_idx_rejects_bad_headers_and_sizes(tmp_path, payload, expected):
    path = _gz(tmp_path / "bad-idx1-ubyte.gz", payload)
    with pytest.raises(CmpnasError, match=expected) as info:
        fm.read_idx(path)
    assert str(path) in str(info.value)
    assert "dataset-fashion-mnist" in info.value.fix


def test_read_idx_truncated_gzip_names_file_and_fix(tiny_idx_dir):
    path = tiny_idx_dir / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CmpnasError, match="truncated or damaged") as info:
        fm.read_idx(path)
    assert str(path) in str(info.value) and "delete" in info.value.fix


def test_read_idx_non_gzip_garbage(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CmpnasError, match="not gzip"):
        fm.read_idx(path)
    plain = tmp_path / "garbage.idx"
    plain.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CmpnasError, match="magic"):
        fm.read_idx(plain)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(CmpnasError, match="Cannot open"):
        fm.read_idx(tmp_path / "nope.gz")


# ---------------------------------------------------------------------------------- lookup


def _copy_set(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in fm.FILES.values():
        shutil.copy(src / name, dst / name)
    return dst


def test_lookup_env_var_beats_debian_folder(isolated_lookup, tiny_idx_dir, monkeypatch):
    debian = _copy_set(tiny_idx_dir, isolated_lookup / "debian")
    monkeypatch.setattr(fm, "DEBIAN_DIR", debian)
    assert fm.find_fashion_mnist() == debian
    env_root = isolated_lookup / "mydata"
    env_dir = _copy_set(tiny_idx_dir, env_root / "fashion-mnist")  # the `fashion-mnist/` subfolder form
    monkeypatch.setenv("CMPNAS_DATA", str(env_root))
    assert fm.find_fashion_mnist() == env_dir


def test_lookup_env_var_without_files_falls_through(isolated_lookup, tiny_idx_dir, monkeypatch):
    monkeypatch.setenv("CMPNAS_DATA", str(isolated_lookup))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tiny_idx_dir)
    assert fm.find_fashion_mnist() == tiny_idx_dir


def test_lookup_explicit_root_wins(isolated_lookup, tiny_idx_dir, monkeypatch):
    other = _copy_set(tiny_idx_dir, isolated_lookup / "elsewhere")
    monkeypatch.setenv("CMPNAS_DATA", str(other))
    assert fm.find_fashion_mnist(str(tiny_idx_dir)) == tiny_idx_dir


def test_lookup_explicit_root_without_files_is_error(isolated_lookup, tiny_idx_dir, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tiny_idx_dir)  # would be found if the root were skipped
    (tiny_idx_dir / "t10k-labels-idx1-ubyte.gz").rename(isolated_lookup / "moved.gz")
    with pytest.raises(CmpnasError, match="lacks t10k-labels-idx1-ubyte.gz"):
        fm.find_fashion_mnist(tiny_idx_dir)
    with pytest.raises(CmpnasError, match="does not exist"):
        fm.find_fashion_mnist(isolated_lookup / "missing")


def test_lookup_user_cache_honours_xdg_and_torchvision_layout(isolated_lookup, tiny_idx_dir):
    raw = _copy_set(
        tiny_idx_dir, isolated_lookup / "xdg-cache" / "cmpnas" / "fashion-mnist" / "FashionMNIST" / "raw"
    )
    assert fm.user_cache_dir() == isolated_lookup / "xdg-cache" / "cmpnas" / "fashion-mnist"
    assert fm.find_fashion_mnist() == raw


def test_lookup_nothing_found(isolated_lookup):
    assert fm.find_fashion_mnist() is None


# ---------------------------------------------------------------------------------- loading


def test_load_fashion_mnist_from_root(tiny_idx_dir, tiny_idx_arrays):
    train_x, train_y, test_x, test_y = fm.load_fashion_mnist(tiny_idx_dir, download=False)
    np.testing.assert_array_equal(train_x, tiny_idx_arrays["train_images"])
    np.testing.assert_array_equal(test_y, tiny_idx_arrays["test_labels"])
    assert train_y.dtype == np.int64 and train_x.shape == (100, 28, 28) and test_x.shape == (30, 28, 28)


def test_load_fashion_mnist_rejects_mismatched_counts(tiny_idx_dir):
    # 29 labels for the 30 test images: valid IDX, but not a consistent dataset.
    _gz(tiny_idx_dir / "t10k-labels-idx1-ubyte.gz", bytes([0, 0, 8, 1]) + struct.pack(">I", 29) + bytes(29))
    with pytest.raises(CmpnasError, match="30 images but 29 labels"):
        fm.load_fashion_mnist(tiny_idx_dir, download=False)


def _fake_torchvision(monkeypatch, fashion_mnist_cls) -> None:
    """Stand-in ``torchvision.datasets`` (importing the real one takes seconds on a busy machine)."""
    package, datasets = types.ModuleType("torchvision"), types.ModuleType("torchvision.datasets")
    datasets.FashionMNIST = fashion_mnist_cls
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_no_data_and_failed_download_gives_install_hint(isolated_lookup, monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(fm, "find_fashion_mnist", lambda root=None: None)
    _fake_torchvision(monkeypatch, offline)
    with pytest.raises(CmpnasError) as info:
        fm.load_fashion_mnist(download=True)
    assert calls and calls[0]["download"] is True
    assert Path(calls[0]["root"]) == isolated_lookup / "xdg-cache" / "cmpnas" / "fashion-mnist"
    assert "download failed" in info.value.problem and "Error downloading" in info.value.problem
    assert "sudo apt-get install dataset-fashion-mnist" in info.value.fix
    assert "CMPNAS_DATA" in info.value.fix


def test_successful_download_is_read_from_the_cache(isolated_lookup, monkeypatch, tiny_idx_dir):
    def fake_download(root, train, download):
        _copy_set(tiny_idx_dir, Path(root) / "FashionMNIST" / "raw")  # torchvision's layout

    _fake_torchvision(monkeypatch, fake_download)
    train_x, *_ = fm.load_fashion_mnist(download=True)
    assert train_x.shape == (100, 28, 28)
    assert fm.find_fashion_mnist() == fm.user_cache_dir() / "FashionMNIST" / "raw"


def test_no_data_without_download_does_not_try(isolated_lookup, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("download attempted although download=False")

    _fake_torchvision(monkeypatch, must_not_run)
    with pytest.raises(CmpnasError, match="downloading is disabled"):
        fm.load_fashion_mnist(download=False)
