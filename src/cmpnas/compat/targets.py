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
from cmpnas.compat.synthesize import extend_classifier, synthesize_classifier
from cmpnas.config import CompatConfig, Config
from cmpnas.data.base import DataBundle
from cmpnas.devices import resolve_precision
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
    """Gallery embeddings of the (un-augmented) training images, cached per gallery model and training split.

    The key holds the split's content fingerprint: another subset or ``data.seed`` of the same size must
    not reuse the embeddings of other images.
    """
    fp = fingerprint(gallery)
    precision = resolve_precision(precision, next(gallery.parameters()).device)
    key = f"{fp}_{data.train_fingerprint()}_{precision}"
    path = cache_dir / f"train_embeddings_{key}.pt" if cache_dir else None
    cached = _read_cache(path) if path is not None and path.exists() else None
    if cached is not None and cached.shape[0] == len(data.train):
        return cached
    emb = embed(gallery, data.train, batch_size=batch_size, precision=precision)
    if path is not None and init_distributed().is_main:
        with atomic_path(path) as tmp:
            torch.save(emb, tmp)
    return emb


def classifier_plan(gallery: EmbeddingModel, data: DataBundle, compat: CompatConfig) -> str:
    """How BCT gets its frozen classifier: ``trained`` (the gallery's own, as is), ``extended`` (its rows for
    the classes it knows, class means for new ones, rows in the data's label order) or ``synthesized``
    (class means for every class). Refuses a gallery whose classes the data does not contain."""
    choice = compat.gallery_classifier
    if choice == "synthesized":
        return "synthesized"
    old, new = gallery.spec.class_names, [str(c) for c in data.class_names]
    if old is None:  # a model that did not record its classes: only the counts can be compared
        covers = gallery.spec.num_classes == data.num_classes
        if choice == "trained" and not covers:
            raise CmpnasError(
                f"The gallery classifier has {gallery.spec.num_classes} classes but the data has {data.num_classes}.",
                "set compat.gallery_classifier: synthesized (BCT's class-mean classifier)",
            )
        return "trained" if covers else "synthesized"
    missing = [n for n in old if n not in set(new)]
    if missing:
        raise CmpnasError(
            f"The gallery model was trained on classes {_names(old)} but the data has {_names(new)} "
            f"({_names(missing)} missing): the gallery classifier's rows would score other classes.",
            "train the query model on the gallery's classes (or a superset of them), or set "
            "compat.gallery_classifier: synthesized",
        )
    if list(old) == new:
        return "trained"
    if choice == "trained":
        raise CmpnasError(
            f"The gallery classifier has {len(old)} classes but the data has {len(new)}.",
            "set compat.gallery_classifier: synthesized (BCT's class-mean classifier) or auto",
        )
    return "extended"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    return f"[{shown}]"


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
    """The frozen classifier BCT uses (see :func:`classifier_plan`)."""
    plan = classifier_plan(gallery, data, compat)
    if plan == "trained":
        return gallery.classifier
    if train_emb is None:
        train_emb = embed(gallery, data.train)
    labels = labels_of(data.train)
    if plan == "extended":
        return extend_classifier(
            gallery.classifier, gallery.spec.class_names or [], [str(c) for c in data.class_names], train_emb, labels
        )
    return synthesize_classifier(train_emb, labels, data.num_classes, gallery.spec.cosine_scale)


def compat_losses_for(
    cfg: Config,
    gallery: EmbeddingModel,
    gallery_path: str | Path,
    data: DataBundle,
    compat: CompatConfig,
    label_smoothing: float,
) -> CompatLosses:
    """The compatibility terms of a query or supernet stage; gallery embeddings only when a term needs them."""
    synthesize = compat.mode == "bct" and classifier_plan(gallery, data, compat) != "trained"
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
