"""An int8 query model that stays compatible: static post-training quantization of a cmpnas ONNX export.

Why here: the query model is the part that runs on the device, so it is the one worth shrinking; but its
embeddings are only useful while they stay in the gallery model's space. So a quantized file is written
only if its embeddings agree with the fp32 export's on held-out images, and its report measures what
matters for search: heterogeneous (int8 query vs gallery embeddings) and homogeneous retrieval on the test
split, next to the same figures of the fp32 export, plus file sizes and batch-1 latency in ONNX Runtime.

Why static QDQ: activation scales are fixed once from calibration images (dynamic quantization recomputes
them on every call), and the QDQ form is what ONNX Runtime fuses into its int8 kernels on CPU. Calibration uses a fixed, seeded,
class-stratified set of *training* images; the parity check uses the validation split; the test split is
only ever scored, never calibrated on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmpnas.data.base import DataBundle, ImageDataset, stratified_subset
from cmpnas.data.batching import fetch_batch
from cmpnas.data.transforms import normalize_batch
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.compare import metric_subset
from cmpnas.evaluation.evaluate import LeaveOneOut, three_way
from cmpnas.io import atomic_path, check_output_path, write_json_atomic
from cmpnas.manifest import environment
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint, load_model
from cmpnas.serving.encoder import INPUT_NAME, META_QUANTIZATION, onnx_encoder, onnx_session
from cmpnas.serving.export import measure_latency

INT8_SUFFIX = ".int8.onnx"
# Salts of the two seeded draws (as the data factory salts its own), so each set is fixed by the seed alone.
_SEED_CALIBRATION = 8101
_SEED_PARITY = 8102


GRANULARITIES = ("per-tensor", "per-channel", "auto")
# auto: a weight whose median output channel would get fewer of int8's 127 levels than this under one scale
# per tensor is quantized per channel (a few channels far wider than the rest, e.g. after BN folding)
MIN_LEVELS = 16


@dataclass(frozen=True)
class Int8Options:
    """How to quantize and how strictly to check the result (the CLI's --int8-* options)."""

    # per-tensor: one scale per weight; per-channel: one per output channel of every weight; auto: per channel
    # only on the convolution weights that one scale would crush (see _crushed_weights), per tensor elsewhere.
    # auto is the default: the size of per-tensor where one scale holds the weights, per channel where it does not
    granularity: str = "auto"
    # 7-bit weights: on x86 CPUs without VNNI, ONNX Runtime's int8 kernels add products in 16-bit pairs that 8-bit
    # weights can saturate (its quantization guide); 7-bit ones cannot, at the cost of one bit of weight precision
    reduce_range: bool = False
    calibration_images: int = 512  # training images, class-stratified (capped at the split's size)
    calibration_batch: int = 64
    parity_images: int = 512  # validation images the int8 / fp32 cosine is measured on
    min_cosine: float = 0.99  # mean cosine int8 vs fp32 below this: refused, nothing written
    seed: int = 0
    eval_batch_size: int = 512
    latency_runs: int = 50
    measure: bool = True  # time batch 1 in ONNX Runtime (off in tests: timings are not asserted)


def int8_path_for(fp32_path: str | Path) -> Path:
    """``query.onnx`` -> ``query.int8.onnx`` (beside it, so a device ships either file)."""
    p = Path(fp32_path)
    return p.with_name(p.stem + INT8_SUFFIX)


def report_path_for(int8_path: str | Path) -> Path:
    """``query.int8.onnx`` -> ``query.int8.json``: the figures travel with the file they describe."""
    return Path(int8_path).with_suffix(".json")


# --------------------------------------------------------------------------------------------- image sets
class CalibrationReader:
    """ONNX Runtime's calibration input: fixed batches of normalised *training* images, in a fixed order.

    ``split`` and ``indices`` say exactly which rows of which split it serves (tests check them); it is an
    ``onnxruntime.quantization.CalibrationDataReader`` by duck typing (``get_next`` / ``rewind``), which is
    all ``quantize_static`` calls.
    """

    split = "train"

    def __init__(self, data: DataBundle, spec: ModelSpec, size: int, batch_size: int, seed: int) -> None:
        self.dataset: ImageDataset = data.train
        n = len(self.dataset)
        if n == 0:
            raise CmpnasError(
                "The data has no training images to calibrate the int8 model on.",
                "use the data config the model was trained with (its training split must not be empty)",
            )
        self.indices = stratified_subset(self.dataset.labels, min(size, n), seed=[seed, _SEED_CALIBRATION])
        self.spec = spec
        self.batch_size = max(1, batch_size)
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.indices):
            return None
        rows = self.indices[self._pos : self._pos + self.batch_size]
        self._pos += len(rows)
        return {INPUT_NAME: _normalised(self.dataset, rows, self.spec)}

    def rewind(self) -> None:
        self._pos = 0


def parity_indices(data: DataBundle, size: int, seed: int) -> np.ndarray:
    """Rows of the validation split the int8 / fp32 cosine is measured on (held out, never test)."""
    if len(data.val) == 0:
        raise CmpnasError(
            "The data has no validation images to check the int8 model against the fp32 export.",
            "set data.val_size > 0 in the config",
        )
    return stratified_subset(data.val.labels, min(size, len(data.val)), seed=[seed, _SEED_PARITY])


def _normalised(dataset: ImageDataset, rows: np.ndarray, spec: ModelSpec) -> np.ndarray:
    imgs, _ = fetch_batch(dataset, [int(i) for i in rows])
    return np.ascontiguousarray(normalize_batch(imgs, spec.mean, spec.std).numpy(), dtype=np.float32)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (float64, zero rows give 0)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return (a64 * b64).sum(axis=1) / np.maximum(norms, 1e-30)


class OnnxModule(nn.Module):
    """An ONNX file as a module with a ``spec``, so the project's one evaluation path (``three_way``,
    ``embed``) scores it exactly as it scores a torch model."""

    def __init__(self, path: str | Path, spec: ModelSpec, threads: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.path = Path(path)
        self._session = onnx_session(self.path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(np.asarray(self._session.run(None, {INPUT_NAME: xn})[0]))


# --------------------------------------------------------------------------------------------- quantize
@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger; a command's output is one line."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(before)


def _compact_names(model: Any) -> None:
    """Short internal tensor and node names (graph inputs and outputs keep theirs).

    The quantizer adds a Quantize/Dequantize pair per tensor with long derived names; on a small query model
    those names are a large share of the file, which is what int8 is meant to shrink.
    """
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for k, node in enumerate(graph.node):
        node.name = f"n{k}"
        del node.metadata_props[:]  # exporters' debug records, copied onto the quantized nodes
        node.doc_string = ""
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
    del graph.value_info[:]
    del graph.metadata_props[:]


def _crushed_weights(model: Any) -> list[str]:
    """The convolution weights of an ONNX graph that one int8 scale per tensor would crush: their median output
    channel spans fewer than ``MIN_LEVELS`` of the 127 levels the widest channel sets."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    crushed = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        w = np.abs(numpy_helper.to_array(inits[node.input[1]]))
        per_channel = w.reshape(w.shape[0], -1).max(axis=1)
        if per_channel.max() > 0 and np.median(per_channel) / per_channel.max() * 127 < MIN_LEVELS:
            crushed.append(node.input[1])
    return crushed


def quantize_file(
    fp32_path: Path,
    out_path: Path,
    reader: CalibrationReader,
    granularity: str,
    extra_meta: dict[str, str],
    reduce_range: bool = False,
) -> None:
    """Static QDQ int8 (weights and activations signed; weights 7-bit with ``reduce_range``) of ``fp32_path``
    into ``out_path``, keeping the export's cmpnas metadata (so search can still check compatibility from the
    file) plus ``extra_meta``."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = onnx.load(str(fp32_path))
    meta = {p.key: p.value for p in source.metadata_props if p.key.startswith("cmpnas.")}
    with tempfile.TemporaryDirectory(prefix="cmpnas-int8-") as tmp, _quiet_root_logger():
        pre, quantized = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        # BN folding and tensor shapes for the calibrator (ONNX Runtime's recommended first step)
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        overrides = (
            {w: [{"axis": 0}] for w in _crushed_weights(onnx.load(str(pre)))} if granularity == "auto" else {}
        )
        reader.rewind()
        quantize_static(
            str(pre),
            str(quantized),
            reader,  # type: ignore[arg-type]  # a CalibrationDataReader by duck typing
            quant_format=QuantFormat.QDQ,
            per_channel=granularity == "per-channel",
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            reduce_range=reduce_range,
            extra_options={"TensorQuantOverrides": overrides} if overrides else None,
        )
        model = onnx.load(str(quantized))
    _compact_names(model)
    del model.metadata_props[:]
    for key, value in {**meta, **extra_meta}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = source.producer_name
    model.producer_version = source.producer_version
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


# --------------------------------------------------------------------------------------------- the report
def _check_inputs(spec: ModelSpec, data: DataBundle, gallery: EmbeddingModel, fp32_path: Path) -> None:
    if (spec.in_chans, spec.input_size) != (data.in_chans, data.image_size):
        raise CmpnasError(
            f"'{fp32_path}' expects {spec.in_chans}x{spec.input_size}px input but the calibration data "
            f"'{data.name}' is {data.in_chans}x{data.image_size}px.",
            "pass --config with the data config the query model was trained with",
        )
    if gallery.spec.embed_dim != spec.embed_dim:
        raise CmpnasError(
            f"The gallery model embeds into {gallery.spec.embed_dim} dimensions, the query model into "
            f"{spec.embed_dim}.",
            "pass the gallery model the query model was trained against (--gallery-model)",
        )
    if (gallery.spec.in_chans, gallery.spec.input_size) != (data.in_chans, data.image_size):
        raise CmpnasError(
            f"The gallery model expects {gallery.spec.in_chans}x{gallery.spec.input_size}px input but the data "
            f"is {data.in_chans}x{data.image_size}px.",
            "pass the gallery model and data config of the same run",
        )


def _p50s(spec: ModelSpec, path: Path, runs: int) -> dict[str, float]:
    """Batch-1 p50 (ms) at 1 thread and at ONNX Runtime's default thread count."""
    row = measure_latency(spec, path, runs, batches=(1,))["batch_1"]
    return {"1thread": row["onnxruntime_1thread"]["p50"], "default": row["onnxruntime_default"]["p50"]}


def quantize_export(
    fp32_path: str | Path,
    data: DataBundle,
    gallery_model: str | Path | EmbeddingModel,
    out_path: str | Path | None = None,
    options: Int8Options | None = None,
) -> dict[str, Any]:
    """Write the int8 version of a cmpnas fp32 export (default: ``X.int8.onnx`` beside ``X.onnx``) and
    ``X.int8.json`` beside it; returns that report.

    Refused (nothing written) when ``fp32_path`` is not a cmpnas export, is already int8, or when the int8
    embeddings' mean cosine with the fp32 ones on held-out images is below ``options.min_cosine``.
    """
    opts = options or Int8Options()
    fp32 = Path(fp32_path)
    out = Path(out_path) if out_path is not None else int8_path_for(fp32)
    if opts.granularity not in GRANULARITIES:
        raise CmpnasError(
            f"Unknown int8 granularity '{opts.granularity}'.", f"use one of {', '.join(GRANULARITIES)}"
        )
    if out.suffix.lower() != ".onnx":
        raise CmpnasError(
            f"Output '{out}' does not end in .onnx.", f"pass a file name such as {fp32.stem}{INT8_SUFFIX}"
        )
    if out.resolve() == fp32.resolve():
        raise CmpnasError(
            f"The int8 output '{out}' would overwrite the fp32 export.", f"write it to {int8_path_for(fp32)}"
        )
    check_output_path(out, "file")
    encoder = onnx_encoder(fp32)  # refuses a file without cmpnas metadata
    _refuse_quantized(fp32)
    spec = encoder.spec
    gallery = gallery_model if isinstance(gallery_model, EmbeddingModel) else load_model(gallery_model)
    _check_inputs(spec, data, gallery, fp32)
    if spec.compatible_with and spec.compatible_with != fingerprint(gallery):
        raise CmpnasError(
            f"The query model was trained against gallery {spec.compatible_with}, not against the given gallery "
            f"model ({fingerprint(gallery)}).",
            "pass the gallery model of the same run (--gallery-model)",
        )
    reader = CalibrationReader(data, spec, opts.calibration_images, opts.calibration_batch, opts.seed)
    calibration = {
        "split": reader.split,
        "images": len(reader.indices),
        "class_stratified": True,
        "seed": opts.seed,
        "batch": reader.batch_size,
        "method": "minmax",
    }
    scheme = {
        "format": "QDQ",
        "weights": "int7 symmetric (reduce_range)" if opts.reduce_range else "int8 symmetric",
        "activations": "int8",
        "granularity": opts.granularity,
    }
    extra_meta = {META_QUANTIZATION: json.dumps({**scheme, "calibration": calibration}, sort_keys=True)}
    par_idx = parity_indices(data, opts.parity_images, opts.seed)
    with atomic_path(out) as tmp:
        quantize_file(fp32, tmp, reader, opts.granularity, extra_meta, opts.reduce_range)
        ref_session, got_session = onnx_session(fp32), onnx_session(tmp)
        simulated = onnx_session(tmp, optimize=False)
        parts, kernel_parts = [], []
        for start in range(0, len(par_idx), opts.eval_batch_size):
            x = _normalised(data.val, par_idx[start : start + opts.eval_batch_size], spec)
            ref = np.asarray(ref_session.run(None, {INPUT_NAME: x})[0])
            got = np.asarray(got_session.run(None, {INPUT_NAME: x})[0])
            parts.append(row_cosines(got, ref))
            kernel_parts.append(row_cosines(got, np.asarray(simulated.run(None, {INPUT_NAME: x})[0])))
        cos, kernel_cos = np.concatenate(parts), np.concatenate(kernel_parts)
        mean_cos, min_cos = float(cos.mean()), float(cos.min())
        if not mean_cos >= opts.min_cosine:  # also catches NaN
            raise CmpnasError(
                f"The int8 query model's embeddings have mean cosine {mean_cos:.4f} (min {min_cos:.4f}) with the "
                f"fp32 export's on {len(par_idx)} held-out images, below {opts.min_cosine:g}; nothing written.",
                "retry with "
                + ("--int8-granularity per-channel, " if opts.granularity != "per-channel" else "")
                + "more --calibration-images, or deploy the fp32 export",
            )
    report: dict[str, Any] = {
        "int8": str(out),
        "fp32": str(fp32),
        "fingerprint": encoder.fingerprint,
        "compatible_with": spec.compatible_with,
        "gallery_fingerprint": fingerprint(gallery),
        "quantization": scheme,
        "calibration": calibration,
        "parity": {
            "split": "val",
            "images": len(par_idx),
            "mean_cosine": mean_cos,
            "min_cosine": min_cos,
            "min_cosine_required": opts.min_cosine,
            "checked": "mean",
        },
        # this CPU's fused int8 kernels against the file's arithmetic simulated in float: further below 1 than
        # rounding explains, they saturate (x86 without VNNI), and another runtime (ORT Web, a VNNI server) embeds
        # the same file otherwise
        "kernels": {
            "split": "val",
            "images": len(par_idx),
            "mean_cosine": float(kernel_cos.mean()),
            "min_cosine": float(kernel_cos.min()),
        },
        "bytes": {"fp32": fp32.stat().st_size, "int8": out.stat().st_size},
    }
    report["bytes"]["ratio"] = report["bytes"]["int8"] / report["bytes"]["fp32"]
    report["retrieval"] = retrieval_fp32_vs_int8(fp32, out, spec, gallery, data, opts.eval_batch_size)
    report["latency_ms"] = latency_fp32_vs_int8(fp32, out, spec, opts.latency_runs) if opts.measure else None
    env = environment()
    report["environment"] = {**env, "cpu_count": os.cpu_count()}
    report["options"] = asdict(opts)
    write_json_atomic(report_path_for(out), report)
    return report


def _refuse_quantized(path: Path) -> None:
    import onnx

    props = {p.key for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if META_QUANTIZATION in props:
        raise CmpnasError(
            f"'{path}' is already an int8 model.", "quantize the fp32 export (the .onnx without .int8)"
        )


def retrieval_fp32_vs_int8(
    fp32_path: Path,
    int8_path: Path,
    spec: ModelSpec,
    gallery: EmbeddingModel,
    data: DataBundle,
    batch_size: int,
) -> dict[str, Any]:
    """Paragon / homogeneous / heterogeneous (leave-one-out on the test split, as the evaluate stage scores)
    of both query files against the gallery model, and int8 minus fp32 per setting."""
    protocol = LeaveOneOut(data.test)
    cache: dict[str, torch.Tensor] = {}  # the gallery model embeds the test split once for both files
    out: dict[str, Any] = {"protocol": {"name": "leave_one_out", "split": "test", "n_images": len(data.test)}}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        tw = three_way(OnnxModule(path, spec), gallery, protocol, batch_size=batch_size, gallery_cache=cache)
        out[name] = {setting: metric_subset(m) for setting, m in tw.items()}
    out["delta_int8_minus_fp32"] = {
        setting: {k: round(out["int8"][setting][k] - out["fp32"][setting][k], 4) for k in ("top1", "map")}
        for setting in ("homogeneous", "heterogeneous")
    }
    return out


def latency_fp32_vs_int8(fp32_path: Path, int8_path: Path, spec: ModelSpec, runs: int) -> dict[str, Any]:
    """Batch-1 p50 in ONNX Runtime of both files, at 1 thread and default threads, and fp32 / int8."""
    fp32, int8 = _p50s(spec, fp32_path, runs), _p50s(spec, int8_path, runs)
    return {
        "batch": 1,
        "runs": runs,
        "fp32_p50": fp32,
        "int8_p50": int8,
        "speedup_fp32_over_int8": {k: fp32[k] / int8[k] if int8[k] > 0 else None for k in fp32},
    }
