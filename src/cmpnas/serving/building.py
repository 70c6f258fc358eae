"""What every backend's builder shares: the build job, embedding a gallery slice, and the ranks' merge.

Under torchrun each rank embeds its own disjoint slice of the gallery; :func:`gather_to_main` brings the
slices to rank 0 as objects over the process group (no files to clean up after a kill), and
:func:`merge_slices` puts them back in source order, so one rank or N write the same index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from cmpnas.data.sources import GallerySource
from cmpnas.data.transforms import pil_to_uint8
from cmpnas.distributed import DistInfo
from cmpnas.errors import CmpnasError
from cmpnas.io import read_json
from cmpnas.serving.compat_policy import lineage_after
from cmpnas.serving.encoder import Encoder
from cmpnas.serving.index_format import IndexParams

if TYPE_CHECKING:
    from cmpnas.serving.index import GalleryIndex

Progress = Callable[[int, int], None]
Embedded = tuple[np.ndarray, list[int], list[str]]  # vectors [M, D], their source rows, skipped item ids
T = TypeVar("T")


@dataclass
class BuildJob:
    """What every backend's builder gets: the encoder, the rows still to embed, this rank."""

    out: Path
    gallery_model: Path
    encoder: Encoder
    source: GallerySource
    rows: list[int]  # source rows to add, in source order (ids not yet in the index, duplicates dropped)
    duplicates: int
    params: IndexParams
    append: bool
    existing: dict[str, Any] | None  # the index folder's manifest (append)
    batch_size: int
    progress: Progress | None
    info: DistInfo
    started: float
    options: dict[str, Any]  # backend options (milvus: uri, collection)
    loaded: GalleryIndex | None = None  # the index an append adds to (IndexBackend.append_loads_index)

    def my_rows(self) -> list[int]:
        """This rank's disjoint, deterministic slice of the rows (all of them in one process)."""
        return self.rows[self.info.rank :: self.info.world_size]


def embed_source(
    encoder: Encoder,
    source: GallerySource,
    rows: Sequence[int],
    batch_size: int = 256,
    progress: Progress | None = None,
) -> Embedded:
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


def gather_to_main(info: DistInfo, obj: T) -> list[T] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks. A collective: every rank calls
    it. The objects travel over gloo (CPU) whatever the default group's backend is."""
    if not info.enabled or not dist.is_initialized():
        return [obj]
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0, group=group)
    if group is not None:
        dist.destroy_process_group(group)
    return gathered


def merge_slices(job: BuildJob, parts: Sequence[Embedded]) -> Embedded:
    """Ranks' embedded slices merged back into source order."""
    dim = job.encoder.dim
    rows = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(rows, kind="stable")
    vecs = np.concatenate([p[0].reshape(-1, dim) for p in parts])[order] if parts else np.zeros((0, dim))
    position = {job.source.items[r].id: r for r in job.rows}
    skipped = sorted((x for p in parts for x in p[2]), key=lambda i: position.get(i, -1))
    return vecs.astype(np.float32), rows[order].tolist(), skipped


def embed_all_ranks(job: BuildJob) -> Embedded | None:
    """Embed this rank's slice; under torchrun rank 0 gets every rank's vectors in source order, the other
    ranks get None."""
    mine = embed_source(job.encoder, job.source, job.my_rows(), job.batch_size, job.progress)
    if not job.info.enabled:
        return mine
    parts = gather_to_main(job.info, mine)
    return None if parts is None else merge_slices(job, parts)


def existing_manifest(out: Path, required: bool) -> dict[str, Any] | None:
    """The index folder's manifest, or None (no folder yet; unreadable and not ``required``: build afresh)."""
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        return read_json(path, "rebuild the index")
    except CmpnasError:
        if required:
            raise
        return None


def gallery_spec_of(encoder: Encoder) -> dict[str, Any]:
    """What an index records of the gallery model that embeds into it (enough to tell what fed it)."""
    return {
        k: getattr(encoder.spec, k)
        for k in ("backbone", "embed_dim", "in_chans", "input_size", "mean", "std", "name")
    }


def gallery_fields(job: BuildJob) -> dict[str, Any]:
    """The manifest fields that describe the gallery model and its embedding space."""
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


def source_record(job: BuildJob, added: int, skipped: list[str]) -> dict[str, Any]:
    """The manifest's record of one build or append from ``job.source``."""
    return {
        **job.source.description,
        "added": added,
        "skipped_unreadable": len(skipped),
        "skipped_duplicate_ids": job.duplicates,
        "skipped_examples": skipped[:20],
    }
