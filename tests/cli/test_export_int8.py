"""`cmpnas export --int8` end to end (the run's config.yaml and manifest.json found beside the model) and its
user errors: one line, exit code 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cli_support import assert_one_line_error, cli

from cmpnas.data.base import DataBundle
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, save_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(data: DataBundle, path: Path, kw: dict, seed: int, compatible_with: str | None = None) -> str:
    torch.manual_seed(seed)
    spec = ModelSpec(
        backbone="resnet_small",
        backbone_kwargs=kw,
        embed_dim=32,
        num_classes=data.num_classes,
        in_chans=data.in_chans,
        input_size=data.image_size,
        mean=list(data.mean),
        std=list(data.std),
        compatible_with=compatible_with,
    )
    return save_model(EmbeddingModel(spec), path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data: DataBundle, tiny_raw_factory: Any) -> Path:
    """A run's layout: gallery/model.safetensors, and retrain/R3/ with the query model, the run's config.yaml
    and a manifest.json naming the gallery (as the training stages write them)."""
    root = tmp_path_factory.mktemp("int8-run")
    (root / "gallery").mkdir()
    (root / "retrain" / "R3").mkdir(parents=True)
    gallery = root / "gallery" / "model.safetensors"
    gfp = _save(tiny_data, gallery, {"widths": [8, 16], "depths": [1, 1], "strides": [1, 2]}, 0)
    query_dir = root / "retrain" / "R3"
    _save(
        tiny_data,
        query_dir / "model.safetensors",
        {"widths": [16, 32], "depths": [1, 1], "strides": [2, 2]},
        1,
        gfp,
    )
    (query_dir / "config.yaml").write_text(yaml.safe_dump(tiny_raw_factory()))
    manifest = {"stage": "retrain", "inputs": {"gallery": {"path": str(gallery), "fingerprint": gfp}}}
    (query_dir / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_export_int8_end_to_end(capsys: pytest.CaptureFixture[str], run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export" / "query.onnx"
    model = run_dir / "retrain" / "R3" / "model.safetensors"
    code, stdout, stderr = cli(
        capsys, "export", "--model", model, "--out", out, "--exporter", "legacy", "--int8", "--no-latency",
        "--calibration-images", "64",
    )  # fmt: skip
    assert code == 0, stderr
    int8 = out.parent / "query.int8.onnx"
    assert int8.is_file() and int8.stat().st_size <= out.stat().st_size / 2
    assert f"wrote {int8} (auto int8" in stdout and "heterogeneous (test) top-1 / mAP: fp32" in stdout  # the default
    assert "int8 kernels against the file's arithmetic: cosine mean" in stdout
    report = json.loads((out.parent / "query.int8.json").read_text())
    assert report["calibration"]["images"] == 64 and report["calibration"]["split"] == "train"
    assert (
        report["gallery_fingerprint"]
        == json.loads((model.parent / "manifest.json").read_text())["inputs"]["gallery"]["fingerprint"]
    )
    # the fp32 export can be quantized again on its own, per channel, with the data and gallery given
    again = tmp_path / "again.int8.onnx"
    code, stdout, stderr = cli(
        capsys, "export", "--model", out, "--out", again, "--int8", "--int8-granularity", "per-channel", "--no-latency",
        "--gallery-model", run_dir / "gallery" / "model.safetensors",
        "--config", run_dir / "retrain" / "R3" / "config.yaml",
    )  # fmt: skip
    assert code == 0, stderr
    assert again.is_file() and "per-channel int8" in stdout
    assert json.loads(again.with_suffix(".json").read_text())["quantization"]["granularity"] == "per-channel"


def test_int8_without_training_data_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], run_dir: Path, tmp_path: Path
) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    model = lone / "model.safetensors"
    model.write_bytes(
        (run_dir / "retrain" / "R3" / "model.safetensors").read_bytes()
    )  # no config.yaml beside
    gallery = run_dir / "gallery" / "model.safetensors"
    out = tmp_path / "out" / "q.onnx"
    code, _, err = cli(capsys, "export", "--model", model, "--out", out, "--int8", "--gallery-model", gallery)
    assert_one_line_error(code, err, "training images to calibrate on", "config.yaml", "--config")
    assert not out.parent.exists()


def test_int8_on_a_foreign_onnx_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], run_dir: Path, tmp_path: Path
) -> None:
    import warnings

    plain = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(plain), dynamo=False)
    code, _, err = cli(
        capsys, "export", "--model", plain, "--out", tmp_path / "p.int8.onnx", "--int8",
        "--gallery-model", run_dir / "gallery" / "model.safetensors",
        "--config", run_dir / "retrain" / "R3" / "config.yaml",
    )  # fmt: skip
    assert_one_line_error(code, err, "no cmpnas metadata", "cmpnas export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx"]


def test_int8_options_without_int8_are_refused(
    capsys: pytest.CaptureFixture[str], run_dir: Path, tmp_path: Path
) -> None:
    model = run_dir / "retrain" / "R3" / "model.safetensors"
    code, _, err = cli(capsys, "export", "--model", model, "--out", tmp_path / "q.onnx", "--int8-granularity", "auto")
    assert_one_line_error(code, err, "only apply to an int8 export", "add --int8")
    code, _, err = cli(capsys, "export", "--model", model, "--out", tmp_path / "q.onnx", "--int8-reduce-range")
    assert_one_line_error(code, err, "only apply to an int8 export", "add --int8")
    code, _, err = cli(capsys, "export", "--model", model, "--out", tmp_path / "q.onnx", "--min-cosine", "2")
    assert code == 2 and "--min-cosine" in err and len(err.strip().splitlines()) == 1
