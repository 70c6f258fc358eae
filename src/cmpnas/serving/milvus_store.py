"""The gallery index on Milvus: a distributed vector database (``pymilvus``), or Milvus Lite in a local file.

``uri`` is a local ``*.db`` path (Milvus Lite, embedded, no server to start) or ``http://host:19530`` (a Milvus
cluster, which shards and replicates the collection across nodes). One collection per index::

    id     VARCHAR primary key   the gallery item id (a re-run upserts: no duplicates, nothing missing)
    label  VARCHAR               class / identity
    path   VARCHAR               where the image came from (thumbnails)
    model  VARCHAR               fingerprint of the gallery model that embedded this item
    vec    FLOAT_VECTOR(dim)     L2-normalised embedding; inner product = cosine

The compatibility guard travels with the data: the collection's ``cmpnas.index`` property holds the gallery
model's fingerprint, lineage and embedding spec, and every ``query``/``serve`` start checks it, as for FAISS.
The index folder holds only the manifest (and the Milvus Lite file, by default), which points at the collection.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cmpnas import __version__, progress
from cmpnas.data.sources import Item
from cmpnas.distributed import barrier
from cmpnas.errors import CmpnasError
from cmpnas.io import make_dirs, read_json, write_json_atomic
from cmpnas.serving.building import (
    BuildJob,
    embed_source,
    existing_manifest,
    gallery_fields,
    gather_to_main,
    merge_slices,
    source_record,
)
from cmpnas.serving.index_format import INDEX_FORMAT, now_iso
from cmpnas.serving.store import Hits, IndexBackend, ModelRows

GUARD_PROPERTY = "cmpnas.index"
DEFAULT_COLLECTION = "gallery"
LITE_FILE = "milvus.db"
MAX_ID, MAX_LABEL, MAX_PATH = 512, 512, 4096
# cmpnas index types -> Milvus index types (and their build parameters)
INDEX_TYPES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW", "ivfpq": "IVF_PQ"}


def is_lite(uri: str) -> bool:
    """A local ``*.db`` path: Milvus Lite, one process at a time (it holds a file lock)."""
    return not uri.startswith(("http://", "https://", "tcp://", "unix:"))


def resolve_uri(uri: str | None, folder: Path) -> str:
    """``None`` -> Milvus Lite inside the index folder; a relative Lite path is relative to the folder."""
    if uri is None:
        return str((folder / LITE_FILE).resolve())
    if is_lite(uri):
        if not uri.endswith(".db"):
            raise CmpnasError(
                f"Milvus URI '{uri}' is neither a Milvus Lite file (*.db) nor a server address.",
                "pass --uri PATH.db (embedded Milvus Lite) or --uri http://HOST:19530 (a Milvus cluster)",
            )
        p = Path(uri)
        return str((p if p.is_absolute() else folder / p).resolve())
    return uri


def _client(uri: str) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError:  # pragma: no cover - an optional dependency
        raise CmpnasError(
            "The Milvus backend needs pymilvus (and milvus-lite for local files).",
            "pip install 'cmpnas[milvus]'",
        ) from None
    if is_lite(uri):  # Milvus Lite answers one call pymilvus makes (AllocTimestamp) with "not implemented":
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)  # harmless, but logged as a traceback
    try:
        try:
            return MilvusClient(uri)
        except Exception:
            if not is_lite(uri):
                raise
            # Connecting to this process's Milvus Lite server for the file can fail after other processes
            # came and went (seen in the test session after a torchrun child: cause not pinned down):
            # start a fresh server for the file and connect again.
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)
            return MilvusClient(uri)
    except Exception as exc:  # connection refused, locked Lite file, bad address: one line, not a stack
        raise CmpnasError(
            f"Cannot open Milvus at '{uri}' ({type(exc).__name__}: {str(exc)[:160]}).",
            "check the address (a Milvus Lite file is usable by one process at a time: stop the other user)",
        ) from None


class MilvusStore:
    """One collection of gallery embeddings; search returns ``{"id", "score", "label"}`` hits like FAISS."""

    name = "milvus"

    def __init__(self, uri: str, collection: str, client: Any | None = None) -> None:
        self.uri, self.collection = uri, collection
        self.client = client if client is not None else _client(uri)
        self.search_params: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------- create / guard
    def exists(self) -> bool:
        return bool(self.client.has_collection(self.collection))

    def create(self, dim: int, guard: dict[str, Any], params: dict[str, Any]) -> None:
        """Create the collection with its guard metadata and vector index (``params``: cmpnas IndexParams)."""
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description="cmpnas gallery"
        )
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID)
        schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL)
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
        schema.add_field("model", DataType.VARCHAR, max_length=64)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
        index = self.client.prepare_index_params()
        index.add_index(
            field_name="vec",
            index_type=INDEX_TYPES[params["kind"]],
            metric_type="IP",
            params=_build_params(params),
        )
        self.client.create_collection(
            self.collection,
            schema=schema,
            index_params=index,
            consistency_level="Strong",
            properties={GUARD_PROPERTY: json.dumps(guard, sort_keys=True)},
        )

    def guard(self) -> dict[str, Any]:
        """The collection's cmpnas metadata, or a clear error for a collection cmpnas did not make."""
        if not self.exists():
            raise CmpnasError(
                f"Milvus collection '{self.collection}' does not exist at '{self.uri}'.",
                "build it with cmpnas index --backend milvus, or point --index at the right folder",
            )
        props = self.client.describe_collection(self.collection).get("properties") or {}
        raw = props.get(GUARD_PROPERTY)
        try:
            guard = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            guard = None
        if not isinstance(guard, dict) or "gallery_fingerprint" not in guard or "dim" not in guard:
            raise CmpnasError(
                f"Milvus collection '{self.collection}' at '{self.uri}' has no cmpnas metadata "
                f"('{GUARD_PROPERTY}' property): it was not built by cmpnas index.",
                "build the index with cmpnas index --backend milvus into a new collection",
            )
        self.client.load_collection(self.collection)  # a collection opened by a new process starts released
        return guard

    def set_guard(self, guard: dict[str, Any]) -> None:
        """Replace the collection's cmpnas metadata (an upgraded gallery model became the newest generation)."""
        self.client.alter_collection_properties(
            self.collection, properties={GUARD_PROPERTY: json.dumps(guard, sort_keys=True)}
        )

    def set_search_params(self, params: dict[str, Any]) -> None:
        """``params`` in cmpnas names (IndexParams), kept in Milvus' names for the next searches."""
        self.search_params = {k: v for k, v in search_params_for(params).items() if v is not None}

    # ----------------------------------------------------------------------------------- data
    def present(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the collection already holds (a resumed build skips them)."""
        if not ids:
            return set()
        rows = self.client.get(self.collection, ids=list(ids), output_fields=["id"])
        return {r["id"] for r in rows}

    def upsert(self, items: Sequence[Item], vectors: np.ndarray, model: str) -> None:
        rows = [
            {"id": it.id, "label": it.label or "", "path": it.path or "", "model": model, "vec": v.tolist()}
            for it, v in zip(items, np.asarray(vectors, dtype=np.float32), strict=True)
        ]
        if rows:
            self.client.upsert(self.collection, rows)

    def __len__(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def item(self, item_id: str) -> Item | None:
        rows = self.client.get(self.collection, ids=[item_id], output_fields=["id", "label", "path"])
        return Item(rows[0]["id"], rows[0]["path"], rows[0]["label"]) if rows else None

    def _field(self, ids: Sequence[str], field: str, batch: int = 1000) -> list[Any]:
        """``field`` of each of ``ids``, in that order, fetched ``batch`` ids per request (one request for a
        million-item backfill would be one huge message)."""
        rows: dict[str, Any] = {}
        for start in range(0, len(ids), batch):
            chunk = list(ids[start : start + batch])
            rows.update((r["id"], r[field]) for r in self.client.get(self.collection, ids=chunk, output_fields=[field]))
        return [rows[i] for i in ids]

    def model_of(self, ids: Sequence[str]) -> list[str]:
        """The fingerprint of the gallery model that embedded each of ``ids``."""
        return self._field(ids, "model")

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``ids``, in that order (tests, migrations)."""
        return np.asarray(self._field(ids, "vec"), dtype=np.float32)

    def all_items(self) -> list[Item]:
        """Every item of the collection (reads the whole collection)."""
        return [self.item(i) for i in self.all_ids()]  # type: ignore[list-item]  # every listed id exists

    def model_counts(self) -> None:
        return None  # a query over the whole collection: not worth it for /stats

    def all_ids(self, batch: int = 1000) -> list[str]:
        it = self.client.query_iterator(self.collection, batch_size=batch, filter="", output_fields=["id"])
        out: list[str] = []
        try:
            while True:
                page = it.next()
                if not page:
                    break
                out += [r["id"] for r in page]
        finally:
            it.close()
        return out

    def search(self, queries: np.ndarray, k: int, rows: ModelRows | None = None) -> Hits:
        res = self.client.search(
            self.collection,
            data=np.ascontiguousarray(queries, dtype=np.float32).tolist(),
            filter="" if rows is None else f'model {"!=" if rows.other else "=="} {json.dumps(rows.model)}',
            limit=int(k),
            output_fields=["label"],
            search_params={"metric_type": "IP", "params": self.search_params},
        )
        return [
            [
                {"id": h["id"], "score": float(h["distance"]), "label": h["entity"].get("label", "")}
                for h in hits
            ]
            for hits in res
        ]

    def replace_vectors(
        self,
        folder: Path,
        ids: Sequence[str],
        vectors: np.ndarray,
        models: Sequence[str],
        manifest: dict[str, Any],
    ) -> None:
        """Upsert batch by batch (a re-run after a kill upserts the same rows again), then the guard and the
        folder's manifest."""
        for start in range(0, len(ids), 1000):
            items = [self.item(i) for i in ids[start : start + 1000]]
            tags = models[start : start + 1000]
            for tag in sorted(set(tags)):
                sel = [j for j, m in enumerate(tags) if m == tag]
                self.upsert([items[j] for j in sel], vectors[start : start + 1000][sel], tag)
        guard = self.guard()
        self.set_guard({**guard, **{k: manifest[k] for k in ("gallery_fingerprint", "lineage")}})
        write_json_atomic(folder / "manifest.json", manifest)

    def shared_uri(self) -> str | None:
        """A Milvus Lite file opens in one process only: serve it over gRPC from this process and return that
        address. None for a cluster, which every process reaches itself."""
        if not is_lite(self.uri):
            return None
        from milvus_lite.server_manager import server_manager_instance

        return server_manager_instance.start_and_get_uri(self.uri)

    def close(self) -> None:
        """Close the connection; for a Milvus Lite file also stop its in-process server (and file lock)."""
        self.client.close()
        if is_lite(self.uri):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)


def _build_params(params: dict[str, Any]) -> dict[str, Any]:
    kind = params["kind"]
    if kind == "ivf":
        return {"nlist": params["nlist"]}
    if kind == "ivfpq":
        return {"nlist": params["nlist"], "m": params["pq_m"], "nbits": params["pq_bits"]}
    if kind == "hnsw":
        return {"M": params["hnsw_m"], "efConstruction": params["ef_construction"]}
    return {}


def search_params_for(params: dict[str, Any]) -> dict[str, Any]:
    """Query-time knobs of an index type, in Milvus' names."""
    kind = params.get("kind")
    if kind in ("ivf", "ivfpq"):
        return {"nprobe": params.get("nprobe")}
    if kind == "hnsw":
        return {"ef": params.get("ef_search")}
    return {}


# --------------------------------------------------------------------------------------------- backend
def load_milvus(folder: Path, manifest: dict[str, Any], uri: str | None = None) -> MilvusStore:
    """The collection the folder's manifest points at (or at ``uri``), checked against the manifest."""
    where = manifest.get("milvus") or {}
    store = MilvusStore(uri or resolve_uri(where.get("uri"), folder), where.get("collection", ""))
    guard = store.guard()
    # a backfill names the new model in the collection's guard, then in the folder's manifest: a kill between
    # the two leaves them one upgrade apart, which is still the same chain (the re-run finishes the job)
    same_chain = guard["gallery_fingerprint"] == manifest["gallery_fingerprint"] or manifest[
        "gallery_fingerprint"
    ] in (guard.get("lineage") or [])
    if not same_chain or int(guard["dim"]) != int(manifest["dim"]):
        raise CmpnasError(
            f"Index folder '{folder}' and Milvus collection '{store.collection}' disagree: the folder says "
            f"gallery {manifest['gallery_fingerprint']} (dim {manifest['dim']}), the collection holds embeddings "
            f"of {guard['gallery_fingerprint']} (dim {guard['dim']}).",
            "rebuild the index folder from the collection's gallery model, or point it at the right collection",
        )
    return store


def build_milvus(job: BuildJob) -> dict[str, Any]:
    """Upsert batch by batch (a killed build continues where it stopped: ids already stored are skipped).

    A cluster (``http://``) takes writes from every rank; a Milvus Lite file opens in one process only, so
    under torchrun the other ranks hand their vectors to rank 0."""
    existing = job.existing if job.append else existing_manifest(job.out, required=False)
    previous = existing if existing and existing.get("backend") == MilvusStore.name else None
    where = (previous or {}).get("milvus", {})
    given = job.options.get("uri")
    uri = resolve_uri(given if given is not None else where.get("uri"), job.out)
    collection = job.options.get("collection") or where.get("collection") or DEFAULT_COLLECTION
    lite = is_lite(uri)
    writes_here = job.info.is_main or not lite
    fields = gallery_fields(job)
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
        stored_uri = LITE_FILE if lite and Path(uri) == (job.out / LITE_FILE).resolve() else uri
        manifest.update(
            {
                **fields,
                "backend": MilvusStore.name,
                "milvus": {"uri": stored_uri, "collection": collection},
                "status": "building",
            }
        )
        write_json_atomic(job.out / "manifest.json", manifest)
    barrier(job.info)  # the collection and the building manifest exist
    if not writes_here:  # a Lite file under torchrun: embed this slice, hand it to rank 0
        gather_to_main(job.info, embed_source(job.encoder, job.source, job.my_rows(), job.batch_size))
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
    if lite and job.info.enabled:  # rank 0 (the other ranks returned above): store their slices too
        nothing_left = (np.zeros((0, job.encoder.dim), np.float32), [], [])  # rank 0 stored its own slice
        vectors, kept, bad = merge_slices(job, gather_to_main(job.info, nothing_left) or [])
        store.upsert([job.source.items[r] for r in kept], vectors, job.encoder.fingerprint)
        added, skipped = added + len(kept), skipped + bad
    else:
        barrier(job.info)  # every rank has stored its slice
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
        manifest["sources"] = [*earlier, source_record(job, added, skipped)]
        write_json_atomic(job.out / "manifest.json", manifest)
    barrier(job.info)
    return read_json(job.out / "manifest.json", "rebuild the index")


BACKEND = IndexBackend(load=load_milvus, build=build_milvus)
