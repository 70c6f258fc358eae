"""One evaluation function: ``evaluate(query_model, gallery_model, protocol)``.

Paragon M(g,g), homogeneous M(q,q) and heterogeneous M(q,g) are the same call with different
model pairs (as in apple/ml-fct). Embeddings can be passed in precomputed for users' own models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cmpnas.evaluation.retrieval import retrieval_metrics
from cmpnas.models.inference import embed, labels_of


@dataclass
class LeaveOneOut:
    """Class-level retrieval inside one set: every image queries all *other* images."""

    dataset: Any
    name: str = "leave_one_out"


@dataclass
class QueryGallery:
    """Separate query and gallery sets (e.g. consumer-to-shop, open-set test split)."""

    query: Any
    gallery: Any
    name: str = "query_gallery"


Protocol = LeaveOneOut | QueryGallery


def evaluate_embeddings(
    query_emb: torch.Tensor, gallery_emb: torch.Tensor, protocol: Protocol, **kw: Any
) -> dict[str, float]:
    if isinstance(protocol, LeaveOneOut):
        labels = labels_of(protocol.dataset)
        return retrieval_metrics(query_emb, labels, gallery_emb, labels, exclude_self=True, **kw)
    return retrieval_metrics(
        query_emb, labels_of(protocol.query), gallery_emb, labels_of(protocol.gallery), **kw
    )


def _sets(protocol: Protocol) -> tuple[Any, Any]:
    if isinstance(protocol, LeaveOneOut):
        return protocol.dataset, protocol.dataset
    return protocol.query, protocol.gallery


def evaluate(
    query_model: nn.Module, gallery_model: nn.Module, protocol: Protocol, batch_size: int = 512, **kw: Any
) -> dict[str, float]:
    """M(query_model, gallery_model): queries embedded by one model, the gallery by the other."""
    qset, gset = _sets(protocol)
    q = embed(query_model, qset, batch_size=batch_size)
    g = (
        q
        if (gallery_model is query_model and qset is gset)
        else embed(gallery_model, gset, batch_size=batch_size)
    )
    return evaluate_embeddings(q, g, protocol, **kw)


def three_way(
    query_model: nn.Module,
    gallery_model: nn.Module,
    protocol: Protocol,
    batch_size: int = 512,
    gallery_cache: dict[str, torch.Tensor] | None = None,
    **kw: Any,
) -> dict[str, dict[str, float]]:
    """Paragon, homogeneous and heterogeneous metrics, embedding each model once per set.

    ``gallery_cache`` (keyed 'query'/'gallery') lets several query models share one gallery pass.
    """
    qset, gset = _sets(protocol)
    cache = gallery_cache if gallery_cache is not None else {}
    if "gallery" not in cache:
        cache["gallery"] = embed(gallery_model, gset, batch_size=batch_size)
        cache["query"] = (
            cache["gallery"] if qset is gset else embed(gallery_model, qset, batch_size=batch_size)
        )
    gq, gg = cache["query"], cache["gallery"]
    qq = embed(query_model, qset, batch_size=batch_size)
    qg = qq if qset is gset else embed(query_model, gset, batch_size=batch_size)
    if "paragon" not in cache:  # identical for every query model sharing this cache
        cache["paragon"] = evaluate_embeddings(gq, gg, protocol, **kw)
    return {
        "paragon": dict(cache["paragon"]),
        "homogeneous": evaluate_embeddings(qq, qg, protocol, **kw),
        "heterogeneous": evaluate_embeddings(qq, gg, protocol, **kw),
    }
