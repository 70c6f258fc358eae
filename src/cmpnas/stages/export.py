"""Stage ``export``: a query model to ONNX, with a parity check against torch and its latency."""

from __future__ import annotations

from pathlib import Path

from cmpnas.serving.export import export_onnx
from cmpnas.stages.common import StageResult


def export_model(
    model_path: str | Path,
    out_path: str | Path,
    *,
    exporter: str = "auto",
    opset: int = 18,
    tolerance: float = 1e-4,
    latency_runs: int = 50,
    measure: bool = True,
) -> StageResult:
    """Write ``out_path`` (.onnx) and ``export.json`` beside it; the result holds that report."""
    out = Path(out_path)
    report = export_onnx(
        model_path,
        out,
        exporter=exporter,  # type: ignore[arg-type]
        opset=opset,
        tolerance=tolerance,
        latency_runs=latency_runs,
        measure=measure,
    )
    return StageResult("export", out.parent, report)
