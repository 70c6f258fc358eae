"""Stages of a query-model family (``nas.budgets``): retrain every member, export every member.

The search (``stages/search.py`` with ``family=True``) writes ``family.json``: one member per budget, its
architecture, MACs and predicted latency. :func:`retrain_family` trains each member from scratch with the compat
objective against the frozen gallery (a member whose architecture another budget also picked is trained once);
:func:`export_family` exports each to ONNX with the parity check, measures it on ONNX Runtime at batch 1 with 1
thread (the latency table's settings) and reports the table's prediction error. The exported ``family.json``
is what ``cmpnas serve --query-model FOLDER`` reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmpnas.config import Config, TrainConfig
from cmpnas.data.base import DataBundle
from cmpnas.errors import CmpnasError
from cmpnas.io import make_dirs, write_json_atomic
from cmpnas.manifest import write_manifest
from cmpnas.models.cost import LatencyTable, count_macs, measure_like
from cmpnas.models.embedding import load_model
from cmpnas.serving.export import export_onnx
from cmpnas.serving.family import FAMILY_FILE, read_family
from cmpnas.stages.common import MODEL_FILE, StageResult
from cmpnas.stages.query import retrain

ONNX_FILE = "query.onnx"


def retrain_family(
    cfg: Config,
    gallery_path: str | Path,
    family: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    data: DataBundle | None = None,
    train_cfg: TrainConfig | None = None,
) -> StageResult:
    """Every member trained from scratch with the compat objective into ``OUT/NAME/``; ``OUT/family.json``
    lists them with their models (what ``cmpnas export --family`` takes)."""
    _, doc = read_family(family)
    out = Path(out_dir)
    members: list[dict[str, Any]] = []
    trained: dict[str, str] = {}  # arch key -> member that trained it
    for m in doc["members"]:  # all checked before any training
        if "arch" not in m:
            raise CmpnasError(f"Family member '{m['name']}' has no architecture.", "pass the search's family.json")
    for m in doc["members"]:
        key = repr(m["arch"])
        if key not in trained:
            retrain(cfg, gallery_path, m["arch"], out / m["name"], resume=resume, data=data,
                    name=f"cmpnas-{m['name']}", train_cfg=train_cfg)
            trained[key] = m["name"]
        members.append({**m, "model": f"{trained[key]}/{MODEL_FILE}", "same_as": trained[key]})
    result = {**doc, "members": members}
    write_json_atomic(out / FAMILY_FILE, result)
    return StageResult("retrain-family", out, result)


def _latency_error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or not measured > 0:
        return None
    return round(100.0 * (predicted - measured) / measured, 2)


def export_family(
    family: dict[str, Any],
    base: Path,
    out_dir: str | Path,
    *,
    exporter: str = "auto",
    latency_runs: int = 50,
    references: Sequence[tuple[str, Path]] = (),
) -> StageResult:
    """Export every member (``model`` paths relative to ``base``) to ``OUT/NAME/query.onnx`` with the parity
    check, count its MACs on the exported model and time it whole the way the search's latency table timed its
    blocks (the family's ``latency_table``: ONNX Runtime, batch 1, 1 thread, same runs and statistic), against
    the table's prediction. ``OUT/family.json`` lists the exported members (``cmpnas serve --query-model OUT``).

    ``references`` (name, model): hand-designed models exported and timed the same way (``OUT/references/NAME``),
    so a plot can put every model on one latency axis. Without a table, the export's own ONNX Runtime p50 is the
    measured latency and no error is reported.
    """
    started = time.time()
    for m in family["members"]:  # before anything is written
        if not m.get("model"):
            raise CmpnasError(
                f"Family member '{m['name']}' has no trained model.",
                "retrain the members first: cmpnas retrain --family FAMILY.json --out DIR",
            )
    out = Path(out_dir)
    make_dirs(out)
    table_path = family.get("latency_table")
    table = LatencyTable.load(table_path) if table_path and Path(table_path).is_file() else None

    def exported(rows: list[tuple[str, Path]]) -> list[dict[str, Any]]:
        """(folder, model) -> the export, its counted MACs and its measured latency."""
        found = []
        for folder, model_path in rows:
            # the export's own timings only when there is no table: with one, every model is timed like it below
            report = export_onnx(
                model_path, out / folder / ONNX_FILE, exporter=exporter, latency_runs=latency_runs, measure=table is None  # type: ignore[arg-type]
            )
            model = load_model(model_path)
            row = {
                "model": str(model_path),
                "onnx": f"{folder}/{ONNX_FILE}",
                "fingerprint": report["fingerprint"],
                "macs_counted": count_macs(model, model.input_shape(1)),
                "parity_max_abs_diff": report["parity"]["max_abs_diff"],
            }
            if table is None:
                row["latency_ms_measured"] = report["latency_ms"]["batch_1"]["onnxruntime_1thread"]["p50"]
            found.append((model, row))
        if table is None or not found:
            return [row for _, row in found]
        shape = found[0][0].input_shape(1)
        measured = measure_like(table, [model for model, _ in found], shape)  # interleaved: one busy spell hits all
        return [{**row, "latency_ms_measured": ms} for (_, row), ms in zip(found, measured, strict=True)]

    # members and references in one call: their timings interleave, so a slow spell of the machine (seen here:
    # one model 2x slower for a minute) hits every model alike instead of one group
    member_rows = [(m["name"], (base / m["model"]).resolve()) for m in family["members"]]
    reference_rows = [(f"references/{name}", Path(path)) for name, path in references]
    found = exported(member_rows + reference_rows)
    rows, refs = found[: len(member_rows)], found[len(member_rows) :]
    members: list[dict[str, Any]] = []
    for m, row in zip(family["members"], rows, strict=True):
        predicted = m.get("latency_ms_predicted")
        members.append({**m, **row, "latency_error_pct": _latency_error(predicted, row["latency_ms_measured"])})
    errors = [abs(e) for e in (m["latency_error_pct"] for m in members) if e is not None and math.isfinite(e)]
    doc = {
        **{k: v for k, v in family.items() if k != "members"},
        "members": members,
        "latency_check": {
            "measured_as": (
                f"{table.meta.get('runtime')}, batch 1, {table.meta.get('threads')} thread(s), "
                f"{table.meta.get('statistic')} over {table.meta.get('rounds')} interleaved rounds of "
                f"{table.meta.get('repeats')} runs (as the latency table's blocks)"
                if table
                else "ONNX Runtime, batch 1, 1 thread, p50 of the export's runs (no latency table)"
            ),
            "mean_abs_error_pct": round(sum(errors) / len(errors), 2) if errors else None,
            "max_abs_error_pct": round(max(errors), 2) if errors else None,
        },
        "references": [{"name": name, **row} for (name, _), row in zip(references, refs, strict=True)],
    }
    write_json_atomic(out / FAMILY_FILE, doc)
    write_manifest(out, "export-family", {}, {"members": [m["model"] for m in members]}, {"family": FAMILY_FILE}, started)
    return StageResult("export-family", out, doc)
