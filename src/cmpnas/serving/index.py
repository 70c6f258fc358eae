"""Gallery index: embed gallery images with the gallery model into FAISS, plus an item table and a manifest.

An index is a folder::

    INDEX/index.faiss     FAISS index over L2-normalised float32 embeddings (inner product = cosine)
    INDEX/items.csv       one row per vector, in FAISS row order: id, path, label
    INDEX/manifest.json   gallery model fingerprint, dim, normalisation, count, index type + params, times

It is built in a hidden temporary folder beside INDEX and moved into place only when complete
(:func:`cmpnas.io.atomic_dir`), so a killed build leaves the previous index (or none), never half of one,
and a full disk is a one-line error. ``append`` rebuilds the folder the same way. A truncated or corrupt
file of an index folder is refused with a one-line message when the index is loaded.

Index types (``IndexParams.kind``):
- ``flat``  exact inner product (IndexFlatIP). The default: exact and fast enough up to ~1M items.
- ``ivf``   IndexIVFFlat: ``nlist`` k-means cells (default ~4*sqrt(n), clamped so each cell has >= 39
  training points), ``nprobe`` cells visited per query (default 8; higher = better recall, slower).
- ``hnsw``  IndexHNSWFlat: graph with ``hnsw_m`` links per node (32), ``ef_construction`` (40) build
  beam and ``ef_search`` (64) search beam. No training, slow to build for millions of items.
- ``ivfpq`` IndexIVFPQ: IVF cells + product quantisation of each vector into ``pq_m`` sub-codes
  of ``pq_bits`` bits (default: dim/4 sub-codes of 8 bits, i.e. dim bytes per vector instead of 4*dim).
IVF/PQ are trained on the first build's vectors; ``append`` adds without retraining (rebuild if the gallery
changes a lot).

What to index comes as a :class:`~cmpnas.data.sources.GallerySource` (a folder, a CSV, a dataset split, a
run's data config); reading images is the data package's job (:mod:`cmpnas.data.sources`), this module
only embeds, stores and searches them.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image

from cmpnas import __version__
from cmpnas.data.sources import GallerySource, Item, load_item_image, open_image
from cmpnas.data.transforms import pil_to_uint8
from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_dir, check_output_path, read_json, write_json_atomic
from cmpnas.serving.export import Encoder, load_encoder

INDEX_FORMAT = "cmpnas.gallery_index.v1"
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------- params
@dataclass
class IndexParams:
    """FAISS index type and its parameters; ``None`` means 'size it from the gallery'."""

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int = 8
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    pq_m: int | None = None
    pq_bits: int = 8

    def resolved(self, count: int, dim: int) -> IndexParams:
        """Effective parameters for ``count`` training vectors (small galleries get small nlist/pq_bits)."""
        if self.kind not in INDEX_TYPES:
            raise CmpnasError(f"Unknown index type '{self.kind}'.", f"use one of {', '.join(INDEX_TYPES)}")
        p = IndexParams(**asdict(self))
        if p.kind in ("ivf", "ivfpq"):
            cap = max(1, count // 39)  # faiss k-means wants >= 39 points per centroid
            p.nlist = max(1, min(p.nlist or round(4 * math.sqrt(count)), cap))
            p.nprobe = max(1, min(p.nprobe, p.nlist))
        if p.kind == "ivfpq":
            if count < 16:
                raise CmpnasError(
                    f"ivfpq needs at least 16 gallery images to train (got {count}).",
                    "use --index flat for tiny galleries",
                )
            # each sub-quantiser runs k-means with 2**bits centroids: keep >= 39 training points per centroid
            p.pq_bits = max(4, min(p.pq_bits, int(math.log2(max(count // 39, 1)))))
            p.pq_m = p.pq_m or max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
            if dim % p.pq_m:
                raise CmpnasError(
                    f"--pq-m {p.pq_m} does not divide the embedding dim {dim}.",
                    "pick a divisor of the dim (e.g. dim/4)",
                )
        return p


def _new_faiss_index(params: IndexParams, dim: int, train: np.ndarray) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if params.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, ip)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if params.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, ip)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, params.pq_bits, ip)
    index.own_fields = True
    quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
    if len(train) > 200_000:  # k-means on a sample is as good and much faster
        train = train[np.random.default_rng(0).choice(len(train), 200_000, replace=False)]
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    index.nprobe = params.nprobe
    return index


def apply_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """nprobe / efSearch are query-time knobs: set them without rebuilding."""
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(ef_search)


# --------------------------------------------------------------------------------------------- embedding
def embed_source(
    encoder: Encoder,
    source: GallerySource,
    rows: Sequence[int],
    batch_size: int = 256,
    progress: Progress | None = None,
) -> tuple[np.ndarray, list[int], list[str]]:
    """Embed ``source.items[rows]`` in batches; returns (vectors [M,D], embedded rows, skipped item ids)."""
    spec = encoder.spec
    vectors, kept, skipped = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk, batch = rows[start : start + batch_size], []
        for r in chunk:
            img = source.load(r)
            if img is None:
                skipped.append(source.items[r].id)
                continue
            try:
                batch.append(pil_to_uint8(img, spec.in_chans, spec.input_size))
            except CmpnasError:
                skipped.append(source.items[r].id)
                continue
            kept.append(r)
        if batch:
            vectors.append(encoder.embed_uint8(torch.stack(batch)))
        if progress is not None:
            progress(min(start + batch_size, len(rows)), len(rows))
    dim = encoder.dim
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), kept, skipped


# --------------------------------------------------------------------------------------------- the index
class GalleryIndex:
    """A loaded index folder: FAISS index + items + manifest. Search takes L2-normalised float32 queries."""

    def __init__(self, path: Path, manifest: dict[str, Any], index: faiss.Index, items: list[Item]) -> None:
        self.path, self.manifest, self.index, self.items = path, manifest, index, items
        self.row_of = {it.id: i for i, it in enumerate(items)}

    @property
    def gallery_fingerprint(self) -> str:
        return str(self.manifest["gallery_fingerprint"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def load(cls, path: str | Path) -> GalleryIndex:
        p = Path(path)
        manifest_path = p / "manifest.json"
        if not manifest_path.is_file():
            previous = sorted(p.parent.glob(f".{p.name}.old-*"))
            if not p.exists() and previous:
                raise CmpnasError(
                    f"Index '{p}' is missing: a rebuild was interrupted while swapping folders.",
                    f"rename '{previous[-1]}' back to '{p}', or rebuild the index",
                )
            raise CmpnasError(
                f"'{p}' is not a gallery index (no manifest.json).",
                "build one with cmpnas index --gallery-model G --out INDEX",
            )
        manifest = read_json(manifest_path, "rebuild the index")
        if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise CmpnasError(f"'{p}' has an unknown index format {found!r}.", "rebuild the index")
        missing = [k for k in ("dim", "gallery_fingerprint") if k not in manifest]
        if missing:
            raise CmpnasError(
                f"'{manifest_path}' is incomplete (no {', '.join(missing)}).", "rebuild the index"
            )
        try:
            index = faiss.read_index(str(p / "index.faiss"))
        except RuntimeError as exc:
            raise CmpnasError(
                f"Cannot read '{p / 'index.faiss'}' ({str(exc)[:160]}).", "rebuild the index"
            ) from None
        items = read_items(p / "items.csv")
        if index.ntotal != len(items) or index.d != manifest["dim"]:
            raise CmpnasError(
                f"Index '{p}' is inconsistent: index.faiss holds {index.ntotal} vectors of dim {index.d}, "
                f"items.csv {len(items)} items, manifest.json dim {manifest['dim']} (a truncated or mixed-up "
                "file).",
                "rebuild the index",
            )
        params = manifest.get("index", {}).get("params", {})
        apply_search_params(index, params.get("nprobe"), params.get("ef_search"))
        return cls(p, manifest, index, items)

    def search(self, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Top-k per query row: [{"id", "score", "label"}], best first."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise CmpnasError(
                f"Query embeddings have shape {q.shape}, the index expects dim {self.dim}.",
                "use a query model with the gallery model's embedding dim",
            )
        k = max(1, min(int(k), len(self.items)))
        scores, rows = self.index.search(q, k)
        return [
            [
                {"id": self.items[r].id, "score": float(s), "label": self.items[r].label}
                for s, r in zip(srow, rrow, strict=True)
                if r >= 0
            ]
            for srow, rrow in zip(scores, rows, strict=True)
        ]

    def thumbnail_image(self, item_id: str) -> Image.Image | None:
        """The gallery image behind ``item_id`` (from disk, or re-rendered from the dataset), or None."""
        row = self.row_of.get(item_id)
        if row is None:
            return None
        return load_item_image(item_id, self.items[row].path, self.manifest.get("sources", []))


def read_items(path: Path) -> list[Item]:
    if not path.is_file():
        raise CmpnasError(f"Item table '{path}' is missing.", "rebuild the index")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"id", "path", "label"} <= set(reader.fieldnames):
                raise ValueError(f"header {reader.fieldnames}, expected id,path,label")
            rows = list(reader)
    except (ValueError, csv.Error, UnicodeDecodeError) as exc:  # UnicodeDecodeError is a ValueError too
        raise CmpnasError(
            f"Item table '{path}' is corrupt ({str(exc)[:120]}).", "rebuild the index"
        ) from None
    if any(r["id"] is None or r["label"] is None for r in rows):  # a row cut short (truncated file)
        raise CmpnasError(f"Item table '{path}' is truncated.", "rebuild the index")
    return [Item(r["id"], r["path"], r["label"]) for r in rows]


def _write_items(path: Path, items: Sequence[Item]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path", "label"])
        for it in items:
            writer.writerow([it.id, it.path, it.label])


def _check_out_dir(out: Path, append: bool) -> None:
    check_output_path(out)
    if append:
        if not (out / "manifest.json").is_file():
            raise CmpnasError(
                f"--append needs an existing index at '{out}'.", "build it first without --append"
            )
        return
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise CmpnasError(
            f"'{out}' exists and is not a gallery index; refusing to replace it.",
            "pass a new --out folder (an existing index folder is rebuilt)",
        )


def build_index(
    gallery_model: str | Path,
    source: GallerySource,
    out: str | Path,
    params: IndexParams | None = None,
    *,
    append: bool = False,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Embed ``source`` with the gallery model into the index folder ``out``; returns the manifest.

    With ``append`` the existing index keeps its type and training; items whose id is already present
    are skipped (so re-running an append is harmless). Nothing at ``out`` changes unless the build completes.
    """
    out = Path(out)
    _check_out_dir(out, append)
    encoder = load_encoder(gallery_model)
    if encoder.kind != "torch":
        raise CmpnasError(
            "The gallery model must be a cmpnas .safetensors checkpoint.",
            "pass --gallery-model GALLERY.safetensors (ONNX files are for query models)",
        )
    t0 = time.time()
    existing: GalleryIndex | None = GalleryIndex.load(out) if append else None
    if existing is not None and existing.gallery_fingerprint != encoder.fingerprint:
        raise CmpnasError(
            f"Index '{out}' was built with gallery model {existing.gallery_fingerprint}, "
            f"not {encoder.fingerprint}.",
            "append with the same gallery model, or build a new index",
        )
    known = set(existing.row_of) if existing else set()
    rows, seen, duplicates = [], set(known), 0
    for i, it in enumerate(source.items):
        if it.id in seen:
            duplicates += 1
            continue
        seen.add(it.id)
        rows.append(i)
    vectors, kept, skipped = embed_source(encoder, source, rows, batch_size, progress)
    new_items = [source.items[r] for r in kept]
    if existing is None and not new_items:
        raise CmpnasError(
            "None of the gallery images could be read.",
            "check the files (skipped: " + ", ".join(skipped[:5]) + ")",
        )

    if existing is not None:
        index, items = existing.index, existing.items + new_items
        manifest = dict(existing.manifest)
        effective = IndexParams(**manifest["index"]["params"])
    else:
        effective = (params or IndexParams()).resolved(len(new_items), encoder.dim)
        index, items = _new_faiss_index(effective, encoder.dim, vectors), new_items
        manifest = {"format": INDEX_FORMAT, "created_at": _now(), "sources": []}
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    manifest.update(
        {
            "gallery_model": str(Path(gallery_model).resolve()),
            "gallery_fingerprint": encoder.fingerprint,
            "gallery_spec": {
                k: getattr(encoder.spec, k)
                for k in ("backbone", "embed_dim", "in_chans", "input_size", "mean", "std", "name")
            },
            "dim": encoder.dim,
            "normalisation": "l2",
            "metric": "inner_product",
            "count": len(items),
            "index": {
                "type": effective.kind,
                "params": asdict(effective),
                "faiss_class": type(index).__name__,
            },
            "updated_at": _now(),
            "build_seconds": round(time.time() - t0, 3),
            "cmpnas_version": __version__,
            "faiss_version": faiss.__version__,
        }
    )
    manifest["sources"] = [
        *manifest.get("sources", []),
        {
            **source.description,
            "added": len(new_items),
            "skipped_unreadable": len(skipped),
            "skipped_duplicate_ids": duplicates,
            "skipped_examples": skipped[:20],
        },
    ]
    with atomic_dir(out) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        _write_items(tmp / "items.csv", items)
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------------------------- compatibility
def check_compatible(index: GalleryIndex, encoder: Encoder, allow_incompatible: bool = False) -> str:
    """'homogeneous' (query model = gallery model), 'heterogeneous' (trained compatible with it), or refuse.

    With ``allow_incompatible`` a mismatch returns 'incompatible-override' instead of raising; a different
    embedding dim is always refused (the vectors cannot be compared at all).
    """
    gallery = index.gallery_fingerprint
    if encoder.dim != index.dim:
        raise CmpnasError(
            f"Query model {encoder.fingerprint} embeds into {encoder.dim} dims, index '{index.path}' "
            f"holds {index.dim}-dim gallery vectors.",
            "use a query model trained against this gallery",
        )
    if encoder.fingerprint == gallery:
        return "homogeneous"
    if encoder.compatible_with == gallery:
        return "heterogeneous"
    if allow_incompatible:
        return "incompatible-override"
    raise CmpnasError(
        f"Query model {encoder.fingerprint} was trained compatible with gallery model "
        f"{encoder.compatible_with or '(none recorded)'}, but index '{index.path}' was built with gallery "
        f"model {gallery}; their embeddings are not comparable.",
        f"query with a model trained against gallery {gallery} (or the gallery model itself), rebuild the "
        "index with the matching gallery model, or pass --allow-incompatible if you know better",
    )


__all__ = [
    "GalleryIndex",
    "IndexParams",
    "build_index",
    "check_compatible",
    "query_images",
]


# --------------------------------------------------------------------------------------------- query
def open_query_image(path: str | Path) -> Image.Image:
    img = open_image(path)
    if img is None:
        raise CmpnasError(f"Cannot read query image '{path}'.", "pass PNG/JPEG/... image files")
    return img


def query_images(
    index_dir: str | Path,
    query_model: str | Path,
    images: Sequence[str | Path],
    k: int = 10,
    *,
    allow_incompatible: bool = False,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> dict[str, Any]:
    """Embed ``images`` with the query model and search the index (refusing incompatible models)."""
    index = GalleryIndex.load(index_dir)
    apply_search_params(index.index, nprobe, ef_search)
    encoder = load_encoder(query_model)
    mode = check_compatible(index, encoder, allow_incompatible)
    pil = [open_query_image(p) for p in images]
    hits = index.search(encoder.embed_images(pil), k) if pil else []
    return {
        "mode": mode,
        "index": str(index_dir),
        "gallery_fingerprint": index.gallery_fingerprint,
        "query_model": encoder.describe(),
        "queries": [{"image": str(p), "results": h} for p, h in zip(images, hits, strict=True)],
    }
