"""Cheap candidate evaluation for the search: the design that makes evolution affordable.

The gallery model embeds the held-out split **once**; calibration batches are fixed and cached.
Each candidate then costs one BN recalibration and one query-model pass over the held-out images,
and both homogeneous M(q,q) and heterogeneous M(q,g) come from that one pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cmpnas.data.base import stratified_subset
from cmpnas.data.batching import fetch_batch
from cmpnas.data.transforms import normalize_batch
from cmpnas.evaluation.compare import score_settings
from cmpnas.evaluation.retrieval import retrieval_metrics
from cmpnas.models.classifiers import classifier_logits
from cmpnas.nas.bn_recalibration import make_calibration_batches, recalibrate_bn
from cmpnas.nas.supernet import SupernetEmbedding


def load_normalized(
    dataset: Any, n: int | None, mean: Any, std: Any, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of a dataset, drawn stratified by class (seeded), as one normalised float tensor (+ labels).

    Not the first ``n``: folder and CSV data are sorted by class, so a prefix would hold a few classes only.
    """
    if n is None or n >= len(dataset):
        rows = list(range(len(dataset)))
    else:
        rows = sorted(int(i) for i in stratified_subset(dataset.labels, n, seed))
    imgs, labels = fetch_batch(dataset, rows)
    return normalize_batch(imgs, mean, std).contiguous(memory_format=torch.channels_last), labels


@dataclass
class CandidateEvaluator:
    """Callable: arch -> {"hom_top1", "het_top1", "hom_map", "het_map", "cls_top1"} (percent).

    ``cls_top1`` is the supernet's own classifier on the path's embedding: the plainest sign that a path learned.
    """

    supernet: SupernetEmbedding
    calib_batches: list[torch.Tensor]
    val_images: torch.Tensor
    val_labels: torch.Tensor
    gallery_val_emb: (
        torch.Tensor | None
    )  # None = re-embed with `gallery_model` per candidate (benchmark only)
    gallery_model: Any = None
    batch_size: int = 1000
    timings: dict[str, float] = field(
        default_factory=lambda: {"recalibration": 0.0, "query_pass": 0.0, "gallery_pass": 0.0, "metric": 0.0}
    )
    n_evaluated: int = 0

    @torch.inference_mode()
    def _embed(self, fn: Any) -> torch.Tensor:
        return torch.cat(
            [
                fn(self.val_images[i : i + self.batch_size]).float()
                for i in range(0, len(self.val_images), self.batch_size)
            ]
        )

    def __call__(self, arch: dict) -> dict[str, float | None]:
        t0 = time.perf_counter()
        recalibrate_bn(self.supernet, self.calib_batches, forward=lambda x: self.supernet(x, arch))
        t1 = time.perf_counter()
        self.supernet.eval()
        q = self._embed(lambda x: self.supernet(x, arch))
        t2 = time.perf_counter()
        g = self.gallery_val_emb
        if g is None:
            g = self._embed(self.gallery_model)
        t3 = time.perf_counter()
        labels = self.val_labels
        scored = score_settings(
            {"query": (q, q), "gallery": (None, g)},
            lambda qs, gs: retrieval_metrics(qs, labels, gs, labels, exclude_self=True, ks=(1,)),
            only=("homogeneous", "heterogeneous"),
        )
        hom, het = scored["homogeneous"], scored["heterogeneous"]
        with torch.inference_mode():
            logits = classifier_logits(self.supernet.classifier, q, None)
        # an open-set split's classes are not the classifier's: it is only scored on classes it was trained on
        seen = labels < logits.shape[1]
        cls_top1 = (
            100.0 * float((logits[seen].argmax(1) == labels[seen]).float().mean()) if bool(seen.any()) else None
        )
        t4 = time.perf_counter()
        for k, dt in zip(
            ("recalibration", "query_pass", "gallery_pass", "metric"),
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3),
            strict=True,
        ):
            self.timings[k] += dt
        self.n_evaluated += 1
        return {
            "hom_top1": round(hom["top1"], 4),
            "het_top1": round(het["top1"], 4),
            "hom_map": round(hom["map"], 4),
            "het_map": round(het["map"], 4),
            "cls_top1": round(cls_top1, 4) if cls_top1 is not None else None,
        }


def build_evaluator(
    supernet: SupernetEmbedding,
    gallery: Any,
    data: Any,
    recal_images: int,
    recal_batch: int,
    val_images: int | None,
    seed: int,
    cache_gallery: bool = True,
) -> CandidateEvaluator:
    train_x, _ = load_normalized(
        data.train, min(len(data.train), max(recal_images * 4, recal_images)), data.mean, data.std, seed
    )
    calib = [
        b.contiguous(memory_format=torch.channels_last)
        for b in make_calibration_batches(train_x, recal_images, recal_batch, seed)
    ]
    val_x, val_y = load_normalized(data.val, val_images, data.mean, data.std, seed)
    ev = CandidateEvaluator(supernet, calib, val_x, val_y, None, gallery_model=gallery.eval())
    if cache_gallery:
        ev.gallery_val_emb = ev._embed(gallery)
    return ev
