"""Stage ``evaluate``: paragon / homogeneous / heterogeneous of query models against the gallery model.

Leave-one-out on a split of the config's data (``evaluate_models``, ``evaluate_query_models`` for a
run's table with latencies), or a registered benchmark protocol (``evaluate_protocol``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cmpnas import progress
from cmpnas.config import Config
from cmpnas.data.base import DataBundle
from cmpnas.distributed import init_distributed
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.compare import compare, markdown_table
from cmpnas.evaluation.evaluate import LeaveOneOut
from cmpnas.evaluation.protocols import run_protocol_evaluation
from cmpnas.io import write_json_atomic, write_text_atomic
from cmpnas.models.cost import measure_latency_ms
from cmpnas.models.embedding import load_model
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
        write_text_atomic(out / "results.md", markdown_table([res]))
    progress.event(
        "evaluate",
        message=(
            f"paragon {res['paragon']['top1']:.2f} | homogeneous {res['homogeneous']['top1']:.2f} | "
            f"heterogeneous {res['heterogeneous']['top1']:.2f} (top-1); cost reduction {res['cost_reduction']:.1f}x"
        ),
    )
    return StageResult("evaluate", None if out_dir is None else Path(out_dir), res)


def evaluate_query_models(
    cfg: Config,
    gallery_path: str | Path,
    models: Sequence[QueryModel],
    out_dir: str | Path,
    data: DataBundle | None = None,
) -> StageResult:
    """The run's table: every (name, model file, kind[, seed]) on the test split, with batch-1 latencies ->
    rows.json, one row per (model, seed). Reporting only: nothing is picked by these numbers."""
    data = data or load_data(cfg)
    gallery = load_model(gallery_path)
    protocol = LeaveOneOut(data.test)
    cache: dict = {}
    rows = []
    g_lat = measure_latency_ms(gallery, gallery.input_shape(1), repeats=cfg.run.latency_repeats, threads=1)
    for name, model_file, kind, *seed in models:
        query = load_model(model_file)
        res = compare(gallery, query, protocol, batch_size=cfg.eval_batch_size, gallery_cache=cache)
        res["protocol"] = {"name": "leave_one_out", "split": "test", "n_images": len(data.test)}
        res["query"]["name"] = name
        res["query"]["kind"] = kind
        res["query"]["seed"] = int(seed[0]) if seed else 0
        res["query"]["latency_ms_b1"] = measure_latency_ms(
            query, query.input_shape(1), repeats=cfg.run.latency_repeats, threads=1
        )["p50"]
        res["gallery"]["latency_ms_b1"] = g_lat["p50"]
        rows.append(res)
        progress.event(
            "evaluate",
            message=(
                f"{name} (seed {res['query']['seed']}): hom {res['homogeneous']['top1']:.2f} het "
                f"{res['heterogeneous']['top1']:.2f} paragon {res['paragon']['top1']:.2f}"
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
