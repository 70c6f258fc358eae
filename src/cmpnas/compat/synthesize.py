"""BCT's synthesised classifier: when the gallery checkpoint has no usable classifier for the
training classes, use the class means of gallery embeddings (over the training set) as weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmpnas.errors import CmpnasError
from cmpnas.models.classifiers import CosineClassifier, LinearClassifier


def class_mean_weights(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, D] mean of the L2-normalised embeddings of each class."""
    emb = F.normalize(embeddings.float(), dim=1)
    counts = torch.bincount(labels, minlength=num_classes).float()
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise CmpnasError(
            f"Classes {missing[:5]} have no training images; cannot synthesise their classifier rows.",
            "make sure every training class has images",
        )
    sums = torch.zeros(num_classes, emb.shape[1]).index_add_(0, labels, emb)
    return sums / counts[:, None]


def extend_classifier(
    old: nn.Module,
    old_names: Sequence[str],
    new_names: Sequence[str],
    embeddings: torch.Tensor,
    labels: torch.Tensor,
) -> nn.Module:
    """BCT for new classes: the old classifier's rows for the classes it knows, class means for the rest.

    Rows follow ``new_names`` (the training data's label order); ``embeddings``/``labels`` are the gallery
    embeddings of the training images and their labels in that order. A cosine classifier gets the
    class-mean directions; a linear one gets them scaled to the old rows' mean norm, with the old
    biases' mean, so new logits live on the old logits' scale.
    """
    index = {name: i for i, name in enumerate(old_names)}
    keep = [(j, index[n]) for j, n in enumerate(new_names) if n in index]
    fresh = [j for j, n in enumerate(new_names) if n not in index]
    means = class_mean_weights(embeddings, labels, len(new_names)) if fresh else None
    weight = old.weight.detach()
    if isinstance(old, CosineClassifier):
        out: nn.Module = CosineClassifier(weight.shape[1], len(new_names), old.scale)
        rows = F.normalize(weight, dim=1)
        with torch.no_grad():
            for j, i in keep:
                out.weight[j] = rows[i]
            for j in fresh:
                out.weight[j] = F.normalize(means[j], dim=0)
        return out
    if isinstance(old, nn.Linear):
        out = LinearClassifier(weight.shape[1], len(new_names), bias=old.bias is not None)
        norm = weight.norm(dim=1).mean()
        with torch.no_grad():
            for j, i in keep:
                out.weight[j] = weight[i]
                if old.bias is not None:
                    out.bias[j] = old.bias[i]
            for j in fresh:
                out.weight[j] = F.normalize(means[j], dim=0) * norm
                if old.bias is not None:
                    out.bias[j] = old.bias.detach().mean()
        return out
    raise CmpnasError(
        f"Cannot extend a {type(old).__name__} to new classes.", "set compat.gallery_classifier: synthesized"
    )


def synthesize_classifier(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, scale: float = 16.0
) -> CosineClassifier:
    """A cosine classifier whose class weights are gallery class means (it is frozen by the caller)."""
    w = class_mean_weights(embeddings, labels, num_classes)
    clf = CosineClassifier(w.shape[1], num_classes, scale)
    with torch.no_grad():
        clf.weight.copy_(w)
    return clf
