"""Classifiers on top of embeddings: linear, or cosine with a scale (normalised softmax)."""

from __future__ import annotations

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
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) * 0.01)
        self.scale = scale

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))


def create_classifier(kind: str, in_features: int, num_classes: int, scale: float = 16.0) -> nn.Module:
    factories = {
        "linear": lambda: LinearClassifier(in_features, num_classes),
        "cosine": lambda: CosineClassifier(in_features, num_classes, scale),
    }
    return factories[kind]()


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a (gallery) module: no gradients, eval mode. Returned for chaining."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
