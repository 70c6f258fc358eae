"""BCT's synthesised classifier: when the gallery checkpoint has no usable classifier for the
training classes, use the class means of gallery embeddings (over the training set) as weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmpnas.errors import CmpnasError
from cmpnas.models.classifiers import CosineClassifier


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


def synthesize_classifier(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, scale: float = 16.0
) -> CosineClassifier:
    """A cosine classifier whose class weights are gallery class means (it is frozen by the caller)."""
    w = class_mean_weights(embeddings, labels, num_classes)
    clf = CosineClassifier(w.shape[1], num_classes, scale)
    with torch.no_grad():
        clf.weight.copy_(w)
    return clf
