"""Classifiers on top of embeddings: linear, cosine with a scale (normalised softmax), and the
angular-margin face losses ArcFace / CosFace.

Margin classifiers only change the target-class logit, and only while training: they take the labels
(``needs_labels = True``). Without labels they return the plain scaled cosine logits, which is what
evaluation and BCT's influence loss through a frozen gallery classifier want.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearClassifier(nn.Linear):
    kind = "linear"


class CosineClassifier(nn.Module):
    """logits = s * cos(w_c, e): the embedding norm stops mattering, which suits cosine retrieval."""

    kind = "cosine"

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        # Unit-norm rows: the logits only see directions, but the step size an optimizer takes on a
        # direction is ~ lr / |w|^2, so the small init common in face code (std 0.01, |w| ~ 0.1) moves the
        # class centres far faster than the backbone and trains badly at a shared SGD learning rate.
        self.weight = nn.Parameter(F.normalize(torch.randn(num_classes, in_features), dim=1))
        self.scale = scale

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))


class _MarginClassifier(CosineClassifier):
    """Cosine logits whose target entry gets a margin during training (subclasses define the margin)."""

    needs_labels = True

    def __init__(self, in_features: int, num_classes: int, scale: float = 64.0, margin: float = 0.5) -> None:
        super().__init__(in_features, num_classes, scale)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))
        if labels is None:
            return self.scale * cosine
        target = cosine.gather(1, labels.view(-1, 1))
        logits = cosine.scatter(1, labels.view(-1, 1), self._target_logit(target))
        return self.scale * logits

    def _target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CosFaceClassifier(_MarginClassifier):
    """CosFace / large-margin cosine loss: target logit s * (cos(theta) - m)."""

    kind = "cosface"

    def _target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine - self.margin


class ArcFaceClassifier(_MarginClassifier):
    """ArcFace / additive angular margin: target logit s * cos(theta + m).

    cos(theta + m) stops decreasing once theta + m passes pi, so beyond theta = pi - m the usual
    insightface fallback cos(theta) - m * sin(m) keeps the target logit monotone in theta.
    """

    kind = "arcface"

    def _target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        cos_m, sin_m = math.cos(self.margin), math.sin(self.margin)
        # the clamp keeps sqrt's gradient finite at |cos| = 1
        sine = torch.sqrt((1.0 - cosine.square()).clamp(min=1e-12))
        with_margin = cosine * cos_m - sine * sin_m
        past_pi = cosine <= math.cos(math.pi - self.margin)
        return torch.where(past_pi, cosine - self.margin * sin_m, with_margin)


def create_classifier(
    kind: str, in_features: int, num_classes: int, scale: float = 16.0, margin: float = 0.5
) -> nn.Module:
    factories = {
        "linear": lambda: LinearClassifier(in_features, num_classes),
        "cosine": lambda: CosineClassifier(in_features, num_classes, scale),
        "arcface": lambda: ArcFaceClassifier(in_features, num_classes, scale, margin),
        "cosface": lambda: CosFaceClassifier(in_features, num_classes, scale, margin),
    }
    return factories[kind]()


def classifier_logits(classifier: nn.Module, emb: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Training logits: margin classifiers get the labels, the others just the embeddings."""
    if labels is not None and getattr(classifier, "needs_labels", False):
        return classifier(emb, labels)
    return classifier(emb)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a (gallery) module: no gradients, eval mode. Returned for chaining."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
