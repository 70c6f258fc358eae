"""Gallery index: embed gallery images with the gallery model into FAISS, plus an item table and a manifest.

An index is a folder::

    INDEX/index.faiss     FAISS index over L2-normalised float32 embeddings (inner product = cosine)
    INDEX/items.csv       one row per vector, in FAISS row order: id, path, label, model (the fingerprint of
                          the gallery model that embedded it; an index may hold several compatible generations)
    INDEX/manifest.json   gallery model fingerprint, lineage (the chain of compatible gallery models, newest
                          first), dim, normalisation, count, index type + params, times

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
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image

from cmpnas import __version__, progress
from cmpnas.data.sources import GallerySource, Item, load_item_image, open_image
from cmpnas.data.transforms import pil_to_uint8
from cmpnas.distributed import DistInfo, barrier, init_distributed
from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_dir, atomic_path, check_output_path, make_dirs, read_json, write_json_atomic
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


def new_faiss_index(params: IndexParams, dim: int, train: np.ndarray) -> faiss.Index:
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


# --------------------------------------------------------------------------------------------- the stores
class FaissStore:
    """The embedded default: a FAISS index in the folder, rows in ``items.csv`` order."""

    name = "faiss"

    def __init__(self, index: faiss.Index, items: list[Item], models: list[str]) -> None:
        self.index, self.items, self.models = index, items, models
        self.row_of = {it.id: i for i, it in enumerate(items)}

    def __len__(self) -> int:
        return len(self.items)

    def item(self, item_id: str) -> Item | None:
        row = self.row_of.get(item_id)
        return None if row is None else self.items[row]

    def present(self, ids: Sequence[str]) -> set[str]:
        return {i for i in ids if i in self.row_of}

    def set_search_params(self, params: dict[str, Any]) -> None:
        apply_search_params(self.index, params.get("nprobe"), params.get("ef_search"))

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        if isinstance(self.index, faiss.IndexIVF) and not self.index.direct_map.type:
            self.index.make_direct_map()  # IVF lists are searched by cell: map ids to slots to read them
        return np.stack([self.index.reconstruct(self.row_of[i]) for i in ids]).astype(np.float32)

    def model_of(self, ids: Sequence[str]) -> list[str]:
        return [self.models[self.row_of[i]] for i in ids]

    def search(self, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        scores, rows = self.index.search(queries, k)
        return [
            [
                {"id": self.items[r].id, "score": float(s), "label": self.items[r].label}
                for s, r in zip(srow, rrow, strict=True)
                if r >= 0
            ]
            for srow, rrow in zip(scores, rows, strict=True)
        ]


def _load_faiss(p: Path, manifest: dict[str, Any]) -> FaissStore:
    try:
        index = faiss.read_index(str(p / "index.faiss"))
    except RuntimeError as exc:
        raise CmpnasError(
            f"Cannot read '{p / 'index.faiss'}' ({str(exc)[:160]}).", "rebuild the index"
        ) from None
    items, models = read_items(p / "items.csv", default_model=manifest["gallery_fingerprint"])
    if index.ntotal != len(items) or index.d != manifest["dim"]:
        raise CmpnasError(
            f"Index '{p}' is inconsistent: index.faiss holds {index.ntotal} vectors of dim {index.d}, "
            f"items.csv {len(items)} items, manifest.json dim {manifest['dim']} (a truncated or mixed-up "
            "file).",
            "rebuild the index",
        )
    return FaissStore(index, items, models)


def _load_milvus(p: Path, manifest: dict[str, Any], uri: str | None = None) -> Any:
    from cmpnas.serving.milvus_store import MilvusStore, resolve_uri

    where = manifest.get("milvus") or {}
    store = MilvusStore(uri or resolve_uri(where.get("uri"), p), where.get("collection", ""))
    guard = store.guard()
    # a backfill names the new model in the collection's guard, then in the folder's manifest: a kill between
    # the two leaves them one upgrade apart, which is still the same chain (the re-run finishes the job)
    same_chain = guard["gallery_fingerprint"] == manifest["gallery_fingerprint"] or manifest[
        "gallery_fingerprint"
    ] in (guard.get("lineage") or [])
    if not same_chain or int(guard["dim"]) != int(manifest["dim"]):
        raise CmpnasError(
            f"Index folder '{p}' and Milvus collection '{store.collection}' disagree: the folder says gallery "
            f"{manifest['gallery_fingerprint']} (dim {manifest['dim']}), the collection holds embeddings of "
            f"{guard['gallery_fingerprint']} (dim {guard['dim']}).",
            "rebuild the index folder from the collection's gallery model, or point it at the right collection",
        )
    return store


# How an index folder's store is opened, by ``manifest["backend"]``: a new backend is one loader here.
STORE_LOADERS: dict[str, Callable[..., Any]] = {"faiss": _load_faiss, "milvus": _load_milvus}
BACKENDS = tuple(STORE_LOADERS)


# --------------------------------------------------------------------------------------------- the index
class GalleryIndex:
    """A loaded index folder: manifest + its store (FAISS in the folder, or a Milvus collection). Search takes
    L2-normalised float32 queries and returns ``{"id", "score", "label"}`` hits, best first, on either store."""

    def __init__(self, path: Path, manifest: dict[str, Any], store: Any) -> None:
        self.path, self.manifest, self.store = path, manifest, store
        self.count = len(store)  # fixed while loaded (an append or backfill writes a new index to swap in)

    @property
    def backend(self) -> str:
        return str(self.store.name)

    @property
    def gallery_fingerprint(self) -> str:
        return str(self.manifest["gallery_fingerprint"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def lineage(self) -> list[str]:
        """The gallery models whose embedding spaces this index is comparable with, newest first."""
        return list(self.manifest.get("lineage") or [self.gallery_fingerprint])

    def model_counts(self) -> dict[str, int] | None:
        """How many items each gallery model embedded (FAISS; None on Milvus, where it is a field query)."""
        if not isinstance(self.store, FaissStore):
            return None
        counts: dict[str, int] = {}
        for m in self.store.models:
            counts[m] = counts.get(m, 0) + 1
        return counts

    @property
    def items(self) -> list[Item]:
        """Every item in store order (FAISS: row order). On Milvus this reads the whole collection."""
        if isinstance(self.store, FaissStore):
            return self.store.items
        ids = self.store.all_ids()
        return [self.store.item(i) for i in ids]

    def __len__(self) -> int:
        return self.count

    def has(self, item_id: str) -> bool:
        return self.store.item(item_id) is not None

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Query-time knobs over the stored defaults (``None`` keeps the stored value)."""
        stored = self.manifest.get("index", {}).get("params", {})
        params = {
            **stored,
            **{k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None},
        }
        if self.backend == "milvus":
            from cmpnas.serving.milvus_store import search_params_for

            self.store.set_search_params(search_params_for(params))
        else:
            self.store.set_search_params(params)

    @classmethod
    def load(cls, path: str | Path, milvus_uri: str | None = None) -> GalleryIndex:
        """Open an index folder; ``milvus_uri`` overrides where its Milvus collection is served from (the
        server processes of ``serve --workers`` share one Milvus Lite server started by their parent)."""
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
        if manifest.get("status", "complete") != "complete":
            raise CmpnasError(
                f"Index '{p}' is still being built (or its build was killed).",
                "re-run the same cmpnas index command: it continues where it stopped",
            )
        backend = manifest.get("backend", "faiss")
        if backend not in STORE_LOADERS:
            raise CmpnasError(
                f"Index '{p}' uses an unknown backend '{backend}'.", f"use one of {', '.join(BACKENDS)}"
            )
        if backend == "milvus":
            store = _load_milvus(p, manifest, milvus_uri)
        else:
            store = STORE_LOADERS[backend](p, manifest)
        index = cls(p, manifest, store)
        index.set_search_params()
        return index

    def search(self, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Top-k per query row: [{"id", "score", "label"}], best first."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise CmpnasError(
                f"Query embeddings have shape {q.shape}, the index expects dim {self.dim}.",
                "use a query model with the gallery model's embedding dim",
            )
        k = max(1, min(int(k), len(self)))
        return self.store.search(q, k)

    def thumbnail_image(self, item_id: str) -> Image.Image | None:
        """The gallery image behind ``item_id`` (from disk, or re-rendered from the dataset), or None."""
        item = self.store.item(item_id)
        if item is None:
            return None
        return load_item_image(item_id, item.path, self.manifest.get("sources", []))


def read_items(path: Path, default_model: str = "") -> tuple[list[Item], list[str]]:
    """The item table and, per item, the fingerprint of the model that embedded it (indexes written before
    the ``model`` column existed were embedded by one model: ``default_model``)."""
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
    items = [Item(r["id"], r["path"], r["label"]) for r in rows]
    return items, [r.get("model") or default_model for r in rows]


def write_items(path: Path, items: Sequence[Item], models: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "path", "label", "model"])
        for it, model in zip(items, models, strict=True):
            writer.writerow([it.id, it.path, it.label, model])


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


@dataclass
class _Build:
    """What every backend's builder gets: the encoder, the rows still to embed, this rank."""

    out: Path
    gallery_model: Path
    encoder: Encoder
    source: GallerySource
    rows: list[int]  # source rows to add, in source order (ids not yet in the index, duplicates dropped)
    duplicates: int
    params: IndexParams
    append: bool
    existing: dict[str, Any] | None  # the index folder's manifest (append / resume)
    batch_size: int
    progress: Progress | None
    info: DistInfo
    started: float
    options: dict[str, Any]  # backend options (milvus: uri, collection)
    loaded: GalleryIndex | None = None  # the FAISS index an append adds to (loaded once)

    def my_rows(self) -> list[int]:
        """This rank's disjoint, deterministic slice of the rows (all of them in one process)."""
        return self.rows[self.info.rank :: self.info.world_size]


def build_index(
    gallery_model: str | Path,
    source: GallerySource,
    out: str | Path,
    params: IndexParams | None = None,
    *,
    append: bool = False,
    batch_size: int = 256,
    progress: Progress | None = None,
    backend: str | None = None,
    uri: str | None = None,
    collection: str | None = None,
) -> dict[str, Any]:
    """Embed ``source`` with the gallery model into the index folder ``out``; returns the manifest.

    ``backend``: ``faiss`` (default; the index is a file in the folder, replaced atomically) or ``milvus``
    (``uri``: a Milvus Lite ``*.db`` file, default ``OUT/milvus.db``, or ``http://host:19530``; the folder
    holds the manifest that points at the collection). With ``append`` the existing index keeps its type;
    ids already present are skipped, so re-running an append — or a killed Milvus build — is harmless.
    Under ``torchrun`` every rank embeds its own slice of the images; one rank or N give the same index.
    """
    out = Path(out)
    info = init_distributed()
    _check_out_dir(out, append)
    # the folder's manifest matters to an append, and to a Milvus build that may continue a killed one; a
    # FAISS rebuild replaces the folder whatever it holds (even a corrupt index)
    existing = _existing_manifest(out, required=append) if append or backend == "milvus" else None
    chosen = backend or (existing or {}).get("backend", "faiss") if append else (backend or "faiss")
    if chosen not in BUILDERS:
        raise CmpnasError(f"Unknown index backend '{chosen}'.", f"use one of {', '.join(BUILDERS)}")
    if append and existing is not None and existing.get("backend", "faiss") != chosen:
        raise CmpnasError(
            f"Index '{out}' uses the {existing.get('backend', 'faiss')} backend, not {chosen}.",
            "append with the index's own backend (drop --backend)",
        )
    encoder = load_encoder(gallery_model)
    if encoder.kind != "torch":
        raise CmpnasError(
            "The gallery model must be a cmpnas .safetensors checkpoint.",
            "pass --gallery-model GALLERY.safetensors (ONNX files are for query models)",
        )
    if append and existing is not None:
        lineage_after(existing, encoder, str(out))  # refuses a gallery model the index cannot take
    loaded = GalleryIndex.load(out) if append and chosen == "faiss" and existing is not None else None
    rows, seen, duplicates = [], set(loaded.store.row_of) if loaded else set(), 0
    for i, it in enumerate(source.items):
        if it.id in seen:
            duplicates += 1
            continue
        seen.add(it.id)
        rows.append(i)
    job = _Build(
        out, Path(gallery_model), encoder, source, rows, duplicates, params or IndexParams(), append, existing,
        batch_size, progress, info, time.time(), {"uri": uri, "collection": collection}, loaded,
    )  # fmt: skip
    return BUILDERS[chosen](job)


def _existing_manifest(out: Path, required: bool) -> dict[str, Any] | None:
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        return read_json(path, "rebuild the index")
    except CmpnasError:
        if required:
            raise
        return None  # unreadable: a new build starts afresh


def lineage_after(manifest: dict[str, Any] | None, encoder: Encoder, where: str = "the index") -> list[str]:
    """The index's chain of compatible gallery models once ``encoder`` writes into it, newest first.

    A new index starts at the model (and the model it was trained compatible with, if any); the model that
    built an index keeps its chain; a *gallery* model trained compatible with the index's newest model (``cmpnas
    upgrade-gallery``, which names it ``gallery`` like ``train-gallery`` does) becomes the new head. Anything
    else is refused: a query model trained against the gallery is comparable but would fill the index with its
    weaker embeddings, and an unrelated model's embeddings are not comparable at all.
    """
    if manifest is None:
        return [encoder.fingerprint, *([encoder.compatible_with] if encoder.compatible_with else [])]
    chain = list(manifest.get("lineage") or [manifest["gallery_fingerprint"]])
    if encoder.fingerprint == chain[0]:
        return chain
    if encoder.compatible_with == chain[0] and encoder.spec.name == "gallery":
        return [encoder.fingerprint, *chain]
    what = "a query model trained against it" if encoder.compatible_with == chain[0] else "not compatible with it"
    raise CmpnasError(
        f"Model {encoder.fingerprint} ('{encoder.spec.name}') cannot write into {where}, whose newest gallery "
        f"model is {chain[0]}: it is {what}.",
        f"append with the same gallery model ({chain[0]}) or a gallery model upgraded from it (cmpnas "
        "upgrade-gallery --old ...), or build a new index",
    )


def gallery_spec_of(encoder: Encoder) -> dict[str, Any]:
    """What an index records of the gallery model that embeds into it (enough to tell what fed it)."""
    return {
        k: getattr(encoder.spec, k)
        for k in ("backbone", "embed_dim", "in_chans", "input_size", "mean", "std", "name")
    }


def _gallery_fields(job: _Build) -> dict[str, Any]:
    enc = job.encoder
    return {
        "gallery_model": str(job.gallery_model.resolve()),
        "gallery_fingerprint": enc.fingerprint,
        "gallery_spec": gallery_spec_of(enc),
        # the chain of gallery models these embeddings are comparable with, newest first
        "lineage": lineage_after(job.existing if job.append else None, enc, str(job.out)),
        "dim": enc.dim,
        "normalisation": "l2",
        "metric": "inner_product",
    }


def _source_record(job: _Build, added: int, skipped: list[str]) -> dict[str, Any]:
    return {
        **job.source.description,
        "added": added,
        "skipped_unreadable": len(skipped),
        "skipped_duplicate_ids": job.duplicates,
        "skipped_examples": skipped[:20],
    }


def _shard_dir(job: _Build) -> Path:
    return job.out.parent / f".{job.out.name}.shards"


def _write_shard(job: _Build, vectors: np.ndarray, kept: list[int], skipped: list[str]) -> None:
    make_dirs(_shard_dir(job))
    with atomic_path(_shard_dir(job) / f"rank{job.info.rank}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                vectors=vectors,
                kept=np.asarray(kept, dtype=np.int64),
                skipped=np.asarray(skipped, dtype=str),
            )


def _read_shards(job: _Build, ranks: range) -> tuple[np.ndarray, list[int], list[str]]:
    """The given ranks' shard files merged back into source order (then the shard folder is removed)."""
    parts = [np.load(_shard_dir(job) / f"rank{r}.npz") for r in ranks]
    rows = np.concatenate([p["kept"] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(rows, kind="stable")
    dim = job.encoder.dim
    vecs = (
        np.concatenate([p["vectors"].reshape(-1, dim) for p in parts])[order] if parts else np.zeros((0, dim))
    )
    position = {job.source.items[r].id: r for r in job.rows}
    skipped = sorted((x for p in parts for x in p["skipped"].tolist()), key=lambda i: position.get(i, -1))
    shutil.rmtree(_shard_dir(job), ignore_errors=True)
    return vecs.astype(np.float32), rows[order].tolist(), skipped


def _embed_all_ranks(job: _Build) -> tuple[np.ndarray, list[int], list[str]] | None:
    """Embed this rank's slice; under torchrun rank 0 gets every rank's vectors back in source order
    (through shard files beside the index), the other ranks get None."""
    vectors, kept, skipped = embed_source(
        job.encoder, job.source, job.my_rows(), job.batch_size, job.progress
    )
    if not job.info.enabled:
        return vectors, kept, skipped
    _write_shard(job, vectors, kept, skipped)
    barrier(job.info)
    if not job.info.is_main:
        return None
    return _read_shards(job, range(job.info.world_size))


def _build_faiss(job: _Build) -> dict[str, Any]:
    embedded = _embed_all_ranks(job)
    if embedded is None:  # another rank: rank 0 writes the index; wait for it, then read what it wrote
        barrier(job.info)
        return read_json(job.out / "manifest.json", "rebuild the index")
    vectors, kept, skipped = embedded
    new_items = [job.source.items[r] for r in kept]
    existing = job.loaded
    if existing is None and not new_items:
        barrier(job.info)
        raise CmpnasError(
            "None of the gallery images could be read.",
            "check the files (skipped: " + ", ".join(skipped[:5]) + ")",
        )
    fresh_models = [job.encoder.fingerprint] * len(new_items)
    if existing is not None:
        index, items = existing.store.index, existing.store.items + new_items
        models = existing.store.models + fresh_models
        manifest = dict(existing.manifest)
        effective = IndexParams(**manifest["index"]["params"])
    else:
        effective = job.params.resolved(len(new_items), job.encoder.dim)
        index, items = new_faiss_index(effective, job.encoder.dim, vectors), new_items
        models = fresh_models
        manifest = {"format": INDEX_FORMAT, "created_at": now_iso(), "sources": []}
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    manifest.update(
        {
            **_gallery_fields(job),
            "backend": "faiss",
            "count": len(items),
            "index": {
                "type": effective.kind,
                "params": asdict(effective),
                "faiss_class": type(index).__name__,
            },
            "updated_at": now_iso(),
            "build_seconds": round(time.time() - job.started, 3),
            "cmpnas_version": __version__,
            "faiss_version": faiss.__version__,
            "ranks": job.info.world_size,
        }
    )
    manifest["sources"] = [*manifest.get("sources", []), _source_record(job, len(new_items), skipped)]
    with atomic_dir(job.out) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        write_items(tmp / "items.csv", items, models)
        write_json_atomic(tmp / "manifest.json", manifest)
    barrier(job.info)
    return manifest


def _build_milvus(job: _Build) -> dict[str, Any]:
    """Upsert batch by batch (a killed build continues where it stopped: ids already stored are skipped).

    A cluster (``http://``) takes writes from every rank; a Milvus Lite file opens in one process only, so
    under torchrun the other ranks hand their vectors to rank 0 through shard files."""
    from cmpnas.serving.milvus_store import DEFAULT_COLLECTION, MilvusStore, is_lite, resolve_uri

    previous = job.existing if job.existing and job.existing.get("backend") == "milvus" else None
    where = (previous or {}).get("milvus", {})
    given = job.options.get("uri")
    uri = resolve_uri(given if given is not None else where.get("uri"), job.out)
    collection = job.options.get("collection") or where.get("collection") or DEFAULT_COLLECTION
    lite = is_lite(uri)
    writes_here = job.info.is_main or not lite
    fields = _gallery_fields(job)
    manifest: dict[str, Any] = dict(previous or {"format": INDEX_FORMAT, "created_at": now_iso(), "sources": []})
    if job.info.is_main:
        make_dirs(job.out)  # the index folder holds the manifest (and a Milvus Lite file by default)
        store = MilvusStore(uri, collection)
        if store.exists():
            guard = store.guard()
            upgrade = job.append and job.encoder.compatible_with == guard["gallery_fingerprint"]
            if upgrade:  # an upgraded gallery model appends: the collection's guard moves to the new head
                store.set_guard({**guard, **fields, "format": INDEX_FORMAT})
            elif guard["gallery_fingerprint"] != job.encoder.fingerprint:
                raise CmpnasError(
                    f"Milvus collection '{collection}' at '{uri}' holds embeddings of gallery model "
                    f"{guard['gallery_fingerprint']}, not {job.encoder.fingerprint}.",
                    "index into a new collection (--collection NAME), or use that collection's gallery model",
                )
        elif job.append:
            raise CmpnasError(
                f"--append: Milvus collection '{collection}' does not exist at '{uri}'.",
                "build it first without --append",
            )
        else:
            effective = job.params.resolved(max(1, len(job.rows)), job.encoder.dim)
            store.create(job.encoder.dim, {**fields, "format": INDEX_FORMAT}, asdict(effective))
            manifest["index"] = {"type": effective.kind, "params": asdict(effective)}
        stored_uri = "milvus.db" if lite and Path(uri) == (job.out / "milvus.db").resolve() else uri
        manifest.update(
            {
                **fields,
                "backend": "milvus",
                "milvus": {"uri": stored_uri, "collection": collection},
                "status": "building",
            }
        )
        write_json_atomic(job.out / "manifest.json", manifest)
    barrier(job.info)  # the collection and the building manifest exist
    if not writes_here:  # a Lite file under torchrun: embed this slice, hand it to rank 0
        _write_shard(job, *embed_source(job.encoder, job.source, job.my_rows(), job.batch_size))
        barrier(job.info)  # shards written
        barrier(job.info)  # rank 0 has stored them and written the manifest
        return read_json(job.out / "manifest.json", "rebuild the index")
    store = store if job.info.is_main else MilvusStore(uri, collection)
    mine = job.my_rows()
    added, skipped = 0, []
    for start in range(0, len(mine), job.batch_size):
        chunk = mine[start : start + job.batch_size]
        present = store.present([job.source.items[r].id for r in chunk])
        todo = [r for r in chunk if job.source.items[r].id not in present]
        vectors, kept, bad = embed_source(job.encoder, job.source, todo, job.batch_size)
        store.upsert([job.source.items[r] for r in kept], vectors, job.encoder.fingerprint)
        added, skipped = added + len(kept), skipped + bad
        done = min(start + job.batch_size, len(mine))
        if job.progress is not None:
            job.progress(done, len(mine))
        progress.event(
            "index", status="batch", done=done, total=len(mine), message=f"index: {done}/{len(mine)}"
        )
    barrier(job.info)  # every rank has stored (cluster) or written its shard (Lite)
    if lite and job.info.enabled and job.info.is_main:
        vectors, kept, bad = _read_shards(job, range(1, job.info.world_size))
        store.upsert([job.source.items[r] for r in kept], vectors, job.encoder.fingerprint)
        added, skipped = added + len(kept), skipped + bad
    if job.info.is_main:
        manifest.update(
            {
                "count": len(store),
                "status": "complete",
                "updated_at": now_iso(),
                "build_seconds": round(time.time() - job.started, 3),
                "cmpnas_version": __version__,
                "ranks": job.info.world_size,
            }
        )
        earlier = manifest.get("sources", []) if job.append else []  # a re-run of a build replaces its record
        manifest["sources"] = [*earlier, _source_record(job, added, skipped)]
        write_json_atomic(job.out / "manifest.json", manifest)
    barrier(job.info)
    return read_json(job.out / "manifest.json", "rebuild the index")


BUILDERS: dict[str, Callable[[_Build], dict[str, Any]]] = {"faiss": _build_faiss, "milvus": _build_milvus}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------------------------- compatibility
def check_compatible(index: GalleryIndex, encoder: Encoder, allow_incompatible: bool = False) -> str:
    """'homogeneous' (query model = the index's newest gallery model), 'heterogeneous' (trained compatible
    with it), 'lineage' (the query model is, or is compatible with, an older gallery model of the index's
    chain: an upgrade kept the spaces comparable), or refuse.

    With ``allow_incompatible`` a mismatch returns 'incompatible-override' instead of raising; a different
    embedding dim is always refused (the vectors cannot be compared at all).
    """
    gallery, lineage = index.gallery_fingerprint, index.lineage
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
    if encoder.fingerprint in lineage or encoder.compatible_with in lineage:
        return "lineage"
    if allow_incompatible:
        return "incompatible-override"
    chain = gallery if len(lineage) == 1 else f"{gallery} (compatible chain: {' <- '.join(lineage)})"
    raise CmpnasError(
        f"Query model {encoder.fingerprint} was trained compatible with gallery model "
        f"{encoder.compatible_with or '(none recorded)'}, but index '{index.path}' was built with gallery "
        f"model {chain}; their embeddings are not comparable.",
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
    index.set_search_params(nprobe, ef_search)
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
