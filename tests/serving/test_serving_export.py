"""ONNX export: parity, metadata, dynamic batch, export.json, and ONNX-vs-torch search agreement."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from cmpnas.errors import CmpnasError
from cmpnas.models.embedding import ModelSpec, load_model
from cmpnas.serving import export as export_mod
from cmpnas.serving.encoder import load_encoder, onnx_session
from cmpnas.serving.export import export_onnx
from cmpnas.serving.index import GalleryIndex, check_compatible


def test_export_writes_metadata_and_report(onnx_query: Path, models: Any) -> None:
    proto = onnx.load(str(onnx_query))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["cmpnas.fingerprint"] == models.query_fp
    assert meta["cmpnas.compatible_with"] == models.gallery_fp
    spec = ModelSpec.from_json(meta["cmpnas.spec"])
    assert (spec.in_chans, spec.input_size, spec.mean, spec.std) == (1, 28, [0.5], [0.5])
    assert json.loads(meta["cmpnas.input"])["input_size"] == 28
    report = json.loads((onnx_query.parent / "export.json").read_text())
    assert report["fingerprint"] == models.query_fp and report["exporter"] == "legacy"
    assert 0 <= report["parity"]["max_abs_diff"] <= 1e-4
    assert report["onnx_bytes"] == onnx_query.stat().st_size
    assert report["latency_ms"] is None  # measure=False in the fixture


def test_dynamic_batch_matches_torch(onnx_query: Path, models: Any) -> None:
    model = load_model(models.query)
    session = onnx_session(onnx_query)
    for batch in (1, 5, 33):
        x = torch.randn(batch, 1, 28, 28)
        with torch.inference_mode():
            ref = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (batch, 16)
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_onnx_query_model_returns_same_top10_as_torch(
    onnx_query: Path, models: Any, flat_index: Path, pattern: Any
) -> None:
    index = GalleryIndex.load(flat_index)
    torch_enc, onnx_enc = load_encoder(models.query), load_encoder(onnx_query)
    assert onnx_enc.kind == "onnx" and onnx_enc.fingerprint == torch_enc.fingerprint
    assert check_compatible(index, onnx_enc) == "heterogeneous"  # from the ONNX metadata alone
    queries = [pattern(kind, 500 + i) for i, kind in enumerate(["stripes", "checks", "blobs"] * 3)]
    a = index.search(torch_enc.embed_images(queries), 10)
    b = index.search(onnx_enc.embed_images(queries), 10)
    for ra, rb in zip(a, b, strict=True):
        assert [h["id"] for h in ra] == [h["id"] for h in rb]
        np.testing.assert_allclose([h["score"] for h in ra], [h["score"] for h in rb], atol=1e-5)


def test_latency_is_measured_for_both_runtimes(tmp_path: Path, models: Any) -> None:
    report = export_onnx(models.query, tmp_path / "q.onnx", exporter="legacy", latency_runs=3)
    for batch in ("batch_1", "batch_32"):
        row = report["latency_ms"][batch]
        assert set(row) == {
            "torch_eager",
            "torch_eager_1thread",
            "onnxruntime_1thread",
            "onnxruntime_default",
        }
        for cell in row.values():
            assert 0 < cell["p50"] <= cell["p99"] and cell["runs"] == 3


def test_parity_failure_writes_nothing(tmp_path: Path, models: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_mod.onnx_session

    class Skewed:
        def __init__(self, path: Path) -> None:
            self.inner = real(path)

        def run(self, names: Any, feeds: dict) -> list[np.ndarray]:
            return [out + 1e-3 for out in self.inner.run(names, feeds)]

    monkeypatch.setattr(export_mod, "onnx_session", lambda path, threads=None: Skewed(path))
    with pytest.raises(CmpnasError, match="differs from PyTorch by 0.001"):
        export_onnx(models.query, tmp_path / "q.onnx", exporter="legacy", measure=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_inputs_are_clear_errors(tmp_path: Path, models: Any) -> None:
    with pytest.raises(CmpnasError, match=r"\.onnx"):
        export_onnx(models.query, tmp_path / "q.bin", exporter="legacy", measure=False)
    with pytest.raises(CmpnasError, match="does not exist"):
        load_encoder(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(CmpnasError, match="not a loadable ONNX model"):
        load_encoder(tmp_path / "junk.onnx")
    plain = tmp_path / "plain.onnx"  # a valid ONNX model, but without cmpnas metadata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(plain), dynamo=False)
    with pytest.raises(CmpnasError, match="no cmpnas metadata"):
        load_encoder(plain)


@pytest.mark.slow
def test_dynamo_exporter(tmp_path: Path, models: Any) -> None:
    """The default path when onnxscript is installed (5-20 s on this machine, hence slow)."""
    pytest.importorskip("onnxscript")
    report = export_onnx(models.query, tmp_path / "q.onnx", exporter="dynamo", measure=False)
    assert report["exporter"] == "dynamo" and report["parity"]["max_abs_diff"] <= 1e-4
    session = onnx_session(tmp_path / "q.onnx")
    for batch in (1, 7):
        assert session.run(None, {"images": np.zeros((batch, 1, 28, 28), np.float32)})[0].shape == (batch, 16)
