"""IJB-C style 1:1 verification: image features -> template features -> pair scores -> TAR@FAR.

Follows the defaults of insightface's IJB-C evaluation script (``recognition/_evaluation_/ijb/ijb_11.py``): flip features are added, each image
feature is weighted by its detector (faceness) score, images of one media are averaged, media are
SUMMED into the template, and the template is L2-normalised; a pair's score is the cosine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_path

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def template_features(
    image_feats: np.ndarray,
    image_feats_flip: np.ndarray | None,
    tids: np.ndarray,
    mids: np.ndarray,
    faceness: np.ndarray,
    use_flip: bool = True,
    use_detector_score: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Pool un-normalised image features into L2-normalised template features.

    Returns (sorted unique template ids [T], features float32 [T, D]). ``use_flip`` has no effect when
    ``image_feats_flip`` is None.
    """
    feats = np.asarray(image_feats, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise CmpnasError(
            f"image features have shape {feats.shape}; expected [N, D].", "pass one row per image."
        )
    n = feats.shape[0]
    tids = np.asarray(tids, dtype=np.int64).reshape(-1)
    mids = np.asarray(mids, dtype=np.int64).reshape(-1)
    faceness = np.asarray(faceness, dtype=np.float32).reshape(-1)
    for name, array in (("template ids", tids), ("media ids", mids), ("faceness scores", faceness)):
        if array.shape[0] != n:
            raise CmpnasError(f"{array.shape[0]} {name} for {n} image features.", "pass one value per image.")
    # sort by (template, media) once: media and template pooling become contiguous segment sums
    order = np.lexsort((mids, tids))
    tids, mids = tids[order], mids[order]
    pooled = feats[order]
    if use_flip and image_feats_flip is not None:
        flipped = np.asarray(image_feats_flip, dtype=np.float32)
        if flipped.shape != feats.shape:
            raise CmpnasError(
                f"flip features have shape {flipped.shape} but features {feats.shape}.",
                "embed the mirrored image of every face, in the same order.",
            )
        pooled += flipped[order]
    if use_detector_score:
        pooled *= faceness[order][:, None]
    if not np.isfinite(pooled).all():
        raise CmpnasError(
            "image features contain NaN or infinite values.", "check the model that produced them."
        )
    media_start = np.flatnonzero(np.r_[True, (tids[1:] != tids[:-1]) | (mids[1:] != mids[:-1])])
    media_size = np.diff(np.r_[media_start, n])
    media_mean = np.add.reduceat(pooled, media_start, axis=0) / media_size[:, None]
    media_tids = tids[media_start]
    template_start = np.flatnonzero(np.r_[True, media_tids[1:] != media_tids[:-1]])
    template_sum = np.add.reduceat(media_mean, template_start, axis=0)
    # L2 normalise; a zero vector stays zero, as sklearn's normalize does upstream
    norms = np.linalg.norm(template_sum, axis=1, keepdims=True)
    normalised = template_sum / np.where(norms > 0, norms, 1.0)
    return media_tids[template_start], normalised.astype(np.float32)


def verification_scores(
    template_ids: np.ndarray, feats: np.ndarray, pairs: np.ndarray, chunk_size: int = 1 << 18
) -> np.ndarray:
    """Cosine score of each template pair (features are already L2-normalised); float32 [P]."""
    template_ids = np.asarray(template_ids, dtype=np.int64).reshape(-1)
    feats = np.asarray(feats, dtype=np.float32)
    pairs = np.asarray(pairs, dtype=np.int64)
    if feats.ndim != 2 or feats.shape[0] != template_ids.shape[0]:
        raise CmpnasError(
            f"{template_ids.shape[0]} template ids for template features of shape {feats.shape}.",
            "pass one feature row per template id.",
        )
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise CmpnasError(f"pairs have shape {pairs.shape}; expected [P, 2].", "pass (tid1, tid2) rows.")
    order = np.argsort(template_ids, kind="stable")
    sorted_ids = template_ids[order]
    position = np.clip(np.searchsorted(sorted_ids, pairs), 0, max(len(sorted_ids) - 1, 0))
    found = sorted_ids[position] == pairs if len(sorted_ids) else np.zeros(pairs.shape, dtype=bool)
    if not found.all():
        missing = np.unique(pairs[~found])
        raise CmpnasError(
            f"{missing.size} template id(s) in the pairs have no feature, e.g. {missing[:5].tolist()}.",
            "embed every image of every template named in the pair file.",
        )
    rows = order[position]
    scores = np.empty(pairs.shape[0], dtype=np.float32)
    for start in range(0, pairs.shape[0], chunk_size):
        left = feats[rows[start : start + chunk_size, 0]]
        right = feats[rows[start : start + chunk_size, 1]]
        scores[start : start + chunk_size] = np.einsum("ij,ij->i", left, right)
    return scores


def roc_curve(
    labels: np.ndarray, scores: np.ndarray, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with sklearn.metrics.roc_curve's conventions, without the dependency.

    One point per distinct score (descending), a leading (0, 0) point, and with ``drop_intermediate``
    the collinear points removed exactly as sklearn does (so "nearest point" lookups match upstream).
    """
    labels, scores = _check_labels_scores(labels, scores)
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_each_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_labels.size - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_each_value]
    false_positives = 1 + last_of_each_value - true_positives
    thresholds = sorted_scores[last_of_each_value]
    if drop_intermediate and true_positives.size > 2:
        bends = np.logical_or(np.diff(false_positives, 2), np.diff(true_positives, 2))
        keep = np.flatnonzero(np.r_[True, bends, True])
        true_positives, false_positives, thresholds = (
            true_positives[keep],
            false_positives[keep],
            thresholds[keep],
        )
    true_positives = np.r_[0, true_positives]
    false_positives = np.r_[0, false_positives]
    thresholds = np.r_[np.inf, thresholds]
    return false_positives / false_positives[-1], true_positives / true_positives[-1], thresholds


def _check_labels_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise CmpnasError(f"{labels.size} labels but {scores.size} scores.", "pass one score per pair.")
    if not np.isin(labels, (0, 1)).all():
        raise CmpnasError("pair labels must be 0 (impostor) or 1 (genuine).", "check the pair file.")
    if not np.isfinite(scores).all():
        raise CmpnasError("verification scores contain NaN or infinite values.", "check the features.")
    labels = labels.astype(np.int64)
    if labels.sum() == 0 or labels.sum() == labels.size:
        raise CmpnasError(
            "TAR@FAR needs both genuine (1) and impostor (0) pairs.", "use the full IJB-C pair file."
        )
    return labels, scores


def tar_at_far(
    labels: np.ndarray, scores: np.ndarray, fars: Sequence[float] = DEFAULT_FARS
) -> dict[str, dict[float, float]]:
    """TAR at each FAR, as fractions, under two conventions.

    ``insightface``: the ROC point (drop_intermediate=True) whose FPR is nearest the target, ties to the
    largest TPR; the chosen FPR may exceed the target (comparable with published IJB-C numbers).
    ``strict``: the largest TPR over all thresholds with FPR <= target.
    """
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=True)
    fpr_reversed, tpr_reversed = fpr[::-1], tpr[::-1]
    full_fpr, full_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    insightface: dict[float, float] = {}
    strict: dict[float, float] = {}
    for far in fars:
        nearest = int(np.argmin(np.abs(fpr_reversed - far)))  # first index = largest TPR among ties
        insightface[far] = float(tpr_reversed[nearest])
        allowed = full_fpr <= far
        strict[far] = float(full_tpr[allowed].max()) if allowed.any() else 0.0
    return {"insightface": insightface, "strict": strict}


def plot_roc(
    labels: np.ndarray,
    scores: np.ndarray | Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    title: str = "IJB-C 1:1 verification",
) -> None:
    """ROC (TAR vs log FAR) as a PNG, written atomically. ``scores`` may map curve names to scores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = dict(scores) if isinstance(scores, Mapping) else {"": scores}
    figure = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for name, curve_scores in curves.items():
        fpr, tpr, _ = roc_curve(labels, curve_scores, drop_intermediate=True)
        positive = fpr > 0  # log axis
        axes.plot(fpr[positive], tpr[positive], label=name or None)
    axes.set_xscale("log")
    axes.set_xlabel("FAR (false accept rate)")
    axes.set_ylabel("TAR (true accept rate)")
    axes.set_ylim(0, 1.01)
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title)
    if any(curves):
        axes.legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
