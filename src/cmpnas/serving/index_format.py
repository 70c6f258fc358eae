"""What an index folder records about itself: its format tag and its index type with the type's parameters.

Both backends write these into the manifest and read them back, so they belong to neither store.

Index types (``IndexParams.kind``):
- ``flat``  exact inner product. The default.
- ``ivf``   ``nlist`` k-means cells (default ~4*sqrt(n), clamped so each cell has >= 39 training points),
  ``nprobe`` cells visited per query (default 8; higher = better recall, slower).
- ``hnsw``  a graph with ``hnsw_m`` links per node (32), ``ef_construction`` (40) build beam and ``ef_search``
  (64) search beam. No training, slow to build for very large galleries.
- ``ivfpq`` IVF cells + product quantisation of each vector into ``pq_m`` sub-codes of ``pq_bits`` bits
  (default: dim/4 sub-codes of 8 bits, i.e. dim bytes per vector instead of 4*dim).
IVF/PQ are trained on the first build's vectors; an append adds without retraining (rebuild if the gallery
changes a lot).

The FAISS backend builds every type from its ``faiss.index_factory`` description (``flat`` = ``Flat``, ``ivf`` =
``IVF{nlist},Flat``, ...); ``IndexParams.factory`` takes any such description instead of a ``kind`` (recorded
as kind ``factory``; FAISS only: Milvus has no equivalent).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

from cmpnas.errors import CmpnasError

INDEX_FORMAT = "cmpnas.gallery_index.v1"
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")


@dataclass
class IndexParams:
    """Index type and its parameters; ``None`` means 'size it from the gallery'."""

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int = 8
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    pq_m: int | None = None
    pq_bits: int = 8
    factory: str | None = None  # a raw faiss.index_factory description; replaces kind and its build params

    def resolved(self, count: int, dim: int, *, factory_ok: bool = False) -> IndexParams:
        """Effective parameters for ``count`` training vectors (small galleries get small nlist/pq_bits).

        ``factory_ok``: the caller's backend builds raw FAISS descriptions (only FAISS does); a raw description
        is FAISS' to check, so it passes unchanged."""
        if self.factory is not None:
            if not factory_ok:
                raise CmpnasError(
                    "A FAISS index_factory description needs the faiss backend.",
                    "drop --factory (use --index and its options), or build with --backend faiss",
                )
            return replace(self, kind="factory")
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


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
