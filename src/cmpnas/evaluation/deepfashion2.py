"""DeepFashion2 consumer-to-shop retrieval, ground-truth-box variant of the
official evaluation (the DeepFashion2 repository's ``evaluation/`` scripts).

Queries are consumer ('user') items with style > 0; the gallery is every shop item (style-0 shop items
stay in as distractors). A retrieved item is correct iff it has the query's pair_id and style. A query
that was not embedded (no ranking) or that has no positive in the gallery stays in the denominator and
is wrong at every k, as in the official script.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from cmpnas.data.deepfashion2 import Item
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.retrieval import as_embeddings, knn
from cmpnas.io import write_json_atomic

TOP_KS = (1, 5, 10, 15, 20)
OFFICIAL_RESULT_LENGTH = 20  # the official script reads exactly 20 gallery entries per query


def retrieval_queries(items: Iterable[Item]) -> list[Item]:
    """Items that are scored as queries: consumer items with style > 0."""
    return [item for item in items if item.source == "user" and item.style > 0]


def retrieval_gallery(items: Iterable[Item]) -> list[Item]:
    """Items that form the gallery: every shop item."""
    return [item for item in items if item.source == "shop"]


def consumer_to_shop_topk(
    query_items: Sequence[Item],
    gallery_items: Sequence[Item],
    ranking: Mapping[str, Sequence[str]],
    ks: Sequence[int] = TOP_KS,
) -> dict[str, float | int]:
    """Top-k accuracy as fractions in [0, 1] under keys ``top{k}``, plus counts.

    Non-queries in ``query_items`` and non-shop items in ``gallery_items`` are ignored, so the full item
    list can be passed for both. ``n_missed`` = queries without a ranking, ``n_without_positive`` = queries
    with no positive in the gallery; both count as misses.
    """
    ks = _check_ks(ks)
    queries = retrieval_queries(query_items)
    gallery = retrieval_gallery(gallery_items)
    if not queries:
        raise CmpnasError(
            "no DeepFashion2 queries: no consumer ('user') item with style > 0 among the query items.",
            "pass the validation items (consumer and shop) as query_items.",
        )
    gallery_identity = {item.item_id: item.identity for item in gallery}
    positives_per_identity: dict[tuple[int, int], int] = {}
    for identity in gallery_identity.values():
        if identity is not None:
            positives_per_identity[identity] = positives_per_identity.get(identity, 0) + 1
    max_k = max(ks)
    first_hit_rank: list[int | None] = []  # 1-based rank of the first positive, None = never
    n_missed = n_without_positive = 0
    for query in queries:
        if query.identity not in positives_per_identity:
            n_without_positive += 1
        ranked = ranking.get(query.item_id)
        if ranked is None:
            n_missed += 1
            first_hit_rank.append(None)
            continue
        first_hit_rank.append(_first_hit(query, ranked[:max_k], gallery_identity))
    n_queries = len(queries)
    result: dict[str, float | int] = {}
    for k in ks:
        hits = sum(1 for rank in first_hit_rank if rank is not None and rank <= k)
        result[f"top{k}"] = hits / n_queries
    result.update(
        n_queries=n_queries,
        n_gallery=len(gallery),
        n_missed=n_missed,
        n_without_positive=n_without_positive,
    )
    return result


def _first_hit(query: Item, ranked: Sequence[str], gallery_identity: Mapping[str, object]) -> int | None:
    for rank, gallery_id in enumerate(ranked, start=1):
        if gallery_id not in gallery_identity:
            raise CmpnasError(
                f"the ranking of query {query.item_id} names {gallery_id!r}, "
                "which is not a shop item of the gallery.",
                "rank against the gallery items only (rank_deepfashion2 with the shop items' ids).",
            )
        if gallery_identity[gallery_id] == query.identity:
            return rank
    return None


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise CmpnasError(f"invalid top-k list {ks}.", "use positive integers such as (1, 5, 10, 15, 20).")
    return ks


def rank_deepfashion2(
    query_ids: Sequence[str],
    query_emb: np.ndarray | torch.Tensor,
    gallery_ids: Sequence[str],
    gallery_emb: np.ndarray | torch.Tensor,
    k: int = OFFICIAL_RESULT_LENGTH,
    chunk_size: int = 512,
) -> dict[str, list[str]]:
    """Top-k gallery ids per query by cosine similarity (exact, chunked over queries to bound memory)."""
    ranking, _ = rank_with_scores(query_ids, query_emb, gallery_ids, gallery_emb, k, chunk_size)
    return ranking


def rank_with_scores(
    query_ids: Sequence[str],
    query_emb: np.ndarray | torch.Tensor,
    gallery_ids: Sequence[str],
    gallery_emb: np.ndarray | torch.Tensor,
    k: int = OFFICIAL_RESULT_LENGTH,
    chunk_size: int = 512,
) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
    """Like :func:`rank_deepfashion2` but also returns the cosine similarity of each ranked item."""
    queries = _as_matrix(query_emb, "query")
    gallery = _as_matrix(gallery_emb, "gallery")
    _check_ids(query_ids, queries, "query")
    _check_ids(gallery_ids, gallery, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise CmpnasError(
            f"query embeddings have dimension {queries.shape[1]} but gallery embeddings {gallery.shape[1]}.",
            "embed queries and gallery with compatible models (same embedding dimension).",
        )
    if k < 1:
        raise CmpnasError(f"k={k} must be >= 1.", "use k=20 (the official result length).")
    k = min(k, gallery.shape[0])
    queries = torch.nn.functional.normalize(queries, dim=1)
    gallery = torch.nn.functional.normalize(gallery, dim=1)
    ranking: dict[str, list[str]] = {}
    similarities: dict[str, list[float]] = {}
    if queries.shape[0] == 0:
        return ranking, similarities
    top_sims, top_index = knn(queries, gallery, k, chunk_size=chunk_size)
    for row, (values, indices) in enumerate(zip(top_sims.tolist(), top_index.tolist(), strict=True)):
        query_id = query_ids[row]
        ranking[query_id] = [gallery_ids[i] for i in indices]
        similarities[query_id] = values
    return ranking, similarities


def _as_matrix(emb: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    return as_embeddings(what, torch.as_tensor(emb).detach().to("cpu", torch.float32))


def _check_ids(ids: Sequence[str], emb: torch.Tensor, what: str) -> None:
    if len(ids) != emb.shape[0]:
        raise CmpnasError(
            f"{len(ids)} {what} ids but {emb.shape[0]} {what} embeddings.", "pass one id per embedding row."
        )
    if len(set(ids)) != len(ids):
        raise CmpnasError(f"{what} ids contain duplicates.", "give every item one embedding row.")


def export_official_results(
    path: str | os.PathLike[str],
    query_items: Sequence[Item],
    gallery_items: Sequence[Item],
    ranking: Mapping[str, Sequence[str]],
    query_scores: Mapping[str, float] | None = None,
) -> int:
    """Write the official retrieval result JSON (evaluation.md "Clothes Retrieval"); returns the entry count.

    One entry per query item that has a ranking: query_image_id, query_bbox [x1,y1,x2,y2], query_cls,
    query_score (the detector confidence; 1.0 for ground-truth boxes when ``query_scores`` is None) and the
    first 20 retrieved gallery items' image ids and boxes.
    """
    gallery_by_id = {item.item_id: item for item in gallery_items}
    entries = []
    for query in query_items:
        ranked = ranking.get(query.item_id)
        if ranked is None:
            continue
        if len(ranked) < OFFICIAL_RESULT_LENGTH:
            raise CmpnasError(
                f"query {query.item_id} has {len(ranked)} ranked gallery items; the official format needs "
                f"{OFFICIAL_RESULT_LENGTH}.",
                f"rank with k={OFFICIAL_RESULT_LENGTH} against a gallery of at least "
                f"{OFFICIAL_RESULT_LENGTH} items.",
            )
        retrieved = []
        for gallery_id in ranked[:OFFICIAL_RESULT_LENGTH]:
            if gallery_id not in gallery_by_id:
                raise CmpnasError(
                    f"the ranking of query {query.item_id} names {gallery_id!r}, "
                    "which is not among the gallery items.",
                    "pass the gallery items the ranking was computed against.",
                )
            retrieved.append(gallery_by_id[gallery_id])
        if query_scores is not None and query.item_id not in query_scores:
            raise CmpnasError(
                f"no query score for {query.item_id}.",
                "give a score for every ranked query, or None for 1.0.",
            )
        score = 1.0 if query_scores is None else float(query_scores[query.item_id])
        entries.append(
            {
                "query_image_id": query.image_id,
                "query_bbox": list(query.bbox),
                "query_cls": query.category_id,
                "query_score": score,
                "gallery_image_id": [item.image_id for item in retrieved],
                "gallery_bbox": [list(item.bbox) for item in retrieved],
            }
        )
    write_json_atomic(path, entries)
    return len(entries)
