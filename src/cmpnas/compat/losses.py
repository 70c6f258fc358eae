"""Compatibility losses as small objects, combined by weights from the config.

Each term maps (query embedding, labels, batch indices) -> scalar loss. The frozen gallery
classifier and the cached gallery embeddings live inside the terms; none of them has trainable
parameters, so the gallery can never receive a gradient through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cmpnas.config import CompatConfig
from cmpnas.errors import CmpnasError
from cmpnas.models.classifiers import freeze


class InfluenceLoss(nn.Module):
    """BCT: CE of the *frozen gallery classifier* applied to the query embedding."""

    name = "bct"

    def __init__(self, gallery_classifier: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gallery_classifier = freeze(gallery_classifier)
        self.label_smoothing = label_smoothing

    def train(self, mode: bool = True) -> InfluenceLoss:  # the frozen classifier stays in eval mode
        super().train(mode)
        self.gallery_classifier.eval()
        return self

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = self.gallery_classifier(emb.float())
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


class AlignmentLoss(nn.Module):
    """Pull the query embedding towards the cached gallery embedding of the same image (L2 or cosine)."""

    def __init__(self, gallery_embeddings: torch.Tensor, kind: str = "cosine") -> None:
        super().__init__()
        # A plain attribute, not a buffer: it is constant, must not be broadcast by DDP every step,
        # and does not belong in checkpoints (it is recomputed/cached from the gallery model).
        self.gallery_embeddings = gallery_embeddings.detach().float()
        self.kind = kind
        self.name = f"align_{kind}"

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        target = self.gallery_embeddings[index.cpu()].to(emb.device)
        if self.kind == "cosine":
            return (1.0 - F.cosine_similarity(emb.float(), target, dim=1)).mean()
        return (
            F.mse_loss(F.normalize(emb.float(), dim=1), F.normalize(target, dim=1), reduction="sum")
            / emb.shape[0]
        )


@dataclass
class WeightedTerm:
    weight: float
    term: nn.Module


class CompatLosses(nn.Module):
    """Sum of weighted compatibility terms; ``forward`` returns (total, {name: value})."""

    def __init__(self, terms: list[WeightedTerm]) -> None:
        super().__init__()
        self.terms = nn.ModuleList([t.term for t in terms])
        self.weights = [t.weight for t in terms]

    def forward(
        self, emb: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        total = emb.new_zeros((), dtype=torch.float32)
        logs: dict[str, float] = {}
        for w, term in zip(self.weights, self.terms, strict=True):
            value = term(emb, labels, index)
            total = total + w * value
            logs[f"loss_{term.name}"] = float(value.detach())
        return total, logs


def build_compat_losses(
    cfg: CompatConfig,
    gallery_classifier: nn.Module | None,
    gallery_embeddings: torch.Tensor | None,
    label_smoothing: float = 0.0,
) -> CompatLosses:
    """Config -> loss terms. ``independent`` gives no terms (the incompatible baseline)."""
    terms: list[WeightedTerm] = []
    if cfg.mode == "bct" and cfg.bct_weight > 0:
        if gallery_classifier is None:
            raise CmpnasError(
                "BCT needs the gallery classifier.", "pass a gallery checkpoint with a classifier"
            )
        terms.append(WeightedTerm(cfg.bct_weight, InfluenceLoss(gallery_classifier, label_smoothing)))
    if cfg.mode == "bct" and cfg.align_weight > 0:
        if gallery_embeddings is None:
            raise CmpnasError(
                "The alignment term needs cached gallery embeddings.", "compute them before training"
            )
        terms.append(WeightedTerm(cfg.align_weight, AlignmentLoss(gallery_embeddings, cfg.align)))
    return CompatLosses(terms)
