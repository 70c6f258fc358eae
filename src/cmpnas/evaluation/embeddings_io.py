"""Score embeddings computed elsewhere on the two benchmark protocols.

The exchange format is one ``.npz`` file with ``ids`` (strings: DeepFashion2 item ids such as
``"000123_item2"`` or IJB-C image names such as ``"1.jpg"``), ``embeddings`` (float [N, D]) and
optionally ``embeddings_flip`` (float [N, D], features of the mirrored images). Passing a second file as
``gallery_npz`` scores a heterogeneous setting: one model for queries, another for the gallery.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmpnas.data.deepfashion2 import read_deepfashion2
from cmpnas.data.ijbc import read_ijbc_meta
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.deepfashion2 import (
    TOP_KS,
    consumer_to_shop_topk,
    rank_deepfashion2,
    retrieval_gallery,
    retrieval_queries,
)
from cmpnas.evaluation.verification import DEFAULT_FARS, tar_at_far, template_features, verification_scores

_SAVE_HINT = (
    "save with np.savez(path, ids=np.array(ids, dtype=str), embeddings=float_matrix "
    "[, embeddings_flip=float_matrix])"
)
Embeddings = dict[str, Any]


def load_embeddings_npz(path: str | os.PathLike[str]) -> Embeddings:
    """Validated ``{"ids": list[str], "embeddings": float32 [N, D], "embeddings_flip": ... | None}``."""
    path = Path(path)
    if not path.is_file():
        raise CmpnasError(f"embeddings file {path} not found.", f"{_SAVE_HINT}.")
    _check_archive_magic(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise CmpnasError(
            f"embeddings file {path} is not an .npz archive ({exc}).", f"{_SAVE_HINT}."
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CmpnasError(f"cannot read embeddings file {path} ({exc}).", f"{_SAVE_HINT}.") from None
    if not isinstance(loaded, Mapping):
        raise CmpnasError(f"{path} holds a single .npy array, not an .npz archive.", f"{_SAVE_HINT}.")
    try:
        with loaded as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as exc:
        raise CmpnasError(
            f"embeddings file {path} holds object arrays ({exc}).",
            f"store ids as a string array, not Python objects; {_SAVE_HINT}.",
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CmpnasError(f"cannot read embeddings file {path} ({exc}).", f"{_SAVE_HINT}.") from None
    for name in ("ids", "embeddings"):
        if name not in arrays:
            raise CmpnasError(
                f"embeddings file {path} has no array {name!r} (it has {sorted(arrays)}).", f"{_SAVE_HINT}."
            )
    ids = arrays["ids"]
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        raise CmpnasError(
            f"embeddings file {path}: 'ids' must be a 1-D string array, "
            f"got dtype {ids.dtype} shape {ids.shape}.",
            f"{_SAVE_HINT}.",
        )
    id_list = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in ids.tolist()]
    embeddings = _float_matrix(arrays["embeddings"], "embeddings", path, len(id_list))
    flip = None
    if "embeddings_flip" in arrays:
        flip = _float_matrix(arrays["embeddings_flip"], "embeddings_flip", path, len(id_list))
        if flip.shape != embeddings.shape:
            raise CmpnasError(
                f"embeddings file {path}: 'embeddings_flip' has shape {flip.shape} but 'embeddings' "
                f"{embeddings.shape}.",
                "store the mirrored-image features of the same items in the same order.",
            )
    if not id_list:
        raise CmpnasError(f"embeddings file {path} holds no embeddings.", f"{_SAVE_HINT}.")
    if len(set(id_list)) != len(id_list):
        seen: set[str] = set()
        duplicates = [i for i in id_list if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
        raise CmpnasError(
            f"embeddings file {path}: {len(duplicates)} duplicate id(s), e.g. {duplicates[:5]}.",
            "store one embedding per id.",
        )
    return {"ids": id_list, "embeddings": embeddings, "embeddings_flip": flip}


_NPZ_MAGIC, _NPY_MAGIC = b"PK", b"\x93NUMPY"  # zip (any record), .npy


def _check_archive_magic(path: Path) -> None:
    """Refuse a file that is neither .npz (zip) nor .npy before numpy does: numpy would call any other
    file "pickled data" and suggest allow_pickle, which must never be the fix for an embeddings file."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    if not (head.startswith(_NPZ_MAGIC) or head.startswith(_NPY_MAGIC)):
        raise CmpnasError(
            f"embeddings file {path} is not an .npz archive (it starts with {head!r}).", f"{_SAVE_HINT}."
        )


def _float_matrix(array: np.ndarray, name: str, path: Path, n_ids: int) -> np.ndarray:
    if array.ndim != 2 or array.dtype.kind != "f":
        raise CmpnasError(
            f"embeddings file {path}: {name!r} must be a float [N, D] matrix, got dtype {array.dtype} "
            f"shape {array.shape}.",
            f"{_SAVE_HINT}.",
        )
    if array.shape[0] != n_ids:
        raise CmpnasError(
            f"embeddings file {path}: {n_ids} ids but {array.shape[0]} rows in {name!r}.",
            "store one row per id, in the same order.",
        )
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array).all(axis=1)).sum())
        raise CmpnasError(
            f"embeddings file {path}: {bad} row(s) of {name!r} contain NaN or infinite values.",
            "check the model that produced them.",
        )
    return array.astype(np.float32, copy=False)


def _as_embeddings(source: str | os.PathLike[str] | Embeddings) -> Embeddings:
    return source if isinstance(source, dict) else load_embeddings_npz(source)


def _rows_for(
    wanted: Sequence[str], embeddings: Embeddings, known: set[str], what: str, use_flip: bool
) -> np.ndarray:
    """Embedding rows (flip added when present and wanted) for ``wanted`` ids, after checking the id set."""
    ids = embeddings["ids"]
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise CmpnasError(
            f"{len(unknown)} id(s) in the embeddings are not {what}, e.g. {unknown[:5]}.",
            f"use the ids of {what} exactly as the reader names them.",
        )
    row_of = {item_id: row for row, item_id in enumerate(ids)}
    missing = [i for i in wanted if i not in row_of]
    if missing:
        raise CmpnasError(
            f"{len(missing)} required id(s) have no embedding, e.g. {missing[:5]}.",
            f"embed every one of {what}.",
        )
    rows = np.fromiter((row_of[i] for i in wanted), dtype=np.int64, count=len(wanted))
    matrix = embeddings["embeddings"][rows]
    if use_flip and embeddings.get("embeddings_flip") is not None:
        matrix = matrix + embeddings["embeddings_flip"][rows]
    return matrix


def score_deepfashion2_embeddings(
    root: str | os.PathLike[str],
    npz: str | os.PathLike[str] | Embeddings,
    split: str = "validation",
    gallery_npz: str | os.PathLike[str] | Embeddings | None = None,
    use_flip: bool = True,
) -> dict[str, float | int]:
    """Consumer-to-shop top-k (GT boxes) in PERCENT, plus counts, from precomputed item embeddings.

    Required ids: every consumer item with style > 0 (queries) and every shop item (gallery); other items
    of the split may be present and are ignored. With ``gallery_npz`` the gallery side comes from it.
    """
    items = read_deepfashion2(root, split)
    known = {item.item_id for item in items}
    queries, gallery = retrieval_queries(items), retrieval_gallery(items)
    query_ids = [item.item_id for item in queries]
    gallery_ids = [item.item_id for item in gallery]
    what = f"DeepFashion2 {split} items"
    query_source = _as_embeddings(npz)
    gallery_source = query_source if gallery_npz is None else _as_embeddings(gallery_npz)
    if gallery_npz is None:
        query_emb = _rows_for(query_ids + gallery_ids, query_source, known, what, use_flip)
        gallery_emb = query_emb[len(query_ids) :]
        query_emb = query_emb[: len(query_ids)]
    else:
        query_emb = _rows_for(query_ids, query_source, known, what, use_flip)
        gallery_emb = _rows_for(gallery_ids, gallery_source, known, what, use_flip)
    ranking = rank_deepfashion2(query_ids, query_emb, gallery_ids, gallery_emb, k=max(TOP_KS))
    metrics = consumer_to_shop_topk(queries, gallery, ranking, TOP_KS)
    return {key: (100.0 * value if key.startswith("top") else value) for key, value in metrics.items()}


def score_ijbc_embeddings(
    root: str | os.PathLike[str],
    npz: str | os.PathLike[str] | Embeddings,
    gallery_npz: str | os.PathLike[str] | Embeddings | None = None,
    use_flip: bool = True,
    use_detector_score: bool = True,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict[str, Any]:
    """IJB-C 1:1 TAR@FAR in PERCENT (both conventions) from precomputed image embeddings.

    Every image named in the tid/mid meta file needs an embedding. With ``gallery_npz`` (heterogeneous
    test) the first template of every pair uses ``npz`` and the second uses ``gallery_npz``.
    """
    meta = read_ijbc_meta(root)
    known = set(meta.image_names)
    what = "IJB-C images of meta/ijbc_face_tid_mid.txt"

    def templates(source: str | os.PathLike[str] | Embeddings) -> tuple[np.ndarray, np.ndarray]:
        embeddings = _as_embeddings(source)
        feats = _rows_for(meta.image_names, embeddings, known, what, use_flip)
        return template_features(
            feats,
            None,
            meta.template_ids,
            meta.media_ids,
            meta.faceness,
            use_detector_score=use_detector_score,
        )

    template_ids, feats = templates(npz)
    if gallery_npz is None:
        scores = verification_scores(template_ids, feats, meta.pairs)
    else:
        gallery_template_ids, gallery_feats = templates(gallery_npz)
        # shift the gallery-side template ids past every query-side id, so both sets can share one table
        offset = int(max(template_ids.max(), gallery_template_ids.max()))
        offset -= int(min(template_ids.min(), gallery_template_ids.min())) - 1
        combined_ids = np.r_[template_ids, gallery_template_ids + offset]
        combined = np.concatenate([feats, gallery_feats])
        scores = verification_scores(combined_ids, combined, meta.pairs + np.array([0, offset]))
    result = tar_at_far(meta.labels, scores, fars)
    return {
        "tar_at_far": {
            convention: {far: 100.0 * tar for far, tar in values.items()}
            for convention, values in result.items()
        },
        "n_pairs": int(meta.labels.size),
        "n_genuine": int(meta.labels.sum()),
        "n_impostor": int(meta.labels.size - meta.labels.sum()),
        "n_templates": int(template_ids.size),
        "n_images": meta.n_images,
    }
