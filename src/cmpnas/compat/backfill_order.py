"""In which order to re-embed ("backfill") a gallery after a compatible gallery-model upgrade.

FastFill (Jaeckle et al., ICLR 2023) backfills first the items whose *old* embedding is least reliable, so
that retrieval improves fastest per re-embedded item. The score here is the one the issue names, free of
training: the margin of the old embedding under the *new* model's classifier (valid because the new model was
trained compatible with the old embedding space). With the item's class known, the margin is the cosine to its
own class row minus the best other row (negative = the old embedding sits in another class); without it, the
gap between the two best rows. Low margin = uncertain = backfilled first. Cosines to the L2-normalised rows
make the score independent of the classifier's scale (linear and cosine classifiers alike).

The margin can be read the other way too: ``confident`` backfills the clearest items first. A new-model query
is closer to new-model vectors than to old ones, so the first re-embedded items draw every nearby query; when
those are the ambiguous ones (``uncertainty``), many queries land in the wrong class, when they are the clear
ones, the pull goes to the right class. Which order serves users better is measured, not assumed
(``benchmarks/upgrade.py`` chooses on validation).

One implementation for the ``backfill`` command and the evaluation's backfill curve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmpnas.errors import CmpnasError

ORDERS = ("uncertainty", "confident", "random")
MARGIN_ORDERS = frozenset({"uncertainty", "confident"})  # the orders that read the new model's classifier


def margins(
    old_vectors: np.ndarray, class_rows: np.ndarray, labels: Sequence[int | None] | None = None
) -> np.ndarray:
    """[N] margin of each old vector under the classifier rows ``class_rows`` [C, D] (see module doc).

    ``labels[i]`` is the row index of item i's class, or None when the item's class is not one of the rows.
    """
    v = np.asarray(old_vectors, dtype=np.float64)
    w = np.asarray(class_rows, dtype=np.float64)
    if v.ndim != 2 or w.ndim != 2 or v.shape[1] != w.shape[1]:
        raise CmpnasError(
            f"Old vectors {v.shape} and classifier rows {w.shape} do not share the embedding dim.",
            "backfill with a gallery model compatible with the index (same embedding dim)",
        )
    if w.shape[0] < 2:
        raise CmpnasError("A margin needs a classifier with at least 2 classes.", "use --order random")
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    cos = v @ w.T
    top2 = -np.sort(-cos, axis=1)[:, :2]
    out = top2[:, 0] - top2[:, 1]
    if labels is not None:
        for i, y in enumerate(labels):
            if y is None:
                continue
            own = cos[i, y]
            other = np.max(np.delete(cos[i], y))
            out[i] = own - other
    return out


def backfill_order(
    old_vectors: np.ndarray,
    order: str,
    *,
    class_rows: np.ndarray | None = None,
    labels: Sequence[int | None] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """A permutation of ``range(N)``: the items to re-embed first come first.

    ``uncertainty``: ascending margin; ``confident``: descending margin (ties by position in both, so the order
    is deterministic); ``random``: a seeded permutation (FastFill's baseline).
    """
    n = len(old_vectors)
    if order == "random":
        return np.random.default_rng(seed).permutation(n)
    if order in MARGIN_ORDERS:
        if class_rows is None:
            raise CmpnasError(f"The {order} order needs the new model's classifier.", "use --order random")
        margin = margins(old_vectors, class_rows, labels)
        return np.argsort(margin if order == "uncertainty" else -margin, kind="stable")
    raise CmpnasError(f"Unknown backfill order '{order}'.", f"use one of {', '.join(ORDERS)}")


def label_rows(labels: Sequence[str], class_names: Sequence[str] | None) -> list[int | None]:
    """Item labels (strings) as classifier row indices (None for a class the classifier does not know)."""
    row = {str(c): i for i, c in enumerate(class_names or [])}
    return [row.get(str(label)) for label in labels]
