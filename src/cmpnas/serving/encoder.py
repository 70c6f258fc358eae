"""The query-model runtime: a loaded ``.safetensors`` (torch eager) or ``.onnx`` export (ONNX Runtime) that turns
images into L2-normalised embeddings, and the ONNX metadata keys it reads.

The keys live here, on the reading side: :mod:`cmpnas.serving.export` writes exactly these, so a search can check
compatibility from an ``.onnx`` file alone (no checkpoint needed on the device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cmpnas.data.transforms import normalize_batch, pil_to_uint8
from cmpnas.errors import CmpnasError
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint, load_model
from cmpnas.models.onnx_runtime import session as onnx_session  # the one ORT session factory (re-exported)

META_FORMAT = "cmpnas.format"
META_FINGERPRINT = "cmpnas.fingerprint"
META_COMPATIBLE_WITH = "cmpnas.compatible_with"
META_SPEC = "cmpnas.spec"
META_QUANTIZATION = "cmpnas.quantization"  # set on a quantized copy: same fingerprint, another kind
META_INPUT = "cmpnas.input"  # {"in_chans","input_size","mean","std"}: what a device needs to preprocess
ONNX_FORMAT = "cmpnas.onnx_query_model.v1"
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise unit length in float32 (inner product = cosine), safe for zero rows."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


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
