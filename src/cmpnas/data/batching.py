"""Batches of uint8 images and labels from any dataset (vectorised when the dataset allows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def fetch_batch(dataset: Any, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [B,C,H,W] and labels for these indices (vectorised when the dataset allows)."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    if hasattr(dataset, "__getitems__"):
        items = dataset.__getitems__(list(indices))
    else:
        items = [dataset[i] for i in indices]
    if isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], torch.Tensor):
        return items[0], items[1]
    imgs = torch.stack([it[0] for it in items])
    labels = torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)
    return imgs, labels
