"""Commands that ship the query model: ``export`` (ONNX, optionally int8) and ``serve`` (the search service)."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cmpnas import progress
from cmpnas.cli.options import (
    AllowIncompatibleOpt,
    EfSearchOpt,
    IndexDirOpt,
    NprobeOpt,
    QueryModelsOpt,
    logged,
)
from cmpnas.errors import CmpnasError
from cmpnas.serving.app import run_server
from cmpnas.serving.browser import ORT_DIR_ENV, ORT_FILES
from cmpnas.serving.family import expand_query_models, read_family
from cmpnas.serving.quantize import Int8Options, report_path_for
from cmpnas.stages import export_family, export_model


class Int8Granularity(str, Enum):
    per_tensor = "per-tensor"
    per_channel = "per-channel"
    auto = "auto"


class ExporterKind(str, Enum):
    auto = "auto"
    dynamo = "dynamo"
    legacy = "legacy"


@logged
def export_cmd(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="output .onnx file (export.json beside it; with --int8 also NAME.int8.onnx and NAME.int8.json); "
            "a folder with --family",
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="query model .safetensors to export (or, with --int8, a cmpnas .onnx export to quantize into --out)",
        ),
    ] = None,
    family: Annotated[
        Path | None,
        typer.Option(
            "--family", help="family.json with trained members (`cmpnas retrain --family`): export all"
        ),
    ] = None,
    exporter: Annotated[
        ExporterKind,
        typer.Option(
            "--exporter",
            help="auto = dynamo if onnxscript is installed, falling back to the legacy TorchScript exporter",
        ),
    ] = ExporterKind.auto,
    opset: Annotated[int, typer.Option("--opset", min=9, help="ONNX opset version")] = 18,
    tolerance: Annotated[
        float, typer.Option("--tolerance", min=0.0, help="max abs difference allowed vs PyTorch")
    ] = 1e-4,
    latency_runs: Annotated[
        int, typer.Option("--latency-runs", min=1, help="timed runs per latency measurement")
    ] = 50,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="skip the latency measurement")] = False,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="also write an int8 query model (static QDQ quantization calibrated on training images), refused "
            "if its embeddings drift from the fp32 export's; reports its retrieval against the gallery model",
        ),
    ] = False,
    int8_granularity: Annotated[
        Int8Granularity | None,
        typer.Option(
            "--int8-granularity",
            help="--int8: weight scales auto (default: per channel only on the convolutions whose channels one "
            "scale would crush, per tensor elsewhere), per-tensor, or per-channel (every weight)",
        ),
    ] = None,
    int8_reduce_range: Annotated[
        bool,
        typer.Option(
            "--int8-reduce-range",
            help="--int8: 7-bit weights, for x86 CPUs without VNNI whose int8 kernels can saturate 8-bit ones "
            "(the report's 'kernels' cosine shows it); costs a little weight precision",
        ),
    ] = False,
    gallery_model: Annotated[
        Path | None,
        typer.Option(
            "--gallery-model",
            help="--int8: the gallery model to score against (default: the one the model's manifest.json names)",
        ),
    ] = None,
    data_config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="--int8: YAML config whose data section gives the calibration (train), parity (val) and "
            "scoring (test) images (default: config.yaml beside --model)",
        ),
    ] = None,
    calibration_images: Annotated[
        int, typer.Option("--calibration-images", min=1, help="--int8: training images to calibrate on")
    ] = 512,
    min_cosine: Annotated[
        float,
        typer.Option(
            "--min-cosine",
            min=-1.0,
            max=1.0,
            help="--int8: least mean cosine of int8 vs fp32 embeddings on held-out images",
        ),
    ] = 0.99,
) -> None:
    """Export a model to ONNX (dynamic batch), check parity with PyTorch and measure latency; --int8 also
    writes and scores an int8 version."""
    if (model is None) == (family is None):
        raise CmpnasError(
            "Pass exactly one of --model and --family.", "--model M.safetensors, or --family family.json"
        )
    int8_only = (int8_granularity, gallery_model, data_config) != (None, None, None) or int8_reduce_range
    if int8_only and not int8:
        raise CmpnasError(
            "--int8-granularity, --int8-reduce-range, --gallery-model and --config only apply to an int8 export.",
            "add --int8",
        )
    if family is not None:
        if int8:
            raise CmpnasError(
                "--int8 quantizes one query model, not a family.", "pass --model MEMBER.safetensors"
            )
        file, doc = read_family(family)
        res = export_family(doc, file.parent, out, exporter=exporter.value, latency_runs=latency_runs)
        for m in res["members"]:
            progress.event(
                "done",
                message=(
                    f"{m['name']}: {out / m['onnx']} ({m['macs_counted'] / 1e6:.3f} MMACs, "
                    f"{m['latency_ms_measured']:.3f} ms measured, table error {m['latency_error_pct']} %)"
                ),
            )
        return
    options = Int8Options(
        granularity=(int8_granularity or Int8Granularity.auto).value,
        reduce_range=int8_reduce_range,
        calibration_images=calibration_images,
        min_cosine=min_cosine,
        latency_runs=latency_runs,
        measure=not no_latency,
    )
    report = export_model(
        model,
        out,
        exporter=exporter.value,
        opset=opset,
        tolerance=tolerance,
        latency_runs=latency_runs,
        measure=not no_latency,
        int8=int8,
        int8_options=options,
        gallery_model=gallery_model,
        data_config=data_config,
    )
    lines = []
    if report.get("exporter"):
        lines.append(
            f"wrote {out} ({report['exporter']} exporter, opset {opset}); parity max abs diff "
            f"{report['parity']['max_abs_diff']:.2e}"
        )
    if report["exporter_fallback_reason"] and exporter == ExporterKind.auto:
        lines.append(f"note: used the legacy exporter ({report['exporter_fallback_reason']})")
    lat = report.get("latency_ms") or {}
    for batch in ("batch_1", "batch_32"):
        if batch in lat:
            cells = ", ".join(
                f"{name} p50 {v['p50']:.2f} / p99 {v['p99']:.2f}" for name, v in lat[batch].items()
            )
            lines.append(f"  {batch} (ms): {cells}")
    if "int8" in report:
        lines += _int8_lines(report["int8"])
    if progress.human():
        typer.echo("\n".join(lines))
    else:
        progress.event("done", message=lines[0])


def _int8_lines(r: dict[str, Any]) -> list[str]:
    """The int8 report in a few lines: size, drift from fp32, retrieval next to fp32's, latency."""
    ret, size = r["retrieval"], r["bytes"]
    lines = [
        f"wrote {r['int8']} ({r['quantization']['granularity']} int8, {size['int8']} of {size['fp32']} bytes = "
        f"{size['ratio']:.2f}x); cosine with fp32 mean {r['parity']['mean_cosine']:.4f} / min "
        f"{r['parity']['min_cosine']:.4f} on {r['parity']['images']} val images"
    ]
    k = r["kernels"]
    lines.append(
        f"  this CPU's int8 kernels against the file's arithmetic: cosine mean {k['mean_cosine']:.5f} / min "
        f"{k['min_cosine']:.5f}"
    )
    for setting in ("heterogeneous", "homogeneous"):
        a, b = ret["fp32"][setting], ret["int8"][setting]
        lines.append(
            f"  {setting} (test) top-1 / mAP: fp32 {a['top1']:.2f} / {a['map']:.2f}, int8 {b['top1']:.2f} / {b['map']:.2f}"
        )
    lat = r.get("latency_ms")
    if lat:
        lines.append(
            "  batch-1 p50 (ms): "
            + ", ".join(
                f"{k} fp32 {lat['fp32_p50'][k]:.3f} / int8 {lat['int8_p50'][k]:.3f}"
                for k in ("1thread", "default")
            )
        )
    lines.append(f"  report: {report_path_for(r['int8'])}")
    return lines


@logged
def serve_cmd(
    index_dir: IndexDirOpt,
    query_model: QueryModelsOpt,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port")] = 8000,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="largest accepted upload (MB)")
    ] = 10.0,
    max_k: Annotated[int, typer.Option("--max-k", min=1, help="largest k a client may ask for")] = 100,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", min=1, help="largest accepted image (width*height)")
    ] = 40_000_000,
    allow_incompatible: AllowIncompatibleOpt = False,
    nprobe: NprobeOpt = None,
    ef_search: EfSearchOpt = None,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=1,
            help="intra-op threads of torch, ONNX Runtime and FAISS; queries are answered one at a time, "
            "so 1 is usually fastest",
        ),
    ] = 1,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            help="server processes on the port, each loading the model and index and accepting from its own "
            "SO_REUSEPORT socket (the kernel spreads connections); about one core each",
        ),
    ] = 1,
    watch_index: Annotated[
        float,
        typer.Option(
            "--watch-index",
            min=0.0,
            help="seconds between checks for a rewritten index (append, backfill, transform-index, rebuild), "
            "which is then swapped in without dropping requests; 0 = never",
        ),
    ] = 2.0,
    ort_web_dir: Annotated[
        Path | None,
        typer.Option(
            "--ort-web-dir",
            help="folder holding ONNX Runtime Web's WebAssembly build (onnxruntime-web's dist/) for the page's "
            "in-browser embedding; default: $CMPNAS_ORT_WEB_DIR, else the checkout's web/node_modules",
        ),
    ] = None,
    dual_query: Annotated[
        list[str] | None,
        typer.Option(
            "--dual-query",
            help="NEW~OLD (names of two served query models): one more query model of that name for a backfill "
            "under way; NEW's embedding searches the re-embedded items, OLD's the others, merged by score "
            "(repeatable)",
        ),
    ] = None,
) -> None:
    """Serve the index over HTTP: POST /search, /search/vector, GET /healthz, /stats, /metrics, /models, /docs and a web
    page at /."""
    if ort_web_dir is not None:
        missing = [name for name in ORT_FILES if not (ort_web_dir / name).is_file()]
        if missing:
            raise CmpnasError(
                f"--ort-web-dir '{ort_web_dir}' lacks {', '.join(missing)}.",
                "point it at onnxruntime-web's dist/ folder (scripts/setup.sh installs it under web/node_modules)",
            )
        os.environ[ORT_DIR_ENV] = str(ort_web_dir.resolve())  # every worker process reads it
    named = expand_query_models(query_model)  # names clash or a family file is bad: say so before loading
    models = str(query_model[0]) if len(named) == 1 else ", ".join(f"{n} ({p})" for n, p in named)
    message = f"serving {index_dir} with {models} on http://{host}:{port}/"
    if progress.human():
        typer.echo(message)
    else:
        progress.event("serve", message=message)
    run_server(
        index_dir,
        *query_model,
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
        watch_index_s=watch_index,
        dual_query=list(dual_query or []),
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.command("serve")(serve_cmd)
