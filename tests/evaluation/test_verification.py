"""IJB-C 1:1: template pooling, pair scores, ROC / TAR@FAR (toys A-C), plot, and end-to-end scoring."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_protocols import GREY, IJBCFixture, make_ijbc_fixture  # noqa: E402

from cmpnas.data.ijbc import IJBCAlignedFaces, read_ijbc_meta  # noqa: E402
from cmpnas.errors import CmpnasError  # noqa: E402
from cmpnas.evaluation.embeddings_io import score_ijbc_embeddings  # noqa: E402
from cmpnas.evaluation.verification import (  # noqa: E402
    DEFAULT_FARS,
    plot_roc,
    roc_curve,
    tar_at_far,
    template_features,
    verification_scores,
)


def _labelled(genuine, impostor):
    labels = np.r_[np.ones(len(genuine)), np.zeros(len(impostor))].astype(int)
    return labels, np.r_[genuine, impostor]


# ------------------------------------------------------------------------------ toys
TOY_A = _labelled([0.9, 0.75, 0.4], [0.8, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2])
TOY_B = _labelled([0.9, 0.7, 0.6, 0.2], [0.8, 0.65, 0.10, 0.09, 0.08, 0.07, 0.06])


def test_toy_a_roc_points() -> None:
    fpr, tpr, _ = roc_curve(*TOY_A)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 0.3, 0.3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1])


def test_toy_a_tar_at_far() -> None:
    result = tar_at_far(*TOY_A)
    for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        assert round(result["insightface"][far], 4) == 0.3333
    assert round(result["insightface"][1e-1], 4) == 0.6667  # ties at fpr=0.1: the larger TPR wins
    assert list(result["insightface"]) == list(DEFAULT_FARS)


def test_toy_b_nearest_point_overshoots_but_strict_does_not() -> None:
    result = tar_at_far(*TOY_B, fars=(0.1,))
    assert result["insightface"][0.1] == pytest.approx(0.50)
    assert result["strict"][0.1] == pytest.approx(0.25)


def test_toy_c_template_pooling() -> None:
    feats = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    tids, mids = np.array([7, 7, 7]), np.array([1, 1, 2])
    ids, pooled = template_features(feats, None, tids, mids, np.ones(3))
    assert ids.tolist() == [7]
    np.testing.assert_allclose(pooled, [[0.7071, 0.7071]], atol=1e-4)  # not the image mean [0.8944, 0.4472]
    _, weighted = template_features(feats, None, tids, mids, np.array([1.0, 1.0, 0.5]))
    np.testing.assert_allclose(weighted, [[0.8944, 0.4472]], atol=1e-4)
    _, unweighted = template_features(
        feats, None, tids, mids, np.array([1.0, 1.0, 0.5]), use_detector_score=False
    )
    np.testing.assert_allclose(unweighted, [[0.7071, 0.7071]], atol=1e-4)


def test_flip_features_are_added_before_pooling() -> None:
    feats = np.array([[1.0, 0.0], [0.0, 1.0]])
    flipped = np.array([[0.0, 3.0], [0.0, 1.0]])
    ids, pooled = template_features(feats, flipped, [1, 2], [1, 2], [1.0, 1.0])
    np.testing.assert_allclose(pooled, [[1 / np.sqrt(10), 3 / np.sqrt(10)], [0.0, 1.0]], atol=1e-6)
    _, no_flip = template_features(feats, flipped, [1, 2], [1, 2], [1.0, 1.0], use_flip=False)
    np.testing.assert_allclose(no_flip, [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(CmpnasError, match="flip"):
        template_features(feats, flipped[:1], [1, 2], [1, 2], [1.0, 1.0])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_template_features_ignore_row_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 12
    feats = rng.normal(size=(n, 4))
    tids, mids, faceness = rng.integers(0, 3, n), rng.integers(0, 3, n), rng.uniform(0.5, 1, n)
    ids, pooled = template_features(feats, None, tids, mids, faceness)
    perm = rng.permutation(n)
    ids_p, pooled_p = template_features(feats[perm], None, tids[perm], mids[perm], faceness[perm])
    np.testing.assert_array_equal(ids, ids_p)
    np.testing.assert_allclose(pooled, pooled_p, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    # brute force for the first template: faceness-weighted media means, summed, normalised
    first = ids[0]
    expected = sum(
        (feats[(tids == first) & (mids == m)] * faceness[(tids == first) & (mids == m)][:, None]).mean(axis=0)
        for m in np.unique(mids[tids == first])
    )
    np.testing.assert_allclose(pooled[0], expected / np.linalg.norm(expected), atol=1e-5)


def test_template_features_input_errors() -> None:
    with pytest.raises(CmpnasError, match="template ids"):
        template_features(np.ones((3, 2)), None, [1, 2], [1, 2, 3], [1, 1, 1])
    with pytest.raises(CmpnasError, match="NaN"):
        template_features(np.full((1, 2), np.nan), None, [1], [1], [1])


def test_verification_scores_by_hand() -> None:
    ids = np.array([30, 10, 20])  # not sorted on purpose
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    scores = verification_scores(ids, feats, np.array([[10, 20], [30, 10], [20, 30], [30, 30]]))
    np.testing.assert_allclose(scores, [0.8, 0.0, 0.6, 1.0], atol=1e-6)
    with pytest.raises(CmpnasError, match=r"\[40\]"):
        verification_scores(ids, feats, np.array([[10, 40]]))


# ----------------------------------------------------------------------------------------------- ROC
@pytest.mark.parametrize("drop", [True, False])
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 40))
def test_roc_matches_sklearn(drop: bool, seed: int, n: int) -> None:
    from sklearn import metrics  # a declared test dependency (pyproject [test]): never skipped silently

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    scores = rng.integers(0, 6, n) / 5.0  # many ties
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=drop)
    ref_fpr, ref_tpr, ref_thresholds = metrics.roc_curve(labels, scores, drop_intermediate=drop)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thresholds[1:], ref_thresholds[1:])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_strict_tar_is_the_best_threshold_within_the_far(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.r_[1, 0, rng.integers(0, 2, 30)]
    scores = rng.normal(size=32).round(1)
    fars = (0.0, 0.05, 0.1, 0.3, 1.0)
    result = tar_at_far(labels, scores, fars)
    n_gen, n_imp = labels.sum(), (1 - labels).sum()
    for far in fars:
        best = 0.0
        for threshold in np.r_[np.inf, np.unique(scores)]:
            accepted = scores >= threshold
            if (accepted & (labels == 0)).sum() / n_imp <= far:
                best = max(best, (accepted & (labels == 1)).sum() / n_gen)
        assert result["strict"][far] == pytest.approx(best)


def test_tar_at_far_needs_both_classes_and_finite_scores() -> None:
    with pytest.raises(CmpnasError, match="both"):
        tar_at_far(np.ones(3), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(CmpnasError, match="NaN"):
        tar_at_far(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(CmpnasError, match="0 .impostor. or 1"):
        tar_at_far(np.array([0, 2]), np.array([0.1, 0.2]))


def test_plot_roc_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "roc.png"
    plot_roc(*TOY_A, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels, scores = TOY_A
    plot_roc(labels, {"paragon": scores, "heterogeneous": scores * 0.5}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["roc.png"]


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def ijbc_fixture(tmp_path_factory: pytest.TempPathFactory) -> IJBCFixture:
    return make_ijbc_fixture(tmp_path_factory.mktemp("ijbc"))


def _colour_features(dataset: IJBCAlignedFaces) -> np.ndarray:
    """A trivial embedding: mean colour of the aligned face centre, centred on grey."""
    rows = []
    for index in range(len(dataset)):
        image, _ = dataset[index]
        rows.append(image[:, 40:60, 30:80].float().mean(dim=(1, 2)) - GREY)
    return torch.stack(rows).numpy()


@pytest.fixture(scope="module")
def face_features(ijbc_fixture: IJBCFixture) -> tuple[np.ndarray, np.ndarray]:
    meta = read_ijbc_meta(ijbc_fixture.root)
    return _colour_features(IJBCAlignedFaces(meta)), _colour_features(IJBCAlignedFaces(meta, flip=True))


def test_end_to_end_meta_to_tar(ijbc_fixture: IJBCFixture, face_features) -> None:
    meta = read_ijbc_meta(ijbc_fixture.root)
    feats, flipped = face_features
    ids, templates = template_features(feats, flipped, meta.template_ids, meta.media_ids, meta.faceness)
    assert ids.tolist() == sorted(set(ijbc_fixture.template_ids.tolist()))
    scores = verification_scores(ids, templates, meta.pairs)
    genuine, impostor = scores[meta.labels == 1], scores[meta.labels == 0]
    assert genuine.min() > 0.99 and impostor.max() < genuine.min()
    result = tar_at_far(meta.labels, scores)
    assert all(v == 1.0 for v in result["insightface"].values())
    assert all(v == 1.0 for v in result["strict"].values())


def _save(path: Path, names, feats, flipped=None) -> Path:
    extra = {} if flipped is None else {"embeddings_flip": flipped}
    np.savez(path, ids=np.array(names), embeddings=feats, **extra)
    return path


def test_score_ijbc_npz(ijbc_fixture: IJBCFixture, face_features, tmp_path: Path) -> None:
    feats, flipped = face_features
    names = ijbc_fixture.names
    result = score_ijbc_embeddings(ijbc_fixture.root, _save(tmp_path / "e.npz", names, feats, flipped))
    assert result["n_pairs"] == 28 and result["n_genuine"] == 4 and result["n_impostor"] == 24
    assert result["n_templates"] == 8 and result["n_images"] == 24
    assert set(result["tar_at_far"]) == {"insightface", "strict"}
    assert all(v == 100.0 for v in result["tar_at_far"]["insightface"].values())
    # row order in the file does not matter
    perm = np.random.default_rng(1).permutation(len(names))
    shuffled = _save(tmp_path / "s.npz", [names[i] for i in perm], feats[perm], flipped[perm])
    assert score_ijbc_embeddings(ijbc_fixture.root, shuffled) == result
    # heterogeneous: a gallery model with swapped colour channels is not compatible
    hetero = score_ijbc_embeddings(
        ijbc_fixture.root,
        tmp_path / "e.npz",
        gallery_npz=_save(tmp_path / "g.npz", names, feats[:, [2, 0, 1]]),
    )
    assert hetero["tar_at_far"]["strict"][1e-1] < 60.0


def test_score_ijbc_npz_missing_and_unknown_images(
    ijbc_fixture: IJBCFixture, face_features, tmp_path
) -> None:
    feats, _ = face_features
    names = ijbc_fixture.names
    with pytest.raises(CmpnasError, match="'24.jpg'"):
        score_ijbc_embeddings(ijbc_fixture.root, _save(tmp_path / "m.npz", names[:-1], feats[:-1]))
    with pytest.raises(CmpnasError, match="'nobody.jpg'"):
        score_ijbc_embeddings(
            ijbc_fixture.root, _save(tmp_path / "u.npz", [*names[:-1], "nobody.jpg"], feats)
        )
