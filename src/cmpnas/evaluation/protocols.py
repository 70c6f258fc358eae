"""``cmpnas evaluate --protocol deepfashion2|ijbc``: the paper's benchmarks, from models or from embeddings.

Evaluation runs in two steps. First come the features: rows of a precomputed ``.npz`` (see
:mod:`cmpnas.evaluation.embeddings_io`) or the models' embeddings of the protocol's own images
(DeepFashion2 ground-truth-box crops; IJB-C faces aligned to 112x112, embedded as f(x) + f(flip x)).
Then one scoring function per protocol turns features into numbers, so the same features give the same
numbers from either source.

With a gallery and a query model, the three settings of the paper are scored: paragon M(g,g), homogeneous
M(q,q) and heterogeneous M(q,g) (the deployed one, whose numbers are also the top-level keys). A single
model or a single ``.npz`` gives that one model's numbers. Percentages throughout, as papers report them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmpnas import progress
from cmpnas.config import Config
from cmpnas.data.deepfashion2 import DeepFashion2Crops, Item, read_deepfashion2
from cmpnas.data.ijbc import ALIGNED_SIZE, IJBCAlignedFaces, IJBCMeta, read_ijbc_meta
from cmpnas.distributed import init_distributed
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.compare import cost_reduction, gap_to_paragon, is_compatible, settings_for
from cmpnas.evaluation.deepfashion2 import (
    OFFICIAL_RESULT_LENGTH,
    TOP_KS,
    consumer_to_shop_topk,
    export_official_results,
    rank_deepfashion2,
    retrieval_gallery,
    retrieval_queries,
)
from cmpnas.evaluation.embeddings_io import _rows_for, load_embeddings_npz
from cmpnas.evaluation.verification import (
    DEFAULT_FARS,
    plot_roc,
    tar_at_far,
    template_features,
    verification_scores,
)
from cmpnas.io import write_json_atomic
from cmpnas.models.embedding import EmbeddingModel, load_model, model_summary
from cmpnas.models.inference import embed
from cmpnas.registry import Registry

RESULTS_FILE = "results.json"
ROC_FILE = "roc.png"
OFFICIAL_FILE = "retrieval_results.json"  # DeepFashion2's official result format (GT boxes)
HEADLINE_FAR = 1e-4  # the TAR@FAR most IJB-C papers lead with
DEFAULT_BATCH_SIZE = 256
# The DeepFashion2 test annotations are held by the challenge server: "test" and "val" score validation.
_DEEPFASHION2_SPLITS = {
    "test": "validation",
    "val": "validation",
    "validation": "validation",
    "train": "train",
}


@dataclass
class ProtocolRequest:
    """Validated inputs of one evaluation (the protocol functions read only this)."""

    root: Path
    split: str
    embeddings: str | os.PathLike[str] | None
    gallery_embeddings: str | os.PathLike[str] | None
    models: dict[str, EmbeddingModel]
    batch_size: int
    margin: float  # DeepFashion2 crop margin
    out: Path
    write: bool  # rank 0 only


def far_key(far: float) -> str:
    """JSON key of a FAR: '1e-04' (fixed format, so keys sort and compare as text)."""
    return f"{far:.0e}"


def run_protocol_evaluation(
    *,
    protocol: str,
    root: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    embeddings: str | os.PathLike[str] | None = None,
    gallery_embeddings: str | os.PathLike[str] | None = None,
    gallery_model: str | os.PathLike[str] | EmbeddingModel | None = None,
    query_model: str | os.PathLike[str] | EmbeddingModel | None = None,
    config: Config | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Score one protocol and write ``OUT/results.json`` (IJB-C also ``OUT/roc.png``); returns the results.

    ``embeddings`` (+ optional ``gallery_embeddings``) and ``gallery_model`` / ``query_model`` are the two
    alternative sources. ``config`` supplies the evaluation batch size and the DeepFashion2 crop margin.
    """
    if protocol not in PROTOCOLS:
        raise CmpnasError(f"Unknown protocol '{protocol}'.", f"use --protocol {' or '.join(PROTOCOLS)}")
    spec = PROTOCOLS[protocol]
    root_dir = _check_root(root, protocol, spec.root_holds)
    spec.check_split(split)
    _check_sources(embeddings, gallery_embeddings, gallery_model, query_model)
    request = ProtocolRequest(
        root=root_dir,
        split=split,
        embeddings=embeddings,
        gallery_embeddings=gallery_embeddings,
        models=_load_models(gallery_model, query_model),
        batch_size=config.eval_batch_size if config is not None else DEFAULT_BATCH_SIZE,
        margin=config.data.margin if config is not None else 0.0,
        out=Path(out),
        write=init_distributed().is_main,
    )
    results = spec.evaluate(request)
    if request.write:
        write_json_atomic(request.out / RESULTS_FILE, results)
    progress.event("evaluate", message=_summary_line(results, spec.headline))
    return results


# ------------------------------------------------------------------------------------------ inputs
def _check_root(root: str | os.PathLike[str] | None, protocol: str, holds: str) -> Path:
    if root is None:
        raise CmpnasError(
            f"--protocol {protocol} needs the dataset root.", f"pass --root DIR (the folder holding {holds})"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise CmpnasError(
            f"Dataset root '{path}' is not a folder.", f"pass --root DIR (the folder holding {holds})"
        )
    return path


def _deepfashion2_split(split: str) -> None:
    if split not in _DEEPFASHION2_SPLITS:
        raise CmpnasError(
            f"Unknown split '{split}' for DeepFashion2.", "use --split test (= validation) or train"
        )


def _ijbc_split(split: str) -> None:
    if split != "test":
        raise CmpnasError(
            f"IJB-C 1:1 has no '{split}' split.", "drop --split (IJB-C is a test-only benchmark)"
        )


def _check_sources(embeddings: Any, gallery_embeddings: Any, gallery_model: Any, query_model: Any) -> None:
    has_models = gallery_model is not None or query_model is not None
    if gallery_embeddings is not None and embeddings is None:
        raise CmpnasError(
            "--gallery-embeddings is the gallery side of a cross-model score and needs --embeddings.",
            "pass the query-side .npz with --embeddings as well",
        )
    if embeddings is not None and has_models:
        raise CmpnasError(
            "Both precomputed embeddings and models were given.",
            "pass either --embeddings [--gallery-embeddings] or --gallery/--query models, not both",
        )
    if embeddings is None and not has_models:
        raise CmpnasError(
            "Nothing to evaluate: neither models nor embeddings were given.",
            "pass --gallery and/or --query model.safetensors, or --embeddings FILE.npz",
        )


def _load_models(gallery: Any, query: Any) -> dict[str, EmbeddingModel]:
    models = {}
    for role, source in (("gallery", gallery), ("query", query)):
        if source is not None:
            models[role] = source if isinstance(source, EmbeddingModel) else load_model(source)
    if len(models) == 2 and models["gallery"].spec.embed_dim != models["query"].spec.embed_dim:
        raise CmpnasError(
            f"Query embed_dim {models['query'].spec.embed_dim} != gallery embed_dim "
            f"{models['gallery'].spec.embed_dim}: their embeddings cannot be compared.",
            "evaluate a query model trained against this gallery",
        )
    return models


def _model_block(
    models: dict[str, EmbeddingModel], headline: Callable[[dict], float], settings: dict
) -> dict:
    """Model summaries, cost reduction and the compatibility verdict (models only)."""
    block: dict[str, Any] = {"models": {role: model_summary(model) for role, model in models.items()}}
    notes = []
    if len(models) == 2:
        query = models["query"]
        g_macs, q_macs = block["models"]["gallery"]["macs"], block["models"]["query"]["macs"]
        block["cost_reduction"] = cost_reduction(g_macs, q_macs)
        block["compatible"] = is_compatible(settings, headline)
        if query.spec.compatible_with != block["models"]["gallery"]["fingerprint"]:
            notes.append("the query model was not trained against this gallery model (fingerprints differ)")
    block["notes"] = notes
    return block


def _summary_line(results: dict[str, Any], headline: Callable[[dict], tuple[str, float]]) -> str:
    parts = []
    for name, metrics in results["settings"].items():
        label, value = headline(metrics)
        parts.append(f"{name} {label} {value:.2f}")
    return f"{results['protocol']}: " + " | ".join(parts)


# ------------------------------------------------------------------------------------ DeepFashion2
def _evaluate_deepfashion2(req: ProtocolRequest) -> dict[str, Any]:
    df2_split = _DEEPFASHION2_SPLITS[req.split]
    items = read_deepfashion2(req.root, df2_split)
    queries, gallery = retrieval_queries(items), retrieval_gallery(items)
    if not queries or not gallery:
        raise CmpnasError(
            f"DeepFashion2 {df2_split} split has {len(queries)} queries (user items with style > 0) and "
            f"{len(gallery)} gallery (shop) items.",
            "point --root at the complete DeepFashion2 folder",
        )
    query_ids = [item.item_id for item in queries]
    gallery_ids = [item.item_id for item in gallery]
    # side -> (query rows, gallery rows); a gallery-only .npz has no query rows and vice versa
    features: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
    if req.embeddings is not None:
        known = {item.item_id for item in items}
        what = f"DeepFashion2 {df2_split} items"
        query_source = load_embeddings_npz(req.embeddings)
        if req.gallery_embeddings is None:
            rows = _rows_for(query_ids + gallery_ids, query_source, known, what, True)
            features["embeddings"] = (rows[: len(query_ids)], rows[len(query_ids) :])
        else:
            features["embeddings"] = (_rows_for(query_ids, query_source, known, what, True), None)
            gallery_source = load_embeddings_npz(req.gallery_embeddings)
            features["gallery_embeddings"] = (None, _rows_for(gallery_ids, gallery_source, known, what, True))
    for role, model in req.models.items():
        rows = _embed_items(model, list(queries) + list(gallery), req.margin, req.batch_size)
        features[role] = (rows[: len(queries)], rows[len(queries) :])
    settings: dict[str, dict[str, Any]] = {}
    rankings: dict[str, dict[str, list[str]]] = {}
    for setting in settings_for(list(features)):
        settings[setting.name], rankings[setting.name] = score_deepfashion2(
            queries, gallery, features[setting.query_side][0], features[setting.gallery_side][1]
        )
    headline = "heterogeneous" if "heterogeneous" in settings else next(iter(settings))
    results: dict[str, Any] = {
        "protocol": "deepfashion2",
        "split": df2_split,
        "source": "embeddings" if req.embeddings is not None else "models",
        "setting": headline,
        "units": "percent",
        **settings[headline],
        "settings": settings,
    }
    if req.split in ("test", "val"):
        results["split_note"] = (
            "DeepFashion2 test annotations are not public; the validation split was scored"
        )
    if req.models:
        results.update(_model_block(req.models, lambda m: m["top1"], settings))
        if len(req.models) == 2:
            results["gap_to_paragon"] = gap_to_paragon(settings, [f"top{k}" for k in TOP_KS])
    if len(gallery) >= OFFICIAL_RESULT_LENGTH:
        if req.write:
            export_official_results(req.out / OFFICIAL_FILE, queries, gallery, rankings[headline])
        results["official_results"] = OFFICIAL_FILE
    return results


def _embed_items(model: EmbeddingModel, items: list[Item], margin: float, batch_size: int) -> np.ndarray:
    """Embeddings of ground-truth-box crops, at the model's own input size and channels."""
    crops = DeepFashion2Crops(
        items, model.spec.input_size, in_chans=model.spec.in_chans, margin=margin, label="category"
    )
    return embed(model, crops, batch_size=batch_size).numpy()


def score_deepfashion2(
    queries: Sequence[Item], gallery: Sequence[Item], query_emb: np.ndarray, gallery_emb: np.ndarray
) -> tuple[dict[str, float | int], dict[str, list[str]]]:
    """Consumer-to-shop top-k in percent (plus counts) and the top-20 ranking per query."""
    query_ids = [item.item_id for item in queries]
    gallery_ids = [item.item_id for item in gallery]
    ranking = rank_deepfashion2(query_ids, query_emb, gallery_ids, gallery_emb, k=OFFICIAL_RESULT_LENGTH)
    metrics = consumer_to_shop_topk(queries, gallery, ranking, TOP_KS)
    return {k: (100.0 * v if k.startswith("top") else v) for k, v in metrics.items()}, ranking


# -------------------------------------------------------------------------------------------- IJB-C
def _evaluate_ijbc(req: ProtocolRequest) -> dict[str, Any]:
    for model in req.models.values():  # before any (long) embedding pass
        _check_face_model(model)
    meta = read_ijbc_meta(req.root)
    features: dict[str, np.ndarray] = {}  # side -> image features in meta row order (flip already added)
    if req.embeddings is not None:
        known = set(meta.image_names)
        what = "IJB-C images of meta/ijbc_face_tid_mid.txt"
        features["embeddings"] = _rows_for(
            meta.image_names, load_embeddings_npz(req.embeddings), known, what, True
        )
        if req.gallery_embeddings is not None:
            gallery_source = load_embeddings_npz(req.gallery_embeddings)
            features["gallery_embeddings"] = _rows_for(meta.image_names, gallery_source, known, what, True)
    for role, model in req.models.items():
        features[role] = _embed_faces(model, meta, req.batch_size)
    settings: dict[str, dict[str, Any]] = {}
    scores: dict[str, np.ndarray] = {}
    for setting in settings_for(list(features)):
        scores[setting.name] = ijbc_scores(meta, features[setting.query_side], features[setting.gallery_side])
        settings[setting.name] = {"tar_at_far": _tar_percent(meta.labels, scores[setting.name])}
    headline = "heterogeneous" if "heterogeneous" in settings else next(iter(settings))
    results: dict[str, Any] = {
        "protocol": "ijbc",
        "source": "embeddings" if req.embeddings is not None else "models",
        "setting": headline,
        "units": "percent",
        "headline_far": far_key(HEADLINE_FAR),
        "tar_at_far": settings[headline]["tar_at_far"],
        "settings": settings,
        "n_pairs": int(meta.labels.size),
        "n_genuine": int(meta.labels.sum()),
        "n_impostor": int(meta.labels.size - meta.labels.sum()),
        "n_templates": int(np.unique(meta.template_ids).size),
        "n_images": meta.n_images,
        "roc": ROC_FILE,
    }
    if req.models:
        key = far_key(HEADLINE_FAR)
        results.update(_model_block(req.models, lambda m: m["tar_at_far"]["insightface"][key], settings))
        if len(req.models) == 2:
            results["gap_to_paragon"] = gap_to_paragon(settings, pick=lambda m: m["tar_at_far"]["insightface"])
    if req.write:
        plot_roc(meta.labels, scores, req.out / ROC_FILE)
    return results


def _check_face_model(model: EmbeddingModel) -> None:
    if model.spec.input_size != ALIGNED_SIZE:
        raise CmpnasError(
            f"IJB-C faces are aligned to {ALIGNED_SIZE}x{ALIGNED_SIZE} but model "
            f"'{model.spec.name or model.spec.backbone}' expects {model.spec.input_size}px input.",
            f"evaluate a face model trained with data.image_size={ALIGNED_SIZE}",
        )


def _embed_faces(model: EmbeddingModel, meta: IJBCMeta, batch_size: int) -> np.ndarray:
    """f(x) + f(flip x) of every aligned face, in meta row order (one decode per image)."""
    faces = IJBCAlignedFaces(meta, in_chans=model.spec.in_chans)
    return embed(model, faces, batch_size=batch_size, forward=lambda x: model(x) + model(x.flip(3))).numpy()


def ijbc_scores(meta: IJBCMeta, query_feats: np.ndarray, gallery_feats: np.ndarray) -> np.ndarray:
    """Cosine score per pair: first template from ``query_feats``, second from ``gallery_feats``.

    Features are per image in meta row order; pooling follows insightface (detector-score weights, media
    mean, template sum, L2 normalisation).
    """

    def pooled(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return template_features(feats, None, meta.template_ids, meta.media_ids, meta.faceness)

    query_ids, query_templates = pooled(query_feats)
    if gallery_feats is query_feats:
        return verification_scores(query_ids, query_templates, meta.pairs)
    gallery_ids, gallery_templates = pooled(gallery_feats)
    # one lookup table for both sides: gallery-side template ids are shifted past every query-side id
    offset = int(query_ids.max()) - int(gallery_ids.min()) + 1
    table_ids = np.r_[query_ids, gallery_ids + offset]
    table = np.concatenate([query_templates, gallery_templates])
    return verification_scores(table_ids, table, meta.pairs + np.array([0, offset]))


def _tar_percent(labels: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, float]]:
    result = tar_at_far(labels, scores, DEFAULT_FARS)
    return {
        convention: {far_key(far): 100.0 * tar for far, tar in values.items()}
        for convention, values in result.items()
    }


# ---------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ProtocolSpec:
    """A benchmark protocol: how to score it, what its root holds, its splits and its headline number."""

    evaluate: Callable[[ProtocolRequest], dict[str, Any]]
    root_holds: str
    check_split: Callable[[str], None]
    headline: Callable[[dict], tuple[str, float]]  # one setting's metrics -> (label, value)


# One line per protocol (see docs/extending.md); `cmpnas evaluate --protocol NAME` looks it up here.
PROTOCOLS: Registry[ProtocolSpec] = Registry("protocol", {
    "deepfashion2": ProtocolSpec(
        _evaluate_deepfashion2,
        "validation/annos and validation/image",
        _deepfashion2_split,
        lambda m: ("top-1", m["top1"]),
    ),
    "ijbc": ProtocolSpec(
        _evaluate_ijbc,
        "loose_crop/ and meta/ijbc_*.txt",
        _ijbc_split,
        lambda m: (f"TAR@FAR={HEADLINE_FAR:g}", m["tar_at_far"]["insightface"][far_key(HEADLINE_FAR)]),
    ),
})


def register_protocol(name: str, spec: ProtocolSpec) -> None:
    """Add a protocol under ``name`` (what ``--protocol`` selects)."""
    PROTOCOLS.register(name, spec)
