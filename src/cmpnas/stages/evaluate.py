"""Stage ``evaluate``: paragon / homogeneous / heterogeneous of query models against the gallery model.

Leave-one-out on a split of the config's data (``evaluate_models``, ``evaluate_query_models`` for a
run's table with latencies and validation scores), a registered benchmark protocol (``evaluate_protocol``),
or a query model against a built index on either backend (``evaluate_index``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cmpnas import progress
from cmpnas.config import Config
from cmpnas.data.base import DataBundle
from cmpnas.data.sources import GallerySource
from cmpnas.distributed import init_distributed
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.compare import compare, comparison_table
from cmpnas.evaluation.evaluate import LeaveOneOut
from cmpnas.evaluation.protocols import run_protocol_evaluation
from cmpnas.evaluation.retrieval import ranked_label_metrics
from cmpnas.io import write_json_atomic, write_text_atomic
from cmpnas.models.cost import measure_latency_ms
from cmpnas.models.embedding import EmbeddingModel, load_model
from cmpnas.serving.encoder import load_encoder
from cmpnas.serving.index import GalleryIndex, check_compatible, embed_source
from cmpnas.stages.common import StageResult, check_gallery, load_data

# (display name, model file, kind) or (display name, model file, kind, seed); seed 0 when left out
QueryModel = tuple[str, Path, str] | tuple[str, Path, str, int]


def evaluate_models(
    cfg: Config,
    gallery_path: str | Path,
    query_path: str | Path,
    out_dir: str | Path | None,
    data: DataBundle | None = None,
    split: str = "test",
) -> StageResult:
    """Paragon / homogeneous / heterogeneous on a split (leave-one-out); writes results.json + results.md."""
    data = data or load_data(cfg)
    gallery = check_gallery(gallery_path, data)
    query = load_model(query_path)
    if query.spec.embed_dim != gallery.spec.embed_dim:
        raise CmpnasError(
            f"Query embed_dim {query.spec.embed_dim} != gallery embed_dim {gallery.spec.embed_dim}.",
            "evaluate a query model trained against this gallery",
        )
    if split not in ("test", "val", "train"):
        raise CmpnasError(f"Unknown split '{split}'.", "use --split test or --split val")
    dataset = {"test": data.test, "val": data.val, "train": data.train}[split]
    res = compare(gallery, query, LeaveOneOut(dataset), batch_size=cfg.eval_batch_size)
    res["protocol"] = {"name": "leave_one_out", "split": split, "n_images": len(dataset)}
    if out_dir is not None and init_distributed().is_main:
        out = Path(out_dir)
        write_json_atomic(out / "results.json", res)
        write_text_atomic(out / "results.md", comparison_table([res]))
    progress.event(
        "evaluate",
        message=(
            f"paragon {res['paragon']['top1']:.2f} | homogeneous {res['homogeneous']['top1']:.2f} | "
            f"heterogeneous {res['heterogeneous']['top1']:.2f} (top-1); cost reduction {res['cost_reduction']:.1f}x"
        ),
    )
    return StageResult("evaluate", None if out_dir is None else Path(out_dir), res)


def validation_scores(
    gallery: EmbeddingModel,
    query: EmbeddingModel,
    protocol: LeaveOneOut | None,
    batch_size: int,
    cache: dict,
) -> dict | None:
    """Top-1 of one query model on the validation split (the same ``compare`` as the table's): what the report
    chooses "the best" model of a group by, so that no test number picks anything. None without a split."""
    if protocol is None:
        return None
    res = compare(gallery, query, protocol, batch_size=batch_size, gallery_cache=cache)
    return {
        "split": "val",
        "n_images": len(protocol.dataset),
        "heterogeneous_top1": res["heterogeneous"]["top1"],
        "homogeneous_top1": res["homogeneous"]["top1"],
        "paragon_top1": res["paragon"]["top1"],
    }


def evaluate_query_models(
    cfg: Config,
    gallery_path: str | Path,
    models: Sequence[QueryModel],
    out_dir: str | Path,
    data: DataBundle | None = None,
) -> StageResult:
    """The run's table: every (name, model file, kind[, seed]) on the test split, with batch-1 latencies, and
    its top-1 on the validation split (``row["validation"]``) -> rows.json, one row per (model, seed). Test
    numbers are reported only; the report picks "the best" of a group by the validation numbers."""
    data = data or load_data(cfg)
    gallery = load_model(gallery_path)
    protocol = LeaveOneOut(data.test)
    val_protocol = LeaveOneOut(data.val) if len(data.val) > 1 else None
    cache: dict = {}
    val_cache: dict = {}
    rows = []
    g_lat = measure_latency_ms(gallery, gallery.input_shape(1), repeats=cfg.run.latency_repeats, threads=1)
    n_classes = len(set(data.test.labels.tolist()))  # an open-set test has other classes than training
    for name, model_file, kind, *seed in models:
        query = load_model(model_file)
        res = compare(gallery, query, protocol, batch_size=cfg.eval_batch_size, gallery_cache=cache)
        res["protocol"] = {"name": "leave_one_out", "split": "test", "n_images": len(data.test), "n_classes": n_classes}
        res["query"]["name"] = name
        res["query"]["kind"] = kind
        res["query"]["seed"] = int(seed[0]) if seed else 0
        res["query"]["latency_ms_b1"] = measure_latency_ms(
            query, query.input_shape(1), repeats=cfg.run.latency_repeats, threads=1
        )["p50"]
        res["gallery"]["latency_ms_b1"] = g_lat["p50"]
        res["validation"] = validation_scores(gallery, query, val_protocol, cfg.eval_batch_size, val_cache)
        rows.append(res)
        val = res["validation"]
        progress.event(
            "evaluate",
            message=(
                f"{name} (seed {res['query']['seed']}): hom {res['homogeneous']['top1']:.2f} het "
                f"{res['heterogeneous']['top1']:.2f} paragon {res['paragon']['top1']:.2f}"
                + (f" (val het {val['heterogeneous_top1']:.2f})" if val else "")
            ),
        )
    out = Path(out_dir)
    write_json_atomic(out / "rows.json", rows)
    n_models = len({r["query"]["name"] for r in rows})
    return StageResult(
        "evaluate", out, {"rows": "rows.json", "n_models": n_models, "n_rows": len(rows), "table": rows}
    )


def evaluate_protocol(
    cfg: Config | None,
    protocol: str,
    root: str | Path | None,
    out_dir: str | Path,
    *,
    gallery_path: str | Path | None = None,
    query_path: str | Path | None = None,
    embeddings: str | Path | None = None,
    gallery_embeddings: str | Path | None = None,
    split: str = "test",
) -> StageResult:
    """A registered benchmark protocol (DeepFashion2, IJB-C, ...) from models or precomputed embeddings."""
    res = run_protocol_evaluation(
        protocol=protocol,
        root=root,
        out=out_dir,
        embeddings=embeddings,
        gallery_embeddings=gallery_embeddings,
        gallery_model=gallery_path,
        query_model=query_path,
        config=cfg,
        split=split,
    )
    return StageResult("evaluate", Path(out_dir), res)


def evaluate_index(
    index_dir: str | Path,
    query_model: str | Path,
    queries: GallerySource,
    out_dir: str | Path | None = None,
    k: int = 10,
    allow_incompatible: bool = False,
) -> StageResult:
    """A query model against a built index (FAISS or Milvus): every labelled query image is embedded and
    searched; a query that is itself in the index does not count its own hit (leave-one-out). The metrics
    come from the ranking the index returns, so both backends must give the same numbers."""
    index = GalleryIndex.load(index_dir)
    encoder = load_encoder(query_model)
    mode = check_compatible(index, encoder, allow_incompatible)
    labels, results, skipped = [], [], 0
    for start in range(0, len(queries.items), 256):
        rows = list(range(start, min(len(queries.items), start + 256)))
        vectors, kept, bad = embed_source(encoder, queries, rows)
        skipped += len(bad)
        if not kept:
            continue
        hits = index.search(vectors, k + 1)
        for r, row in zip(kept, hits, strict=True):
            own = queries.items[r].id
            labels.append(queries.items[r].label)
            results.append([h["label"] for h in row if h["id"] != own][:k])
    if not labels:
        raise CmpnasError("None of the query images could be read.", "check the query images")
    ks = tuple(x for x in (1, 5, 10) if x <= k) or (k,)
    summary = {
        "index": str(index_dir),
        "backend": index.backend,
        "gallery_fingerprint": index.gallery_fingerprint,
        "query_model": encoder.describe(),
        "mode": mode,
        "queries": len(labels),
        "skipped_unreadable": skipped,
        "queries_source": queries.description,
        "metrics": ranked_label_metrics(labels, results, ks),
    }
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "index_results.json", summary)
    return StageResult("evaluate-index", Path(out_dir) if out_dir else Path(index_dir), summary)
