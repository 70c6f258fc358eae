"""Compat losses on hand examples; query training against a frozen gallery (no gradient reaches it)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cmpnas.stages.query as stages
from cmpnas.compat.losses import AlignmentLoss, CompatLosses, InfluenceLoss, WeightedTerm, build_compat_losses
from cmpnas.config import CompatConfig, build_config
from cmpnas.errors import CmpnasError
from cmpnas.models.classifiers import CosineClassifier, LinearClassifier
from cmpnas.models.embedding import EmbeddingModel, fingerprint, load_model
from cmpnas.models.inference import embed

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_linear() -> LinearClassifier:
    clf = LinearClassifier(2, 3)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        clf.bias.zero_()
    return clf


# ---------------------------------------------------------------------------------------------- influence
def test_influence_loss_is_ce_of_the_frozen_classifier_hand_example() -> None:
    loss = InfluenceLoss(hand_linear())
    emb = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 2])
    # logits: [2, 0, -2] (label 0) and [0, 1, -1] (label 2)
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    ce1 = -math.log(math.exp(-1) / (1 + math.exp(1) + math.exp(-1)))
    assert float(loss(emb, labels, torch.arange(2))) == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


def test_influence_loss_through_a_cosine_classifier_hand_example() -> None:
    clf = CosineClassifier(2, 2, scale=10.0)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))  # norms do not matter
    emb = torch.tensor([[5.0, 5.0]])  # 45 degrees from both classes: cos = 1/sqrt(2) each
    assert float(InfluenceLoss(clf)(emb, torch.tensor([1]), torch.arange(1))) == pytest.approx(math.log(2))
    emb = torch.tensor([[0.0, 7.0]])  # cos = 0 and 1: logits [0, 10]; the label is the far class 0
    expected = -math.log(1 / (1 + math.exp(10)))
    assert float(InfluenceLoss(clf)(emb, torch.tensor([0]), torch.arange(1))) == pytest.approx(
        expected, rel=1e-5
    )


def test_influence_loss_freezes_the_classifier_and_passes_gradient_to_the_query() -> None:
    clf = hand_linear()
    clf.train()
    loss_fn = InfluenceLoss(clf)
    loss_fn.train()
    assert not clf.training  # stays in eval mode even when the loss module is put in train mode
    emb = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss_fn(emb, torch.tensor([1, 1]), torch.arange(2)).backward()
    assert all(p.grad is None and not p.requires_grad for p in clf.parameters())
    assert emb.grad is not None and torch.any(emb.grad != 0)


# ---------------------------------------------------------------------------------------------- alignment
def test_alignment_cosine_hand_vectors() -> None:
    cache = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 3.0]])
    loss = AlignmentLoss(cache, "cosine")
    emb = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    # index 1 -> target [1, 0]: cos 1 (loss 0);  index 1 again vs [0, 2]: cos 0 (loss 1)
    assert float(loss(emb, torch.zeros(2), torch.tensor([1, 1]))) == pytest.approx(0.5)
    # index 0 -> [9, 9]: cos(45 deg); index 2 -> [0, 3]: cos 1
    assert float(loss(emb, torch.zeros(2), torch.tensor([0, 2]))) == pytest.approx((1 - 1 / math.sqrt(2)) / 2)


def test_alignment_l2_hand_vectors() -> None:
    cache = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    loss = AlignmentLoss(cache, "l2")
    emb = torch.tensor([[3.0, 0.0], [5.0, 0.0]])
    # unit vectors: [1,0] vs [1,0] -> 0;  [1,0] vs [0,1] -> squared distance 2; mean over the batch = 1
    assert float(loss(emb, torch.zeros(2), torch.tensor([0, 1]))) == pytest.approx(1.0)
    assert loss.name == "align_l2"
    assert list(loss.parameters()) == []  # a cached tensor, nothing to train
    assert "gallery_embeddings" not in loss.state_dict()  # not saved in checkpoints


# ---------------------------------------------------------------------------------------------- combination
def test_weights_combine_the_terms() -> None:
    cache = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cfg = CompatConfig(mode="bct", bct_weight=2.0, align_weight=0.5, align="cosine")
    losses = build_compat_losses(cfg, hand_linear(), cache)
    emb, labels, index = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 2]), torch.tensor([0, 0])
    total, logs = losses(emb, labels, index)
    bct = float(InfluenceLoss(hand_linear())(emb, labels, index))
    align = float(AlignmentLoss(cache)(emb, labels, index))
    assert set(logs) == {"loss_bct", "loss_align_cosine"}
    assert logs["loss_bct"] == pytest.approx(bct) and logs["loss_align_cosine"] == pytest.approx(align)
    assert float(total) == pytest.approx(2.0 * bct + 0.5 * align)


def test_independent_mode_has_no_terms() -> None:
    cfg = CompatConfig(mode="independent", bct_weight=1.0, align_weight=1.0)
    losses = build_compat_losses(cfg, hand_linear(), torch.ones(3, 2))
    assert len(losses.terms) == 0
    total, logs = losses(torch.randn(2, 2, requires_grad=True), torch.tensor([0, 1]), torch.arange(2))
    assert float(total) == 0.0 and logs == {}


def test_zero_weights_drop_the_terms() -> None:
    losses = build_compat_losses(CompatConfig(bct_weight=0.0, align_weight=0.0), hand_linear(), None)
    assert isinstance(losses, CompatLosses) and len(losses.terms) == 0


def test_missing_inputs_are_clear_errors() -> None:
    with pytest.raises(CmpnasError, match="gallery classifier"):
        build_compat_losses(CompatConfig(mode="bct"), None, None)
    with pytest.raises(CmpnasError, match="gallery embeddings"):
        build_compat_losses(CompatConfig(mode="bct", align_weight=1.0), hand_linear(), None)


def test_compat_losses_is_a_module_list_of_terms() -> None:
    term = AlignmentLoss(torch.ones(2, 2))
    losses = CompatLosses([WeightedTerm(3.0, term)])
    assert isinstance(losses.terms, nn.ModuleList) and losses.weights == [3.0]


# ------------------------------------------------------------------------------------------- query training
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def captured_tasks(monkeypatch) -> list:
    """Records the task object each ``train()`` call in the query stage trains, for inspection afterwards."""
    real_train = stages.train
    tasks: list = []

    def recording_train(task, *args, **kwargs):
        tasks.append(task)
        return real_train(task, *args, **kwargs)

    monkeypatch.setattr(stages, "train", recording_train)
    return tasks


@pytest.mark.parametrize("align", ["cosine", "l2"])
def test_gallery_receives_no_gradient_during_query_training(
    tmp_path: Path, tiny_raw: dict, tiny_data, tiny_gallery: Path, captured_tasks: list, align: str
) -> None:
    tiny_raw["compat"] = {"mode": "bct", "bct_weight": 1.0, "align_weight": 1.0, "align": align}
    cfg = build_config(tiny_raw)
    gallery_bytes = _sha(tiny_gallery)
    gallery = load_model(tiny_gallery)
    gallery_clf = {k: v.clone() for k, v in gallery.classifier.state_dict().items()}
    train_emb = embed(gallery, tiny_data.train)

    res = stages.train_query(cfg, tiny_gallery, tmp_path / "query", data=tiny_data)

    (task,) = captured_tasks
    assert res["train"]["steps"] > 0
    assert [t.name for t in task.compat.terms] == ["bct", f"align_{align}"]
    influence, alignment = task.compat.terms
    for name, p in influence.gallery_classifier.named_parameters():
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, gallery_clf[name]), f"gallery classifier {name} changed"
    assert torch.allclose(alignment.gallery_embeddings, train_emb, atol=1e-5)
    # the query model itself did learn: its trained weights differ from the initial ones (same seed)
    torch.manual_seed(cfg.query_train.seed)
    initial = EmbeddingModel(task.model.spec).state_dict()
    trained = task.model.state_dict()
    moved = [n for n, w in trained.items() if w.is_floating_point() and not torch.equal(w, initial[n])]
    assert any(n.startswith("backbone.") for n in moved) and any(n.startswith("head.") for n in moved)
    # the gallery file on disk is untouched and the query records which gallery it is compatible with
    assert _sha(tiny_gallery) == gallery_bytes
    query = load_model(tmp_path / "query" / "model.safetensors")
    assert query.spec.compatible_with == fingerprint(gallery)
    assert (tiny_gallery.parent / "cache").is_dir()  # gallery embeddings cached next to the gallery


def test_independent_query_training_uses_no_gallery_terms(
    tmp_path: Path, tiny_raw: dict, tiny_data, tiny_gallery: Path, captured_tasks: list
) -> None:
    tiny_raw["compat"] = {"mode": "independent", "align_weight": 1.0}
    stages.train_query(build_config(tiny_raw), tiny_gallery, tmp_path / "q", data=tiny_data)
    (task,) = captured_tasks
    assert len(task.compat.terms) == 0
    assert load_model(tmp_path / "q" / "model.safetensors").spec.compatible_with is None


def test_embedding_dim_mismatch_fails_before_any_output(
    tmp_path: Path, tiny_raw: dict, tiny_data, tiny_gallery: Path, captured_tasks: list
) -> None:
    tiny_raw["query"]["embed_dim"] = 24  # the gallery has 16
    out = tmp_path / "query"
    with pytest.raises(CmpnasError, match="embed_dim") as exc:
        stages.train_query(build_config(tiny_raw), tiny_gallery, out, data=tiny_data)
    assert "query.embed_dim: 16" in str(exc.value)  # the fix names the value to use
    assert not out.exists()
    assert captured_tasks == []


# ------------------------------------------------------------------------------- CSD and regression
def test_regression_hand_example() -> None:
    from cmpnas.compat.losses import RegressionLoss

    gallery = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    term = RegressionLoss(gallery)
    query = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # squared distances 1 and 4
    assert float(term(query, torch.tensor([0, 1]), torch.tensor([0, 1]))) == pytest.approx(2.5)


def _csd_naive(gallery: np.ndarray, query: np.ndarray, rows: list[int], k: int, t: float) -> float:
    """CSD from its definition, in numpy: each row's k nearest other gallery items (cosine), softmax of
    the gallery's and of the query's similarities to them, KL(gallery || query), averaged."""
    unit = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    total = 0.0
    for b, i in enumerate(rows):
        sims = unit @ unit[i]
        order = [j for j in np.argsort(-sims, kind="stable") if j != i][:k]
        ctx = unit[order]
        p = np.exp(ctx @ unit[i] / t)
        p /= p.sum()
        qv = query[b] / np.linalg.norm(query[b])
        logits = ctx @ qv / t
        logq = logits - np.log(np.exp(logits).sum())
        total += float((p * (np.log(p) - logq)).sum())
    return total / len(rows)


def test_csd_matches_its_definition_and_vanishes_on_the_gallery_embedding() -> None:
    from cmpnas.compat.losses import ContextualSimilarityLoss

    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(12, 4)).astype(np.float32)
    query = rng.normal(size=(5, 4)).astype(np.float32)
    rows = [0, 3, 4, 7, 11]
    term = ContextualSimilarityLoss(torch.from_numpy(gallery), k=3, temperature=0.2, pool=100)
    got = term(torch.from_numpy(query), torch.zeros(5, dtype=torch.long), torch.tensor(rows))
    assert float(got) == pytest.approx(_csd_naive(gallery, query, rows, 3, 0.2), rel=1e-4)
    same = term(torch.from_numpy(gallery[rows]), torch.zeros(5, dtype=torch.long), torch.tensor(rows))
    assert abs(float(same)) < 1e-5
    q = torch.from_numpy(query).requires_grad_(True)
    term(q, torch.zeros(5, dtype=torch.long), torch.tensor(rows)).backward()
    assert q.grad is not None and torch.any(q.grad != 0)


def test_csd_and_regression_are_registered_terms_built_from_config() -> None:
    cfg = CompatConfig(
        bct_weight=0.0, terms={"csd": 0.5, "regress": 0.1}, options={"csd": {"k": 2, "pool": 8}}
    )
    losses = build_compat_losses(cfg, None, torch.randn(10, 3))
    assert [t.name for t in losses.terms] == ["csd", "regress"] and losses.weights == [0.5, 0.1]
    assert losses.terms[0].neighbour_index.shape == (10, 2)
    with pytest.raises(CmpnasError, match="cached gallery embeddings"):
        build_compat_losses(CompatConfig(terms={"csd": 1.0}), hand_linear(), None)
