"""Shared, session-scoped fixtures: tiny models, a synthetic gallery folder, a built index, an ONNX export."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmpnas.models.embedding import EmbeddingModel, ModelSpec, save_model

GALLERY_KW = {"widths": [8, 16], "depths": [1, 1], "strides": [1, 2]}
QUERY_KW = {"widths": [4, 8], "depths": [1, 1], "strides": [2, 1]}
CLASSES = ("stripes", "checks", "blobs")
PER_CLASS = 12


@dataclass
class Models:
    gallery: Path
    gallery_fp: str
    query: Path
    query_fp: str
    stranger: Path  # records no compatible gallery
    stranger_fp: str
    wide: Path  # 32-dim: cannot be compared with a 16-dim index at all
    wide_fp: str


def _model(seed: int, kw: dict, dim: int = 16, compatible_with: str | None = None) -> EmbeddingModel:
    torch.manual_seed(seed)
    spec = ModelSpec(
        backbone="resnet_small", backbone_kwargs=kw, embed_dim=dim, compatible_with=compatible_with
    )
    return EmbeddingModel(spec).eval()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    d = tmp_path_factory.mktemp("models")
    gfp = save_model(_model(0, GALLERY_KW), d / "gallery.safetensors")
    qfp = save_model(_model(1, QUERY_KW, compatible_with=gfp), d / "query.safetensors")
    sfp = save_model(_model(2, QUERY_KW), d / "stranger.safetensors")
    wfp = save_model(_model(3, QUERY_KW, dim=32, compatible_with=gfp), d / "wide.safetensors")
    return Models(
        d / "gallery.safetensors",
        gfp,
        d / "query.safetensors",
        qfp,
        d / "stranger.safetensors",
        sfp,
        d / "wide.safetensors",
        wfp,
    )


def pattern_image(kind: str, seed: int, size: int = 40) -> Image.Image:
    """A distinct RGB picture per (kind, seed): stripes, checks or a blob, plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4, 12)
    if kind == "stripes":
        base = np.sin(2 * np.pi * (yy + rng.uniform(0, 10)) / period)
    elif kind == "checks":
        base = np.sign(np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period))
    else:
        cy, cx = rng.uniform(8, size - 8, 2)
        base = 2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(3, 8) ** 2)) - 1
    gray = (base + 1) * 110 + rng.normal(0, 12, (size, size))
    rgb = np.stack([gray, gray * rng.uniform(0.6, 1.0), gray * rng.uniform(0.6, 1.0)], -1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def pattern():  # type: ignore[no-untyped-def]
    """The gallery's generator ``pattern(kind, seed)``: item ``kind/NNN.png`` is seed 100*class+N."""
    return pattern_image


@pytest.fixture(scope="session")
def gallery_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 good images in class folders (ImageFolder layout) plus one corrupt file that indexing must skip."""
    root = tmp_path_factory.mktemp("gallery")
    for c, kind in enumerate(CLASSES):
        (root / kind).mkdir()
        for i in range(PER_CLASS):
            pattern_image(kind, 100 * c + i).save(root / kind / f"{i:03d}.png")
    (root / "blobs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return root


@pytest.fixture(scope="session")
def flat_index(models: Models, gallery_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cmpnas.serving.index import build_index, folder_source

    out = tmp_path_factory.mktemp("indexes") / "flat"
    build_index(models.gallery, folder_source(gallery_dir), out)
    return out


@pytest.fixture(scope="session")
def onnx_query(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The query model exported with the legacy exporter (fast); the dynamo path has its own slow test."""
    from cmpnas.serving.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "query.onnx"
    export_onnx(models.query, out, exporter="legacy", measure=False)
    return out
