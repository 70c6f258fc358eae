"""Compatibility losses as small objects, combined by weights from the config.

Each term maps (query embedding, labels, batch indices) -> scalar loss. The frozen gallery
classifier and the cached gallery embeddings live inside the terms; none of them has trainable
parameters, so the gallery can never receive a gradient through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmpnas.config import CompatConfig
from cmpnas.errors import CmpnasError
from cmpnas.models.classifiers import freeze
from cmpnas.registry import Registry


class CompatTerm(nn.Module):
    """A compatibility term: ``forward(query embedding, labels, batch indices) -> scalar``.

    ``needs`` names the gallery targets it reads (``classifier``: the frozen gallery classifier,
    ``embeddings``: the cached gallery embeddings of the training images); ``from_targets`` builds it.
    """

    name = "term"
    needs: tuple[str, ...] = ()

    @classmethod
    def from_targets(cls, targets: dict[str, Any], cfg: CompatConfig, label_smoothing: float) -> CompatTerm:
        raise NotImplementedError


class InfluenceLoss(CompatTerm):
    """BCT: CE of the *frozen gallery classifier* applied to the query embedding."""

    name = "bct"
    needs = ("classifier",)

    @classmethod
    def from_targets(cls, targets: dict[str, Any], cfg: CompatConfig, label_smoothing: float) -> InfluenceLoss:
        return cls(targets["classifier"], label_smoothing)

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


class AlignmentLoss(CompatTerm):
    """Pull the query embedding towards the cached gallery embedding of the same image (L2 or cosine)."""

    needs = ("embeddings",)

    @classmethod
    def from_targets(cls, targets: dict[str, Any], cfg: CompatConfig, label_smoothing: float) -> AlignmentLoss:
        return cls(targets["embeddings"], cfg.align)

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


class RegressionLoss(CompatTerm):
    """Asymmetric metric learning's plain regression (Budnik & Avrithis, CVPR 2021): the query embedding
    should *be* the gallery embedding of the same image, ``mean ||q - g||^2`` over the batch."""

    name = "regress"
    needs = ("embeddings",)

    def __init__(self, gallery_embeddings: torch.Tensor) -> None:
        super().__init__()
        self.gallery_embeddings = gallery_embeddings.detach().float()  # constant: an attribute, not a buffer

    @classmethod
    def from_targets(cls, targets: dict[str, Any], cfg: CompatConfig, label_smoothing: float) -> RegressionLoss:
        return cls(targets["embeddings"])

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        target = self.gallery_embeddings[index.cpu()].to(emb.device)
        return (emb.float() - target).pow(2).sum(1).mean()


class ContextualSimilarityLoss(CompatTerm):
    """Contextual similarity distillation (CSD; Wu et al., CVPR 2022).

    For each training image, the gallery model's ``k`` nearest neighbours among an anchor pool of gallery
    embeddings define a context; the query embedding's softmax similarity distribution over those
    neighbours (temperature ``t``) must match the gallery embedding's: KL(gallery || query). This keeps
    the gallery's *neighbourhood structure*, which is what asymmetric retrieval ranks by. The neighbour
    table is computed once from the cached embeddings (exact top-k, self excluded).
    Options (``compat.options.csd``): ``k`` (16), ``temperature`` (0.05), ``pool`` (4096 anchors).
    """

    name = "csd"
    needs = ("embeddings",)

    def __init__(
        self, gallery_embeddings: torch.Tensor, k: int = 16, temperature: float = 0.05, pool: int = 4096,
        seed: int = 0,
    ) -> None:
        super().__init__()
        unit = F.normalize(gallery_embeddings.detach().float(), dim=1)
        n = unit.shape[0]
        gen = torch.Generator().manual_seed(seed)
        anchors = torch.randperm(n, generator=gen)[: min(pool, n)].sort().values
        k = int(min(k, len(anchors) - 1))
        if k < 1:
            raise CmpnasError("CSD needs at least 2 gallery embeddings.", "train on more images or drop the csd term")
        self.anchor_embeddings = unit[anchors]  # [A, D]
        idx, target = [], []
        for start in range(0, n, 8192):  # chunks bound the [rows, A] score matrix
            rows = torch.arange(start, min(n, start + 8192))
            scores = unit[rows] @ self.anchor_embeddings.T
            scores.masked_fill_(anchors.unsqueeze(0) == rows.unsqueeze(1), -float("inf"))  # not itself
            top, nn_idx = scores.topk(k, dim=1)
            idx.append(nn_idx)
            target.append(F.softmax(top / temperature, dim=1))
        self.neighbour_index = torch.cat(idx)  # [N, k] rows of anchor_embeddings
        self.target = torch.cat(target)  # [N, k] the gallery's similarity distribution over its context
        self.temperature = temperature

    @classmethod
    def from_targets(
        cls, targets: dict[str, Any], cfg: CompatConfig, label_smoothing: float
    ) -> ContextualSimilarityLoss:
        opts = cfg.options.get("csd", {})
        return cls(
            targets["embeddings"],
            k=int(opts.get("k", 16)),
            temperature=float(opts.get("temperature", 0.05)),
            pool=int(opts.get("pool", 4096)),
        )

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        i = index.cpu()
        ctx = self.anchor_embeddings[self.neighbour_index[i]].to(emb.device)  # [B, k, D]
        target = self.target[i].to(emb.device)
        sims = torch.einsum("bd,bkd->bk", F.normalize(emb.float(), dim=1), ctx) / self.temperature
        return F.kl_div(F.log_softmax(sims, dim=1), target, reduction="batchmean")


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
    """Config -> weighted terms from the registry. ``independent`` gives no terms (the incompatible baseline)."""
    if cfg.mode != "bct":
        return CompatLosses([])
    targets = {"classifier": gallery_classifier, "embeddings": gallery_embeddings}
    terms: list[WeightedTerm] = []
    for name, weight in cfg.weights().items():
        if weight <= 0:
            continue
        if name not in TERMS:
            raise CmpnasError(
                f"Unknown compatibility term '{name}'.", f"use one of: {', '.join(TERMS)}"
            )
        term_cls = TERMS[name]
        for need in term_cls.needs:
            if targets[need] is None:
                raise CmpnasError(*_MISSING[need](name))
        terms.append(WeightedTerm(weight, term_cls.from_targets(targets, cfg, label_smoothing)))
    return CompatLosses(terms)


def needs_of(cfg: CompatConfig) -> set[str]:
    """Targets (``classifier``, ``embeddings``) the active terms of ``cfg`` read."""
    if cfg.mode != "bct":
        return set()
    return {need for name, w in cfg.weights().items() if w > 0 and name in TERMS for need in TERMS[name].needs}


_MISSING = {
    "classifier": lambda name: (
        "BCT needs the gallery classifier." if name == "bct" else f"The '{name}' term needs the gallery classifier.",
        "pass a gallery checkpoint with a classifier",
    ),
    "embeddings": lambda name: (
        "The alignment term needs cached gallery embeddings."
        if name == "align"
        else f"The '{name}' term needs cached gallery embeddings.",
        "compute them before training",
    ),
}

# The compatibility terms: config weight name -> term class (one line each; see docs/extending.md).
TERMS: Registry[type[CompatTerm]] = Registry(
    "compatibility term",
    {"bct": InfluenceLoss, "align": AlignmentLoss, "regress": RegressionLoss, "csd": ContextualSimilarityLoss},
)


def register_term(name: str, cls: type[CompatTerm]) -> None:
    """Add a term; its weight is ``compat.terms.<name>`` in the config."""
    TERMS.register(name, cls)
