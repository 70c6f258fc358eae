"""The embedding head: backbone features -> embedding (Linear without bias, then BatchNorm1d).

Why a module of its own: :class:`cmpnas.models.embedding.EmbeddingModel` runs it after every backbone, and a
search space's latency table must time exactly those ops; the space cannot import ``embedding`` (which
builds backbones from the spaces), so both import it from here.
"""

from __future__ import annotations

from torch import nn


def embedding_head(features: int, embed_dim: int) -> nn.Sequential:
    """[B, features] -> [B, embed_dim], not normalised (retrieval L2-normalises the output)."""
    return nn.Sequential(nn.Linear(features, embed_dim, bias=False), nn.BatchNorm1d(embed_dim))
