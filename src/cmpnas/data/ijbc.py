"""IJB-C 1:1 as the community runs it (insightface's IJB evaluation): insightface meta files + loose crops.

Layout: ``<root>/loose_crop/<name>.jpg`` and ``<root>/meta/ijbc_face_tid_mid.txt`` (name tid mid),
``ijbc_template_pair_label.txt`` (tid1 tid2 label), ``ijbc_name_5pts_score.txt`` (name, 5 x/y
landmarks, faceness). Space separated, no header, parsed by position. Row i of the 5pts file belongs to
row i of the tid/mid file, so both are checked to name the same image on every row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cmpnas.data.base import ImageDataset
from cmpnas.errors import CmpnasError

ALIGNED_SIZE = 112
_SAME_ORDER_FIX = (
    "the 5pts and tid/mid files must list the same images in the same order; use one meta release."
)
# ArcFace 112x112 five-point template (left eye, right eye, nose, left and right mouth corner),
# in pixel-index coordinates (pixel i is centred on i), as used with cv2.warpAffine upstream.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class MetaFiles:
    tid_mid: Path
    pairs: Path
    landmarks: Path


def meta_files(root: str | os.PathLike[str], prefix: str = "ijbc") -> MetaFiles:
    meta = Path(root) / "meta"
    return MetaFiles(
        tid_mid=meta / f"{prefix}_face_tid_mid.txt",
        pairs=meta / f"{prefix}_template_pair_label.txt",
        landmarks=meta / f"{prefix}_name_5pts_score.txt",
    )


@dataclass
class IJBCMeta:
    """Everything the 1:1 protocol needs, one row per image (aligned across the meta files)."""

    root: Path
    image_names: list[str]
    template_ids: np.ndarray  # int64 [N]
    media_ids: np.ndarray  # int64 [N]
    landmarks: np.ndarray  # float32 [N, 5, 2], pixel coordinates in the loose crop
    faceness: np.ndarray  # float32 [N], detector score
    pairs: np.ndarray  # int64 [P, 2] template ids
    labels: np.ndarray  # int64 [P], 1 genuine / 0 impostor

    @property
    def n_images(self) -> int:
        return len(self.image_names)

    def image_path(self, index: int) -> Path:
        return self.root / "loose_crop" / self.image_names[index]


def read_ijbc_meta(root: str | os.PathLike[str], prefix: str = "ijbc") -> IJBCMeta:
    """Read and cross-check the three 1:1 meta files under ``<root>/meta``."""
    root = Path(root)
    files = meta_files(root, prefix)
    for path in (files.tid_mid, files.pairs, files.landmarks):
        if not path.is_file():
            raise CmpnasError(
                f"IJB-C meta file {path} not found.",
                f"point the root at the IJB-C folder holding 'meta/{path.name}' and 'loose_crop/' "
                "(the meta files come from insightface's IJB release tarball).",
            )
    names, template_ids, media_ids, tid_lines = _read_tid_mid(files.tid_mid)
    landmarks, faceness = _read_landmarks(files.landmarks, names, tid_lines, files.tid_mid)
    pairs, labels = _read_pairs(files.pairs)
    known = np.unique(template_ids)
    unknown_rows = np.flatnonzero(~np.isin(pairs, known).all(axis=1))
    if unknown_rows.size:
        row = int(unknown_rows[0])
        bad = [int(t) for t in pairs[row] if not np.isin(t, known)]
        raise CmpnasError(
            f"IJB-C pair file {files.pairs}, line {_line_of_row(files.pairs, row)}: template id {bad[0]} "
            f"does not appear in {files.tid_mid} ({unknown_rows.size} pair(s) name unknown templates).",
            "use the pair and tid/mid files from the same IJB-C meta release.",
        )
    return IJBCMeta(root, names, template_ids, media_ids, landmarks, faceness, pairs, labels)


def _content_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, whitespace-split fields) of every non-blank line."""
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                fields = line.split()
                if fields:
                    yield number, fields
    except UnicodeDecodeError:
        raise CmpnasError(
            f"IJB-C meta file {path} is not a text file.", "re-extract the meta files."
        ) from None


def _row_error(path: Path, line: int, problem: str, expected: str) -> CmpnasError:
    return CmpnasError(
        f"IJB-C meta file {path}, line {line}: {problem}.",
        f"each line must be '{expected}' (space separated, no header); re-extract the meta files.",
    )


def _read_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[int]]:
    expected = "image_name template_id media_id"
    names, tids, mids, lines = [], [], [], []
    for number, fields in _content_lines(path):
        if len(fields) != 3:
            raise _row_error(path, number, f"{len(fields)} columns instead of 3", expected)
        try:
            tids.append(int(fields[1]))
            mids.append(int(fields[2]))
        except ValueError:
            raise _row_error(path, number, "template or media id is not an integer", expected) from None
        names.append(fields[0])
        lines.append(number)
    if not names:
        raise CmpnasError(f"IJB-C meta file {path} is empty.", "re-extract the meta files.")
    return names, np.asarray(tids, dtype=np.int64), np.asarray(mids, dtype=np.int64), lines


def _read_landmarks(
    path: Path, names: Sequence[str], tid_lines: Sequence[int], tid_path: Path
) -> tuple[np.ndarray, np.ndarray]:
    expected = "image_name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 faceness"
    values = np.empty((len(names), 11), dtype=np.float32)
    row = -1
    for row, (number, fields) in enumerate(_content_lines(path)):
        if len(fields) != 12:
            raise _row_error(path, number, f"{len(fields)} columns instead of 12", expected)
        if row >= len(names):
            raise CmpnasError(
                f"IJB-C meta file {path}, line {number}: more rows than the {len(names)} of {tid_path}.",
                _SAME_ORDER_FIX,
            )
        if fields[0] != names[row]:
            raise CmpnasError(
                f"IJB-C meta file {path}, line {number} names {fields[0]!r} but {tid_path}, "
                f"line {tid_lines[row]} names {names[row]!r}.",
                _SAME_ORDER_FIX,
            )
        try:
            values[row] = [float(v) for v in fields[1:]]
        except ValueError:
            raise _row_error(path, number, "a landmark or the score is not a number", expected) from None
        if not np.isfinite(values[row]).all():
            raise _row_error(path, number, "a landmark or the score is NaN or infinite", expected)
    if row + 1 != len(names):
        raise CmpnasError(
            f"IJB-C meta file {path} has {row + 1} rows but {tid_path} has {len(names)}.",
            _SAME_ORDER_FIX,
        )
    return values[:, :10].reshape(-1, 5, 2).copy(), values[:, 10].copy()


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = read_int_table(path, 3, "tid1 tid2 label")
    if table.shape[0] == 0:
        raise CmpnasError(f"IJB-C meta file {path} has no pairs.", "re-extract the meta files.")
    labels = table[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        row = int(bad[0])
        raise _row_error(
            path, _line_of_row(path, row), f"label {labels[row]} is not 0 or 1", "tid1 tid2 label"
        )
    return table[:, :2].copy(), labels.astype(np.int64)


_BLOCK_BYTES = 1 << 22


def read_int_table(path: Path, n_columns: int, expected: str) -> np.ndarray:
    """An all-integer, whitespace-separated table, parsed with numpy in blocks of whole lines.

    The IJB-C pair file has ~15.6M lines, too many for a Python loop; every line is still checked for
    its column count, and errors give the line number. Blank lines are skipped.
    """
    parts: list[np.ndarray] = []
    first_line = 1
    remainder = b""
    with open(path, "rb") as handle:
        while True:
            block = handle.read(_BLOCK_BYTES)
            data = remainder + block
            if block:
                cut = data.rfind(b"\n") + 1
                data, remainder = data[:cut], data[cut:]
            if data:
                parts.append(_parse_int_block(data, n_columns, path, first_line, expected))
                first_line += data.count(b"\n")
            if not block:
                break
    return np.concatenate(parts) if parts else np.empty((0, n_columns), dtype=np.int64)


def _parse_int_block(data: bytes, n_columns: int, path: Path, first_line: int, expected: str) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    newline = raw == ord("\n")
    separator = newline | (raw == ord(" ")) | (raw == ord("\t")) | (raw == ord("\r"))
    token_start = ~separator
    token_start[1:] &= separator[:-1]
    line_of_byte = np.cumsum(newline, dtype=np.int64) - newline
    n_lines = int(newline.sum()) + (0 if data.endswith(b"\n") else 1)
    columns = np.bincount(line_of_byte[token_start], minlength=n_lines)
    bad = np.flatnonzero((columns != 0) & (columns != n_columns))
    if bad.size:
        line = int(bad[0])
        raise _row_error(path, first_line + line, f"{columns[line]} columns instead of {n_columns}", expected)
    try:
        values = np.fromstring(data, dtype=np.int64, sep=" ")
    except ValueError:
        values = None
    if values is None or values.size != int(columns.sum()):
        for offset, line in enumerate(data.decode("utf-8", errors="replace").split("\n")):
            for field in line.split():
                try:
                    int(field)
                except ValueError:
                    raise _row_error(
                        path, first_line + offset, f"{field!r} is not an integer", expected
                    ) from None
        raise _row_error(path, first_line, "unparsable integers in this block", expected)  # not reached
    return values.reshape(-1, n_columns)


def _line_of_row(path: Path, row: int) -> int:
    """1-based line number of the row-th (0-based) non-blank line."""
    for index, (number, _) in enumerate(_content_lines(path)):
        if index == row:
            return number
    return -1


# --------------------------------------------------------------------------------------------- alignment
def estimate_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) mapping ``source`` points onto ``target``.

    Returns the 2x3 matrix M with target ~= M[:, :2] @ p + M[:, 2] (rotation, uniform scale, translation;
    no reflection), the same model as skimage's SimilarityTransform.estimate used upstream.
    """
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or not np.isfinite(src).all():
        raise CmpnasError(
            f"landmarks of shape {src.shape} cannot be matched to a template of shape {dst.shape}.",
            "give finite (x, y) landmarks, one row per template point.",
        )
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centred, dst_centred = src - src_mean, dst - dst_mean
    src_variance = (src_centred**2).sum() / len(src)
    if src_variance < 1e-12:
        raise CmpnasError(
            "the landmarks all sit on one point; no alignment is possible.", "check the 5pts file."
        )
    covariance = dst_centred.T @ src_centred / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal fit would be a reflection
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = float((singular * sign).sum() / src_variance)
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(
    image: np.ndarray,
    landmarks5: np.ndarray,
    size: int = ALIGNED_SIZE,
    template: np.ndarray = ARCFACE_TEMPLATE,
) -> np.ndarray:
    """Warp a loose crop (H x W x 3 uint8 RGB) so its 5 landmarks land on the ArcFace template.

    Bilinear sampling, black outside the source image (cv2.warpAffine's default border upstream).
    """
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise CmpnasError(
            f"face image has shape {array.shape} and dtype {array.dtype}; expected H x W x 3 uint8 RGB.",
            "decode the image as RGB.",
        )
    matrix = estimate_similarity(np.asarray(landmarks5, dtype=np.float64).reshape(-1, 2), template)
    linear_inverse = np.linalg.inv(matrix[:, :2])
    translation_inverse = -linear_inverse @ matrix[:, 2]
    # PIL samples at pixel centres x + 0.5 (corner coordinates); landmarks are pixel-index coordinates.
    offset = translation_inverse + 0.5 - linear_inverse @ np.array([0.5, 0.5])
    coefficients = (
        linear_inverse[0, 0],
        linear_inverse[0, 1],
        offset[0],
        linear_inverse[1, 0],
        linear_inverse[1, 1],
        offset[1],
    )
    warped = Image.fromarray(array).transform(
        (size, size),
        Image.Transform.AFFINE,
        coefficients,
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    return np.array(warped, dtype=np.uint8)  # a writable copy


def load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise CmpnasError(
            f"cannot read IJB-C image {path} ({exc}).", "restore the loose_crop image."
        ) from None


class IJBCAlignedFaces(ImageDataset):
    """Aligned 112x112 faces as ``(uint8 tensor [C, 112, 112], row index)``; ``flip`` mirrors them.

    The row index points into the meta arrays, so features can be pooled into templates afterwards.
    """

    def __init__(self, meta: IJBCMeta, flip: bool = False, in_chans: int = 3) -> None:
        if in_chans not in (1, 3):
            raise CmpnasError(f"in_chans={in_chans} is not supported.", "use 1 (grayscale) or 3 (RGB).")
        self.meta = meta
        self.flip = flip
        self.in_chans = in_chans
        self.labels = torch.arange(meta.n_images, dtype=torch.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        face = align_face(load_rgb(self.meta.image_path(index)), self.meta.landmarks[index])
        if self.flip:
            face = face[:, ::-1]
        if self.in_chans == 1:
            face = np.array(Image.fromarray(np.ascontiguousarray(face)).convert("L"))[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(face)).permute(2, 0, 1).contiguous(), index
