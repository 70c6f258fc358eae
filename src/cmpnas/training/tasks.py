"""Training tasks: what a stage optimises. The loop calls ``task(x, y, index, step)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmpnas.compat.losses import CompatLosses
from cmpnas.models.classifiers import classifier_logits


class ClassificationTask(nn.Module):
    """Gallery training: the model's own classifier, cross-entropy with label smoothing."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict]:
        # margin classifiers (ArcFace / CosFace) need the labels; their accuracy is then a lower bound
        logits = classifier_logits(self.model.classifier, self.model(x), y).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, {"acc": float((logits.argmax(1) == y).float().mean())}


class CompatTask(nn.Module):
    """Query / supernet training: own CE + weighted compatibility terms (BCT influence, alignment).

    With ``arch_sampler`` the model is a supernet: each step runs the path ``arch_sampler(step)``
    (a function of the global step, so every DDP rank trains the same path), and parameters off
    the path get ``grad=None`` so momentum and weight decay leave them alone (SPOS).
    """

    def __init__(
        self,
        model: nn.Module,
        compat: CompatLosses,
        label_smoothing: float = 0.0,
        arch_sampler: Callable[[int], Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.compat = compat
        self.label_smoothing = label_smoothing
        self.arch_sampler = arch_sampler
        self.dynamic_graph = arch_sampler is not None

    def train(self, mode: bool = True) -> CompatTask:
        super().train(mode)
        self.compat.train(mode)  # frozen gallery parts keep themselves in eval mode
        return self

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict]:
        if self.arch_sampler is not None:
            emb = self.model(x, self.arch_sampler(step))
        else:
            emb = self.model(x)
        logits = classifier_logits(self.model.classifier, emb, y).float()
        own = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        extra, logs = self.compat(emb.float(), y, index)
        logs["loss_own"] = float(own.detach())
        logs["acc"] = float((logits.argmax(1) == y).float().mean())
        return own + extra, logs

    def after_backward(self) -> None:
        if self.arch_sampler is None:
            return
        for p in self.model.parameters():
            if p.grad is not None and not torch.any(p.grad):
                p.grad = None
