"""Benchmark (not a test): what an int8 query model costs in compatibility, and what it saves.

    PYTHONPATH=src .venv/bin/python benchmarks/int8.py \\
        --gallery-model runs/full/gallery/model.safetensors \\
        --query-model runs/full/retrain/R3/model.safetensors runs/full/retrain/R3/seed1/model.safetensors ... \\
        [--config FILE] [--set KEY=VALUE ...] \\
        [--calibration-images 512] [--latency-runs 200] [--exporter auto|dynamo|legacy] [--out FILE]

Exports the query model to fp32 ONNX (as `cmpnas export`), then quantizes it once per variant (static QDQ int8,
weights per tensor, per channel, and per channel only where one scale would crush a weight's channels, the last
also with 7-bit weights; calibrated on class-stratified training images) with the same code as `cmpnas export
--int8`. For each int8 file: mean / min cosine with the fp32 embeddings on validation images, and of this CPU's
fused int8 kernels with the file's arithmetic run as written (below 1 where they saturate: x86 without VNNI),
heterogeneous and homogeneous top-1 / mAP against the gallery model on the test split (leave-one-out, as the
evaluate stage scores) next to the fp32 export's, file sizes, and batch-1 p50 latency in ONNX Runtime at 1 thread
and at its default thread count. The data is the run's (``--config``, default: config.yaml beside the query
model, which for the default profile is the whole Fashion-MNIST test split).

Target: int8 loses at most 0.3 points of heterogeneous top-1 at at most 1/3 of the fp32 file size, judged on the
mean over the query models given (a profile's seeds); the JSON says "met" or "missed" with the numbers, per
variant, for the mean and for each model. Writes benchmarks/results/int8.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

MAX_TOP1_LOSS = 0.3  # points of heterogeneous top-1
MAX_SIZE_RATIO = 1 / 3  # int8 bytes / fp32 bytes
# JSON key -> (--int8-granularity, --int8-reduce-range): one weight scale per tensor, per output channel, or per
# channel only where one scale would crush a weight's channels; 8-bit weights, or 7-bit ones (reduce_range)
VARIANTS = {
    "per_tensor": ("per-tensor", False),
    "per_channel": ("per-channel", False),
    "auto": ("auto", False),
    "auto_reduce_range": ("auto", True),
}


def target_check(report: dict[str, Any]) -> dict[str, Any]:
    """The target, with the numbers it was judged on."""
    ret = report["retrieval"]
    loss = ret["fp32"]["heterogeneous"]["top1"] - ret["int8"]["heterogeneous"]["top1"]
    ratio = report["bytes"]["ratio"]
    top1_ok, size_ok = loss <= MAX_TOP1_LOSS + 1e-9, ratio <= MAX_SIZE_RATIO
    verdict = "met" if top1_ok and size_ok else "missed"
    return {
        "target": f"int8 loses <= {MAX_TOP1_LOSS} points of heterogeneous top-1 at <= 1/3 of the fp32 file size",
        "heterogeneous_top1_loss_points": round(loss, 4),
        "size_ratio": round(ratio, 4),
        "top1_within_limit": top1_ok,
        "size_within_limit": size_ok,
        "verdict": verdict,
        "summary": (
            f"{verdict}: heterogeneous top-1 {ret['fp32']['heterogeneous']['top1']:.2f} -> "
            f"{ret['int8']['heterogeneous']['top1']:.2f} ({-loss:+.2f} points, limit -{MAX_TOP1_LOSS}), "
            f"{report['bytes']['int8']} of {report['bytes']['fp32']} bytes ({ratio:.3f}x, limit {MAX_SIZE_RATIO:.3f}x)"
        ),
    }


def _row(report: dict[str, Any]) -> dict[str, Any]:
    """One variant's figures, without the repeated run-wide fields."""
    keep = ("quantization", "calibration", "parity", "kernels", "bytes", "retrieval", "latency_ms")
    return {**{k: report[k] for k in keep}, "target_check": target_check(report)}


def mean_check(per_model: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """The target judged on the mean over the query models (a profile's seeds), per variant."""
    out: dict[str, Any] = {}
    for name in variants:
        checks = [m["int8"][name]["target_check"] for m in per_model if "target_check" in m["int8"].get(name, {})]
        if len(checks) != len(per_model):
            out[name] = {"verdict": "missed", "summary": "a model could not be quantized (see per_model)"}
            continue
        loss = statistics.fmean(c["heterogeneous_top1_loss_points"] for c in checks)
        ratio = max(c["size_ratio"] for c in checks)
        ok = loss <= MAX_TOP1_LOSS + 1e-9 and ratio <= MAX_SIZE_RATIO
        out[name] = {
            "n_models": len(checks),
            "heterogeneous_top1_loss_points": [c["heterogeneous_top1_loss_points"] for c in checks],
            "mean_loss_points": round(loss, 4),
            "max_size_ratio": round(ratio, 4),
            "verdict": "met" if ok else "missed",
            "summary": f"{'met' if ok else 'missed'}: mean heterogeneous top-1 change {-loss:+.2f} points over "
            f"{len(checks)} model(s) (limit -{MAX_TOP1_LOSS}), size <= {ratio:.3f}x (limit {MAX_SIZE_RATIO:.3f}x)",
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery-model", default="runs/default/gallery/model.safetensors")
    ap.add_argument(
        "--query-model",
        nargs="+",
        default=["runs/default/retrain/R3/model.safetensors"],
        help="one query model, or several (a profile's seeds: the target is judged on their mean)",
    )
    ap.add_argument("--config", default=None, help="data config (default: config.yaml beside the first --query-model)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--calibration-images", type=int, default=512)
    ap.add_argument("--parity-images", type=int, default=1000)
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}: pass --variants from {', '.join(VARIANTS)}")

    from cmpnas.config import load_config
    from cmpnas.data.factory import build_data
    from cmpnas.models.embedding import load_model

    queries, gallery = [Path(q) for q in args.query_model], Path(args.gallery_model)
    for what, p in [*(("--query-model", q) for q in queries), ("--gallery-model", gallery)]:
        if not p.is_file():
            ap.error(f"{what} {p} does not exist: pass the model.safetensors files of a finished run")
    config = Path(args.config) if args.config else queries[0].parent / "config.yaml"
    if not config.is_file():
        ap.error(f"no data config: {config} does not exist; pass --config")
    cfg = load_config(config, args.overrides)
    t0, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    data = build_data(cfg.data)
    gallery_model = load_model(gallery)
    per_model = [measure(query, data, gallery_model, args) for query in queries]
    payload = {
        "models": {"gallery": str(gallery), "query": [m["models"]["query"] for m in per_model]},
        "data": {
            "config": str(config),
            "overrides": args.overrides,
            "name": data.name,
            "train": len(data.train),
            "val": len(data.val),
            "test": len(data.test),
        },
        "command": " ".join(["benchmarks/int8.py", *sys.argv[1:]]),
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average_1min": {
            "start": load_start,
            "end": round(os.getloadavg()[0], 2),
        },  # timings share the CPU
        "mean": mean_check(per_model, args.variants),
        "per_model": per_model,
    }
    write_result("int8", payload, args.out)


def measure(query: Path, data: Any, gallery_model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Export one query model to fp32 ONNX, quantize it both ways and score each against the gallery."""
    from cmpnas.errors import CmpnasError
    from cmpnas.serving.export import export_onnx
    from cmpnas.serving.quantize import Int8Options, quantize_export

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cmpnas-int8-bench-") as tmp:
        fp32 = Path(tmp) / "query.onnx"
        export = export_onnx(query, fp32, exporter=args.exporter, measure=False)  # type: ignore[arg-type]
        for name in args.variants:
            granularity, reduce_range = VARIANTS[name]
            opts = Int8Options(
                granularity=granularity,
                reduce_range=reduce_range,
                calibration_images=args.calibration_images,
                parity_images=args.parity_images,
                latency_runs=args.latency_runs,
                min_cosine=-1.0,  # a benchmark records a drifting file instead of refusing it
            )
            try:
                rows[name] = _row(
                    quantize_export(fp32, data, gallery_model, Path(tmp) / f"{name}.int8.onnx", opts)
                )
            except CmpnasError as exc:
                rows[name] = {"error": str(exc)}
            print(f"{query} {name}: {rows[name].get('target_check', {}).get('summary', rows[name].get('error'))}")
    return {
        "models": {
            "query": str(query),
            "query_fingerprint": export["fingerprint"],
            "compatible_with": export["compatible_with"],
            "exporter": export["exporter"],
            "opset": export["opset"],
        },
        "int8": rows,
    }


if __name__ == "__main__":
    main()
