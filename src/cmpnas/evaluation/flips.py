"""Negative flips: queries a new system gets wrong that the old system got right.

Aggregate top-1 can rise while some users' searches get worse; the model-upgrade literature (e.g. regression-
free or hot-refresh upgrades) counts those queries. A flip compares the top-1 answer of two systems query by
query, so both are scored on the same queries (leave-one-out, cosine, ties by gallery position as in
:func:`cmpnas.evaluation.retrieval.knn`).
"""

from __future__ import annotations

import torch

from cmpnas.evaluation.retrieval import knn, l2_normalize


def top1_hits(query: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] bool: is each item's nearest *other* item (leave-one-out, cosine) of its own class?

    Queries whose class has no other item cannot be right or wrong and are left out (as the top-1 metric does):
    the result has one entry per query that has a relevant item, in order.
    """
    _, idx = knn(l2_normalize(query.float()), l2_normalize(gallery.float()), 1, exclude_self=True)
    labels = labels.to(torch.int64)
    counts = torch.bincount(labels)
    answerable = counts[labels] > 1
    return (labels[idx[:, 0]] == labels)[answerable]


def flip_rates(reference: torch.Tensor, hits: torch.Tensor) -> dict[str, float]:
    """Percent of queries that go right -> wrong (negative) and wrong -> right (positive) from ``reference``."""
    if reference.shape != hits.shape:
        raise ValueError(f"flip rates need the same queries: {tuple(reference.shape)} vs {tuple(hits.shape)}")
    n = max(int(reference.numel()), 1)
    return {
        "negative_flips": 100.0 * float((reference & ~hits).sum()) / n,
        "positive_flips": 100.0 * float((~reference & hits).sum()) / n,
    }
