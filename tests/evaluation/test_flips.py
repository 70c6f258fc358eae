"""Negative / positive flips: a hand-computed example, and the hits agree with the top-1 metric."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmpnas.evaluation.flips import flip_rates, top1_hits
from cmpnas.evaluation.retrieval import retrieval_metrics

# two items per class 0 and 1 on the unit circle, and one lone item of class 2 (no answer: left out)
OLD = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
LABELS = torch.tensor([0, 0, 1, 1, 2])


def test_hits_by_hand() -> None:
    # nearest other item: 0->1, 1->0, 2->3 (cos 0.8), 3->2 (0.8 > 0.745 to item 1): all right; item 4 is lone
    assert top1_hits(OLD, OLD, LABELS).tolist() == [True, True, True, True]
    new_queries = OLD.clone()
    new_queries[1] = torch.tensor([0.5, 0.9])  # now closest to item 3 (class 1): query 1 goes wrong
    hits = top1_hits(new_queries, OLD, LABELS)
    assert hits.tolist() == [True, False, True, True]
    assert flip_rates(top1_hits(OLD, OLD, LABELS), hits) == {"negative_flips": 25.0, "positive_flips": 0.0}


def test_flip_rates_by_hand() -> None:
    ref = torch.tensor([True, True, False, False])
    new = torch.tensor([True, False, True, False])
    assert flip_rates(ref, new) == {"negative_flips": 25.0, "positive_flips": 25.0}
    assert flip_rates(ref, ref) == {"negative_flips": 0.0, "positive_flips": 0.0}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6))
def test_hits_average_to_the_top1_metric(seed: int, classes: int) -> None:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (60,), generator=g)
    query = torch.randn(60, 8, generator=g)
    gallery = query + torch.randn(60, 8, generator=g)
    hits = top1_hits(query, gallery, labels)
    metric = retrieval_metrics(query, labels, gallery, labels, exclude_self=True, ks=(1,))
    assert len(hits) == metric["n_queries"]
    assert 100.0 * float(hits.float().mean()) == pytest.approx(metric["top1"])

