"""CLI commands of the serving side: ``index``, ``query``, ``export``, ``serve``.

Thin: parse options, call the library, print. CmpnasError propagates (the main CLI prints it as one line
and exits 2).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from cmpnas.errors import CmpnasError


class IndexKind(str, Enum):
    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"
    ivfpq = "ivfpq"


class ExporterKind(str, Enum):
    auto = "auto"
    dynamo = "dynamo"
    legacy = "legacy"


def _progress_bar(label: str):  # type: ignore[no-untyped-def]
    """A rich progress bar and the (done, total) callback that drives it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def index_command(
    gallery_model: Path = typer.Option(
        ..., "--gallery-model", help="gallery model .safetensors that embeds the gallery"
    ),
    out: Path = typer.Option(
        ..., "--out", help="index folder to create (an existing index there is rebuilt)"
    ),
    images: Path | None = typer.Option(
        None,
        "--images",
        help="folder of gallery images (walked recursively; a sub-folder name becomes the label)",
    ),
    csv_file: Path | None = typer.Option(
        None, "--csv", help="CSV with path,label rows (paths relative to the CSV)"
    ),
    dataset: str | None = typer.Option(None, "--dataset", help="built-in dataset: fashion_mnist"),
    split: str = typer.Option("test", "--split", help="dataset split to index: test or train"),
    dataset_root: str | None = typer.Option(
        None,
        "--dataset-root",
        help="folder with the dataset files "
        "(default: the usual places, incl. Debian's dataset-fashion-mnist)",
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="index only the first N dataset images"),
    kind: IndexKind | None = typer.Option(
        None,
        "--index",
        help="flat = exact inner product (default); ivf, hnsw, ivfpq = approximate, for large galleries",
    ),
    nlist: int | None = typer.Option(
        None,
        "--nlist",
        min=1,
        help="ivf/ivfpq: number of k-means cells (default ~4*sqrt(N), clamped to N/39)",
    ),
    nprobe: int = typer.Option(8, "--nprobe", min=1, help="ivf/ivfpq: cells visited per query"),
    hnsw_m: int = typer.Option(32, "--hnsw-m", min=2, help="hnsw: links per node"),
    ef_construction: int = typer.Option(40, "--ef-construction", min=1, help="hnsw: build beam width"),
    ef_search: int = typer.Option(64, "--ef-search", min=1, help="hnsw: search beam width"),
    pq_m: int | None = typer.Option(
        None, "--pq-m", min=1, help="ivfpq: sub-quantisers (must divide dim; default dim/4)"
    ),
    pq_bits: int = typer.Option(8, "--pq-bits", min=1, max=16, help="ivfpq: bits per sub-code"),
    append: bool = typer.Option(
        False,
        "--append",
        help="add the images to an existing index (same gallery model; ids already present are skipped)",
    ),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="images embedded per forward pass"),
) -> None:
    """Embed gallery images with the gallery model into a FAISS index folder (atomic)."""
    from cmpnas.serving.index import IndexParams, build_index, csv_source, dataset_source, folder_source

    chosen = [x is not None for x in (images, csv_file, dataset)]
    if sum(chosen) != 1:
        raise CmpnasError(
            "Give exactly one gallery source.", "pass one of --images DIR, --csv FILE, --dataset NAME"
        )
    if images is not None:
        source = folder_source(images)
    elif csv_file is not None:
        source = csv_source(csv_file)
    else:
        source = dataset_source(str(dataset), split, dataset_root, limit)
    if append and kind is not None:
        raise CmpnasError(
            "--index cannot be combined with --append (the existing index keeps its type).",
            "drop --index, or build a new index",
        )
    params = IndexParams(
        kind=(kind or IndexKind.flat).value,
        nlist=nlist,
        nprobe=nprobe,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=ef_search,
        pq_m=pq_m,
        pq_bits=pq_bits,
    )
    bar, update = _progress_bar("embedding gallery")
    with bar:
        manifest = build_index(
            gallery_model, source, out, params, append=append, batch_size=batch_size, progress=update
        )
    last = manifest["sources"][-1]
    typer.echo(
        f"index {out}: {manifest['count']} items ({manifest['index']['type']}, dim {manifest['dim']}, "
        f"gallery {manifest['gallery_fingerprint']}); added {last['added']}, skipped "
        f"{last['skipped_unreadable']} unreadable and {last['skipped_duplicate_ids']} duplicate ids"
    )


def query_command(
    images: list[Path] = typer.Argument(..., help="query image files"),
    index_dir: Path = typer.Option(..., "--index", help="index folder written by cmpnas index"),
    query_model: Path = typer.Option(
        ..., "--query-model", help="query model: .safetensors checkpoint or .onnx export"
    ),
    k: int = typer.Option(10, "-k", "--k", min=1, help="results per query image"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    allow_incompatible: bool = typer.Option(
        False,
        "--allow-incompatible",
        help="search even if the query model was "
        "not trained compatible with the index's gallery model (experts)",
    ),
    nprobe: int | None = typer.Option(None, "--nprobe", min=1, help="override ivf/ivfpq cells visited"),
    ef_search: int | None = typer.Option(None, "--ef-search", min=1, help="override hnsw search beam"),
) -> None:
    """Top-k gallery items for each query image, embedded by the (compact) query model."""
    from cmpnas.serving.index import query_images

    out = query_images(
        index_dir,
        query_model,
        images,
        k,
        allow_incompatible=allow_incompatible,
        nprobe=nprobe,
        ef_search=ef_search,
    )
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    if out["mode"] == "incompatible-override":
        typer.echo(
            "warning: query and gallery models are not recorded as compatible (--allow-incompatible)",
            err=True,
        )
    for q in out["queries"]:
        typer.echo(f"{q['image']}  (mode {out['mode']})")
        for rank, hit in enumerate(q["results"], 1):
            typer.echo(f"  {rank:>3}  {hit['score']:.4f}  {hit['label'] or '-':<14} {hit['id']}")


def export_command(
    model: Path = typer.Option(..., "--model", help="query model .safetensors to export"),
    out: Path = typer.Option(..., "--out", help="output .onnx file (export.json is written beside it)"),
    exporter: ExporterKind = typer.Option(
        ExporterKind.auto,
        "--exporter",
        help="auto = dynamo if onnxscript is installed, falling back to the legacy TorchScript exporter",
    ),
    opset: int = typer.Option(18, "--opset", min=9, help="ONNX opset version"),
    tolerance: float = typer.Option(
        1e-4, "--tolerance", min=0.0, help="max abs difference allowed vs PyTorch"
    ),
    latency_runs: int = typer.Option(50, "--latency-runs", min=1, help="timed runs per latency measurement"),
    no_latency: bool = typer.Option(False, "--no-latency", help="skip the latency measurement"),
) -> None:
    """Export a model to ONNX (dynamic batch), check parity with PyTorch and measure latency."""
    from cmpnas.serving.export import export_onnx

    report = export_onnx(
        model,
        out,
        exporter=exporter.value,
        opset=opset,
        tolerance=tolerance,
        latency_runs=latency_runs,
        measure=not no_latency,
    )
    typer.echo(
        f"wrote {out} ({report['exporter']} exporter, opset {opset}); parity max abs diff "
        f"{report['parity']['max_abs_diff']:.2e}"
    )
    if report["exporter_fallback_reason"] and exporter == ExporterKind.auto:
        typer.echo(f"note: used the legacy exporter ({report['exporter_fallback_reason']})")
    lat = report["latency_ms"] or {}
    for batch in ("batch_1", "batch_32"):
        if batch in lat:
            cells = ", ".join(
                f"{name} p50 {v['p50']:.2f} / p99 {v['p99']:.2f}" for name, v in lat[batch].items()
            )
            typer.echo(f"  {batch} (ms): {cells}")


def serve_command(
    index_dir: Path = typer.Option(..., "--index", help="index folder written by cmpnas index"),
    query_model: Path = typer.Option(
        ..., "--query-model", help="query model: .safetensors checkpoint or .onnx export"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port"),
    max_upload_mb: float = typer.Option(
        10.0, "--max-upload-mb", min=0.001, help="largest accepted upload (MB)"
    ),
    max_k: int = typer.Option(100, "--max-k", min=1, help="largest k a client may ask for"),
    max_pixels: int = typer.Option(
        40_000_000, "--max-pixels", min=1, help="largest accepted image (width*height)"
    ),
    allow_incompatible: bool = typer.Option(
        False,
        "--allow-incompatible",
        help="serve even if the query model was not trained compatible with the index's gallery model",
    ),
    nprobe: int | None = typer.Option(None, "--nprobe", min=1, help="override ivf/ivfpq cells visited"),
    ef_search: int | None = typer.Option(None, "--ef-search", min=1, help="override hnsw search beam"),
    threads: int = typer.Option(
        1,
        "--threads",
        min=1,
        help="intra-op threads of torch, ONNX Runtime and FAISS; queries are answered one at a time, "
        "so 1 is usually fastest",
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        help="server processes on the port (each loads the model and index); about one core each",
    ),
) -> None:
    """Serve the index over HTTP: POST /search, GET /healthz, /stats, /docs and a web page at /."""
    from cmpnas.serving.app import run_server

    typer.echo(f"serving {index_dir} with {query_model} on http://{host}:{port}/")
    run_server(
        index_dir,
        query_model,
        host=host,
        port=port,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_k=max_k,
        max_pixels=max_pixels,
        allow_incompatible=allow_incompatible,
        nprobe=nprobe,
        ef_search=ef_search,
        threads=threads,
        workers=workers,
    )


def register(app: typer.Typer) -> None:
    """Add ``index``, ``query``, ``export`` and ``serve`` to the main CLI."""
    app.command("index")(index_command)
    app.command("query")(query_command)
    app.command("export")(export_command)
    app.command("serve")(serve_command)
