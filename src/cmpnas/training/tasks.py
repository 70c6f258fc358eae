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
    (a function of the global step, so every DDP rank trains the same path), and only the path is
    updated (SPOS): parameters off the path get ``grad=None`` so momentum and weight decay leave them
    alone, and the unused channels of a partly used (sliced) weight are put back after the step, momentum
    buffer included, so weight decay and momentum do not move them through their zero gradients.

    A sampler may return a list of paths for a step (the sandwich rule: the space's widest path first): their
    losses are summed (the step's logged loss is that sum) into one update of the union of their weights. With
    ``inplace_distill`` the paths after the first learn their own classifier's output from the first path's (KL
    to its detached softmax, BigNAS's in-place distillation) instead of from the labels; the compatibility terms
    stay on every path.
    """

    def __init__(
        self,
        model: nn.Module,
        compat: CompatLosses,
        label_smoothing: float = 0.0,
        arch_sampler: Callable[[int], Any] | None = None,
        inplace_distill: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.compat = compat
        self.label_smoothing = label_smoothing
        self.arch_sampler = arch_sampler
        self.inplace_distill = inplace_distill
        self.dynamic_graph = arch_sampler is not None
        self._archs: list[Any] = []
        self._saved: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

    def train(self, mode: bool = True) -> CompatTask:
        super().train(mode)
        self.compat.train(mode)  # frozen gallery parts keep themselves in eval mode
        return self

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict]:
        if self.arch_sampler is None:
            loss, logs, _ = self._loss(self.model(x), y, index)
            return loss, logs
        drawn = self.arch_sampler(step)
        self._archs = drawn if isinstance(drawn, list) else [drawn]
        losses, logs, teacher = [], {}, None
        for i, arch in enumerate(self._archs):
            loss, path_logs, logits = self._loss(self.model(x, arch), y, index, teacher)
            losses.append(loss)
            if self.inplace_distill and i == 0:
                teacher = logits.detach()
            if i == len(self._archs) // 2:  # the logs follow the in-band path (a sandwich's middle one)
                logs = path_logs
        if len(self._archs) > 1:
            logs["paths"] = len(self._archs)
        return torch.stack(losses).sum(), logs

    def _loss(
        self,
        emb: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor,
        teacher: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict, torch.Tensor]:
        logits = classifier_logits(self.model.classifier, emb, y).float()
        if teacher is None:
            own = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        else:
            own = F.kl_div(F.log_softmax(logits, 1), F.softmax(teacher, 1), reduction="batchmean")
        extra, logs = self.compat(emb.float(), y, index)
        logs["loss_own"] = float(own.detach())
        logs["acc"] = float((logits.argmax(1) == y).float().mean())
        return own + extra, logs, logits

    def after_backward(self) -> None:
        if self.arch_sampler is None:
            return
        for p in self.model.parameters():
            if p.grad is not None and not torch.any(p.grad):
                p.grad = None

    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Remember the unused channels of the path's sliced weights and their optimizer state."""
        self._saved = []
        if self.arch_sampler is None:
            return
        masks: dict[nn.Parameter, torch.Tensor] = {}
        for arch in self._archs:
            for p, used in self.model.path_slices(arch):
                if p.grad is None:
                    continue
                mask = masks.setdefault(p, torch.zeros_like(p, dtype=torch.bool))
                mask[used] = True
        for p, mask in masks.items():
            if bool(mask.all()):
                continue
            state = {
                k: v.clone()
                for k, v in optimizer.state.get(p, {}).items()
                if isinstance(v, torch.Tensor) and v.shape == p.shape
            }
            self._saved.append((p, mask, p.detach().clone(), state))

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Put back the unused channels (values and optimizer state such as the momentum buffer)."""
        for p, mask, before, state in self._saved:
            p.copy_(torch.where(mask, p, before))
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    old = state.get(key, torch.zeros_like(value))
                    value.copy_(torch.where(mask, value, old))
        self._saved = []
