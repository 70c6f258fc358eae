"""Stage functions (library API; the CLI and `cmpnas run` call these).

Each stage writes into its own folder: ``model.safetensors``, ``config.yaml``, ``manifest.json``,
``metrics.jsonl`` and ``checkpoint.pt``. Only rank 0 writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmpnas import progress
from cmpnas.compat.losses import CompatLosses, build_compat_losses
from cmpnas.compat.synthesize import synthesize_classifier
from cmpnas.config import CompatConfig, Config, ModelConfig, TrainConfig, dump_config
from cmpnas.data.base import DataBundle
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.evaluate import LeaveOneOut, embed, labels_of, three_way
from cmpnas.io import write_json_atomic, write_text_atomic
from cmpnas.manifest import write_manifest
from cmpnas.models.cost import count_macs
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint, load_model, save_model
from cmpnas.training.distributed import barrier, init_distributed
from cmpnas.training.loop import TrainResult, train
from cmpnas.training.tasks import ClassificationTask, CompatTask

MODEL_FILE = "model.safetensors"


def load_data(cfg: Config) -> DataBundle:
    from cmpnas.data.factory import build_data

    return build_data(cfg.data)


def make_spec(
    mcfg: ModelConfig, data: DataBundle, name: str, compatible_with: str | None = None
) -> ModelSpec:
    return ModelSpec(
        backbone=mcfg.backbone,
        embed_dim=mcfg.embed_dim,
        num_classes=data.num_classes,
        classifier=mcfg.classifier,
        cosine_scale=mcfg.cosine_scale,
        margin=mcfg.margin,
        backbone_kwargs=dict(mcfg.backbone_kwargs),
        arch=mcfg.arch,
        in_chans=data.in_chans,
        input_size=data.image_size,
        mean=list(data.mean),
        std=list(data.std),
        compatible_with=compatible_with,
        name=name,
    )


def _train_summary(result: TrainResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "epochs": round(result.epochs, 3),
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from_step,
        "gflops_per_second": None if result.gflops_per_second is None else round(result.gflops_per_second, 2),
    }


def _finish(
    out: Path,
    stage: str,
    model: EmbeddingModel,
    cfg_dump: dict,
    inputs: dict,
    result: TrainResult,
    started: float,
    extra_outputs: dict | None = None,
) -> dict[str, Any]:
    info = init_distributed()
    outputs: dict[str, Any] = {}
    if info.is_main:
        fp = save_model(model, out / MODEL_FILE)
        outputs = {
            "model": MODEL_FILE,
            "fingerprint": fp,
            "macs": count_macs(model, model.input_shape(1)),
            "params": sum(p.numel() for p in model.parameters()),
            "train": _train_summary(result),
            **(extra_outputs or {}),
        }
        write_manifest(out, stage, cfg_dump, inputs, outputs, started)
    barrier(info)
    return outputs


def write_config(out: Path, cfg: Config) -> None:
    """The resolved config next to a stage's outputs (called by the loop once a resume check has passed)."""
    write_text_atomic(out / "config.yaml", dump_config(cfg))


def train_gallery(
    cfg: Config, out_dir: str | Path, resume: bool = False, data: DataBundle | None = None
) -> dict:
    """Train the gallery model (backbone + head + classifier) with plain cross-entropy."""
    started = time.time()
    out = Path(out_dir)
    data = data or load_data(cfg)
    torch.manual_seed(cfg.gallery_train.seed)  # the seed fixes the initial weights too, whatever ran before
    model = EmbeddingModel(make_spec(cfg.gallery, data, "gallery"), pretrained=cfg.gallery.pretrained)
    macs = count_macs(model, model.input_shape(1))
    task = ClassificationTask(model, cfg.gallery_train.label_smoothing)
    result = train(
        task,
        data.train,
        cfg.gallery_train,
        out,
        mean=data.mean,
        std=data.std,
        stage="gallery",
        resume=resume,
        macs_per_image=macs,
        identity_extra=data.train_identity(),
        on_start=lambda: write_config(out, cfg),
    )
    model.eval()
    return _finish(
        out, "train-gallery", model, cfg.model_dump(mode="json"), {"data": data.describe()}, result, started
    )


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
    if path is not None and path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.shape[0] == len(data.train):
            return cached
    emb = embed(gallery, data.train, batch_size=batch_size, precision=precision)
    if path is not None and init_distributed().is_main:
        from cmpnas.io import atomic_path

        with atomic_path(path) as tmp:
            torch.save(emb, tmp)
    return emb


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
    needs_emb = compat.mode == "bct" and (
        compat.align_weight > 0
        or compat.gallery_classifier != "trained"
        and gallery.spec.num_classes != data.num_classes
    )
    train_emb = (
        gallery_train_embeddings(
            gallery, data, Path(gallery_path).parent / "cache", precision=cfg.gallery_train.precision
        )
        if needs_emb
        else None
    )
    classifier = gallery_classifier_for(gallery, data, compat, train_emb) if compat.mode == "bct" else None
    return build_compat_losses(compat, classifier, train_emb, label_smoothing)


def check_gallery(gallery_path: str | Path, data: DataBundle) -> EmbeddingModel:
    gallery = load_model(gallery_path)
    if (gallery.spec.in_chans, gallery.spec.input_size) != (data.in_chans, data.image_size):
        raise CmpnasError(
            f"Gallery model expects {gallery.spec.in_chans}x{gallery.spec.input_size}px input but the data is "
            f"{data.in_chans}x{data.image_size}px.",
            "use the data config the gallery was trained with",
        )
    return gallery


def train_query(
    cfg: Config,
    gallery_path: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    data: DataBundle | None = None,
    model_cfg: ModelConfig | None = None,
    compat: CompatConfig | None = None,
    train_cfg: TrainConfig | None = None,
    name: str = "query",
    stage: str = "train-query",
) -> dict:
    """Train a query model against a frozen gallery model (independent / BCT / + alignment)."""
    started = time.time()
    out = Path(out_dir)
    data = data or load_data(cfg)
    mcfg = model_cfg or cfg.query
    compat = compat or cfg.compat
    tcfg = train_cfg or cfg.query_train
    gallery = check_gallery(gallery_path, data)
    if mcfg.embed_dim != gallery.spec.embed_dim:
        raise CmpnasError(
            f"Query embed_dim {mcfg.embed_dim} differs from the gallery's {gallery.spec.embed_dim}: the embeddings "
            "would not be comparable.",
            f"set query.embed_dim: {gallery.spec.embed_dim}",
        )
    gfp = fingerprint(gallery)
    compatible_with = gfp if compat.mode != "independent" else None
    torch.manual_seed(tcfg.seed)  # the seed fixes the initial weights too, whatever ran before
    model = EmbeddingModel(make_spec(mcfg, data, name, compatible_with), pretrained=mcfg.pretrained)
    losses = compat_losses_for(cfg, gallery, gallery_path, data, compat, tcfg.label_smoothing)
    del gallery
    task = CompatTask(model, losses, tcfg.label_smoothing)
    macs = count_macs(model, model.input_shape(1))
    result = train(
        task,
        data.train,
        tcfg,
        out,
        mean=data.mean,
        std=data.std,
        stage=name,
        resume=resume,
        macs_per_image=macs,
        identity_extra=gfp + compat.model_dump_json() + data.train_identity(),
        on_start=lambda: write_config(out, cfg),
    )
    model.eval()
    inputs = {
        "data": data.describe(),
        "gallery": {"path": str(gallery_path), "fingerprint": gfp},
        "compat": compat.model_dump(mode="json"),
    }
    return _finish(out, stage, model, cfg.model_dump(mode="json"), inputs, result, started)


def _metric_subset(m: dict[str, float]) -> dict[str, float]:
    keys = ("top1", "top5", "top10", "map", "map_at_r")
    return {k: round(float(m[k]), 4) for k in keys if k in m}


def compare(
    gallery: EmbeddingModel,
    query: EmbeddingModel,
    protocol: Any,
    batch_size: int = 512,
    gallery_cache: dict | None = None,
) -> dict[str, Any]:
    """The three-way table for one query model, with costs and the compatibility verdict."""
    tw = three_way(query, gallery, protocol, batch_size=batch_size, gallery_cache=gallery_cache)
    g_macs = count_macs(gallery, gallery.input_shape(1))
    q_macs = count_macs(query, query.input_shape(1))
    res: dict[str, Any] = {k: _metric_subset(v) for k, v in tw.items()}
    res["n_queries"] = int(tw["heterogeneous"].get("n_queries", 0))
    res["gallery"] = {
        "name": gallery.spec.name or gallery.spec.backbone,
        "macs": g_macs,
        "fingerprint": fingerprint(gallery),
    }
    res["query"] = {
        "name": query.spec.name or query.spec.backbone,
        "macs": q_macs,
        "fingerprint": fingerprint(query),
        "compatible_with": query.spec.compatible_with,
    }
    res["cost_reduction"] = round(g_macs / max(1, q_macs), 2)
    res["gap_to_paragon"] = {k: round(res["paragon"][k] - res["heterogeneous"][k], 4) for k in res["paragon"]}
    res["relative_gap_to_paragon"] = {
        k: round((res["paragon"][k] - res["heterogeneous"][k]) / res["paragon"][k] * 100, 4)
        if res["paragon"][k]
        else None
        for k in res["paragon"]
    }
    res["compatible"] = bool(res["heterogeneous"]["top1"] > res["homogeneous"]["top1"])
    return res


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """paragon / homogeneous / heterogeneous (top-1, mAP) per query model, with MACs and cost reduction."""
    lines = [
        "| query model | MACs | cost reduction | paragon top-1 / mAP | homogeneous top-1 / mAP | "
        "heterogeneous top-1 / mAP | gap to paragon (top-1) | M(q,g) > M(q,q) |",
        "|---|---:|---:|---|---|---|---:|:---:|",
    ]
    for r in rows:
        p, h, x = r["paragon"], r["homogeneous"], r["heterogeneous"]
        lines.append(
            f"| {r['query']['name']} | {r['query']['macs'] / 1e6:.2f} M | {r['cost_reduction']:.1f}x | "
            f"{p['top1']:.2f} / {p['map']:.2f} | {h['top1']:.2f} / {h['map']:.2f} | {x['top1']:.2f} / {x['map']:.2f} | "
            f"{r['gap_to_paragon']['top1']:+.2f} | {'yes' if r['compatible'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_models(
    cfg: Config,
    gallery_path: str | Path,
    query_path: str | Path,
    out_dir: str | Path | None,
    data: DataBundle | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Paragon / homogeneous / heterogeneous on a split (leave-one-out); writes results.json + results.md."""
    data = data or load_data(cfg)
    gallery = check_gallery(gallery_path, data)
    query = load_model(query_path)
    if query.spec.embed_dim != gallery.spec.embed_dim:
        raise CmpnasError(
            f"Query embed_dim {query.spec.embed_dim} != gallery embed_dim {gallery.spec.embed_dim}.",
            "evaluate a query model trained against this gallery",
        )
    dataset = {"test": data.test, "val": data.val, "train": data.train}[split]
    res = compare(gallery, query, LeaveOneOut(dataset), batch_size=cfg.eval_batch_size)
    res["protocol"] = {"name": "leave_one_out", "split": split, "n_images": len(dataset)}
    if out_dir is not None and init_distributed().is_main:
        out = Path(out_dir)
        write_json_atomic(out / "results.json", res)
        write_text_atomic(out / "results.md", markdown_table([res]))
    progress.event(
        "evaluate",
        message=(
            f"paragon {res['paragon']['top1']:.2f} | homogeneous {res['homogeneous']['top1']:.2f} | "
            f"heterogeneous {res['heterogeneous']['top1']:.2f} (top-1); cost reduction {res['cost_reduction']:.1f}x"
        ),
    )
    return res
