"""Stage ``export``: a query model to ONNX, with a parity check against torch and its latency, and optionally
its int8 version with what quantization costs in compatibility (``cmpnas.serving.quantize``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmpnas.config import load_config, load_config_dict
from cmpnas.data.base import DataBundle
from cmpnas.errors import CmpnasError
from cmpnas.io import read_json
from cmpnas.manifest import MANIFEST
from cmpnas.serving.export import export_onnx
from cmpnas.serving.quantize import Int8Options, int8_path_for, quantize_export
from cmpnas.stages.common import StageResult, load_data

RUN_CONFIG = "config.yaml"  # what every training stage writes beside its model.safetensors


def export_model(
    model_path: str | Path,
    out_path: str | Path,
    *,
    exporter: str = "auto",
    opset: int = 18,
    tolerance: float = 1e-4,
    latency_runs: int = 50,
    measure: bool = True,
    int8: bool | None = None,
    int8_options: Int8Options | None = None,
    gallery_model: str | Path | None = None,
    data: DataBundle | None = None,
    data_config: str | Path | None = None,
) -> StageResult:
    """Write ``out_path`` (.onnx) and ``export.json`` beside it; the result holds that report.

    With ``int8``: also ``X.int8.onnx`` and ``X.int8.json`` beside it (the report's ``int8`` entry); left
    unset, as the run's ``config.yaml`` beside the model says (``run.export_int8``), so a run's export stage
    follows its config. A ``model_path`` that is already a cmpnas ``.onnx`` export is only quantized, into
    ``out_path``.
    Calibration and scoring need the data (``data``, else ``data_config``, else the run's ``config.yaml``
    beside the model) and the gallery model (``gallery_model``, else the one the model's manifest names).
    """
    src, out = Path(model_path), Path(out_path)
    is_onnx = src.suffix.lower() == ".onnx"
    if not src.is_file():  # before any int8 look-up beside it, so the first thing said is what is wrong
        raise CmpnasError(
            f"Model file '{src}' does not exist.",
            "pass the model.safetensors written by a training command, or an .onnx written by cmpnas export",
        )
    if int8 is None:
        int8 = not is_onnx and _run_asks_for_int8(src)
    if is_onnx and not int8:
        raise CmpnasError(
            f"'{src}' is already an ONNX file.", "pass the model's .safetensors, or add --int8 to quantize it"
        )
    if int8:  # a missing gallery or data config is refused before any (slow) work
        gallery = _resolve_gallery(src, gallery_model)
        cfg = None if data is not None else load_config(_resolve_data_config(src, data_config))
        if not gallery.is_file():
            raise CmpnasError(
                f"Gallery model '{gallery}' does not exist.", "pass --gallery-model GALLERY.safetensors"
            )
    if is_onnx:
        report: dict[str, Any] = {"onnx": str(src), "exporter": None, "exporter_fallback_reason": None}
    else:
        report = export_onnx(
            src,
            out,
            exporter=exporter,  # type: ignore[arg-type]
            opset=opset,
            tolerance=tolerance,
            latency_runs=latency_runs,
            measure=measure,
        )
    if int8:
        opts = int8_options or Int8Options(latency_runs=latency_runs, measure=measure)
        bundle = data if data is not None else load_data(cfg)  # type: ignore[arg-type]
        fp32, int8_out = (src, out) if is_onnx else (out, int8_path_for(out))
        report["int8"] = quantize_export(fp32, bundle, gallery, int8_out, opts)
    return StageResult("export", out.parent, report)


def _run_asks_for_int8(model_path: Path) -> bool:
    """``run.export_int8`` of the run's config beside the model (read as YAML: a config that no longer
    validates must not stop a plain fp32 export)."""
    beside = model_path.parent / RUN_CONFIG
    if not beside.is_file():
        return False
    try:
        run = load_config_dict(beside).get("run")
    except CmpnasError:
        return False
    return isinstance(run, dict) and run.get("export_int8") is True


def _resolve_data_config(model_path: Path, data_config: str | Path | None) -> Path:
    """The YAML whose ``data`` section gives the calibration (train), parity (val) and scoring (test) images."""
    if data_config is not None:
        return Path(data_config)
    beside = model_path.parent / RUN_CONFIG
    if model_path.suffix.lower() != ".onnx" and beside.is_file():
        return beside
    raise CmpnasError(
        f"--int8 needs the training images to calibrate on, and '{model_path}' has no {RUN_CONFIG} beside it "
        "to say which data it was trained on.",
        "pass --config with the data config the model was trained with",
    )


def _resolve_gallery(model_path: Path, gallery_model: str | Path | None) -> Path:
    """The gallery model the int8 query model is scored against: given, or the one the model's manifest names."""
    if gallery_model is not None:
        return Path(gallery_model)
    manifest = model_path.parent / MANIFEST
    named = None
    if model_path.suffix.lower() != ".onnx" and manifest.is_file():
        doc = read_json(manifest, "pass --gallery-model")
        inputs = doc.get("inputs") if isinstance(doc, dict) else None
        gallery = inputs.get("gallery") if isinstance(inputs, dict) else None
        named = gallery.get("path") if isinstance(gallery, dict) else None
    if named and Path(named).is_file():
        return Path(named)
    raise CmpnasError(
        f"--int8 scores the int8 query model against the gallery model: none was given for '{model_path}', and "
        f"no {MANIFEST} beside it names an existing one.",
        "pass --gallery-model GALLERY.safetensors",
    )
