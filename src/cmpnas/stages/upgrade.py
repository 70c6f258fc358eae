"""Stages of a gallery-model upgrade: ``upgrade-gallery`` (a new gallery model trained compatible with the old
one), ``train-transformation`` (FCT: old embeddings -> new space, when the new model is not compatible) and
``evaluate-upgrade`` (the BCT paper's compatibility table and the backfill curve).

A new gallery model is trained like a query model, against the frozen old gallery model: its own classifier
plus BCT's influence loss through the old classifier (for classes the old model never saw, the old rows are kept
and the new rows are old-model class means, :func:`cmpnas.compat.targets.classifier_plan`). It records the old
model's fingerprint (``compatible_with``): that is its lineage, and what lets an index built by the old model
take its embeddings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmpnas import progress
from cmpnas.compat.backfill_order import ORDERS, backfill_order, label_rows
from cmpnas.compat.targets import gallery_train_embeddings
from cmpnas.compat.transformation import (
    TransformationSpec,
    fit_transformation,
    load_transformation,
    save_transformation,
)
from cmpnas.compat.transition import POLICIES, dual_vectors
from cmpnas.config import Config
from cmpnas.data.base import DataBundle
from cmpnas.distributed import init_distributed
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.evaluate import LeaveOneOut, evaluate_embeddings
from cmpnas.evaluation.flips import flip_rates, top1_hits
from cmpnas.io import write_json_atomic, write_text_atomic
from cmpnas.manifest import write_manifest
from cmpnas.models.embedding import EmbeddingModel, fingerprint
from cmpnas.models.inference import embed, labels_of
from cmpnas.stages.common import StageResult, check_gallery, load_data
from cmpnas.stages.query import train_query

TRANSFORMATION_FILE = "transformation.safetensors"
FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def upgrade_gallery(
    cfg: Config,
    old_gallery: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    data: DataBundle | None = None,
    independent: bool = False,
) -> StageResult:
    """Train the new gallery model (``cfg.gallery`` on ``cfg.gallery_train``) with ``cfg.compat`` against the
    frozen ``old_gallery``; ``independent`` trains it without the compatibility term (the control: its
    embeddings should not be comparable with the old ones)."""
    compat = cfg.compat.model_copy(update={"mode": "independent"}) if independent else cfg.compat
    if compat.mode == "independent" and not independent:
        raise CmpnasError(
            "upgrade-gallery with compat.mode: independent makes a model the old index cannot take.",
            "set compat.mode: bct (or pass --independent to train the control on purpose)",
        )
    return train_query(
        cfg,
        old_gallery,
        out_dir,
        resume=resume,
        data=data,
        model_cfg=cfg.gallery,
        compat=compat,
        train_cfg=cfg.gallery_train,
        name="gallery",
        stage="upgrade-gallery",
    )


def train_transformation(
    cfg: Config,
    old_gallery: str | Path,
    new_gallery: str | Path,
    out_dir: str | Path,
    *,
    data: DataBundle | None = None,
    epochs: int = 30,
    hidden: int = 512,
) -> StageResult:
    """Fit the FCT transformation on both models' embeddings of the training images (cached per model)."""
    started = time.time()
    data = data or load_data(cfg)
    out = Path(out_dir)
    pairs = []
    for path in (old_gallery, new_gallery):
        model = check_gallery(path, data)
        pairs.append((model, gallery_train_embeddings(model, data, Path(path).parent / "cache")))
    (old, old_emb), (new, new_emb) = pairs
    if old.spec.embed_dim != new.spec.embed_dim:
        raise CmpnasError(
            f"The old model embeds into {old.spec.embed_dim} dims, the new one into {new.spec.embed_dim}.",
            "fit the transformation between models of the same embedding dim",
        )
    spec = TransformationSpec(fingerprint(old), fingerprint(new), old.spec.embed_dim, hidden)
    if spec.old_fingerprint == spec.new_fingerprint:
        raise CmpnasError(
            f"--old and --new are the same model ({spec.old_fingerprint}): there is nothing to transform.",
            "pass the new gallery model as --new",
        )
    fct, fit = fit_transformation(old_emb, new_emb, spec, epochs=epochs, seed=cfg.gallery_train.seed)
    outputs = {"transformation": TRANSFORMATION_FILE, "old": spec.old_fingerprint, "new": spec.new_fingerprint, **fit}
    if init_distributed().is_main:
        save_transformation(fct, out / TRANSFORMATION_FILE)
        inputs = {"old": str(old_gallery), "new": str(new_gallery), "data": data.describe()}
        write_manifest(out, "train-transformation", cfg.model_dump(mode="json"), inputs, outputs, started)
    progress.event(
        "transformation",
        message=f"FCT {spec.old_fingerprint} -> {spec.new_fingerprint}: train cosine "
        f"{fit['train_cosine_identity']:.3f} (identity) -> {fit['train_cosine']:.3f}",
    )
    return StageResult("train-transformation", out, outputs)


def evaluate_upgrade(
    cfg: Config,
    old_gallery: str | Path,
    new_gallery: str | Path,
    out_dir: str | Path | None,
    *,
    small: str | Path | None = None,
    independent: str | Path | None = None,
    transformation: str | Path | None = None,
    data: DataBundle | None = None,
    split: str = "test",
    fractions: Sequence[float] = FRACTIONS,
    seed: int = 0,
) -> StageResult:
    """The compatibility table and the backfill curve on a split (leave-one-out retrieval).

    Table rows M(query model, gallery model): (old, old), (new, new), (new, old); with ``small`` (a query model
    trained against the old gallery) (small, old), (small, new); with ``independent`` (the control, trained
    without the compat term) (indep, indep), (indep, old); with ``transformation`` (new, FCT(old)). The curve:
    the gallery re-embedded by the new model in each order (:data:`cmpnas.compat.backfill_order.ORDERS`), from
    0 % to 100 %, under each query policy (:data:`cmpnas.compat.transition.POLICIES`).
    """
    data = data or load_data(cfg)
    if split not in ("test", "val"):
        raise CmpnasError(f"Unknown split '{split}'.", "use test or val")
    dataset = data.test if split == "test" else data.val
    protocol = LeaveOneOut(dataset)
    models: dict[str, EmbeddingModel] = {"old": check_gallery(old_gallery, data), "new": check_gallery(new_gallery, data)}
    if small is not None:
        models["small"] = check_gallery(small, data)
    if independent is not None:
        models["independent"] = check_gallery(independent, data)
    emb = {name: embed(m, dataset, batch_size=cfg.eval_batch_size) for name, m in models.items()}
    pairs = [("old", "old"), ("new", "new"), ("new", "old")]
    pairs += [("small", "old"), ("small", "new")] if small is not None else []
    pairs += [("independent", "independent"), ("independent", "old")] if independent is not None else []
    if transformation is not None:  # FCT maps the old embeddings into the new (or the control's) space
        fct = load_transformation(transformation)
        target = next(
            (n for n in ("new", "independent") if n in models and fingerprint(models[n]) == fct.spec.new_fingerprint),
            None,
        )
        if target is None or fct.spec.old_fingerprint != fingerprint(models["old"]):
            raise CmpnasError(
                f"The transformation maps {fct.spec.old_fingerprint} -> {fct.spec.new_fingerprint}, which is not "
                "the old model into the new one or the control.",
                "fit it between --old and --new (or --independent)",
            )
        emb["fct(old)"] = torch.from_numpy(fct.apply_numpy(torch.nn.functional.normalize(emb["old"], dim=1).numpy()))
        pairs.append((target, "fct(old)"))
    labels = labels_of(dataset)
    reference = top1_hits(emb["old"], emb["old"], labels)  # what users get today: M(old, old), query by query
    table = [
        {
            "query": q,
            "gallery": g,
            **_headline(evaluate_embeddings(emb[q], emb[g], protocol)),
            **flip_rates(reference, top1_hits(emb[q], emb[g], labels)),
        }
        for q, g in pairs
    ]
    top1 = {(r["query"], r["gallery"]): r["top1"] for r in table}
    criterion = {
        name: {
            "cross": top1[(name, "old")],
            "old": top1[("old", "old")],
            "compatible": top1[(name, "old")] > top1[("old", "old")],
        }
        for name in ("new", "independent")
        if (name, "old") in top1
    }
    curve = backfill_curve(models["new"], emb["old"], emb["new"], data, dataset, fractions, seed)
    curve_summary = {
        order: {
            "auc_top1": curve_area(points),
            "min_top1": min(p["top1"] for p in points),
            "max_negative_flips": max(p["negative_flips"] for p in points),
            "never_below_old": min(p["top1"] for p in points) >= top1[("old", "old")],
        }
        for order, points in curve.items()
    }
    res: dict[str, Any] = {
        "split": split,
        "n_images": len(dataset),
        "models": {name: {"fingerprint": fingerprint(m), "compatible_with": m.spec.compatible_with} for name, m in models.items()},
        "table": table,
        "bct_criterion": criterion,
        "flips_against": "old/old",
        "backfill_curve": curve,
        "backfill_summary": curve_summary,
    }
    if out_dir is not None and init_distributed().is_main:
        write_json_atomic(Path(out_dir) / "results.json", res)
        write_text_atomic(Path(out_dir) / "results.md", upgrade_markdown(res))
    for name, c in criterion.items():
        verdict = "compatible" if c["compatible"] else "NOT compatible"
        progress.event("evaluate", message=f"M({name}, old) {c['cross']:.2f} vs M(old, old) {c['old']:.2f}: {verdict}")
    return StageResult("evaluate-upgrade", None if out_dir is None else Path(out_dir), res)


def curve_name(order: str, policy: str) -> str:
    """The key of one backfill curve: the order, and the query policy when it is not the default ``new``."""
    return order if policy == "new" else f"{order}, {policy} query"


def backfill_curve(
    new_model: EmbeddingModel,
    old_emb: torch.Tensor,
    new_emb: torch.Tensor,
    data: DataBundle,
    dataset: Any,
    fractions: Sequence[float],
    seed: int = 0,
) -> dict[str, list[dict[str, float]]]:
    """Per order and query policy (:mod:`cmpnas.compat.transition`), the metrics against a gallery whose first
    ``f`` of items (in that order) are re-embedded by the new model — the same order
    :func:`cmpnas.serving.backfill.backfill` uses — with the negative and positive flips against M(old, old) at
    every point. The items are their own queries (leave-one-out), so the old model's query embeddings are
    ``old_emb``."""
    old_n = torch.nn.functional.normalize(old_emb.float(), dim=1)
    labels = labels_of(dataset)
    reference = top1_hits(old_emb, old_emb, labels)
    names = [str(data.class_names[int(y)]) for y in labels]
    rows = new_model.classifier.weight.detach().float().numpy()
    protocol = LeaveOneOut(dataset)
    out: dict[str, list[dict[str, float]]] = {}
    for policy in POLICIES:
        for order in ORDERS:
            perm = backfill_order(
                old_n.numpy(), order, class_rows=rows, labels=label_rows(names, new_model.spec.class_names), seed=seed
            )
            points = []
            for f in fractions:
                backfilled = np.zeros(len(perm), dtype=bool)
                backfilled[perm[: int(round(f * len(perm)))]] = True
                if policy == "dual":
                    query, gallery = dual_vectors(old_emb, new_emb, old_emb, new_emb, backfilled)
                else:
                    query, gallery = new_emb, torch.where(torch.from_numpy(backfilled)[:, None], new_emb, old_emb)
                points.append(
                    {
                        "fraction": float(f),
                        **_headline(evaluate_embeddings(query, gallery, protocol)),
                        **flip_rates(reference, top1_hits(query, gallery, labels)),
                    }
                )
            out[curve_name(order, policy)] = points
    return out


def curve_area(points: Sequence[dict[str, float]]) -> float:
    """Mean top-1 over the backfill (trapezoid rule over the fractions): one number for a whole transition."""
    from scipy.integrate import trapezoid

    f = [p["fraction"] for p in points]
    t = [p["top1"] for p in points]
    if len(f) < 2 or f[-1] == f[0]:
        return sum(t) / len(t)
    return float(trapezoid(t, f) / (f[-1] - f[0]))


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in ("top1", "top5", "map") if k in metrics}


def upgrade_markdown(res: dict[str, Any]) -> str:
    """The compatibility table and the backfill curve as Markdown (split and size stated)."""
    md = [
        f"Compatibility table ({res['split']} split, {res['n_images']} images, leave-one-out retrieval), "
        "M(query model, gallery model):",
        "",
        "| query | gallery | top-1 | mAP | negative flips vs old/old | positive flips |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['query']} | {r['gallery']} | {r['top1']:.1f} | {r.get('map', float('nan')):.1f} | "
        f"{r['negative_flips']:.2f} % | {r['positive_flips']:.2f} % |"
        for r in res["table"]
    ]
    for name, c in res["bct_criterion"].items():
        verdict = "holds" if c["compatible"] else "does not hold"
        md.append(f"\nBCT criterion M({name}, old) > M(old, old): {c['cross']:.1f} vs {c['old']:.1f} — {verdict}.")
    md += [
        "",
        "Backfill curve (top-1 / negative flips vs old/old by fraction of the gallery re-embedded; queries by the "
        "new model, or by both models merged by cosine where it says dual query):",
        "",
    ]
    orders = list(res["backfill_curve"])
    md += ["| fraction | " + " | ".join(orders) + " |", "|---" * (len(orders) + 1) + "|"]
    points = res["backfill_curve"][orders[0]]
    for i, p in enumerate(points):
        cells = [
            f"{res['backfill_curve'][o][i]['top1']:.1f} / {res['backfill_curve'][o][i]['negative_flips']:.2f} %"
            for o in orders
        ]
        md.append(f"| {p['fraction']:.0%} | " + " | ".join(cells) + " |")
    for order, s in res.get("backfill_summary", {}).items():
        below = "never below M(old, old)" if s["never_below_old"] else "drops below M(old, old)"
        md.append(
            f"\n{order}: mean top-1 over the backfill {s['auc_top1']:.1f}, lowest {s['min_top1']:.1f} ({below}); "
            f"most negative flips {s['max_negative_flips']:.2f} %."
        )
    return "\n".join(md) + "\n"
