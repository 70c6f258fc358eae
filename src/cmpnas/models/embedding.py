"""Embedding model = backbone + embedding head (dim D) + classifier, with a JSON spec.

A model is saved as one ``.safetensors`` file: weights plus the spec (JSON) in the metadata.
Loading never unpickles objects. The fingerprint (hash of spec + weights) identifies a model: a
query model records the fingerprint of the gallery model it was trained to be compatible with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_path
from cmpnas.models.backbones import create_backbone
from cmpnas.models.classifiers import create_classifier
from cmpnas.models.cost import count_macs
from cmpnas.models.heads import embedding_head

FORMAT = "cmpnas.embedding_model.v1"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and feed it images."""

    backbone: str
    embed_dim: int = 128
    num_classes: int = 10
    classifier: str = "linear"
    cosine_scale: float = 16.0
    margin: float = 0.5  # arcface / cosface margin
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    arch: dict[str, Any] | None = None
    in_chans: int = 1
    input_size: int = 28
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    compatible_with: str | None = (
        None  # fingerprint of the gallery model this query model was trained against
    )
    name: str = ""
    class_names: list[str] | None = None  # the classifier's classes, in row order (None: not recorded)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls(**json.loads(text))

    @classmethod
    def parse(cls, text: str, source: str | Path) -> ModelSpec:
        """:meth:`from_json` for a spec read from a file: a damaged or foreign spec is a user error that
        names the file, not a JSON/TypeError traceback."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, not an object")
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise CmpnasError(
                f"The model spec stored in '{source}' is unreadable ({exc}).",
                "the file is damaged, edited or from another tool: retrain or restore it",
            ) from None


class EmbeddingModel(nn.Module):
    """forward(x) -> embedding [B, D] (not normalised; retrieval normalises). ``classifier`` maps embeddings to logits."""

    def __init__(self, spec: ModelSpec, pretrained: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.backbone, feat = create_backbone(
            spec.backbone,
            in_chans=spec.in_chans,
            pretrained=pretrained,
            arch=spec.arch,
            **spec.backbone_kwargs,
        )
        self.head = embedding_head(feat, spec.embed_dim)
        self.classifier = create_classifier(
            spec.classifier, spec.embed_dim, spec.num_classes, spec.cosine_scale, spec.margin
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.spec.in_chans, self.spec.input_size, self.spec.input_size)


def fingerprint(model: EmbeddingModel) -> str:
    """sha256 over the spec and all tensors, first 16 hex digits.

    The display name is left out (renaming a model keeps its identity); the compat link stays in, so the
    same weights declared compatible with another gallery are a different model to an index.
    """
    return _fingerprint(model.spec.to_json(), model.state_dict())


def _fingerprint(spec_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """The fingerprint from a spec and the tensors (a saved file can be checked without building its model)."""
    h = hashlib.sha256()
    spec = json.loads(spec_json)
    spec.pop("name", None)
    h.update(json.dumps(spec, sort_keys=True).encode())
    for key, t in sorted(tensors.items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_model(model: EmbeddingModel, path: str | Path, extra: dict[str, str] | None = None) -> str:
    """Atomically write weights + spec; returns the fingerprint."""
    fp = fingerprint(model)
    meta = {"format": FORMAT, "spec": model.spec.to_json(), "fingerprint": fp, **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return fp


def safetensors_header(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file; a missing, truncated or corrupt file is a one-line error.

    Opening parses the header and checks that the file is as long as the header says, so a truncated file
    is caught here without reading the weights.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise CmpnasError(
            f"Model file '{p}' does not exist.", "pass the model.safetensors written by a training command"
        )
    try:
        with safe_open(str(p), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CmpnasError(
            f"'{p}' is not a readable safetensors model (truncated or corrupt: {exc}).",
            "pass a model.safetensors written by cmpnas, or restore / retrain it",
        ) from None


def read_metadata(path: str | Path) -> dict[str, str]:
    p = Path(path)
    meta = safetensors_header(p)
    if meta.get("format") != FORMAT:
        raise CmpnasError(
            f"'{p}' is not a cmpnas model (no cmpnas spec in its metadata).",
            "pass a model.safetensors written by cmpnas train-gallery/train-query/retrain",
        )
    return meta


def load_model(path: str | Path) -> EmbeddingModel:
    """Rebuild the model from its spec and load weights (strict). Returns it in eval mode.

    The weights must hash to the fingerprint saved with them: a file damaged on disk (flipped bytes that
    keep the format valid) is refused instead of silently giving other embeddings.
    """
    meta, state = _read_tensors(path)
    spec = ModelSpec.parse(meta.get("spec", ""), path)
    try:
        model = EmbeddingModel(spec)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:  # CmpnasError (unknown backbone) passes
        raise CmpnasError(
            f"The spec in '{path}' does not build a model ({type(exc).__name__}: {str(exc)[:200]}).",
            "the file is damaged or was edited: retrain or restore it",
        ) from None
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch is None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            mismatch = str(exc)[:200]
    if mismatch is not None:
        raise CmpnasError(
            f"Weights in '{path}' do not match their spec ({mismatch}).",
            "the file is corrupt or was edited (its spec describes another architecture): retrain or restore it",
        )
    _check_fingerprint(path, meta, state)
    return model.eval()


def state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """A one-line summary of how ``found`` tensors differ from the ``expected`` state dict, or None.

    Why: torch's own message is a multi-line list that names every tensor; one example of each kind
    says what went wrong (a different architecture, an edited file) in one line.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} tensor(s) of another shape, e.g. {k} {list(found[k].shape)} in the file vs "
            f"{list(expected[k].shape)} from the spec"
        )
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    return "; ".join(parts)


def verify_model_file(path: str | Path) -> dict[str, str]:
    """Check a saved model without building it: readable, and its tensors hash to the saved fingerprint."""
    meta, state = _read_tensors(path)
    _check_fingerprint(path, meta, state)
    return meta


def _read_tensors(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    meta = read_metadata(path)
    try:
        return meta, load_file(str(path))
    except (RuntimeError, SafetensorError, OSError) as exc:
        raise CmpnasError(
            f"Weights in '{path}' are unreadable ({str(exc)[:200]}).",
            "the file is corrupt or was edited: retrain or restore it",
        ) from None


def _check_fingerprint(path: str | Path, meta: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    """Flipped bytes keep the format valid: only the fingerprint saved with the weights tells."""
    saved = meta.get("fingerprint")
    if saved is not None and saved != _fingerprint(meta["spec"], state):
        raise CmpnasError(
            f"Model file '{path}' is corrupt: its weights no longer match the fingerprint {saved} saved with "
            "them.",
            "restore the file or retrain it (in a run folder: cmpnas run ... --force STAGE)",
        )


def verify_safetensors(path: str | Path) -> dict[str, str]:
    """A safetensors artifact reads back: its header always, and a cmpnas model's weights hash to its fingerprint."""
    meta = safetensors_header(path)
    if meta.get("format") == FORMAT:
        verify_model_file(path)
    return meta


def model_summary(model: EmbeddingModel) -> dict[str, Any]:
    return {
        "name": model.spec.name or model.spec.backbone,
        "backbone": model.spec.backbone,
        "macs": count_macs(model, model.input_shape(1)),
        "params": sum(p.numel() for p in model.parameters()),
        "fingerprint": fingerprint(model),
        "embed_dim": model.spec.embed_dim,
    }
