"""Embedding a whole dataset with a model, in order (the one implementation every floor above uses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cmpnas.data.batching import fetch_batch
from cmpnas.data.transforms import normalize_batch
from cmpnas.devices import resolve_precision


@torch.inference_mode()
def embed(
    model: nn.Module,
    dataset: Any,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 512,
    forward: Any = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Embeddings [N, D] (float32, un-normalised) of a whole dataset, in order.

    ``precision="bf16"`` runs the forward under bf16 autocast (faster on CPUs with native bf16,
    ``"auto"`` uses it only there); used for cached training targets, not for reported metrics.
    """
    spec = getattr(model, "spec", None)
    mean = mean if mean is not None else spec.mean
    std = std if std is not None else spec.std
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    out = []
    n = len(dataset)
    for start in range(0, n, batch_size):
        imgs, _ = fetch_batch(dataset, list(range(start, min(n, start + batch_size))))
        x = normalize_batch(imgs.to(device), mean, std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out.append((forward or model)(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def labels_of(dataset: Any) -> torch.Tensor:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(labels, dtype=torch.int64)
