"""Commands of the index side: ``index`` (embed a gallery into a FAISS or Milvus index), ``query`` and
``evaluate-index`` (search it)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from cmpnas import progress
from cmpnas.cli.options import (
    AllowIncompatibleOpt,
    EfSearchOpt,
    IndexDirOpt,
    NprobeOpt,
    QueryModelOpt,
    logged,
)
from cmpnas.data.sources import csv_source, dataset_source, folder_source
from cmpnas.errors import CmpnasError
from cmpnas.serving.index import IndexParams, query_images
from cmpnas.stages import evaluate_index, index_gallery


class IndexKind(str, Enum):
    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"
    ivfpq = "ivfpq"


class BackendKind(str, Enum):
    faiss = "faiss"
    milvus = "milvus"


# The one image source of `index` and `evaluate-index`: a folder, a CSV or a built-in dataset split.
ImagesOpt = Annotated[
    Path | None,
    typer.Option(
        "--images", help="folder of images (walked recursively; a sub-folder name becomes the label)"
    ),
]
CsvOpt = Annotated[
    Path | None, typer.Option("--csv", help="CSV with path,label rows (paths relative to the CSV)")
]
DatasetOpt = Annotated[str | None, typer.Option("--dataset", help="built-in dataset: fashion_mnist")]
SplitOpt = Annotated[str, typer.Option("--split", help="dataset split: test or train")]
DatasetRootOpt = Annotated[
    str | None,
    typer.Option(
        "--dataset-root",
        help="folder with the dataset files (default: the usual places, incl. Debian's dataset-fashion-mnist)",
    ),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="only the first N dataset images")]


def _progress_bar(label: str, show: bool) -> tuple[Any, Any]:
    """A rich progress bar (a no-op when hidden) and the (done, total) callback that drives it."""
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not show,
    )
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _source(
    images: Path | None,
    csv_file: Path | None,
    dataset: str | None,
    split: str,
    dataset_root: str | None,
    limit: int | None,
    what: str = "gallery",
) -> Any:
    """The one image source of a command: a folder, a CSV or a built-in dataset split."""
    if sum(x is not None for x in (images, csv_file, dataset)) != 1:
        raise CmpnasError(
            f"Give exactly one {what} source.", "pass one of --images DIR, --csv FILE, --dataset NAME"
        )
    if images is not None:
        return folder_source(images)
    if csv_file is not None:
        return csv_source(csv_file)
    return dataset_source(str(dataset), split, dataset_root, limit)


@logged
def index_cmd(
    gallery_model: Annotated[
        Path, typer.Option("--gallery-model", help="gallery model .safetensors that embeds the gallery")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="index folder to create (an existing index there is rebuilt)")
    ],
    images: ImagesOpt = None,
    csv_file: CsvOpt = None,
    dataset: DatasetOpt = None,
    split: SplitOpt = "test",
    dataset_root: DatasetRootOpt = None,
    limit: LimitOpt = None,
    kind: Annotated[
        IndexKind | None,
        typer.Option(
            "--index",
            help="flat = exact inner product (default); ivf, hnsw, ivfpq = approximate, for large galleries",
        ),
    ] = None,
    nlist: Annotated[
        int | None,
        typer.Option(
            "--nlist", min=1, help="ivf/ivfpq: number of k-means cells (default ~4*sqrt(N), clamped to N/39)"
        ),
    ] = None,
    nprobe: Annotated[int, typer.Option("--nprobe", min=1, help="ivf/ivfpq: cells visited per query")] = 8,
    hnsw_m: Annotated[int, typer.Option("--hnsw-m", min=2, help="hnsw: links per node")] = 32,
    ef_construction: Annotated[
        int, typer.Option("--ef-construction", min=1, help="hnsw: build beam width")
    ] = 40,
    ef_search: Annotated[int, typer.Option("--ef-search", min=1, help="hnsw: search beam width")] = 64,
    pq_m: Annotated[
        int | None,
        typer.Option("--pq-m", min=1, help="ivfpq: sub-quantisers (must divide dim; default dim/4)"),
    ] = None,
    pq_bits: Annotated[int, typer.Option("--pq-bits", min=1, max=16, help="ivfpq: bits per sub-code")] = 8,
    factory: Annotated[
        str | None,
        typer.Option(
            "--factory",
            help="faiss: any faiss.index_factory description instead of --index, e.g. 'IVF1024,PQ32' or "
            "'OPQ16,IVF256,PQ16' (inner product; --nprobe / --ef-search still apply)",
        ),
    ] = None,
    append: Annotated[
        bool,
        typer.Option(
            "--append",
            help="add the images to an existing index (same gallery model; ids already present are skipped)",
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="images embedded per forward pass")
    ] = 256,
    backend: Annotated[
        BackendKind | None,
        typer.Option(
            "--backend",
            help="faiss = an index file in the folder (default); milvus = a Milvus collection (Milvus Lite file "
            "or cluster, see --uri)",
        ),
    ] = None,
    uri: Annotated[
        str | None,
        typer.Option(
            "--uri",
            help="milvus: a Milvus Lite *.db file (default OUT/milvus.db, embedded) or http://HOST:19530 (a cluster)",
        ),
    ] = None,
    collection: Annotated[
        str | None, typer.Option("--collection", help="milvus: collection name (default 'gallery')")
    ] = None,
) -> None:
    """Embed gallery images with the gallery model into an index folder: FAISS (atomic) or Milvus (resumable).

    Under ``torchrun --nproc_per_node=N`` every rank embeds its own slice of the images."""
    source = _source(images, csv_file, dataset, split, dataset_root, limit)
    if append and (kind is not None or factory is not None):
        raise CmpnasError(
            "--index / --factory cannot be combined with --append (the existing index keeps its type).",
            "drop --index / --factory, or build a new index",
        )
    if factory is not None and (kind is not None or backend is BackendKind.milvus):
        raise CmpnasError(
            "--factory is a FAISS index description: it replaces --index and needs the faiss backend.",
            "drop --index (and --backend milvus), or drop --factory",
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
        factory=factory,
    )
    if backend is not BackendKind.milvus and (uri is not None or collection is not None):
        raise CmpnasError("--uri and --collection are Milvus settings.", "add --backend milvus, or drop them")
    bar, update = _progress_bar("embedding gallery", progress.human())
    with bar:
        manifest = index_gallery(
            gallery_model,
            source,
            out,
            params,
            append=append,
            batch_size=batch_size,
            progress=update,
            backend=backend.value if backend else None,
            uri=uri,
            collection=collection,
        )
    last = manifest["sources"][-1]
    milvus = manifest.get("milvus")
    where = f" in Milvus collection '{milvus['collection']}' at {milvus['uri']}" if milvus else ""
    message = (
        f"index {out}: {manifest['count']} items ({manifest['index']['type']}{where}, dim {manifest['dim']}, "
        f"gallery {manifest['gallery_fingerprint']}); added {last['added']}, skipped "
        f"{last['skipped_unreadable']} unreadable and {last['skipped_duplicate_ids']} duplicate ids"
    )
    if progress.human():
        typer.echo(message)
    else:
        progress.event("done", message=message)


@logged
def query_cmd(
    images: Annotated[list[Path], typer.Argument(help="query image files")],
    index_dir: IndexDirOpt,
    query_model: QueryModelOpt,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="results per query image")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    allow_incompatible: AllowIncompatibleOpt = False,
    nprobe: NprobeOpt = None,
    ef_search: EfSearchOpt = None,
) -> None:
    """Top-k gallery items for each query image, embedded by the (compact) query model."""
    out = query_images(
        index_dir,
        query_model,
        images,
        k,
        allow_incompatible=allow_incompatible,
        nprobe=nprobe,
        ef_search=ef_search,
    )
    if as_json or not progress.human():
        typer.echo(json.dumps(out, indent=2 if as_json else None))
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


@logged
def evaluate_index_cmd(
    index_dir: IndexDirOpt,
    query_model: QueryModelOpt,
    images: ImagesOpt = None,
    csv_file: CsvOpt = None,
    dataset: DatasetOpt = None,
    split: SplitOpt = "test",
    dataset_root: DatasetRootOpt = None,
    limit: LimitOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="results per query")] = 10,
    out: Annotated[Path | None, typer.Option("--out", help="folder for index_results.json")] = None,
    allow_incompatible: AllowIncompatibleOpt = False,
) -> None:
    """Top-1 / Recall@k / precision@k of a query model against a built index (FAISS or Milvus); a query that
    is itself in the index does not count its own hit."""
    source = _source(images, csv_file, dataset, split, dataset_root, limit, what="query")
    res = evaluate_index(index_dir, query_model, source, out, k=k, allow_incompatible=allow_incompatible)
    if progress.human():
        metrics = ", ".join(f"{name} {value:.2f}" for name, value in res["metrics"].items())
        typer.echo(
            f"{res['queries']} queries against {res['backend']} index {index_dir} ({res['mode']}): {metrics}"
        )
    else:
        progress.event("done", **res)


def register(app: typer.Typer) -> None:
    app.command("index")(index_cmd)
    app.command("query")(query_cmd)
    app.command("evaluate-index")(evaluate_index_cmd)
