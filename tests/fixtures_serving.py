"""Session-scoped serving fixtures (tiny models, a synthetic gallery folder, a built index, an ONNX export),
shared by tests/serving and tests/cli through their conftest.py."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

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


@pytest.fixture(scope="session")
def small_query(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second query model trained compatible with the gallery (other weights, narrower): served next to
    ``models.query`` as a family, it must give its own answers (file stem and member name: 'small')."""
    out = tmp_path_factory.mktemp("models-small") / "small.safetensors"
    kw = {**QUERY_KW, "widths": [4, 4]}
    save_model(_model(4, kw, compatible_with=models.gallery_fp), out)
    return out


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds one tiny IDAT: a decompression bomb's header."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + tag + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def gallery_dir(tmp_path_factory: pytest.TempPathFactory, pattern) -> Path:  # type: ignore[no-untyped-def]
    """36 good images in class folders (ImageFolder layout) plus one corrupt file that indexing must skip.

    Item ``kind/NNN.png`` is ``pattern(kind, 100 * class + N)`` (``pattern``: see tests/conftest.py).
    """
    root = tmp_path_factory.mktemp("gallery")
    for c, kind in enumerate(CLASSES):
        (root / kind).mkdir()
        for i in range(PER_CLASS):
            pattern(kind, 100 * c + i).save(root / kind / f"{i:03d}.png")
    (root / "blobs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return root


@pytest.fixture(scope="session")
def flat_index(models: Models, gallery_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cmpnas.data.sources import folder_source
    from cmpnas.serving.index import build_index

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


@pytest.fixture(scope="session")
def milvus_index(models: Models, gallery_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same gallery as ``flat_index`` in a Milvus Lite collection (the file inside the index folder)."""
    from cmpnas.data.sources import folder_source
    from cmpnas.serving.index import build_index

    out = tmp_path_factory.mktemp("indexes") / "milvus"
    build_index(models.gallery, folder_source(gallery_dir), out, backend="milvus")
    return out
