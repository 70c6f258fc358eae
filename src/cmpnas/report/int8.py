"""The int8 query model beside the fp32 export: does it stay compatible with the gallery index, and what does it
save? Read from the export stage's ``query.int8.json`` when the run asked for it (``run.export_int8``)."""

from __future__ import annotations

from typing import Any

from cmpnas.tables import markdown_table, num


def int8_summary(rep: dict[str, Any]) -> dict[str, Any]:
    """The figures the report keeps in results.json (test split for retrieval, validation for the cosine)."""
    ret = rep["retrieval"]
    out: dict[str, Any] = {
        "split": ret["protocol"]["split"],
        "granularity": rep["quantization"]["granularity"],
        "mean_cosine_to_fp32": rep["parity"]["mean_cosine"],
        "bytes": rep["bytes"],
    }
    for side in ("heterogeneous", "homogeneous"):
        out[side] = {
            "fp32": {m: ret["fp32"][side][m] for m in ("top1", "map")},
            "int8": {m: ret["int8"][side][m] for m in ("top1", "map")},
        }
    lat = rep.get("latency_ms")
    if lat:
        out["latency_ms_b1_p50"] = {"fp32": lat["fp32_p50"], "int8": lat["int8_p50"]}
    return out


def int8_markdown(summary: dict[str, Any]) -> str:
    """One table, fp32 against int8, and a line on size and cosine."""
    rows = []
    for side in ("heterogeneous", "homogeneous"):
        f, q = summary[side]["fp32"], summary[side]["int8"]
        rows.append([side, num(f["top1"], 2), num(q["top1"], 2), f"{q['top1'] - f['top1']:+.2f}", num(q["map"], 2)])
    b = summary["bytes"]
    lines = [
        markdown_table(
            ["M(query, gallery)", "fp32 top-1", "int8 top-1", "int8 - fp32", "int8 mAP"], rows, align="lrrrr"
        ),
        "",
        f"{summary['granularity']} int8, {summary['split']} split; {b['int8']:,} of {b['fp32']:,} bytes "
        f"({b['int8'] / b['fp32']:.2f}x); mean cosine with the fp32 embeddings {summary['mean_cosine_to_fp32']:.4f} "
        "(validation).",
    ]
    lat = summary.get("latency_ms_b1_p50")
    if lat:
        lines.append(
            f"Batch-1 p50 in ONNX Runtime, 1 thread: fp32 {lat['fp32']['1thread']:.3f} ms, int8 "
            f"{lat['int8']['1thread']:.3f} ms."
        )
    return "\n".join(lines) + "\n"
