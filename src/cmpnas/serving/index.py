"""Gallery index: a folder that is opened, built, appended to and searched the same way on every backend.

    INDEX/manifest.json   gallery model fingerprint, lineage (the chain of compatible gallery models, newest
                          first), dim, normalisation, count, index type + params, backend, times
    INDEX/...             the backend's own files (:mod:`cmpnas.serving.faiss_store`,
                          :mod:`cmpnas.serving.milvus_store`)

The manifest names the backend; :data:`BACKENDS` maps it to how the store is opened and built, and everything
above (search, serving, backfill) sees a :class:`~cmpnas.serving.store.VectorStore`. A truncated or corrupt
file of an index folder is refused with a one-line message when the index is loaded.

What to index comes as a :class:`~cmpnas.data.sources.GallerySource` (a folder, a CSV, a dataset split, a
run's data config); reading images is the data package's job, this module only embeds, stores and searches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cmpnas.data.sources import GallerySource, Item, load_item_image, open_image
from cmpnas.distributed import init_distributed
from cmpnas.errors import CmpnasError
from cmpnas.io import check_output_path, read_json
from cmpnas.registry import Registry
from cmpnas.serving import faiss_store, milvus_store
from cmpnas.serving.building import BuildJob, Progress, embed_source, existing_manifest
from cmpnas.serving.compat_policy import check_compatible, lineage_after
from cmpnas.serving.encoder import load_encoder
from cmpnas.serving.index_format import INDEX_FORMAT, IndexParams
from cmpnas.serving.store import Hits, IndexBackend, ModelRows, VectorStore

# How an index folder's store is opened and built, by ``manifest["backend"]``.
BACKENDS: Registry[IndexBackend] = Registry(
    "index backend", {"faiss": faiss_store.BACKEND, "milvus": milvus_store.BACKEND}
)
DEFAULT_BACKEND = "faiss"

__all__ = [
    "BACKENDS",
    "INDEX_FORMAT",
    "GalleryIndex",
    "IndexParams",
    "Progress",
    "build_index",
    "check_compatible",
    "embed_source",
    "query_images",
]


class GalleryIndex:
    """A loaded index folder: manifest + its store. Search takes L2-normalised float32 queries and returns
    ``{"id", "score", "label"}`` hits, best first, on any store."""

    def __init__(self, path: Path, manifest: dict[str, Any], store: VectorStore) -> None:
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
        """How many items each gallery model embedded (None where the store would have to read everything)."""
        return self.store.model_counts()

    @property
    def items(self) -> list[Item]:
        """Every item in store order (FAISS: row order). On Milvus this reads the whole collection."""
        return self.store.all_items()

    def __len__(self) -> int:
        return self.count

    def has(self, item_id: str) -> bool:
        return self.store.item(item_id) is not None

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Query-time knobs over the stored defaults (``None`` keeps the stored value)."""
        stored = self.manifest.get("index", {}).get("params", {})
        overrides = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
        self.store.set_search_params({**stored, **overrides})

    @classmethod
    def load(cls, path: str | Path, milvus_uri: str | None = None) -> GalleryIndex:
        """Open an index folder; ``milvus_uri`` overrides where its store is served from (the server processes
        of ``serve --workers`` share one Milvus Lite server started by their parent)."""
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
        name = manifest.get("backend", DEFAULT_BACKEND)
        backend = BACKENDS.get(name)
        if backend is None:
            raise CmpnasError(
                f"Index '{p}' uses an unknown backend '{name}'.", f"use one of {', '.join(BACKENDS)}"
            )
        index = cls(p, manifest, backend.load(p, manifest, milvus_uri))
        index.set_search_params()
        return index

    def search(self, queries: np.ndarray, k: int) -> Hits:
        """Top-k per query row: [{"id", "score", "label"}], best first."""
        return self.store.search(self._checked(queries), max(1, min(int(k), len(self))))

    def search_dual(self, new_queries: np.ndarray, old_queries: np.ndarray, k: int, new_model: str) -> Hits:
        """The dual query policy (:mod:`cmpnas.compat.transition`): ``new_queries`` search the rows gallery model
        ``new_model`` embedded, ``old_queries`` (an older generation's) the rest; per query the two lists merge
        by score, top-k."""
        k = max(1, min(int(k), len(self)))
        new = self.store.search(self._checked(new_queries), k, ModelRows(new_model))
        old = self.store.search(self._checked(old_queries), k, ModelRows(new_model, other=True))
        return [sorted(a + b, key=lambda hit: -hit["score"])[:k] for a, b in zip(new, old, strict=True)]

    def _checked(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise CmpnasError(
                f"Query embeddings have shape {q.shape}, the index expects dim {self.dim}.",
                "use a query model with the gallery model's embedding dim",
            )
        return q

    def thumbnail_image(self, item_id: str) -> Image.Image | None:
        """The gallery image behind ``item_id`` (from disk, or re-rendered from the dataset), or None."""
        item = self.store.item(item_id)
        if item is None:
            return None
        return load_item_image(item_id, item.path, self.manifest.get("sources", []))


# --------------------------------------------------------------------------------------------- build
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
    existing = existing_manifest(out, required=True) if append else None
    recorded = (existing or {}).get("backend", DEFAULT_BACKEND)
    chosen = (backend or recorded) if append else (backend or DEFAULT_BACKEND)
    spec = BACKENDS.get(chosen)
    if spec is None:
        raise CmpnasError(f"Unknown index backend '{chosen}'.", f"use one of {', '.join(BACKENDS)}")
    if append and existing is not None and recorded != chosen:
        raise CmpnasError(
            f"Index '{out}' uses the {recorded} backend, not {chosen}.",
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
    loaded = GalleryIndex.load(out) if append and spec.append_loads_index and existing is not None else None
    rows, seen, duplicates = [], set(loaded.store.all_ids()) if loaded else set(), 0
    for i, it in enumerate(source.items):
        if it.id in seen:
            duplicates += 1
            continue
        seen.add(it.id)
        rows.append(i)
    job = BuildJob(
        out, Path(gallery_model), encoder, source, rows, duplicates, params or IndexParams(), append, existing,
        batch_size, progress, info, time.time(), {"uri": uri, "collection": collection}, loaded,
    )  # fmt: skip
    return spec.build(job)


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
