"""Stage ``index``: embed gallery images with the gallery model into an index folder (atomic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmpnas.config import DataConfig, IndexConfig
from cmpnas.data.sources import GallerySource, config_source
from cmpnas.serving.index import IndexParams, Progress, build_index
from cmpnas.stages.common import StageResult


def index_gallery(
    gallery_model: str | Path,
    source: GallerySource,
    out_dir: str | Path,
    params: IndexParams | None = None,
    *,
    append: bool = False,
    batch_size: int = 256,
    progress: Progress | None = None,
    backend: str | None = None,
    uri: str | None = None,
    collection: str | None = None,
) -> StageResult:
    """Index a gallery source (folder, CSV, dataset split) into FAISS or Milvus; outputs are the manifest."""
    manifest = build_index(
        gallery_model,
        source,
        out_dir,
        params,
        append=append,
        batch_size=batch_size,
        progress=progress,
        backend=backend,
        uri=uri,
        collection=collection,
    )
    return StageResult("index", Path(out_dir), manifest)


def index_dataset(
    gallery_model: str | Path,
    data_cfg: DataConfig,
    split: str,
    out_dir: str | Path,
    params: IndexParams | None = None,
    batch_size: int = 256,
    progress: Progress | None = None,
    store: IndexConfig | None = None,
) -> StageResult:
    """Index a run's dataset split with its gallery model (the pipeline's ``index`` stage); a summary."""
    store = store or IndexConfig()
    res = index_gallery(
        gallery_model,
        config_source(data_cfg, split),
        out_dir,
        params,
        batch_size=batch_size,
        progress=progress,
        backend=store.backend,
        uri=store.uri,
        collection=store.collection,
    )
    manifest: dict[str, Any] = dict(res)
    src = manifest["sources"][-1]
    return StageResult(
        "index",
        res.out,
        {
            "count": manifest["count"],
            "dim": manifest["dim"],
            "gallery_fingerprint": manifest["gallery_fingerprint"],
            "index_type": manifest["index"]["type"],
            "backend": manifest.get("backend", "faiss"),
            "build_seconds": manifest["build_seconds"],
            "skipped_unreadable": src["skipped_unreadable"],
            "dataset": f"{data_cfg.name}/{split}",
        },
    )
