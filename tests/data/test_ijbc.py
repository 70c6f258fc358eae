"""IJB-C meta readers (with line-numbered errors), similarity alignment and the aligned-face dataset."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_protocols import IJBCFixture, make_ijbc_fixture  # noqa: E402

from cmpnas.data import ijbc  # noqa: E402
from cmpnas.data.ijbc import (  # noqa: E402
    ARCFACE_TEMPLATE,
    IJBCAlignedFaces,
    align_face,
    estimate_similarity,
    load_rgb,
    read_ijbc_meta,
    read_int_table,
)
from cmpnas.errors import CmpnasError  # noqa: E402

TID_MID = "ijbc_face_tid_mid.txt"
PAIRS = "ijbc_template_pair_label.txt"
FIVE_PTS = "ijbc_name_5pts_score.txt"


@pytest.fixture(scope="module")
def ijbc_fixture(tmp_path_factory: pytest.TempPathFactory) -> IJBCFixture:
    return make_ijbc_fixture(tmp_path_factory.mktemp("ijbc"))


def test_meta_is_read_by_position(ijbc_fixture: IJBCFixture) -> None:
    meta = read_ijbc_meta(ijbc_fixture.root)
    assert meta.image_names == ijbc_fixture.names
    np.testing.assert_array_equal(meta.template_ids, ijbc_fixture.template_ids)
    np.testing.assert_array_equal(meta.media_ids, ijbc_fixture.media_ids)
    np.testing.assert_allclose(meta.landmarks, ijbc_fixture.landmarks, atol=1e-3)
    np.testing.assert_allclose(meta.faceness, ijbc_fixture.faceness, atol=1e-6)
    np.testing.assert_array_equal(meta.pairs, ijbc_fixture.pairs)
    np.testing.assert_array_equal(meta.labels, ijbc_fixture.labels)
    assert meta.n_images == 24 and meta.pairs.shape == (28, 2) and meta.labels.sum() == 4
    assert meta.image_path(0) == ijbc_fixture.root / "loose_crop" / "1.jpg"


def _copy(fixture: IJBCFixture, tmp_path: Path) -> Path:
    root = tmp_path / "IJBC"
    shutil.copytree(fixture.root / "meta", root / "meta")
    return root


def _edit(root: Path, name: str, line: int, new: str | None) -> Path:
    """Replace (or with None delete) 1-based ``line`` of a meta file."""
    path = root / "meta" / name
    lines = path.read_text().splitlines(keepends=True)
    if new is None:
        del lines[line - 1]
    else:
        lines[line - 1] = new + "\n"
    path.write_text("".join(lines))
    return path


MALFORMED = {
    # case: (file, line, replacement, line number the error must name, text in the message)
    "tid_mid wrong column count": (TID_MID, 3, "3.jpg 101", 3, "columns"),
    "tid_mid non-integer id": (TID_MID, 4, "4.jpg 101 x", 4, "integer"),
    "5pts wrong column count": (FIVE_PTS, 5, "5.jpg 1 2 3 4 5 6 7 8 9 10", 5, "columns"),
    "5pts not a number": (FIVE_PTS, 2, "2.jpg 1 2 3 4 5 6 7 8 9 ten 0.9", 2, "number"),
    "5pts NaN": (FIVE_PTS, 2, "2.jpg 1 2 3 4 5 6 7 8 9 nan 0.9", 2, "NaN"),
    "5pts misaligned name": (FIVE_PTS, 6, "7.jpg 1 2 3 4 5 6 7 8 9 10 0.9", 6, "'6.jpg'"),
    "pair unknown template": (PAIRS, 7, "101 999 0", 7, "999"),
    "pair wrong column count": (PAIRS, 9, "101 102", 9, "columns"),
    "pair non-integer": (PAIRS, 4, "101 10x 0", 4, "10x"),
    "pair float": (PAIRS, 4, "101 102 0.5", 4, "0.5"),
    "pair label not 0/1": (PAIRS, 11, "101 102 2", 11, "label"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_meta_names_file_and_line(ijbc_fixture: IJBCFixture, tmp_path: Path, case: str) -> None:
    name, line, replacement, error_line, text = MALFORMED[case]
    root = _copy(ijbc_fixture, tmp_path)
    path = _edit(root, name, line, replacement)
    with pytest.raises(CmpnasError) as info:
        read_ijbc_meta(root)
    message = str(info.value)
    assert str(path) in message
    assert f"line {error_line}" in message
    assert text in message
    assert info.value.fix


def test_row_count_mismatch_between_5pts_and_tid_mid(ijbc_fixture: IJBCFixture, tmp_path: Path) -> None:
    root = _copy(ijbc_fixture, tmp_path)
    _edit(root, FIVE_PTS, 24, None)  # one row short
    with pytest.raises(CmpnasError, match="23 rows") as info:
        read_ijbc_meta(root)
    assert FIVE_PTS in str(info.value) and TID_MID in str(info.value)
    root = _copy(ijbc_fixture, tmp_path / "b")
    path = root / "meta" / FIVE_PTS
    path.write_text(path.read_text() + "25.jpg 1 2 3 4 5 6 7 8 9 10 0.9\n")
    with pytest.raises(CmpnasError, match="line 25"):
        read_ijbc_meta(root)


def test_missing_meta_file(ijbc_fixture: IJBCFixture, tmp_path: Path) -> None:
    root = _copy(ijbc_fixture, tmp_path)
    (root / "meta" / PAIRS).unlink()
    with pytest.raises(CmpnasError, match=PAIRS):
        read_ijbc_meta(root)


def test_blank_lines_are_skipped_and_line_numbers_stay_true(
    ijbc_fixture: IJBCFixture, tmp_path: Path
) -> None:
    root = _copy(ijbc_fixture, tmp_path)
    path = root / "meta" / PAIRS
    lines = path.read_text().splitlines()
    path.write_text("\n" + "\n".join(lines[:5]) + "\n\n  \n" + "\n".join(lines[5:]) + "\n")
    np.testing.assert_array_equal(read_ijbc_meta(root).pairs, ijbc_fixture.pairs)
    # pair row 6 now sits on line 10: (blank, 5 rows, blank, blank) + 1
    _edit(root, PAIRS, 10, "101 777 0")
    with pytest.raises(CmpnasError, match="line 10"):
        read_ijbc_meta(root)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-(10**12), 10**12), st.integers(0, 10**6), st.integers(0, 1)), max_size=40
    ),
    st.integers(3, 64),
    st.booleans(),
)
def test_block_parser_matches_a_plain_parse(tmp_path_factory, rows, block, trailing_newline) -> None:
    path = tmp_path_factory.mktemp("t") / "table.txt"
    text = "\n".join(" ".join(str(v) for v in row) for row in rows)
    path.write_text(text + ("\n" if trailing_newline and rows else ""))
    original = ijbc._BLOCK_BYTES
    ijbc._BLOCK_BYTES = block  # tiny blocks: rows straddle block boundaries
    try:
        table = read_int_table(path, 3, "a b c")
    finally:
        ijbc._BLOCK_BYTES = original
    np.testing.assert_array_equal(table, np.array(rows, dtype=np.int64).reshape(-1, 3))


def test_block_parser_reports_the_right_line_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("".join(f"{i} {i + 1} 0\n" for i in range(50)) + "1 2 3 4\n" + "5 6 0\n")
    original = ijbc._BLOCK_BYTES
    ijbc._BLOCK_BYTES = 16
    try:
        with pytest.raises(CmpnasError, match="line 51"):
            read_int_table(path, 3, "a b c")
    finally:
        ijbc._BLOCK_BYTES = original


# ---------------------------------------------------------------------------------------- alignment
def test_similarity_of_the_template_onto_itself_is_the_identity() -> None:
    np.testing.assert_allclose(
        estimate_similarity(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE), np.eye(2, 3), atol=1e-9
    )


@settings(max_examples=40, deadline=None)
@given(
    st.floats(0.2, 5.0),
    st.floats(-np.pi, np.pi),
    st.floats(-200, 200),
    st.floats(-200, 200),
)
def test_similarity_recovers_a_known_transform(scale, angle, tx, ty) -> None:
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.array([[scale * cos, -scale * sin, tx], [scale * sin, scale * cos, ty]])
    landmarks = ARCFACE_TEMPLATE @ forward[:, :2].T + forward[:, 2]  # the template seen in a loose crop
    recovered = estimate_similarity(landmarks, ARCFACE_TEMPLATE)  # crop -> template
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(recovered, inverse, atol=1e-7 * max(1.0, 1 / scale) * 100)


def test_similarity_never_reflects() -> None:
    mirrored = ARCFACE_TEMPLATE * np.array([-1.0, 1.0])
    matrix = estimate_similarity(mirrored, ARCFACE_TEMPLATE)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_similarity_rejects_degenerate_landmarks() -> None:
    with pytest.raises(CmpnasError, match="one point"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE)
    with pytest.raises(CmpnasError):
        estimate_similarity(np.ones((4, 2)), ARCFACE_TEMPLATE)


def _smooth_image(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    channels = [
        127 + 100 * np.sin(x / size * 3.0) * np.cos(y / size * 2.0),
        x / size * 255,
        y / size * 255,
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).round().astype(np.uint8)


def test_align_with_template_landmarks_is_the_identity() -> None:
    image = _smooth_image(112)
    aligned = align_face(image, ARCFACE_TEMPLATE)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    assert np.abs(aligned.astype(int) - image.astype(int)).max() <= 1


def test_align_undoes_a_scaled_and_shifted_copy() -> None:
    """A 2x upscaled face pasted at an offset: pixel-index coordinates map x -> 2x + 0.5 + offset."""
    face = _smooth_image(112)
    big = np.zeros((260, 250, 3), dtype=np.uint8)
    big[20:244, 10:234] = np.asarray(Image.fromarray(face).resize((224, 224), Image.Resampling.BILINEAR))
    landmarks = 2 * ARCFACE_TEMPLATE + 0.5 + np.array([10, 20])
    aligned = align_face(big, landmarks)
    # a half-pixel slip in the coordinate convention gives ~0.3 here
    assert np.abs(aligned.astype(int) - face.astype(int))[2:-2, 2:-2].mean() < 0.1


def test_align_puts_painted_landmarks_on_the_template(ijbc_fixture: IJBCFixture) -> None:
    """Fixture faces have dark dots on their rotated, scaled landmarks; aligned, they sit on the template."""
    meta = read_ijbc_meta(ijbc_fixture.root)
    for index in (0, 7, 23):
        aligned = align_face(load_rgb(meta.image_path(index)), meta.landmarks[index]).astype(float)
        for x, y in ARCFACE_TEMPLATE:
            dot = aligned[int(round(y)) - 1 : int(round(y)) + 2, int(round(x)) - 1 : int(round(x)) + 2]
            assert dot.mean() < 60  # dark dot, the face colour has a 228 channel
        assert aligned[56, 56].max() > 200  # between the dots: face colour


def test_align_rejects_a_wrong_image_type() -> None:
    with pytest.raises(CmpnasError, match="uint8"):
        align_face(np.zeros((10, 10)), ARCFACE_TEMPLATE)
    with pytest.raises(CmpnasError, match="uint8"):
        align_face(np.zeros((10, 10, 3), dtype=np.float32), ARCFACE_TEMPLATE)


def test_aligned_faces_dataset(ijbc_fixture: IJBCFixture) -> None:
    meta = read_ijbc_meta(ijbc_fixture.root)
    faces, flipped = IJBCAlignedFaces(meta), IJBCAlignedFaces(meta, flip=True)
    assert len(faces) == 24 and faces.labels.tolist() == list(range(24))
    image, index = faces[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 112, 112) and index == 5
    assert torch.equal(flipped[5][0], image.flip(-1))
    gray, _ = IJBCAlignedFaces(meta, in_chans=1)[5]
    assert gray.shape == (1, 112, 112)


def test_unreadable_face_image(ijbc_fixture: IJBCFixture, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(CmpnasError, match="bad.jpg"):
        load_rgb(bad)
