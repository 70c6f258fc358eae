"""The default backend: a FAISS index inside the index folder, next to its item table.

    INDEX/index.faiss     FAISS index over L2-normalised float32 embeddings (inner product = cosine)
    INDEX/items.csv       one row per vector, in FAISS row order: id, path, label, model (the fingerprint of
                          the gallery model that embedded it; an index may hold several compatible generations)

Every write (build, append, backfill) produces a whole new folder that replaces the old one in one rename
(:func:`cmpnas.io.atomic_dir`), so a reader sees the old index or the new one, never a mix.
"""

from __future__ import annotations

import csv
import re
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
from cmpnas.serving.store import Hits, IndexBackend, ModelRows

# Kept by hand: which vectors train IVF/PQ. FAISS' own cap (cp.max_points_per_centroid = 256 per cell) would
# train a 2M gallery's default 5657 cells on 1.45M vectors, not these 200k: other cells, other results.
TRAIN_SAMPLE = 200_000  # IVF/PQ k-means trains on at most this many vectors


def factory_string(params: IndexParams) -> str:
    """The ``faiss.index_factory`` description of resolved ``params``: a manifest's ``kind`` maps here, so an
    index written before descriptions were recorded rebuilds (backfill) exactly as it was built."""
    if params.factory is not None:
        return params.factory
    return {
        "flat": "Flat",
        "ivf": f"IVF{params.nlist},Flat",
        "hnsw": f"HNSW{params.hnsw_m},Flat",
        # np: no polysemous training, like IndexIVFPQ(...) (the codes are the same, without an extra pass)
        "ivfpq": f"IVF{params.nlist},PQ{params.pq_m}x{params.pq_bits}np",
    }[params.kind]


def _faiss_reason(exc: RuntimeError) -> str:
    """FAISS' own reason, without its 'Error in <C++ signature> at <file:line>:' preamble."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", first)[:200]


def empty_faiss_index(params: IndexParams, dim: int) -> faiss.Index:
    """The untrained, empty index ``params`` describe, searching by inner product (cheap: checks a
    ``--factory`` description before any image is embedded)."""
    description = factory_string(params)
    try:
        index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise CmpnasError(
            f"FAISS rejects the index description '{description}' for {dim}-dim vectors: {_faiss_reason(exc)}.",
            "pass a faiss.index_factory string that fits the dim, e.g. 'IVF256,Flat', 'HNSW32,Flat' or "
            "'IVF256,PQ8' (PQ sub-codes must divide the dim)",
        ) from None
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        raise CmpnasError(
            f"The index description '{description}' asks for IDMap, but cmpnas numbers the rows itself.",
            "drop the 'IDMap' / 'IDMap2' part of --factory",
        )
    set_faiss_parameters(
        index, efConstruction=params.ef_construction, nprobe=params.nprobe, efSearch=params.ef_search
    )
    return index


def new_faiss_index(params: IndexParams, dim: int, train: np.ndarray) -> faiss.Index:
    """An empty FAISS index of ``params`` (trained on ``train`` if its type needs it: IVF, PQ, ...)."""
    index = empty_faiss_index(params, dim)
    if not index.is_trained:
        if len(train) > TRAIN_SAMPLE:  # k-means on a sample is as good and much faster
            train = train[np.random.default_rng(0).choice(len(train), TRAIN_SAMPLE, replace=False)]
        try:
            index.train(np.ascontiguousarray(train, dtype=np.float32))
        except RuntimeError as exc:
            raise CmpnasError(
                f"FAISS cannot train '{factory_string(params)}' on {len(train)} vectors: {_faiss_reason(exc)}.",
                "use fewer cells / centroids in --factory, or index more images",
            ) from None
    return index


def set_faiss_parameters(index: faiss.Index, **values: float | None) -> None:
    """Set FAISS parameters by their ParameterSpace names (nprobe, efSearch, efConstruction, ...), also inside
    wrappers (OPQ, refine); one the index type has no use for (nprobe on HNSW) is skipped, so the stored
    defaults apply to any index."""
    space = faiss.ParameterSpace()
    for name, value in values.items():
        if value is None:
            continue
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as exc:
            if "could not set parameter" not in str(exc):
                raise


def apply_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """nprobe / efSearch are query-time knobs: set them without rebuilding."""
    set_faiss_parameters(index, nprobe=nprobe, efSearch=ef_search)


def params_record(params: IndexParams) -> dict[str, Any]:
    """``params`` for the manifest; ``factory`` only when set, so cmpnas versions that predate it (they build
    ``IndexParams(**params)``) still append to the indexes written now."""
    record = asdict(params)
    if params.factory is None:
        del record["factory"]
    return record


def stored_class(index: faiss.Index) -> str:
    """The class ``read_index`` returns: the factory's ``IndexFlat`` (inner product) is written, and read back,
    as ``IndexFlatIP``."""
    if type(index) is faiss.IndexFlat:
        return {faiss.METRIC_INNER_PRODUCT: "IndexFlatIP", faiss.METRIC_L2: "IndexFlatL2"}.get(
            index.metric_type, "IndexFlat"
        )
    return type(index).__name__


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
        self._rows: dict[ModelRows, np.ndarray] = {}

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
        ivf = faiss.try_extract_index_ivf(self.index)  # also inside a wrapper (OPQ, PCA, ...)
        if ivf is not None and not ivf.direct_map.type:
            ivf.make_direct_map()  # IVF lists are searched by cell: map ids to slots to read them
        return np.stack([self.index.reconstruct(self.row_of[i]) for i in ids]).astype(np.float32)

    def model_of(self, ids: Sequence[str]) -> list[str]:
        return [self.models[self.row_of[i]] for i in ids]

    def model_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.models:
            counts[m] = counts.get(m, 0) + 1
        return counts

    def search(self, queries: np.ndarray, k: int, rows: ModelRows | None = None) -> Hits:
        if rows is None:
            return self._hits(*self.index.search(queries, k), None, k)
        # Among some rows only: search deeper until k of them are found or the whole index was read. Generic over
        # every index_factory type (wrappers included); the rows keep the order the index gives them.
        wanted = self._rows.get(rows)
        if wanted is None:  # a store never changes its rows (a write makes a new folder): compute once
            wanted = self._rows[rows] = np.fromiter(map(rows.holds, self.models), dtype=bool, count=len(self.models))
        depth = max(k, 1)
        while True:
            depth = min(len(self.items), depth * 4)
            scores, found = self.index.search(queries, depth)
            hits = self._hits(scores, found, wanted, k)
            if depth >= len(self.items) or all(len(h) == min(k, int(wanted.sum())) for h in hits):
                return hits

    def _hits(self, scores: np.ndarray, found: np.ndarray, wanted: np.ndarray | None, k: int) -> Hits:
        return [
            [
                {"id": self.items[r].id, "score": float(s), "label": self.items[r].label}
                for s, r in zip(srow, rrow, strict=True)
                if r >= 0 and (wanted is None or wanted[r])
            ][:k]
            for srow, rrow in zip(scores, found, strict=True)
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
        if faiss.try_extract_index_ivf(self.index) is not None:
            out = faiss.clone_index(self.index)
            # remove_ids works on the lists, not a direct map
            faiss.extract_index_ivf(out).set_direct_map_type(faiss.DirectMap.NoMap)
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
    if job.loaded is None and job.params.factory is not None:
        empty_faiss_index(job.params, job.encoder.dim)  # a description FAISS rejects fails before embedding
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
        effective = job.params.resolved(len(new_items), job.encoder.dim, factory_ok=True)
        try:
            index, items = new_faiss_index(effective, job.encoder.dim, vectors), new_items
        except CmpnasError:
            barrier(job.info)  # the other ranks wait there for this one
            raise
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
                "params": params_record(effective),
                "factory": factory_string(effective),
                "faiss_class": stored_class(index),
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
