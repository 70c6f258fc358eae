"""Move an index to an upgraded gallery model without re-indexing everything at once.

``backfill``: re-embed part of the items with a new gallery model that was trained compatible with the index's
newest one (``cmpnas upgrade-gallery``), most uncertain items first (FastFill) or in random order. Until then
the old vectors keep serving: the two models' embeddings are comparable, so the index is never inconsistent.

``transform_index``: map the stored vectors of an old model into a new model's space with a fitted
transformation (FCT), for when the new model is not compatible with the old one.

Both write the same way: the work is planned once (``.INDEX.backfill/plan.json``), done in chunks saved
atomically (a killed run continues from the last complete chunk: same plan, same result), and applied in one
step by the index's store (:meth:`~cmpnas.serving.store.VectorStore.replace_vectors`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmpnas import progress
from cmpnas.compat.backfill_order import MARGIN_ORDERS, backfill_order, label_rows
from cmpnas.compat.transformation import load_transformation
from cmpnas.data.sources import GallerySource, Item, load_item_image
from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_path, make_dirs, read_json, write_json_atomic
from cmpnas.models.embedding import EmbeddingModel, load_model
from cmpnas.serving.building import Progress, embed_source, gallery_spec_of
from cmpnas.serving.compat_policy import lineage_after
from cmpnas.serving.encoder import Encoder, load_encoder, torch_encoder
from cmpnas.serving.index import GalleryIndex
from cmpnas.serving.index_format import now_iso

PLAN_FORMAT = "cmpnas.backfill_plan.v1"


def work_dir(index_dir: Path) -> Path:
    return index_dir.parent / f".{index_dir.name}.backfill"


# --------------------------------------------------------------------------------------------- backfill
def backfill(
    index_dir: str | Path,
    gallery_model: str | Path,
    fraction: float,
    order: str = "random",
    *,
    seed: int = 0,
    chunk_size: int = 256,
    progress_cb: Progress | None = None,
) -> dict[str, Any]:
    """Re-embed items with ``gallery_model`` until ``fraction`` of the index is embedded by it (cumulative:
    0.3 then 0.6 re-embeds another 30 %; the same call twice does nothing the second time). Returns the
    backfill record that is also appended to the manifest's ``backfills``."""
    if not 0.0 <= fraction <= 1.0:
        raise CmpnasError(f"--fraction must be in [0, 1], got {fraction}.", "pass e.g. --fraction 0.25")
    index_dir = Path(index_dir)
    index = GalleryIndex.load(index_dir)
    if Path(gallery_model).suffix.lower() == ".onnx":
        raise CmpnasError("Backfill needs the gallery model's .safetensors file.", "pass --gallery-model G.safetensors")
    new_model = load_model(gallery_model)  # loaded once: it embeds, and its classifier orders by margin
    encoder = torch_encoder(new_model, gallery_model)
    chain = lineage_after(index.manifest, encoder, f"index '{index_dir}'")
    items = index.items
    models = _models(index, [it.id for it in items])
    stale = [i for i, m in enumerate(models) if m != encoder.fingerprint]
    target = int(round(fraction * len(items))) - (len(items) - len(stale))
    settings = {"kind": "backfill", "model": encoder.fingerprint, "fraction": fraction, "order": order, "seed": seed}
    plan = _plan(index, settings, lambda: _select(index, new_model, items, stale, target, order, seed))
    ids = plan["ids"]
    by_id = {it.id: it for it in items}
    vectors, kept = _run_chunks(index, encoder, [by_id[i] for i in ids], chunk_size, progress_cb)
    record = {
        "at": now_iso(),
        "model": encoder.fingerprint,
        "fraction": fraction,
        "order": order,
        "seed": seed,
        "reembedded": len(kept),
        "skipped_unreadable": len(ids) - len(kept),
        "embedded_by_model_after": len(items) - len(stale) + len(kept),
        "count": len(items),
    }
    fields = {
        "gallery_model": str(Path(gallery_model).resolve()),
        "gallery_fingerprint": encoder.fingerprint,
        "gallery_spec": gallery_spec_of(encoder),
        "lineage": chain,
    }
    _apply(index, kept, vectors, [encoder.fingerprint] * len(kept), fields, ("backfills", record))
    progress.event(
        "backfill",
        message=f"backfill: {len(kept)} items re-embedded; {record['embedded_by_model_after']}/{len(items)} "
        f"now by {encoder.fingerprint}",
    )
    return record


def _select(
    index: GalleryIndex,
    new_model: EmbeddingModel,
    items: Sequence[Item],
    stale: list[int],
    target: int,
    order: str,
    seed: int,
) -> list[str]:
    """The ids to re-embed, in order: the first ``target`` stale items by ``order``."""
    if target <= 0 or not stale:
        return []
    stale_ids = [items[i].id for i in stale]
    old = index.store.vectors(stale_ids) if order in MARGIN_ORDERS else np.zeros((len(stale), 1))
    rows = labels = None
    if order in MARGIN_ORDERS:
        rows = new_model.classifier.weight.detach().float().numpy()
        labels = label_rows([items[i].label for i in stale], new_model.spec.class_names)
    ranking = backfill_order(old, order, class_rows=rows, labels=labels, seed=seed)
    return [stale_ids[j] for j in ranking[:target]]


# --------------------------------------------------------------------------------------------- transform
def transform_index(
    index_dir: str | Path,
    transformation: str | Path,
    gallery_model: str | Path,
    *,
    chunk_size: int = 4096,
    progress_cb: Progress | None = None,
) -> dict[str, Any]:
    """Replace every vector of the transformation's old model by its transformed vector; the index then lives in
    the new gallery model's space: its head is that model (which embeds what is appended next), and query
    models compatible with the old chain no longer fit.
    """
    index_dir = Path(index_dir)
    index = GalleryIndex.load(index_dir)
    fct = load_transformation(transformation)
    encoder = load_encoder(gallery_model)
    old_fp, new_fp = fct.spec.old_fingerprint, fct.spec.new_fingerprint
    if encoder.fingerprint != new_fp:
        raise CmpnasError(
            f"Transformation '{transformation}' maps into gallery model {new_fp}, not {encoder.fingerprint}.",
            "pass the new gallery model the transformation was fitted for",
        )
    items = index.items
    models = _models(index, [it.id for it in items])
    others = sorted({m for m in models} - {old_fp, new_fp})
    if old_fp not in index.lineage or others:
        raise CmpnasError(
            f"Transformation {old_fp} -> {new_fp} does not fit index '{index_dir}' (its items were embedded by "
            f"{', '.join(sorted(set(models)))}).",
            "fit a transformation from the model that embedded the index (cmpnas train-transformation --old ...)",
        )
    if fct.spec.dim != index.dim:
        raise CmpnasError(f"Transformation dim {fct.spec.dim} != index dim {index.dim}.", "fit it for this index")
    settings = {"kind": "transform", "model": new_fp, "old": old_fp}
    plan = _plan(index, settings, lambda: [it.id for it, m in zip(items, models, strict=True) if m == old_fp])
    ids = plan["ids"]
    done, parts = 0, []
    for start in range(0, len(ids), chunk_size):
        parts.append(fct.apply_numpy(index.store.vectors(ids[start : start + chunk_size])))
        done = min(start + chunk_size, len(ids))
        if progress_cb is not None:
            progress_cb(done, len(ids))
    vectors = np.concatenate(parts) if parts else np.zeros((0, index.dim), np.float32)
    tag = f"fct:{old_fp}->{new_fp}"
    record = {"at": now_iso(), "old": old_fp, "new": new_fp, "transformed": len(ids), "transformation": str(transformation)}
    fields = {
        "gallery_model": str(Path(gallery_model).resolve()),
        "gallery_fingerprint": new_fp,
        "gallery_spec": gallery_spec_of(encoder),
        "lineage": lineage_after(None, encoder),
    }
    _apply(index, ids, vectors, [tag] * len(ids), fields, ("transforms", record))
    progress.event("transform", message=f"transform-index: {len(ids)} vectors mapped {old_fp} -> {new_fp}")
    return record


# --------------------------------------------------------------------------------------------- shared steps
def _models(index: GalleryIndex, ids: list[str]) -> list[str]:
    return index.store.model_of(ids) if ids else []


def _plan(index: GalleryIndex, settings: dict[str, Any], select: Callable[[], list[str]]) -> dict[str, Any]:
    """The saved plan when it was made for this index state and these settings (a resumed run), else a new one
    (older chunks are dropped: they belong to another plan)."""
    work = work_dir(index.path)
    path = work / "plan.json"
    key = {**settings, "index_updated_at": index.manifest.get("updated_at"), "count": len(index)}
    if path.is_file():
        try:
            plan = read_json(path, "")
        except CmpnasError:
            plan = None
        if isinstance(plan, dict) and plan.get("format") == PLAN_FORMAT and plan.get("key") == key:
            progress.event("resume", message=f"{settings['kind']}: continuing the plan in '{work}'")
            return plan
    shutil.rmtree(work, ignore_errors=True)
    make_dirs(work)
    plan = {"format": PLAN_FORMAT, "key": key, "ids": select()}
    write_json_atomic(path, plan)
    return plan


def _run_chunks(
    index: GalleryIndex, encoder: Encoder, items: list[Item], chunk_size: int, progress_cb: Progress | None
) -> tuple[np.ndarray, list[str]]:
    """Embed ``items`` chunk by chunk into ``chunkNNNNN.npz`` files (kept ones are not redone); returns the
    vectors and ids of every readable item, in plan order."""
    work = work_dir(index.path)
    sources = index.manifest.get("sources", [])
    vec_parts, kept = [], []
    for c, start in enumerate(range(0, len(items), chunk_size)):
        path = work / f"chunk{c:05d}.npz"
        part = _read_chunk(path)
        if part is None:
            chunk = items[start : start + chunk_size]
            source = GallerySource(
                {"kind": "backfill"}, chunk, lambda r, chunk=chunk: load_item_image(chunk[r].id, chunk[r].path, sources)
            )
            vectors, rows, _ = embed_source(encoder, source, list(range(len(chunk))), batch_size=chunk_size)
            part = (vectors, [chunk[r].id for r in rows])
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, vectors=part[0], ids=np.asarray(part[1], dtype=str))
        vec_parts.append(part[0])
        kept += part[1]
        done = min(start + chunk_size, len(items))
        progress.event("backfill", status="chunk", done=done, total=len(items), message=f"backfill: {done}/{len(items)}")
        if progress_cb is not None:
            progress_cb(done, len(items))
    vectors = np.concatenate(vec_parts) if vec_parts else np.zeros((0, index.dim), np.float32)
    return vectors.astype(np.float32), kept


def _read_chunk(path: Path) -> tuple[np.ndarray, list[str]] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return z["vectors"], z["ids"].tolist()
    except Exception:  # noqa: BLE001 - a damaged chunk is embedded again
        return None


def _apply(
    index: GalleryIndex,
    ids: list[str],
    vectors: np.ndarray,
    models: list[str],
    fields: dict[str, Any],
    record: tuple[str, dict[str, Any]],
) -> None:
    """Write the new vectors and the manifest in one step, then drop the work folder."""
    manifest = {**index.manifest, **fields, "updated_at": now_iso()}
    key, entry = record
    manifest[key] = [*index.manifest.get(key, []), entry]
    index.store.replace_vectors(index.path, ids, vectors, models, manifest)
    shutil.rmtree(work_dir(index.path), ignore_errors=True)
