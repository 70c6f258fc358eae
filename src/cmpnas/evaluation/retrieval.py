"""Class-level retrieval: exact k-NN and the metrics of deep metric learning / BCT.

One idea in one file although it is long: the ranking of a gallery for each query, and the metrics read off
that one ranking, share the tie-breaking and validation rules below.

Conventions:

* Similarity is the inner product; :func:`retrieval_metrics` L2-normalises first, so it is cosine.
* **Ties are broken by the lower gallery index**, everywhere (``knn`` with either backend and the metric
  ranking), so results never depend on the backend, on ``chunk_size`` or on sort stability. ``knn`` ranks by
  float64-rescored inner products, the metrics by the float32 cosine block; the two orders can only differ
  for scores within float32 rounding (~1e-6) of each other.
* ``exclude_self=True`` is leave-one-out on one image set (query i and gallery i are the same image, possibly
  embedded by *different* models): gallery item i is removed from the ranking of query i, and the relevant
  count R of a query does not include itself. The self-match is masked by index, never assumed to be the top
  hit.
* Recall@K ("topK") is the DML / BCT top-K accuracy: 1 if a relevant item is within the first K ranks.
  AP / mAP run over the full ranking; MAP@R and R-precision (Musgrave et al. 2020) over the first R ranks.
* Queries without any relevant gallery item ("lone") are dropped (``lone_queries="exclude"``, the
  pytorch-metric-learning convention) or counted as misses with AP 0 (``"fail"``); both counts are returned.

Memory stays bounded for 70k x 70k: queries are processed in blocks of at most ``chunk_size`` rows and at most
``_BLOCK_ELEMENTS`` similarity entries, so no Q x G matrix is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cmpnas.errors import CmpnasError

__all__ = ["knn", "l2_normalize", "metrics_from_similarity", "retrieval_metrics"]

# Cap on similarity entries per block: 8M entries keep the ranking temporaries (~40 bytes each) near 300 MB.
_BLOCK_ELEMENTS = 1 << 23
# knn asks its candidate generator for this many extra neighbours so that ties at rank k can be resolved.
_EXTRA_CANDIDATES = 16
# float64 products materialised at once while rescoring knn candidates (32 MB).
_EXACT_ELEMENTS = 1 << 22
_LOW31 = 0x7FFFFFFF
_INT64_MIN = torch.iinfo(torch.int64).min
# Rank CPU blocks with numpy's fast sort; the torch branch serves GPUs (tests switch this off to cover it).
_NUMPY_SORT_ON_CPU = True
_BACKENDS = ("auto", "faiss", "torch")
_LONE_MODES = ("exclude", "fail")


# ----------------------------------------------------------------------------------------------- validation


def as_embeddings(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` as a non-empty, finite, floating [N, D] tensor, or a CmpnasError naming ``name`` and the fix."""
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise CmpnasError(
            f"{name} embeddings must be a non-empty 2-D tensor [N, D], got shape {tuple(x.shape)}.",
            "pass one embedding row per image.",
        )
    if not x.is_floating_point():
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise CmpnasError(
            f"{name} embeddings contain NaN or inf.",
            "check the model for diverged weights (NaN loss) or broken input images.",
        )
    return x


def _as_labels(name: str, labels: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise CmpnasError(
            f"{name} labels must be a 1-D tensor with one label per row ({n}), got {tuple(labels.shape)}.",
            "pass integer class ids aligned with the embeddings.",
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise CmpnasError(
            f"{name} labels must be integer class ids, got dtype {labels.dtype}.",
            "convert labels with .long().",
        )
    return labels.to(device=device, dtype=torch.int64)


def _check_pair(query: torch.Tensor, gallery: torch.Tensor, exclude_self: bool) -> None:
    if query.shape[1] != gallery.shape[1]:
        raise CmpnasError(
            f"query and gallery embeddings have different widths ({query.shape[1]} vs {gallery.shape[1]}).",
            "compare embeddings of the same dimension (BCT query models must match the gallery width).",
        )
    if exclude_self and query.shape[0] != gallery.shape[0]:
        raise CmpnasError(
            f"exclude_self=True needs query i and gallery i to be the same image, but Q={query.shape[0]} "
            f"and G={gallery.shape[0]}.",
            "embed the same image list on both sides, or set exclude_self=False for separate sets.",
        )


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise CmpnasError(f"chunk_size must be a positive integer, got {chunk_size!r}.", "use e.g. 1024.")


def _check_ks(ks: tuple[int, ...]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise CmpnasError(f"ks must be positive integers, got {ks!r}.", "use e.g. ks=(1, 5, 10).")
    return ks


def _check_lone_mode(lone_queries: str) -> None:
    if lone_queries not in _LONE_MODES:
        raise CmpnasError(
            f"unknown lone_queries mode {lone_queries!r}.",
            "use 'exclude' (drop queries with no relevant item) or 'fail' (count them as misses).",
        )


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise CmpnasError(f"unknown knn backend {backend!r}.", f"use one of {', '.join(_BACKENDS)}.")
    if backend == "auto":
        return "faiss" if _faiss_available() else "torch"
    if backend == "faiss" and not _faiss_available():
        raise CmpnasError(
            "backend 'faiss' was requested but faiss is not installed.",
            "pip install faiss-cpu, or use backend='torch'.",
        )
    return backend


def _rows_per_block(chunk_size: int, n_gallery: int) -> int:
    return max(1, min(chunk_size, _BLOCK_ELEMENTS // max(n_gallery, 1)))


# ------------------------------------------------------------------------------------------------------ knn


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, as float32 (cosine similarity = inner product). Zero rows stay zero."""
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise CmpnasError(f"expected a 2-D tensor [N, D] to normalise, got shape {tuple(x.shape)}.", None)
    return F.normalize(x.float(), p=2.0, dim=1, eps=1e-12)


def _exact_scores(query64: torch.Tensor, gallery64: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Inner products of float32 data in float64, accumulated strictly in dimension order 0, 1, ..., D-1.

    The products are exact in float64 and each sum is a sequential scan, so an entry's value depends only on
    its query and gallery rows, never on the block shape: two candidate lists that share an item give it
    bit-identical scores, which is what makes the faiss and torch backends agree exactly.
    """
    dim = query64.shape[1]
    if candidates.device.type != "cpu":  # GPU scans may reorder additions: use the explicit loop
        return _exact_scores_loop(query64, gallery64, candidates)
    out = torch.empty(candidates.shape, dtype=torch.float64)
    rows_per_step = max(1, _EXACT_ELEMENTS // max(1, candidates.shape[1] * dim))
    for start in range(0, candidates.shape[0], rows_per_step):
        stop = start + rows_per_step
        products = query64[start:stop].unsqueeze(1) * gallery64[candidates[start:stop]]
        out[start:stop] = products.cumsum_(dim=2)[:, :, -1]  # CPU cumsum: one sequential pass per row
    return out


def _exact_scores_loop(
    query64: torch.Tensor, gallery64: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """The same sum as :func:`_exact_scores`, one dimension per step (no [B, n, D] buffer; slow on CPU)."""
    acc = torch.zeros(candidates.shape, dtype=torch.float64, device=candidates.device)
    gallery_t64 = gallery64.T
    for d in range(query64.shape[1]):
        acc += query64[:, d : d + 1] * gallery_t64[d][candidates]
    return acc


def _exact_scores_all(query64: torch.Tensor, gallery64: torch.Tensor) -> torch.Tensor:
    """:func:`_exact_scores` against the whole gallery (the fallback for rows with ties at rank k)."""
    n_gallery = gallery64.shape[0]
    out = torch.empty((query64.shape[0], n_gallery), dtype=torch.float64, device=query64.device)
    step = max(1, _EXACT_ELEMENTS // max(1, query64.shape[0] * query64.shape[1]))
    for start in range(0, n_gallery, step):
        stop = min(start + step, n_gallery)
        columns = torch.arange(start, stop, device=query64.device).expand(query64.shape[0], -1)
        out[:, start:stop] = _exact_scores(query64, gallery64, columns)
    return out


def _sort_by_score_then_index(
    indices: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row by descending score, equal scores by ascending gallery index."""
    indices, perm = indices.sort(dim=1)
    scores = scores.gather(1, perm)
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    return scores, indices.gather(1, order)


def _dot_error_bound(dim: int) -> float:
    """Worst-case relative error of a float32 dot product (any summation order) plus our float64 rescoring."""
    unit = 2.0**-24 if torch.get_float32_matmul_precision() == "highest" else 2.0**-8
    gamma32 = dim * unit / (1.0 - dim * unit) if dim * unit < 0.5 else 1.0
    gamma64 = (dim + 1) * 2.0**-53 * 1.01
    return 1.01 * gamma32 + gamma64


def knn(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    backend: str = "auto",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k: ``(scores [Q, k] float32, indices [Q, k] int64)``, best first.

    Embeddings are used as given (normalise first for cosine). ``backend`` only chooses how candidates are
    found (faiss ``IndexFlatIP`` or a chunked torch matmul + topk); both candidate lists are rescored with the
    same float64 arithmetic and ordered by (score desc, index asc), so the backends return identical indices
    and scores. A candidate list is accepted only if its k-th score beats every item it might have missed by
    more than the float32 rounding bound; otherwise that row is ranked exactly against the whole gallery.
    """
    query = as_embeddings("query", query).float()
    gallery = as_embeddings("gallery", gallery).float().to(query.device)
    _check_pair(query, gallery, exclude_self)
    _check_chunk_size(chunk_size)
    backend = _resolve_backend(backend)
    n_query, dim = query.shape
    n_gallery = gallery.shape[0]
    n_eligible = n_gallery - 1 if exclude_self else n_gallery
    if not isinstance(k, int) or not 1 <= k <= n_eligible:
        raise CmpnasError(
            f"k={k!r} neighbours requested but only {n_eligible} gallery items are eligible"
            + (" (self excluded)." if exclude_self else "."),
            f"use 1 <= k <= {n_eligible}.",
        )
    device = query.device
    n_candidates = min(n_gallery, k + _EXTRA_CANDIDATES + (1 if exclude_self else 0))
    complete = n_candidates == n_gallery  # every item is a candidate: nothing can have been missed
    gallery64 = gallery.double()
    # twice one score's error bound: a missed item may be under-, a candidate over-estimated.
    tolerance = (
        2.0 * _dot_error_bound(dim) * query.double().norm(dim=1) * float(gallery.double().norm(dim=1).max())
    )

    index = None
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(dim)
        index.add(np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32))

    out_scores = torch.empty((n_query, k), dtype=torch.float32, device=device)
    out_indices = torch.empty((n_query, k), dtype=torch.int64, device=device)
    block_rows = _rows_per_block(chunk_size, n_gallery)
    for start in range(0, n_query, block_rows):
        stop = min(start + block_rows, n_query)
        q_block = query[start:stop]
        self_idx = torch.arange(start, stop, device=device)
        if index is not None:
            q_np = np.ascontiguousarray(q_block.detach().cpu().numpy(), dtype=np.float32)
            _, found = index.search(q_np, n_candidates)
            candidates = torch.from_numpy(found).to(device=device, dtype=torch.int64)
        else:
            approx = q_block @ gallery.T
            if exclude_self:
                approx[torch.arange(stop - start, device=device), self_idx] = -math.inf
            candidates = approx.topk(n_candidates, dim=1).indices
            del approx
        q64 = q_block.double()
        scores = _exact_scores(q64, gallery64, candidates)
        is_self = (
            candidates == self_idx.unsqueeze(1)
            if exclude_self
            else torch.zeros_like(candidates, dtype=torch.bool)
        )
        scores = scores.masked_fill(is_self, -math.inf)
        sorted_scores, sorted_indices = _sort_by_score_then_index(candidates, scores)
        if complete:
            resolved = torch.ones(stop - start, dtype=torch.bool, device=device)
        else:
            lowest = scores.masked_fill(is_self, math.inf).min(dim=1).values
            resolved = sorted_scores[:, k - 1] - lowest > tolerance[start:stop]
        out_scores[start:stop] = sorted_scores[:, :k].float()
        out_indices[start:stop] = sorted_indices[:, :k]
        unresolved = (~resolved).nonzero().flatten()
        for rows in unresolved.split(_rows_per_block(chunk_size, n_gallery)):
            full = _exact_scores_all(q64[rows], gallery64)
            if exclude_self:
                full[torch.arange(rows.numel(), device=device), rows + start] = -math.inf
            full_scores, full_order = full.sort(dim=1, descending=True, stable=True)
            out_scores[rows + start] = full_scores[:, :k].float()
            out_indices[rows + start] = full_order[:, :k]
    return out_scores, out_indices


# ------------------------------------------------------------------------------------------------- metrics


def _rank_keys(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys that sort like (score, -gallery index) and carry the relevance flag in bit 0.

    Layout: [order-preserving float32 bits | 31-bit (2^31 - 1 - index) | relevant]. Keys are unique, so even
    an unstable sort gives the tie-break "lower index first", and the relevance of each rank is read from the
    sorted keys without gathering labels. :func:`_rank_keys_numpy` is the same recipe, twice as fast on CPU.
    """
    bits = (scores.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)  # +0.0: -0.0 becomes +0.0
    bits ^= (bits >> 63) & _LOW31  # negative floats: flip the magnitude bits -> order-preserving integers
    bits *= 1 << 32
    index = torch.arange(scores.shape[1], device=scores.device, dtype=torch.int64)
    bits += (_LOW31 - index) * 2
    bits += relevant
    return bits


def _rank_keys_numpy(scores: torch.Tensor, relevant: torch.Tensor) -> np.ndarray:
    """:func:`_rank_keys` in numpy (CPU tensors only)."""
    bits = (scores.detach().float().numpy() + np.float32(0.0)).view(np.int32).astype(np.int64)
    bits ^= (bits >> 63) & _LOW31
    bits <<= 32
    bits += (_LOW31 - np.arange(scores.shape[1], dtype=np.int64)) * 2
    bits += relevant.numpy()
    return bits


def _relevance_in_rank_order(
    scores: torch.Tensor, relevant: torch.Tensor, self_columns: torch.Tensor | None
) -> torch.Tensor:
    """Relevance of each rank ([B, G] bool, or [B, G-1] without self): descending score, ties lower index.

    float32 rows are sorted as packed int64 keys (numpy's vectorised sort on CPU is several times faster than
    a stable argsort); float64 rows use torch's stable argsort. Both give the same order. The query's own
    column gets the smallest key, sorts last and is cut off.
    """
    n_rows = scores.shape[0]
    if scores.shape[1] > _LOW31:
        raise CmpnasError(f"gallery of {scores.shape[1]} items is too large to rank.", "split the gallery.")
    if scores.dtype in (torch.float32, torch.float16, torch.bfloat16):
        if scores.device.type == "cpu" and _NUMPY_SORT_ON_CPU:
            keys = _rank_keys_numpy(scores, relevant)
            if self_columns is not None:
                keys[np.arange(n_rows), self_columns.numpy()] = _INT64_MIN
            keys.sort(axis=1)
            ascending = keys[:, 1:] if self_columns is not None else keys
            return torch.from_numpy((ascending[:, ::-1] & 1).astype(bool))
        keys = _rank_keys(scores, relevant)
        if self_columns is not None:
            keys[torch.arange(n_rows, device=keys.device), self_columns] = _INT64_MIN
        ranked = torch.sort(keys, dim=1, descending=True).values
        if self_columns is not None:
            ranked = ranked[:, :-1]
        return (ranked & 1).bool()
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    if self_columns is not None:
        order = order[order != self_columns.unsqueeze(1)].view(n_rows, scores.shape[1] - 1)
    return relevant.gather(1, order)


class _PerQuery:
    """Per-query results, filled block by block and reduced once at the end (chunking cannot change sums)."""

    def __init__(self, n_query: int, device: torch.device) -> None:
        self.n_relevant = torch.zeros(n_query, dtype=torch.int64, device=device)
        # 1-based rank of the first relevant item; 0 = none
        self.first_rank = torch.zeros(n_query, dtype=torch.int64, device=device)
        self.ap = torch.zeros(n_query, dtype=torch.float64, device=device)
        self.map_at_r = torch.zeros(n_query, dtype=torch.float64, device=device)
        self.r_precision = torch.zeros(n_query, dtype=torch.float64, device=device)

    def add_block(
        self,
        start: int,
        scores: torch.Tensor,
        query_labels: torch.Tensor,
        gallery_labels: torch.Tensor,
        exclude_self: bool,
    ) -> None:
        """Rank one block of similarity rows (queries ``start ..``) and record each query's metrics."""
        n_rows = scores.shape[0]
        self_columns = torch.arange(start, start + n_rows, device=scores.device) if exclude_self else None
        relevant = gallery_labels.unsqueeze(0) == query_labels.unsqueeze(1)
        relevant = _relevance_in_rank_order(scores, relevant, self_columns)
        rows, positions = relevant.nonzero(as_tuple=True)  # row-major: each row's hits in rank order
        del relevant
        n_relevant = torch.bincount(rows, minlength=n_rows)
        row_start = torch.cumsum(n_relevant, 0) - n_relevant
        hit_number = torch.arange(rows.numel(), device=rows.device) - row_start[rows] + 1
        rank = positions + 1
        precision = hit_number.double() / rank.double()  # P@rank at each relevant rank
        within_r = rank <= n_relevant[rows]
        ap_sum = torch.zeros(n_rows, dtype=torch.float64, device=rows.device).index_add_(0, rows, precision)
        map_r_sum = torch.zeros_like(ap_sum).index_add_(0, rows, precision * within_r)
        hits_in_r = torch.zeros_like(ap_sum).index_add_(0, rows, within_r.double())
        first = hit_number == 1
        first_rank = torch.zeros(n_rows, dtype=torch.int64, device=rows.device)
        first_rank[rows[first]] = rank[first]
        denom = n_relevant.clamp_min(1).double()
        block = slice(start, start + n_rows)
        self.n_relevant[block] = n_relevant
        self.first_rank[block] = first_rank
        self.ap[block] = ap_sum / denom
        self.map_at_r[block] = map_r_sum / denom
        self.r_precision[block] = hits_in_r / denom

    def summarize(self, ks: tuple[int, ...], lone_queries: str) -> dict[str, float]:
        lone = self.n_relevant == 0
        n_lone = int(lone.sum())
        counted = ~lone if lone_queries == "exclude" else torch.ones_like(lone)
        n_counted = int(counted.sum())
        if n_counted == 0:
            raise CmpnasError(
                "no query has a relevant gallery item, so retrieval metrics are undefined.",
                "check that query and gallery labels share classes, or use lone_queries='fail'.",
            )

        def percent(per_query: torch.Tensor) -> float:
            return 100.0 * float(per_query[counted].sum()) / n_counted

        found = self.first_rank > 0  # lone queries have first_rank 0 and AP 0: misses under "fail"
        result: dict[str, float] = {f"top{k}": percent((found & (self.first_rank <= k)).double()) for k in ks}
        result["map"] = percent(self.ap)
        result["map_at_r"] = percent(self.map_at_r)
        result["r_precision"] = percent(self.r_precision)
        result["n_queries"] = n_counted
        result["n_lone"] = n_lone
        return result


def metrics_from_similarity(
    sim: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    *,
    exclude_self: bool = False,
    ks: tuple[int, ...] = (1, 5, 10),
    lone_queries: str = "exclude",
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Retrieval metrics (percent) from a precomputed [Q, G] similarity matrix (higher = more similar).

    The low-level entry point: any score works (e.g. negative distances); :func:`retrieval_metrics` feeds it
    cosine-similarity blocks. float32 scores are ranked as they are; float64 scores keep their full precision.
    """
    sim = torch.as_tensor(sim)
    if sim.dim() != 2 or sim.shape[0] == 0 or sim.shape[1] == 0 or not sim.is_floating_point():
        raise CmpnasError(
            f"sim must be a non-empty float matrix [Q, G], got {sim.dtype} {tuple(sim.shape)}.", None
        )
    if bool(torch.isnan(sim).any()):
        raise CmpnasError("similarity matrix contains NaN.", "check the embeddings for NaN values.")
    n_query, n_gallery = sim.shape
    if exclude_self and n_query != n_gallery:
        raise CmpnasError(
            f"exclude_self=True needs a square similarity matrix, got {n_query} x {n_gallery}.",
            "use exclude_self=False for separate query and gallery sets.",
        )
    return _metrics_by_blocks(
        lambda start, stop: sim[start:stop],
        (n_query, n_gallery),
        query_labels,
        gallery_labels,
        sim.device,
        exclude_self=exclude_self,
        ks=ks,
        lone_queries=lone_queries,
        chunk_size=chunk_size,
    )


def _metrics_by_blocks(
    rows: Callable[[int, int], torch.Tensor],
    shape: tuple[int, int],
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    device: torch.device,
    *,
    exclude_self: bool,
    ks: tuple[int, ...],
    lone_queries: str,
    chunk_size: int,
) -> dict[str, float]:
    """The metrics of a [Q, G] similarity matrix read block by block (``rows(start, stop)``), so that
    :func:`retrieval_metrics` never holds the whole matrix."""
    n_query, n_gallery = shape
    q_labels = _as_labels("query", query_labels, n_query, device)
    g_labels = _as_labels("gallery", gallery_labels, n_gallery, device)
    ks = _check_ks(ks)
    _check_lone_mode(lone_queries)
    _check_chunk_size(chunk_size)
    per_query = _PerQuery(n_query, device)
    block_rows = _rows_per_block(chunk_size, n_gallery)
    for start in range(0, n_query, block_rows):
        stop = min(start + block_rows, n_query)
        per_query.add_block(start, rows(start, stop), q_labels[start:stop], g_labels, exclude_self)
    return per_query.summarize(ks, lone_queries)


def retrieval_metrics(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_emb: torch.Tensor,
    gallery_labels: torch.Tensor,
    *,
    exclude_self: bool = False,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
    lone_queries: str = "exclude",
) -> dict[str, float]:
    """Cosine-similarity retrieval metrics in percent: topK (Recall@K), map, map_at_r, r_precision.

    Also returns ``n_queries`` (queries averaged over) and ``n_lone`` (queries with no relevant gallery item).
    Every metric, top-K included, is read off one full ranking per query, so they can never disagree about
    the order. There is no knn backend to choose: mAP needs the whole ranking, which a top-k index cannot give.
    """
    query = l2_normalize(as_embeddings("query", query_emb))
    gallery = l2_normalize(as_embeddings("gallery", gallery_emb)).to(query.device)
    _check_pair(query, gallery, exclude_self)
    return _metrics_by_blocks(
        lambda start, stop: query[start:stop] @ gallery.T,
        (query.shape[0], gallery.shape[0]),
        query_labels,
        gallery_labels,
        query.device,
        exclude_self=exclude_self,
        ks=ks,
        lone_queries=lone_queries,
        chunk_size=chunk_size,
    )


def ranked_label_metrics(
    query_labels: Sequence[str], hit_labels: Sequence[Sequence[str]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Metrics of ranked result lists (e.g. what an index returned), in percent: ``top{k}`` (Recall@k: a hit
    of the query's label among the first k) and ``precision@{k}`` (the fraction of the first k with it).

    For rankings that come from a search engine rather than from embeddings (``knn`` ranks embeddings).
    """
    if len(query_labels) != len(hit_labels):
        raise ValueError(f"{len(query_labels)} query labels but {len(hit_labels)} result lists")
    n = max(1, len(query_labels))
    out: dict[str, float] = {}
    for k in ks:
        hits = [[h == q for h in row[:k]] for q, row in zip(query_labels, hit_labels, strict=True)]
        out[f"top{k}"] = 100.0 * sum(any(r) for r in hits) / n
        out[f"precision@{k}"] = 100.0 * sum(sum(r) / k for r in hits) / n
    return out
