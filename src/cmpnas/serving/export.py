"""Query-model formats for serving: ONNX export of a cmpnas model, and encoders that run either format.

Why one module: the ONNX metadata keys written by :func:`export_onnx` are exactly what :func:`load_encoder`
reads back, so a search can check compatibility from an ``.onnx`` file alone (no checkpoint needed on device).

Exporter choice (torch 2.14): ``exporter="auto"`` uses the dynamo exporter (``torch.export`` based, the
supported path; the TorchScript one is deprecated and warns that it will be removed) when ``onnxscript`` is
importable, and falls back to the legacy exporter if dynamo fails or onnxscript is missing. Both give
max |diff| < 1e-6 on the project's backbones here; dynamo takes 5-20 s on small models, legacy about 1-3 s.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from cmpnas import __version__
from cmpnas.data.transforms import normalize_batch, pil_to_uint8
from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_path, check_output_path, write_json_atomic
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint, load_model
from cmpnas.models.onnx_runtime import DEFAULT_OPSET, export_legacy
from cmpnas.models.onnx_runtime import session as onnx_session  # the one ORT session factory (re-exported)

META_FORMAT = "cmpnas.format"
META_FINGERPRINT = "cmpnas.fingerprint"
META_COMPATIBLE_WITH = "cmpnas.compatible_with"
META_SPEC = "cmpnas.spec"
META_QUANTIZATION = "cmpnas.quantization"  # set on a quantized copy: same fingerprint, another kind
META_INPUT = "cmpnas.input"  # {"in_chans","input_size","mean","std"}: what a device needs to preprocess
ONNX_FORMAT = "cmpnas.onnx_query_model.v1"
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
Exporter = Literal["auto", "dynamo", "legacy"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise unit length in float32 (inner product = cosine), safe for zero rows."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------------------------- encoders
@dataclass
class Encoder:
    """A loaded model that turns images into L2-normalised float32 embeddings (torch or ONNX Runtime)."""

    spec: ModelSpec
    fingerprint: str
    compatible_with: str | None
    path: Path
    kind: str
    _run: Callable[[np.ndarray], np.ndarray]

    @property
    def dim(self) -> int:
        return int(self.spec.embed_dim)

    def embed_uint8(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 [B,C,H,W] already at the model's input size -> normalised embeddings [B,D]."""
        x = normalize_batch(batch, self.spec.mean, self.spec.std).numpy()
        return l2_normalize(self._run(x))

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        batch = torch.stack([pil_to_uint8(im, self.spec.in_chans, self.spec.input_size) for im in images])
        return self.embed_uint8(batch)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "compatible_with": self.compatible_with,
            "dim": self.dim,
            "name": self.spec.name,
        }


def torch_encoder(model: EmbeddingModel, path: str | Path = "<memory>") -> Encoder:
    model = model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return Encoder(model.spec, fingerprint(model), model.spec.compatible_with, Path(path), "torch", run)


def onnx_encoder(path: str | Path, threads: int | None = None) -> Encoder:
    """Load an ``.onnx`` written by :func:`export_onnx`; spec and fingerprints come from metadata_props."""
    p = Path(path)
    if not p.is_file():
        raise CmpnasError(f"ONNX model '{p}' does not exist.", "pass the .onnx written by cmpnas export")
    session = onnx_session(p, threads)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get(META_FORMAT) != ONNX_FORMAT or META_SPEC not in meta:
        raise CmpnasError(
            f"'{p}' has no cmpnas metadata (spec, fingerprints).",
            "export it with cmpnas export, which records what search needs to check compatibility",
        )
    spec = ModelSpec.parse(meta[META_SPEC], p)
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {input_name: x.astype(np.float32, copy=False)})[0])

    compat = meta.get(META_COMPATIBLE_WITH) or None
    kind = "onnx-int8" if META_QUANTIZATION in meta else "onnx"  # what /stats and /models show per model
    return Encoder(spec, meta[META_FINGERPRINT], compat, p, kind, run)


def load_encoder(path: str | Path, threads: int | None = None) -> Encoder:
    """A ``.safetensors`` checkpoint (torch eager) or an exported ``.onnx`` (ONNX Runtime)."""
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        return onnx_encoder(p, threads)
    return torch_encoder(load_model(p), p)


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
