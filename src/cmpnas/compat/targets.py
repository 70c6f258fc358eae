"""What the compatibility terms are computed against: the gallery side, built once per stage.

The frozen gallery classifier (or BCT's synthesised class-mean classifier when the gallery lacks
classes) and the gallery model's embeddings of the training images (cached on disk per gallery).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cmpnas import progress
from cmpnas.compat.losses import CompatLosses, build_compat_losses, needs_of
from cmpnas.compat.synthesize import synthesize_classifier
from cmpnas.config import CompatConfig, Config
from cmpnas.data.base import DataBundle
from cmpnas.distributed import init_distributed
from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_path
from cmpnas.models.embedding import EmbeddingModel, fingerprint
from cmpnas.models.inference import embed, labels_of


def gallery_train_embeddings(
    gallery: EmbeddingModel,
    data: DataBundle,
    cache_dir: Path | None,
    batch_size: int = 512,
    precision: str = "fp32",
) -> torch.Tensor:
    """Gallery embeddings of the (un-augmented) training images, cached per gallery fingerprint."""
    fp = fingerprint(gallery)
    path = cache_dir / f"train_embeddings_{fp}_{len(data.train)}_{precision}.pt" if cache_dir else None
    cached = _read_cache(path) if path is not None and path.exists() else None
    if cached is not None and cached.shape[0] == len(data.train):
        return cached
    emb = embed(gallery, data.train, batch_size=batch_size, precision=precision)
    if path is not None and init_distributed().is_main:
        with atomic_path(path) as tmp:
            torch.save(emb, tmp)
    return emb


def _read_cache(path: Path) -> torch.Tensor | None:
    """A cached tensor, or None when the file is unreadable: a cache is recomputed (and rewritten), not refused."""
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable cache file means the same: compute it again
        cached = None
    if isinstance(cached, torch.Tensor):
        return cached
    progress.event("cache", message=f"unreadable cache '{path}' (truncated or corrupt): computing it again")
    return None


def gallery_classifier_for(
    gallery: EmbeddingModel, data: DataBundle, compat: CompatConfig, train_emb: torch.Tensor | None
) -> nn.Module:
    """The frozen classifier BCT uses: the gallery's own, or BCT's synthesised class means."""
    covers = gallery.spec.num_classes == data.num_classes
    choice = compat.gallery_classifier
    if choice == "trained" and not covers:
        raise CmpnasError(
            f"The gallery classifier has {gallery.spec.num_classes} classes but the data has {data.num_classes}.",
            "set compat.gallery_classifier: synthesized (BCT's class-mean classifier)",
        )
    if choice == "trained" or (choice == "auto" and covers):
        return gallery.classifier
    if train_emb is None:
        train_emb = embed(gallery, data.train)
    return synthesize_classifier(
        train_emb, labels_of(data.train), data.num_classes, gallery.spec.cosine_scale
    )


def compat_losses_for(
    cfg: Config,
    gallery: EmbeddingModel,
    gallery_path: str | Path,
    data: DataBundle,
    compat: CompatConfig,
    label_smoothing: float,
) -> CompatLosses:
    """The compatibility terms of a query or supernet stage; gallery embeddings only when a term needs them."""
    synthesize = (
        compat.mode == "bct"
        and compat.gallery_classifier != "trained"
        and gallery.spec.num_classes != data.num_classes
    )
    needs_emb = "embeddings" in needs_of(compat) or synthesize
    train_emb = (
        gallery_train_embeddings(
            gallery, data, Path(gallery_path).parent / "cache", precision=cfg.gallery_train.precision
        )
        if needs_emb
        else None
    )
    classifier = gallery_classifier_for(gallery, data, compat, train_emb) if compat.mode == "bct" else None
    return build_compat_losses(compat, classifier, train_emb, label_smoothing)
