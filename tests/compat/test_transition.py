"""The dual query policy: its inner products are each row's cosine in that row's own space, and its ends are the
old and the new system exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmpnas.compat.transition import dual_vectors
from cmpnas.evaluation.flips import top1_hits


def test_dual_scores_by_hand() -> None:
    # one query; old space: q = (1, 0), new space: q = (0, 2) -> unit (0, 1)
    # row 0 not backfilled, old (3, 4) -> cos with (1, 0) = 0.6
    # row 1 backfilled, new (0, -5) -> cos with (0, 1) = -1 (its old vector (1, 0) would have scored 1)
    # row 2 backfilled, new (1, 1) -> cos 0.7071
    q_old, q_new = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    g_old = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0]])
    g_new = torch.tensor([[9.0, 9.0], [0.0, -5.0], [1.0, 1.0]])
    query, gallery = dual_vectors(q_old, q_new, g_old, g_new, np.array([False, True, True]))
    assert query.shape == (1, 4) and gallery.shape == (3, 4)
    torch.testing.assert_close(query @ gallery.T, torch.tensor([[0.6, -1.0, 2**-0.5]]))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 9), st.integers(1, 6))
def test_dual_scores_are_each_spaces_cosine(seed: int, n: int, dim: int) -> None:
    rng = np.random.default_rng(seed)
    q_old, q_new, g_old, g_new = (torch.from_numpy(rng.normal(size=(n, dim))).float() for _ in range(4))
    mask = rng.random(n) < 0.5
    query, gallery = dual_vectors(q_old, q_new, g_old, g_new, mask)

    def cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        a, b = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
        return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T

    expected = np.where(mask[None, :], cos(q_new, g_new), cos(q_old, g_old))
    np.testing.assert_allclose((query @ gallery.T).numpy(), expected, atol=1e-5)


def test_dual_ends_are_the_old_and_the_new_system() -> None:
    rng = np.random.default_rng(0)
    old, new = (torch.from_numpy(rng.normal(size=(40, 5))).float() for _ in range(2))
    labels = torch.from_numpy(rng.integers(0, 4, size=40))
    nothing, everything = np.zeros(40, dtype=bool), np.ones(40, dtype=bool)
    assert torch.equal(top1_hits(*dual_vectors(old, new, old, new, nothing), labels), top1_hits(old, old, labels))
    assert torch.equal(top1_hits(*dual_vectors(old, new, old, new, everything), labels), top1_hits(new, new, labels))


def test_dual_refuses_mismatched_inputs() -> None:
    a, b = torch.ones(3, 2), torch.ones(3, 4)
    with pytest.raises(ValueError, match="same items"):
        dual_vectors(a, b, a, a, np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="backfilled"):
        dual_vectors(a, a, a, a, np.zeros(2, dtype=bool))
