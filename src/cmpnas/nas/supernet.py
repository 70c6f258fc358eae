"""The supernet as an embedding model: SPOS supernet + shared embedding head + own classifier.

Saved as ``supernet.safetensors`` with the space config, data shape and the gallery fingerprint in
its metadata, so a search refuses a supernet that does not match the config or the gallery.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cmpnas.config import SpaceConfig
from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_path
from cmpnas.models.classifiers import create_classifier
from cmpnas.models.embedding import safetensors_header
from cmpnas.models.spaces import create_space

FORMAT = "cmpnas.supernet.v1"


class SupernetEmbedding(nn.Module):
    """forward(x, arch) -> embedding; head and ``classifier`` are shared by all paths.

    The choice blocks use affine-free BN (SPOS), but the embedding head's BN keeps its affine
    parameters: they are shared by every path, and without them the embedding is forced to zero
    mean / unit variance per dimension, which cannot match the gallery's embedding distribution
    (the heterogeneous metric compares the two directly).
    """

    def __init__(
        self,
        space: Any,
        embed_dim: int,
        num_classes: int,
        classifier: str = "linear",
        cosine_scale: float = 16.0,
    ) -> None:
        super().__init__()
        self.space = space
        self.supernet = space.supernet()
        self.head = nn.Sequential(
            nn.Linear(self.supernet.num_features, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim),
        )
        self.classifier = create_classifier(classifier, embed_dim, num_classes, cosine_scale)
        self.embed_dim = embed_dim

    def path_slices(self, arch: dict) -> list[tuple[nn.Parameter, tuple[slice, ...]]]:
        return self.supernet.path_slices(arch)

    def forward(self, x: torch.Tensor, arch: dict) -> torch.Tensor:
        return self.head(self.supernet(x, arch))


_RETRAIN = "restore the file or retrain the supernet (in a run folder: cmpnas run ... --force supernet)"


def save_supernet(model: SupernetEmbedding, path: Path, meta: dict[str, Any]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_supernet(
    path: Path, expect: dict[str, Any], space: Any | None = None
) -> tuple[SupernetEmbedding, dict[str, Any]]:
    """Load and check that space, data shape, embed dim and gallery fingerprint match ``expect``.

    ``space``: score the paths of another space over the same layers (a space that only restricts which paths
    are sampled, such as one channel scale per stage), so a supernet of one can be asked about the other's
    architectures; a space with other layers is refused."""
    if not Path(path).is_file():
        raise CmpnasError(f"Supernet '{path}' does not exist.", "run `cmpnas train-supernet` first")
    raw = safetensors_header(path)
    if raw.get("format") != FORMAT:
        raise CmpnasError(
            f"'{path}' is not a cmpnas supernet.", "pass the supernet.safetensors of train-supernet"
        )
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    except ValueError:
        raise CmpnasError(f"Supernet '{path}' has corrupt metadata.", _RETRAIN) from None
    for key, want in expect.items():
        if meta.get(key) != want:
            raise CmpnasError(
                f"Supernet '{path}' does not match the config: '{key}' is {meta.get(key)!r}, expected {want!r}.",
                "search with the config and gallery the supernet was trained with, or retrain the supernet",
            )
    saved = create_space(SpaceConfig(**meta["space"]), in_chans=meta["in_chans"], input_size=meta["input_size"])
    if space is not None and space.layers != saved.layers:
        raise CmpnasError(
            f"Supernet '{path}' was trained over other layers than the space it is asked to score.",
            "score architectures of the supernet's own space, or of one with the same layers",
        )
    space = space or saved
    model = SupernetEmbedding(
        space, meta["embed_dim"], meta["num_classes"], meta["classifier"], meta["cosine_scale"]
    )
    try:
        model.load_state_dict(load_file(str(path)))
    except (RuntimeError, SafetensorError) as exc:
        raise CmpnasError(f"Weights in supernet '{path}' are corrupt ({str(exc)[:160]}).", _RETRAIN) from None
    return model.eval(), meta
