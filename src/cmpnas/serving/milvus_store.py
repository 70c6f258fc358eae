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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmpnas.data.sources import Item
from cmpnas.errors import CmpnasError

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
        self.search_params = {k: v for k, v in params.items() if v is not None}

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

    def search(self, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        res = self.client.search(
            self.collection,
            data=np.ascontiguousarray(queries, dtype=np.float32).tolist(),
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
