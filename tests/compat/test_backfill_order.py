"""The backfill order: margins against hand-computed cosines, and the permutations they give."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmpnas.compat.backfill_order import backfill_order, label_rows, margins
from cmpnas.errors import CmpnasError

ROWS = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # three class directions in 2-D


def test_margins_by_hand() -> None:
    # v0 on class 0 exactly: cos (1, 0, -1) -> own 1 - best other 0 = 1
    # v1 at 45 degrees between class 0 and 1, labelled 1: cos (.7071, .7071, -.7071) -> 0
    # v2 pointing at class 1 but labelled 0 (the old embedding sits in another class): 0 - 1 = -1
    # v3 unlabelled, at 30 degrees from class 0: top-2 gap cos30 - cos60 = .8660 - .5
    v = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [np.cos(np.pi / 6), np.sin(np.pi / 6)]])
    got = margins(v, ROWS * 5.0, [0, 1, 0, None])  # row norms do not matter
    np.testing.assert_allclose(got, [1.0, 0.0, -1.0, np.cos(np.pi / 6) - 0.5], atol=1e-12)


def test_uncertainty_order_puts_low_margins_first_and_breaks_ties_by_position() -> None:
    v = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    order = backfill_order(v, "uncertainty", class_rows=ROWS, labels=[0, 0, 1, 0])
    # margins: 1, -1, 0, -1 -> items 1 and 3 (tie, by position), then 2, then 0
    assert order.tolist() == [1, 3, 2, 0]


def test_confident_order_puts_high_margins_first_and_breaks_ties_by_position() -> None:
    v = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    order = backfill_order(v, "confident", class_rows=ROWS, labels=[0, 0, 1, 0])
    # margins: 1, -1, 0, -1 -> item 0, then 2, then 1 and 3 (tie, by position)
    assert order.tolist() == [0, 2, 1, 3]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 40), seed=st.integers(0, 1000))
def test_random_order_is_a_seeded_permutation(n: int, seed: int) -> None:
    v = np.ones((n, 2))
    a = backfill_order(v, "random", seed=seed)
    assert sorted(a.tolist()) == list(range(n))
    assert a.tolist() == backfill_order(v, "random", seed=seed).tolist()


def test_label_rows_maps_names_and_unknown_classes() -> None:
    assert label_rows(["b", "z", "a"], ["a", "b"]) == [1, None, 0]


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(CmpnasError, match="Unknown backfill order"):
        backfill_order(np.ones((2, 2)), "newest-first")
    for order in ("uncertainty", "confident"):
        with pytest.raises(CmpnasError, match="needs the new model's classifier"):
            backfill_order(np.ones((2, 2)), order)
    with pytest.raises(CmpnasError, match="embedding dim"):
        margins(np.ones((2, 3)), ROWS)
