"""User image folders and CSV manifests, built from tiny PNGs written per test."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmpnas.data import folder as fd
from cmpnas.data.base import TensorImageDataset
from cmpnas.errors import CmpnasError

CLASS_VALUE = {"cat": 40, "dog": 120, "emu": 200}


def _png(path: Path, value: int, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8), mode="L").save(path)
    return path


def _tree(root: Path, per_class: int = 5, classes: dict[str, int] = CLASS_VALUE) -> Path:
    for name, value in classes.items():
        for i in range(per_class):
            _png(root / name / f"{i:02d}.png", value + i)
    return root


def _values(ds) -> list[int]:
    return [int(ds[i][0][0, 0, 0]) for i in range(len(ds))]


# ---------------------------------------------------------------------------------- image folder


def test_image_folder_split_labels_and_pixels(tmp_path):
    root = _tree(tmp_path / "imgs")
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    src = fd.load_image_folder(root, image_size=4, in_chans=1, seed=0)
    assert src.class_names == ["cat", "dog", "emu"] and src.num_classes == 3
    assert isinstance(src.train, TensorImageDataset)  # small: decoded once, kept in memory
    assert len(src.train) == 12 and len(src.test) == 3  # 20% of each class (1 of 5) held out
    assert torch.bincount(src.test.labels).tolist() == [1, 1, 1]
    img, label = src.train[0]
    assert img.dtype == torch.uint8 and img.shape == (1, 4, 4)
    # Every pixel value identifies the class (value + i, i < 5) and matches the label.
    for ds in (src.train, src.test):
        for value, label in zip(_values(ds), ds.labels.tolist(), strict=True):
            assert list(CLASS_VALUE.values())[label] <= value < list(CLASS_VALUE.values())[label] + 5
    assert set(_values(src.train)).isdisjoint(_values(src.test))


def test_image_folder_split_is_deterministic(tmp_path):
    root = _tree(tmp_path / "imgs")
    a = fd.load_image_folder(root, image_size=4, seed=3)
    b = fd.load_image_folder(root, image_size=4, seed=3)
    assert _values(a.test) == _values(b.test)


def test_image_folder_with_split_subfolders(tmp_path):
    root = tmp_path / "imgs"
    _tree(root / "train", per_class=3)
    _tree(root / "val", per_class=1)
    _tree(root / "test", per_class=2)
    src = fd.load_image_folder(root, image_size=4)
    assert (len(src.train), len(src.val), len(src.test)) == (9, 3, 6)
    assert src.class_names == ["cat", "dog", "emu"]
    assert any("val split given" in n for n in src.notes)


def test_resize_shorter_side_then_center_crop(tmp_path):
    # 24x8 image: 255 bands in the outer 4 columns each side, 100 in the middle.
    pixels = np.full((8, 24), 100, dtype=np.uint8)
    pixels[:, :4] = 255
    pixels[:, 20:] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(pixels, mode="L").save(path)
    img = fd.load_image(path, image_size=4, in_chans=1)
    assert img.shape == (1, 4, 4)
    assert img.unique().tolist() == [100]  # squashing instead of cropping would pull in the 255 bands


def test_rgb_conversion(tmp_path):
    path = tmp_path / "red.png"
    Image.fromarray(np.tile(np.array([200, 10, 30], np.uint8), (6, 6, 1)), mode="RGB").save(path)
    rgb = fd.load_image(path, image_size=4, in_chans=3)
    assert rgb.shape == (3, 4, 4) and rgb[:, 0, 0].tolist() == [200, 10, 30]
    gray = fd.load_image(path, image_size=4, in_chans=1)
    assert gray.shape == (1, 4, 4)
    assert int(gray[0, 0, 0]) == round(0.299 * 200 + 0.587 * 10 + 0.114 * 30)


# ---------------------------------------------------------------------------------- bad images


def _add_corrupt(root: Path) -> list[Path]:
    bad = [root / "dog" / "zz-broken.png", root / "emu" / "zz-empty.jpg"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad[1].write_bytes(b"")
    return bad


def test_corrupt_images_skipped_with_one_counted_warning(tmp_path):
    root = _tree(tmp_path / "imgs")
    bad = _add_corrupt(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = fd.load_image_folder(root, image_size=4, on_bad_image="skip")
    ours = [w for w in caught if issubclass(w.category, fd.BadImageWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "skipped 2 unreadable image(s) of 17" in message and str(bad[0]) in message
    assert len(src.train) + len(src.test) == 15
    assert any("skipped 2" in n for n in src.notes)


def test_corrupt_image_error_mode_names_file(tmp_path):
    root = _tree(tmp_path / "imgs")
    bad = _add_corrupt(root)
    with pytest.raises(CmpnasError) as info:
        fd.load_image_folder(root, image_size=4, on_bad_image="error")
    assert str(bad[0]) in info.value.problem
    assert "on_bad_image=skip" in info.value.fix


def test_uncached_path_verifies_upfront_and_reports_later_damage(tmp_path):
    root = _tree(tmp_path / "imgs")
    _add_corrupt(root)
    with pytest.warns(fd.BadImageWarning, match="skipped 2"):
        src = fd.load_image_folder(root, image_size=4, cache_max_images=0)
    assert isinstance(src.train, fd.ImageFileDataset)
    img, label = src.train[0]
    low = list(CLASS_VALUE.values())[label]
    assert img.shape == (1, 4, 4) and low <= int(img[0, 0, 0]) < low + 5
    sub = src.train.subset([0, 1])
    assert isinstance(sub, fd.ImageFileDataset) and sub.labels.tolist() == src.train.labels[:2].tolist()
    sub.paths[1].unlink()
    with pytest.raises(CmpnasError, match="could not be read during training"):
        sub[1]


def test_all_images_unreadable(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(CmpnasError, match="None of the 1 images"), pytest.warns(fd.BadImageWarning):
        fd.load_image_folder(tmp_path / "imgs", image_size=4)


# ---------------------------------------------------------------------------------- open set


def test_open_set_test_classes_disjoint_from_training(tmp_path):
    classes = {name: 20 * k for k, name in enumerate(["a", "b", "c", "d", "e"])}
    root = _tree(tmp_path / "imgs", per_class=3, classes=classes)
    src = fd.load_image_folder(root, image_size=4, open_set=True, open_set_test_fraction=0.4, seed=7)
    assert src.open_set and src.num_classes == 3 and len(src.class_names) == 5
    assert sorted(src.class_names) == ["a", "b", "c", "d", "e"]
    assert set(src.train.labels.tolist()) == {0, 1, 2}
    assert set(src.test.labels.tolist()) == {3, 4}
    assert len(src.train) == 9 and len(src.test) == 6
    # Labels point to the right class names: pixel value identifies the class.
    for ds in (src.train, src.test):
        for value, label in zip(_values(ds), ds.labels.tolist(), strict=True):
            assert classes[src.class_names[label]] <= value < classes[src.class_names[label]] + 3
    again = fd.load_image_folder(root, image_size=4, open_set=True, open_set_test_fraction=0.4, seed=7)
    assert again.class_names == src.class_names


def test_open_set_conflicts_with_given_splits(tmp_path):
    root = tmp_path / "imgs"
    _tree(root / "train", per_class=2)
    _tree(root / "test", per_class=1)
    with pytest.raises(CmpnasError, match="open_set"):
        fd.load_image_folder(root, image_size=4, open_set=True)


def test_open_set_needs_two_classes(tmp_path):
    root = _tree(tmp_path / "imgs", per_class=2, classes={"only": 10})
    with pytest.raises(CmpnasError, match="at least 2 classes"):
        fd.load_image_folder(root, image_size=4, open_set=True)


# ---------------------------------------------------------------------------------- CSV


def _write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_csv_relative_and_absolute_paths_with_split(tmp_path):
    base = tmp_path / "project"
    for i in range(3):
        _png(base / "imgs" / f"ten{i}.png", 10 + i)
        _png(base / "imgs" / f"two{i}.png", 100 + i)
    absolute = _png(tmp_path / "elsewhere" / "abs.png", 50)
    csv_path = _write_csv(
        base / "manifest.csv",
        "Path,Label,Split\n"
        + "".join(f"imgs/ten{i}.png,10,train\nimgs/two{i}.png,2,train\n" for i in range(2))
        + "imgs/ten2.png,10,TEST\nimgs/two2.png,2,test\n"
        + f"{absolute},2,val\n\n",
    )
    src = fd.load_csv_manifest(csv_path, image_size=4)
    assert src.class_names == ["2", "10"]  # numeric order, not "10" < "2"
    assert (len(src.train), len(src.val), len(src.test)) == (4, 1, 2)
    assert _values(src.val) == [50] and src.val.labels.tolist() == [0]
    assert sorted(zip(_values(src.test), src.test.labels.tolist(), strict=True)) == [(12, 1), (102, 0)]


def test_csv_without_split_column_splits_deterministically(tmp_path):
    lines = ["path,label"]
    for k, value in enumerate((30, 130)):
        for i in range(5):
            _png(tmp_path / f"c{k}_{i}.png", value + i)
            lines.append(f"c{k}_{i}.png,class{k}")
    csv_path = _write_csv(tmp_path / "m.csv", "\n".join(lines) + "\n")
    a = fd.load_csv_manifest(csv_path, image_size=4, seed=1)
    b = fd.load_csv_manifest(csv_path, image_size=4, seed=1)
    assert a.val is None and len(a.test) == 2 and torch.bincount(a.test.labels).tolist() == [1, 1]
    assert _values(a.test) == _values(b.test)


def test_csv_missing_image_is_a_bad_image(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    csv_path = _write_csv(tmp_path / "m.csv", "path,label\na.png,x\nb.png,y\ngone.png,y\n")
    with pytest.raises(CmpnasError, match="gone.png.*file not found"):
        fd.load_csv_manifest(csv_path, image_size=4, on_bad_image="error")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty"),
        ("file,class\na.png,x\n", "lacks the column\\(s\\) path, label"),
        ("a.png,x\n", "lacks the column"),  # no header line
        ("path,label\n", "no rows"),
        ("path,label,split\na.png,x,training\n", "line 2: unknown split 'training'"),
        ("path,label\na.png,x\nb.png,\n", "line 3: the label of 'b.png' is empty"),
        ("path,label\n,x\n", "line 2: the path is empty"),
    ],
)
def test_csv_bad_inputs(tmp_path, text, expected):
    csv_path = _write_csv(tmp_path / "m.csv", text)
    with pytest.raises(CmpnasError, match=expected) as info:
        fd.load_csv_manifest(csv_path, image_size=4)
    assert info.value.fix


def test_csv_split_without_test_rows(tmp_path):
    _png(tmp_path / "a.png", 1)
    csv_path = _write_csv(tmp_path / "m.csv", "path,label,split\na.png,x,train\n")
    with pytest.raises(CmpnasError, match="none of its usable images is in 'test'"):
        fd.load_csv_manifest(csv_path, image_size=4)


# ---------------------------------------------------------------------------------- bad folders


def test_folder_bad_inputs(tmp_path):
    with pytest.raises(CmpnasError, match="does not exist"):
        fd.load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CmpnasError, match="no class subfolders"):
        fd.load_image_folder(tmp_path / "empty")
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    with pytest.raises(CmpnasError, match="No images found"):
        fd.load_image_folder(tmp_path / "no_images")
    csv_file = _write_csv(tmp_path / "list.csv", "path,label\n")
    with pytest.raises(CmpnasError, match="not a folder") as info:
        fd.load_image_folder(csv_file)
    assert "data.name=csv" in info.value.fix
    with pytest.raises(CmpnasError, match="is a folder"):
        fd.load_csv_manifest(tmp_path / "empty")


# ---------------------------------------------------------------------------------- unusual images
def test_16bit_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert("L") clips 16-bit values to 255 (a white image); the reader scales them by 1/257."""
    values = np.array([[0, 64, 128, 255]] * 4, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values * 257).save(path)
    assert Image.open(path).mode.startswith("I")
    for chans in (1, 3):
        img = fd.load_image(path, 4, chans)
        assert img.shape == (chans, 4, 4) and img[0, 0].tolist() == [0, 64, 128, 255]


def test_cmyk_images_are_converted(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # red in print colours
    red = fd.load_image(path, 4, 3)[:, 2, 2].tolist()
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    path = _png(tmp_path / "big.png", 7, size=(300, 200))
    with pytest.raises(fd.ImageTooLarge, match="300x200"):
        with fd.open_bounded(path, max_pixels=300 * 200 - 1):
            pytest.fail("the image was opened")
    with fd.open_bounded(path, max_pixels=300 * 200) as img:
        assert img.size == (300, 200)
