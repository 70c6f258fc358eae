"""The default backend: a FAISS index inside the index folder, next to its item table.

    INDEX/index.faiss     FAISS index over L2-normalised float32 embeddings (inner product = cosine)
    INDEX/items.csv       one row per vector, in FAISS row order: id, path, label, model (the fingerprint of
                          the gallery model that embedded it; an index may hold several compatible generations)

Every write (build, append, backfill) produces a whole new folder that replaces the old one in one rename
(:func:`cmpnas.io.atomic_dir`), so a reader sees the old index or the new one, never a mix.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np

from cmpnas import __version__
from cmpnas.data.sources import Item
from cmpnas.distributed import barrier
from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_dir, read_json, write_json_atomic
from cmpnas.serving.building import BuildJob, embed_all_ranks, gallery_fields, source_record
from cmpnas.serving.index_format import INDEX_FORMAT, IndexParams, now_iso
from cmpnas.serving.store import Hits, IndexBackend

TRAIN_SAMPLE = 200_000  # IVF/PQ k-means trains on at most this many vectors


def new_faiss_index(params: IndexParams, dim: int, train: np.ndarray) -> faiss.Index:
    """An empty FAISS index of ``params.kind`` (IVF/PQ trained on ``train``), searching by inner product."""
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
    if len(train) > TRAIN_SAMPLE:  # k-means on a sample is as good and much faster
        train = train[np.random.default_rng(0).choice(len(train), TRAIN_SAMPLE, replace=False)]
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    index.nprobe = params.nprobe
    return index


def apply_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """nprobe / efSearch are query-time knobs: set them without rebuilding."""
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(ef_search)


# --------------------------------------------------------------------------------------------- item table
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


def _write_folder(
    folder: Path, index: faiss.Index, items: Sequence[Item], models: Sequence[str], manifest: dict[str, Any]
) -> None:
    """Index, item table and manifest as a new folder that replaces ``folder`` in one rename."""
    with atomic_dir(folder) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        write_items(tmp / "items.csv", items, models)
        write_json_atomic(tmp / "manifest.json", manifest)


# --------------------------------------------------------------------------------------------- the store
class FaissStore:
    """A FAISS index and its item table; rows in ``items.csv`` order."""

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

    def all_ids(self) -> list[str]:
        return [it.id for it in self.items]

    def all_items(self) -> list[Item]:
        return self.items

    def set_search_params(self, params: dict[str, Any]) -> None:
        apply_search_params(self.index, params.get("nprobe"), params.get("ef_search"))

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        if isinstance(self.index, faiss.IndexIVF) and not self.index.direct_map.type:
            self.index.make_direct_map()  # IVF lists are searched by cell: map ids to slots to read them
        return np.stack([self.index.reconstruct(self.row_of[i]) for i in ids]).astype(np.float32)

    def model_of(self, ids: Sequence[str]) -> list[str]:
        return [self.models[self.row_of[i]] for i in ids]

    def model_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.models:
            counts[m] = counts.get(m, 0) + 1
        return counts

    def search(self, queries: np.ndarray, k: int) -> Hits:
        scores, rows = self.index.search(queries, k)
        return [
            [
                {"id": self.items[r].id, "score": float(s), "label": self.items[r].label}
                for s, r in zip(srow, rrow, strict=True)
                if r >= 0
            ]
            for srow, rrow in zip(scores, rows, strict=True)
        ]

    def replace_vectors(
        self,
        folder: Path,
        ids: Sequence[str],
        vectors: np.ndarray,
        models: Sequence[str],
        manifest: dict[str, Any],
    ) -> None:
        """A new folder with the rows replaced; flat and HNSW are rebuilt from their exact stored vectors, IVF
        indexes keep their trained cells and replace the rows in place (IVF-PQ codes are never decoded and
        re-encoded)."""
        rows = np.asarray([self.row_of[i] for i in ids], dtype=np.int64)
        new_models = list(self.models)
        for r, m in zip(rows.tolist(), models, strict=True):
            new_models[r] = m
        dim = self.index.d
        if isinstance(self.index, faiss.IndexIVF):
            out = faiss.clone_index(self.index)
            out.set_direct_map_type(faiss.DirectMap.NoMap)  # remove_ids works on the lists, not a direct map
            if len(rows):
                out.remove_ids(faiss.IDSelectorBatch(rows))
                out.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), rows)
        else:
            every = self.vectors(self.all_ids()) if len(self.items) else np.zeros((0, dim))
            every[rows] = vectors
            out = new_faiss_index(IndexParams(**manifest["index"]["params"]), dim, every)
            out.add(np.ascontiguousarray(every, dtype=np.float32))
        _write_folder(folder, out, self.items, new_models, {**manifest, "format": INDEX_FORMAT})

    def shared_uri(self) -> None:
        return None  # every process reads the folder itself

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------- backend
def load_faiss(folder: Path, manifest: dict[str, Any], uri: str | None = None) -> FaissStore:
    """The folder's FAISS index and item table, checked against each other and the manifest."""
    try:
        index = faiss.read_index(str(folder / "index.faiss"))
    except RuntimeError as exc:
        raise CmpnasError(
            f"Cannot read '{folder / 'index.faiss'}' ({str(exc)[:160]}).", "rebuild the index"
        ) from None
    items, models = read_items(folder / "items.csv", default_model=manifest["gallery_fingerprint"])
    if index.ntotal != len(items) or index.d != manifest["dim"]:
        raise CmpnasError(
            f"Index '{folder}' is inconsistent: index.faiss holds {index.ntotal} vectors of dim {index.d}, "
            f"items.csv {len(items)} items, manifest.json dim {manifest['dim']} (a truncated or mixed-up "
            "file).",
            "rebuild the index",
        )
    return FaissStore(index, items, models)


def build_faiss(job: BuildJob) -> dict[str, Any]:
    """Embed the rows (every rank its slice) and write the folder from rank 0: a new index, or the loaded
    one with the new rows added."""
    embedded = embed_all_ranks(job)
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
        store = cast(FaissStore, existing.store)
        index, items = store.index, store.items + new_items
        models = store.models + fresh_models
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
            **gallery_fields(job),
            "backend": FaissStore.name,
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
    manifest["sources"] = [*manifest.get("sources", []), source_record(job, len(new_items), skipped)]
    _write_folder(job.out, index, items, models, manifest)
    barrier(job.info)
    return manifest


BACKEND = IndexBackend(load=load_faiss, build=build_faiss, append_loads_index=True)
