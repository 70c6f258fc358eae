"""ONNX export of a cmpnas query model, with the metadata :mod:`cmpnas.serving.encoder` reads back, a parity
check against PyTorch and a latency measurement.

Exporter choice: ``exporter="auto"`` uses the dynamo exporter (``torch.export`` based, the supported path; the
TorchScript one is deprecated and warns that it will be removed) when ``onnxscript`` is importable, and falls
back to the legacy exporter if dynamo fails or onnxscript is missing. Both are parity-checked the same way;
dynamo takes longer to export.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cmpnas import __version__
from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_path, check_output_path, write_json_atomic
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint, load_model
from cmpnas.models.onnx_runtime import DEFAULT_OPSET, export_legacy
from cmpnas.serving.encoder import (
    INPUT_NAME,
    META_COMPATIBLE_WITH,
    META_FINGERPRINT,
    META_FORMAT,
    META_INPUT,
    META_SPEC,
    ONNX_FORMAT,
    OUTPUT_NAME,
    onnx_session,
)

Exporter = Literal["auto", "dynamo", "legacy"]


# --------------------------------------------------------------------------------------------- export
def _onnxscript_available() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _export_dynamo(model: EmbeddingModel, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
        if program is None:
            raise RuntimeError("dynamo export returned no program")
        program.save(str(path), external_data=False)


def _export_legacy(model: EmbeddingModel, example: torch.Tensor, path: Path, opset: int) -> None:
    export_legacy(
        model,
        example,
        path,
        opset=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )


def _run_exporter(
    model: EmbeddingModel, path: Path, exporter: Exporter, opset: int
) -> tuple[str, str | None]:
    """Export to ``path``; returns (exporter used, why dynamo was not used or None)."""
    example = torch.randn(*model.input_shape(2))  # batch 2: a batch of 1 can get specialised as a constant
    if exporter == "legacy":
        _export_legacy(model, example, path, opset)
        return "legacy", "requested"
    if exporter == "auto" and not _onnxscript_available():
        _export_legacy(model, example, path, opset)
        return "legacy", "onnxscript is not installed"
    try:
        _export_dynamo(model, example, path, opset)
        return "dynamo", None
    except Exception as exc:  # noqa: BLE001 - the dynamo exporter fails in many ways; auto falls back
        if exporter == "dynamo":
            raise CmpnasError(
                f"The dynamo ONNX exporter failed: {type(exc).__name__}: {str(exc)[:300]}",
                "retry with --exporter legacy",
            ) from None
        _export_legacy(model, example, path, opset)
        return "legacy", f"dynamo failed: {type(exc).__name__}: {str(exc)[:200]}"


def _add_metadata(path: Path, model: EmbeddingModel, fp: str) -> None:
    """The cmpnas keys search reads back; the dynamo exporter's debug records (per node: stack traces, module
    paths; per graph: the export signature) are dropped, as on a small query model they can be about half the
    file a device downloads."""
    import onnx

    proto = onnx.load(str(path))
    del proto.graph.metadata_props[:]
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    spec = model.spec
    props = {
        META_FORMAT: ONNX_FORMAT,
        META_FINGERPRINT: fp,
        META_COMPATIBLE_WITH: spec.compatible_with or "",
        META_SPEC: spec.to_json(),
        META_INPUT: json.dumps(
            {
                "in_chans": spec.in_chans,
                "input_size": spec.input_size,
                "mean": spec.mean,
                "std": spec.std,
                "layout": "NCHW float32, (x/255-mean)/std",
            }
        ),
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cmpnas"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def percentiles_ms(
    fn: Callable[[], object], runs: int, warmup: int = 3, time_cap_s: float = 10.0
) -> dict[str, float]:
    """p50/p99/mean wall time of ``fn`` over ``runs`` calls (fewer if ``time_cap_s`` runs out first)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + time_cap_s
    while len(times) < runs and (not times or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    arr = np.asarray(times)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
        "runs": len(times),
    }


def measure_latency(
    model: EmbeddingModel | ModelSpec,
    onnx_path: Path,
    runs: int = 50,
    batches: Sequence[int] = (1, 32),
) -> dict[str, Any]:
    """Torch eager vs ONNX Runtime, each with 1 thread and with default threads, per batch size, in ms.

    The 1-thread rows are the fair comparison on a shared machine: with other processes busy, torch's
    default OpenMP threads can stall in barriers and take 100x longer per call. Given only a spec (e.g. for
    an int8 file, which has no eager counterpart), only the ONNX Runtime rows are timed.
    """
    sessions = {
        "onnxruntime_1thread": onnx_session(onnx_path, threads=1),
        "onnxruntime_default": onnx_session(onnx_path),
    }
    spec = model if isinstance(model, ModelSpec) else model.spec
    default_threads = torch.get_num_threads()
    out: dict[str, Any] = {"torch_threads": default_threads}
    for b in batches:
        x = torch.randn(b, spec.in_chans, spec.input_size, spec.input_size)
        xn = x.numpy()
        row: dict[str, Any] = {}
        if isinstance(model, EmbeddingModel):
            with torch.inference_mode():
                row["torch_eager"] = percentiles_ms(lambda x=x: model(x), runs)
                torch.set_num_threads(1)
                try:
                    row["torch_eager_1thread"] = percentiles_ms(lambda x=x: model(x), runs)
                finally:
                    torch.set_num_threads(default_threads)
        for name, sess in sessions.items():
            row[name] = percentiles_ms(lambda s=sess, xn=xn: s.run(None, {INPUT_NAME: xn}), runs)
        out[f"batch_{b}"] = row
    return out


def export_onnx(
    model_path: str | Path,
    out_path: str | Path,
    *,
    exporter: Exporter = "auto",
    opset: int = DEFAULT_OPSET,
    tolerance: float = 1e-4,
    latency_runs: int = 50,
    measure: bool = True,
    parity_batch: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Export a cmpnas model to ONNX (dynamic batch), check parity against torch, measure latency.

    The ``.onnx`` only appears at ``out_path`` if the parity check passes; ``export.json`` beside it
    records exporter, parity and latency. Returns that report.
    """
    out = Path(out_path)
    if out.suffix.lower() != ".onnx":
        raise CmpnasError(f"Output '{out}' does not end in .onnx.", "pass --out NAME.onnx")
    check_output_path(out, "file")  # before the (slow) export, not after it
    model = load_model(model_path)
    fp = fingerprint(model)
    t0 = time.perf_counter()
    with atomic_path(out) as tmp:
        used, fallback = _run_exporter(model, tmp, exporter, opset)
        _add_metadata(tmp, model, fp)
        export_s = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(*model.input_shape(parity_batch), generator=gen)
        with torch.inference_mode():
            ref = model(x).numpy()
        got = onnx_session(tmp).run(None, {INPUT_NAME: x.numpy()})[0]
        max_diff = float(np.abs(np.asarray(got) - ref).max())
        if not max_diff <= tolerance:  # also catches NaN
            raise CmpnasError(
                f"ONNX output differs from PyTorch by {max_diff:.3g} (> {tolerance:g}); nothing written.",
                "try --exporter legacy or another --opset, or report the model's backbone",
            )
        latency = measure_latency(model, tmp, latency_runs) if measure else None
    report = {
        "onnx": str(out),
        "source_model": str(model_path),
        "fingerprint": fp,
        "compatible_with": model.spec.compatible_with,
        "spec": json.loads(model.spec.to_json()),
        "exporter": used,
        "exporter_fallback_reason": fallback,
        "opset": opset,
        "dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        "export_seconds": round(export_s, 3),
        "onnx_bytes": out.stat().st_size,
        "parity": {"batch": parity_batch, "max_abs_diff": max_diff, "tolerance": tolerance},
        "latency_ms": latency,
        "versions": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(out.parent / "export.json", report)
    return report


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "cmpnas": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
    }
