"""ArcFace / CosFace classifiers: hand-computed logits on a 2-D toy, and their use in training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from cmpnas.config import ModelConfig
from cmpnas.models.classifiers import (
    ArcFaceClassifier,
    CosFaceClassifier,
    CosineClassifier,
    classifier_logits,
    create_classifier,
)
from cmpnas.models.embedding import EmbeddingModel, ModelSpec
from cmpnas.training.tasks import ClassificationTask

COS45 = math.sqrt(0.5)


def _toy(kind: type, scale: float = 2.0, margin: float = 0.5) -> torch.nn.Module:
    """Class 0 points along +x, class 1 along +y (weights need not be unit length: they are normalised)."""
    classifier = kind(2, 2, scale, margin)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
    return classifier


def test_cosface_subtracts_the_margin_from_the_target_cosine() -> None:
    logits = _toy(CosFaceClassifier)(torch.tensor([[1.0, 1.0]]), torch.tensor([0]))
    # both angles are 45 degrees; only the target (class 0) loses m = 0.5 before scaling by s = 2
    assert logits.tolist()[0] == pytest.approx([2 * (COS45 - 0.5), 2 * COS45], abs=1e-6)


def test_arcface_adds_the_margin_to_the_target_angle() -> None:
    emb = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    logits = _toy(ArcFaceClassifier)(emb, torch.tensor([0, 1]))
    target = 2 * math.cos(math.pi / 4 + 0.5)  # 2 * cos(1.2854) = 0.5630
    np.testing.assert_allclose(logits.detach().numpy(), [[target, 2 * COS45], [2 * COS45, target]], atol=1e-6)


def test_without_labels_both_return_plain_scaled_cosines() -> None:
    emb = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    plain = CosineClassifier(2, 2, 2.0)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
    expected = [[2 * COS45, 2 * COS45], [2 * 3 / math.sqrt(10), 2 * -1 / math.sqrt(10)]]
    for kind in (ArcFaceClassifier, CosFaceClassifier):
        np.testing.assert_allclose(_toy(kind)(emb).detach().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(plain(emb).detach().numpy(), expected, atol=1e-6)


def test_zero_margin_is_the_cosine_classifier() -> None:
    emb, labels = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 0, 1])
    for kind in (ArcFaceClassifier, CosFaceClassifier):
        classifier = _toy(kind, margin=0.0)
        torch.testing.assert_close(classifier(emb, labels), classifier(emb))


def test_arcface_past_pi_minus_m_uses_the_insightface_fallback() -> None:
    # theta = pi for class 0: cos(theta + m) would rise again, so the logit is cos(theta) - m sin(m)
    logits = _toy(ArcFaceClassifier)(torch.tensor([[-1.0, 0.0]]), torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(2 * (-1 - 0.5 * math.sin(0.5)), abs=1e-6)
    assert logits[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_arcface_target_logit_never_increases_with_the_angle() -> None:
    theta = torch.linspace(0, math.pi, 721)
    emb = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    target = _toy(ArcFaceClassifier)(emb, torch.zeros(len(theta), dtype=torch.int64))[:, 0]
    assert bool((target[1:] <= target[:-1] + 1e-6).all())
    assert bool((target < 2 * torch.cos(theta) + 1e-6).all())  # the margin always costs the target


def test_gradients_stay_finite_when_the_embedding_hits_the_class_centre() -> None:
    emb = torch.tensor([[1.0, 0.0]], requires_grad=True)
    classifier = _toy(ArcFaceClassifier)
    F.cross_entropy(classifier(emb, torch.tensor([0])), torch.tensor([0])).backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(classifier.weight.grad).all()


def test_factory_and_label_dispatch() -> None:
    arc = create_classifier("arcface", 4, 3, scale=64.0, margin=0.3)
    cos = create_classifier("cosface", 4, 3, scale=30.0, margin=0.35)
    assert isinstance(arc, ArcFaceClassifier) and (arc.scale, arc.margin, arc.out_features) == (64.0, 0.3, 3)
    assert isinstance(cos, CosFaceClassifier) and (cos.scale, cos.margin) == (30.0, 0.35)
    assert arc.needs_labels and not getattr(create_classifier("cosine", 4, 3), "needs_labels", False)
    emb, labels = torch.randn(2, 4), torch.tensor([0, 2])
    torch.testing.assert_close(classifier_logits(arc, emb, labels), arc(emb, labels))
    linear = create_classifier("linear", 4, 3)
    torch.testing.assert_close(classifier_logits(linear, emb, labels), linear(emb))
    with pytest.raises(ValueError, match="margin"):
        ArcFaceClassifier(4, 3, 64.0, -0.1)


def test_config_accepts_margin_classifiers() -> None:
    cfg = ModelConfig(classifier="arcface", cosine_scale=64, margin=0.5)
    assert (cfg.classifier, cfg.margin) == ("arcface", 0.5)
    with pytest.raises(ValidationError):
        ModelConfig(classifier="cosface", margin=-0.2)
    with pytest.raises(ValidationError):
        ModelConfig(classifier="sphereface")
    assert ModelSpec(backbone="x").margin == 0.5  # older model files without the field still load


def test_classification_task_trains_arcface_with_the_margin() -> None:
    torch.manual_seed(0)
    spec = ModelSpec(
        backbone="resnet_small", backbone_kwargs={"widths": [4], "depths": [1], "strides": [1]}, embed_dim=4,
        num_classes=3, classifier="arcface", cosine_scale=4.0, input_size=8,
    )  # fmt: skip
    model = EmbeddingModel(spec).eval()
    task = ClassificationTask(model).eval()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, _ = task(x, y, torch.arange(6), 0)
    with torch.no_grad():
        emb = model(x)
        with_margin = F.cross_entropy(model.classifier(emb, y), y)
        without = F.cross_entropy(model.classifier(emb), y)
    assert loss.item() == pytest.approx(with_margin.item(), rel=1e-5)
    assert loss.item() > without.item()
    assert np.isfinite(loss.item())
