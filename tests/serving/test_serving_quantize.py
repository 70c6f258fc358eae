"""int8 query model: file size, parity with the fp32 export (checked independently), the calibration set's
split, the report's fields, refusals. Synthetic data and untrained tiny nets: the figures are not asserted,
only that they are computed from the right images and files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from cmpnas.config import build_config
from cmpnas.data.base import DataBundle
from cmpnas.data.synthetic import make_synthetic_bundle
from cmpnas.errors import CmpnasError
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, save_model
from cmpnas.serving import quantize as quantize_mod
from cmpnas.serving.encoder import load_encoder
from cmpnas.serving.export import export_onnx
from cmpnas.serving.quantize import (
    META_QUANTIZATION,
    CalibrationReader,
    Int8Options,
    int8_path_for,
    parity_indices,
    quantize_export,
    report_path_for,
)
from cmpnas.stages import export_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = Int8Options(
    calibration_images=64, calibration_batch=16, parity_images=40, eval_batch_size=32, measure=False
)


def _spec(
    data: DataBundle, kw: dict, dim: int, compatible_with: str | None = None, backbone: str = "resnet_small"
) -> ModelSpec:
    return ModelSpec(
        backbone=backbone,
        backbone_kwargs=kw,
        embed_dim=dim,
        num_classes=data.num_classes,
        in_chans=data.in_chans,
        input_size=data.image_size,
        mean=list(data.mean),
        std=list(data.std),
        compatible_with=compatible_with,
    )


@pytest.fixture(scope="module")
def int8_models(tmp_path_factory: pytest.TempPathFactory, tiny_data: DataBundle) -> SimpleNamespace:
    """A gallery and a compatible query model shaped like the tiny data, the query's fp32 export and its
    int8 version (written once for the module)."""
    d = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    gfp = save_model(
        EmbeddingModel(_spec(tiny_data, {"widths": [8, 16], "depths": [1, 1], "strides": [1, 2]}, 32)),
        d / "g.safetensors",
    )
    torch.manual_seed(1)
    kw = {"widths": [16, 32], "depths": [1, 1], "strides": [2, 2]}
    save_model(EmbeddingModel(_spec(tiny_data, kw, 32, compatible_with=gfp)), d / "q.safetensors")
    export_onnx(d / "q.safetensors", d / "q.onnx", exporter="legacy", measure=False)
    report = quantize_export(d / "q.onnx", tiny_data, d / "g.safetensors", options=FAST)
    return SimpleNamespace(
        dir=d,
        gallery=d / "g.safetensors",
        query=d / "q.safetensors",
        fp32=d / "q.onnx",
        report=report,
        gfp=gfp,
    )


def _by_hand(images: torch.Tensor, spec: ModelSpec) -> np.ndarray:
    """(x/255 - mean) / std, written out here rather than through cmpnas' transforms."""
    x = images.numpy().astype(np.float32) / 255.0
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def test_int8_file_is_written_beside_and_at_most_half_the_size(int8_models: Any) -> None:
    int8 = int8_path_for(int8_models.fp32)
    assert int8 == int8_models.dir / "q.int8.onnx" and int8.is_file()
    fp32_bytes, int8_bytes = int8_models.fp32.stat().st_size, int8.stat().st_size
    assert int8_bytes <= fp32_bytes / 2, (int8_bytes, fp32_bytes)
    assert int8_models.report["bytes"] == {
        "fp32": fp32_bytes,
        "int8": int8_bytes,
        "ratio": int8_bytes / fp32_bytes,
    }
    proto = onnx.load(str(int8))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [i for i in proto.graph.initializer if len(i.dims) == 4]  # conv kernels
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)


def test_int8_file_keeps_the_compatibility_metadata(int8_models: Any) -> None:
    fp32, int8 = load_encoder(int8_models.fp32), load_encoder(int8_path_for(int8_models.fp32))
    assert (fp32.kind, int8.kind) == ("onnx", "onnx-int8") and int8.fingerprint == fp32.fingerprint
    assert int8.compatible_with == int8_models.gfp
    meta = {p.key: p.value for p in onnx.load(str(int8.path)).metadata_props}
    quant = json.loads(meta[META_QUANTIZATION])
    assert quant["format"] == "QDQ" and quant["calibration"]["split"] == "train"


def test_parity_cosine_matches_an_independent_numpy_cosine(int8_models: Any, tiny_data: DataBundle) -> None:
    spec = load_encoder(int8_models.fp32).spec
    rows = parity_indices(tiny_data, FAST.parity_images, FAST.seed)
    x = _by_hand(tiny_data.val.images[torch.as_tensor(rows)], spec)
    a = ort.InferenceSession(str(int8_models.fp32)).run(None, {"images": x})[0].astype(np.float64)
    b = (
        ort.InferenceSession(str(int8_path_for(int8_models.fp32)))
        .run(None, {"images": x})[0]
        .astype(np.float64)
    )
    cos = np.einsum("ij,ij->i", a, b) / np.sqrt(np.einsum("ij,ij->i", a, a) * np.einsum("ij,ij->i", b, b))
    parity = int8_models.report["parity"]
    assert parity["split"] == "val" and parity["images"] == len(rows) == FAST.parity_images
    assert parity["mean_cosine"] == pytest.approx(cos.mean(), abs=1e-6)
    assert parity["min_cosine"] == pytest.approx(cos.min(), abs=1e-6)
    assert parity["mean_cosine"] >= FAST.min_cosine and cos.min() < 1.0  # int8 really differs from fp32


def test_calibration_reader_serves_stratified_training_rows_only(tiny_data: DataBundle) -> None:
    spec = _spec(tiny_data, {"widths": [8], "depths": [1], "strides": [1]}, 16)
    reader = CalibrationReader(tiny_data, spec, 60, 16, seed=3)
    assert (
        reader.split == "train" and reader.dataset is tiny_data.train and reader.dataset is not tiny_data.test
    )
    served = []
    while (feed := reader.get_next()) is not None:
        served.append(feed["images"])
    served_x = np.concatenate(served)
    idx = torch.as_tensor(reader.indices)
    np.testing.assert_allclose(served_x, _by_hand(tiny_data.train.images[idx], spec), atol=1e-5)
    counts = np.bincount(tiny_data.train.labels[idx].numpy(), minlength=tiny_data.num_classes)
    assert counts.sum() == 60 and counts.max() - counts.min() <= 1  # class-stratified
    test_rows = {bytes(img.numpy().tobytes()) for img in tiny_data.test.images}
    assert not any(bytes(img.numpy().tobytes()) in test_rows for img in tiny_data.train.images[idx])
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["images"], served[0])  # a fixed order after rewind
    again = CalibrationReader(tiny_data, spec, 60, 16, seed=3)
    np.testing.assert_array_equal(again.indices, reader.indices)  # seeded: the same set every time
    assert not np.array_equal(CalibrationReader(tiny_data, spec, 60, 16, seed=4).indices, reader.indices)


def test_quantize_export_calibrates_on_the_train_split(
    int8_models: Any, tiny_data: DataBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[CalibrationReader] = []
    real = quantize_mod.quantize_file

    def spy(fp32: Path, out: Path, reader: CalibrationReader, *args: Any) -> None:
        seen.append(reader)
        real(fp32, out, reader, *args)

    monkeypatch.setattr(quantize_mod, "quantize_file", spy)
    opts = Int8Options(
        calibration_images=30, calibration_batch=8, parity_images=20, measure=False, granularity="per-channel"
    )
    report = quantize_export(
        int8_models.fp32, tiny_data, int8_models.gallery, tmp_path / "pc.int8.onnx", opts
    )
    (reader,) = seen
    assert reader.dataset is tiny_data.train and len(reader.indices) == 30
    assert report["calibration"]["split"] == "train" and report["calibration"]["images"] == 30
    assert report["quantization"]["granularity"] == "per-channel"


def test_report_json_has_the_fields(int8_models: Any) -> None:
    on_disk = json.loads(report_path_for(int8_path_for(int8_models.fp32)).read_text())
    assert on_disk == json.loads(json.dumps(int8_models.report))  # the JSON is the returned report
    ret = on_disk["retrieval"]
    assert ret["protocol"] == {"name": "leave_one_out", "split": "test", "n_images": 100}
    for precision in ("fp32", "int8"):
        for setting in ("paragon", "homogeneous", "heterogeneous"):
            assert {"top1", "map"} <= set(ret[precision][setting])
    assert ret["fp32"]["paragon"] == ret["int8"]["paragon"]  # the gallery side is the same model
    for setting in ("homogeneous", "heterogeneous"):
        for k in ("top1", "map"):
            want = ret["int8"][setting][k] - ret["fp32"][setting][k]
            assert ret["delta_int8_minus_fp32"][setting][k] == pytest.approx(want, abs=1e-3)
    assert on_disk["environment"]["cpu"] and on_disk["environment"]["cpu_count"] >= 1
    assert on_disk["gallery_fingerprint"] == int8_models.gfp and on_disk["latency_ms"] is None


def test_latency_rows_have_both_thread_settings(
    int8_models: Any, tiny_data: DataBundle, tmp_path: Path
) -> None:
    opts = Int8Options(calibration_images=20, parity_images=10, latency_runs=2)
    lat = quantize_export(int8_models.fp32, tiny_data, int8_models.gallery, tmp_path / "l.int8.onnx", opts)[
        "latency_ms"
    ]
    assert lat["batch"] == 1 and lat["runs"] == 2
    for key in ("fp32_p50", "int8_p50", "speedup_fp32_over_int8"):
        assert set(lat[key]) == {"1thread", "default"}
    for k in ("1thread", "default"):
        assert lat["speedup_fp32_over_int8"][k] == pytest.approx(lat["fp32_p50"][k] / lat["int8_p50"][k])


def test_drift_below_the_threshold_writes_nothing(
    int8_models: Any, tiny_data: DataBundle, tmp_path: Path
) -> None:
    opts = Int8Options(calibration_images=20, parity_images=10, measure=False, min_cosine=1.0)
    with pytest.raises(
        CmpnasError, match=r"mean cosine 0\.\d+ .* below 1; nothing written\. Fix: .*per-channel"
    ):
        quantize_export(int8_models.fp32, tiny_data, int8_models.gallery, tmp_path / "x.int8.onnx", opts)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_clear_errors(int8_models: Any, tiny_data: DataBundle, tmp_path: Path) -> None:
    plain = tmp_path / "plain.onnx"  # a valid ONNX model, but not a cmpnas export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(plain), dynamo=False)
    with pytest.raises(CmpnasError, match="no cmpnas metadata"):
        quantize_export(plain, tiny_data, int8_models.gallery, options=FAST)
    with pytest.raises(CmpnasError, match="already an int8 model"):
        quantize_export(
            int8_path_for(int8_models.fp32), tiny_data, int8_models.gallery, tmp_path / "y.onnx", FAST
        )
    other = make_synthetic_bundle(60, 20, 4, image_size=16)
    with pytest.raises(CmpnasError, match="1x28px input but the calibration data"):
        quantize_export(int8_models.fp32, other, int8_models.gallery, tmp_path / "z.onnx", FAST)
    with pytest.raises(CmpnasError, match="not against the given gallery"):
        quantize_export(int8_models.fp32, tiny_data, int8_models.query, tmp_path / "w.onnx", FAST)
    with pytest.raises(CmpnasError, match="would overwrite the fp32 export"):
        quantize_export(int8_models.fp32, tiny_data, int8_models.gallery, int8_models.fp32, FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx"]


def test_stage_refuses_int8_without_data_before_exporting(int8_models: Any, tmp_path: Path) -> None:
    out = tmp_path / "out" / "q.onnx"
    with pytest.raises(CmpnasError, match="no config.yaml beside it.*Fix: pass --config"):
        export_model(
            int8_models.query,
            out,
            exporter="legacy",
            measure=False,
            int8=True,
            gallery_model=int8_models.gallery,
        )
    with pytest.raises(CmpnasError, match="no manifest.json beside it names.*Fix: pass --gallery-model"):
        export_model(int8_models.query, out, exporter="legacy", measure=False, int8=True)
    assert not out.parent.exists()


def test_stage_exports_and_quantizes_with_the_run_data(
    int8_models: Any, tiny_data: DataBundle, tmp_path: Path
) -> None:
    out = tmp_path / "export" / "query.onnx"
    res = export_model(
        int8_models.query,
        out,
        exporter="legacy",
        measure=False,
        int8=True,
        int8_options=FAST,
        gallery_model=int8_models.gallery,
        data=tiny_data,
    )
    assert res["onnx"] == str(out) and res["int8"]["int8"] == str(tmp_path / "export" / "query.int8.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "export.json",
        "query.int8.json",
        "query.int8.onnx",
        "query.onnx",
    ]


@pytest.mark.parametrize("asked", [True, False])
def test_a_runs_export_stage_follows_run_export_int8(
    int8_models: Any, tiny_raw_factory: Any, tmp_path: Path, asked: bool
) -> None:
    """The pipeline calls the stage with the model of a run's folder only: config.yaml there decides."""
    folder = tmp_path / "retrain" / "R3"
    folder.mkdir(parents=True)
    model = folder / "model.safetensors"
    model.write_bytes(int8_models.query.read_bytes())
    raw = tiny_raw_factory()
    raw["run"]["export_int8"] = asked
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    manifest = {"inputs": {"gallery": {"path": str(int8_models.gallery)}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "export" / "query.onnx"
    res = export_model(model, out, exporter="legacy", measure=False, int8_options=FAST)
    assert ("int8" in res) is asked and (out.parent / "query.int8.onnx").is_file() is asked
    assert build_config(raw).run.export_int8 is asked  # the field the run's config validates


def test_auto_granularity_scales_per_channel_only_the_weight_one_scale_would_crush(
    int8_models: Any, tiny_data: DataBundle, tmp_path: Path
) -> None:
    from onnx import numpy_helper

    torch.manual_seed(2)
    model = EmbeddingModel(
        _spec(tiny_data, {"width_mult": 0.25}, 32, int8_models.gfp, backbone="tv:mobilenet_v2")
    )
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    with torch.no_grad():
        depthwise[2].weight[0] *= 1000  # one channel 1000x wider: one scale would zero the others
    save_model(model, tmp_path / "m.safetensors")
    export_onnx(tmp_path / "m.safetensors", tmp_path / "m.onnx", exporter="legacy", measure=False)
    opts = Int8Options(**{**FAST.__dict__, "granularity": "auto", "min_cosine": -1.0})
    quantize_export(tmp_path / "m.onnx", tiny_data, int8_models.gallery, tmp_path / "m.int8.onnx", opts)

    graph = onnx.load(str(tmp_path / "m.int8.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dequant = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    per_channel = []
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        weight = dequant[conv.input[1]]
        if inits[weight.input[1]].size > 1:
            per_channel.append(inits[weight.input[0]].shape)
    assert per_channel == [tuple(depthwise[2].weight.shape)]


def test_an_unknown_granularity_is_refused(int8_models: Any, tiny_data: DataBundle, tmp_path: Path) -> None:
    opts = Int8Options(**{**FAST.__dict__, "granularity": "per-layer"})
    with pytest.raises(CmpnasError, match="Unknown int8 granularity 'per-layer'"):
        quantize_export(int8_models.fp32, tiny_data, int8_models.gallery, tmp_path / "x.int8.onnx", opts)
    assert not (tmp_path / "x.int8.onnx").exists()


def _int8_conv_weights(path: Path) -> list[np.ndarray]:
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return [numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) == 4]


def test_reduce_range_keeps_weights_in_seven_bits(int8_models: Any, tiny_data: DataBundle, tmp_path: Path) -> None:
    full = _int8_conv_weights(int8_path_for(int8_models.fp32))
    assert max(int(np.abs(w).max()) for w in full) == 127  # 8-bit: the widest weight sets the top level
    opts = Int8Options(**{**FAST.__dict__, "reduce_range": True})
    out = tmp_path / "r.int8.onnx"
    report = quantize_export(int8_models.fp32, tiny_data, int8_models.gallery, out, opts)
    reduced = _int8_conv_weights(out)
    assert reduced and all(w.dtype == np.int8 for w in reduced)
    assert 32 < max(int(np.abs(w).max()) for w in reduced) <= 64  # 7-bit: VPMADDUBSW pair sums cannot saturate
    assert report["quantization"]["weights"].startswith("int7")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta[META_QUANTIZATION])["weights"] == report["quantization"]["weights"]
    assert report["options"]["reduce_range"] is True


def test_kernel_cosine_is_fused_int8_against_the_graph_run_as_written(
    int8_models: Any, tiny_data: DataBundle
) -> None:
    int8 = str(int8_path_for(int8_models.fp32))
    spec = load_encoder(int8_models.fp32).spec
    rows = parity_indices(tiny_data, FAST.parity_images, FAST.seed)
    x = _by_hand(tiny_data.val.images[torch.as_tensor(rows)], spec)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    simulated = ort.InferenceSession(int8, plain).run(None, {"images": x})[0].astype(np.float64)
    fused = ort.InferenceSession(int8).run(None, {"images": x})[0].astype(np.float64)
    cos = np.einsum("ij,ij->i", fused, simulated) / np.sqrt(
        np.einsum("ij,ij->i", fused, fused) * np.einsum("ij,ij->i", simulated, simulated)
    )
    kernels = int8_models.report["kernels"]
    assert kernels["split"] == "val" and kernels["images"] == len(rows)
    assert kernels["mean_cosine"] == pytest.approx(cos.mean(), abs=1e-6)
    assert kernels["min_cosine"] == pytest.approx(cos.min(), abs=1e-6)
    assert kernels["min_cosine"] != int8_models.report["parity"]["min_cosine"]  # not the drift from fp32
