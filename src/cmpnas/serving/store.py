"""The contract between a gallery index and the engine that stores its vectors.

:class:`~cmpnas.serving.index.GalleryIndex`, the server and backfill talk to a :class:`VectorStore` only, so
none of them branches on the engine. A backend is one module that provides a store and an
:class:`IndexBackend` (how to open and how to build one), plus one line in
:data:`cmpnas.serving.index.BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cmpnas.data.sources import Item

if TYPE_CHECKING:
    from cmpnas.serving.building import BuildJob

Hits = list[list[dict[str, Any]]]


@dataclass(frozen=True)
class ModelRows:
    """The rows embedded by gallery model ``model`` or, with ``other``, by every model but it: what each half
    of a dual-query search reads while a backfill is under way (:mod:`cmpnas.compat.transition`)."""

    model: str
    other: bool = False

    def holds(self, row_model: str) -> bool:
        return (row_model == self.model) != self.other


class VectorStore(Protocol):
    """L2-normalised gallery vectors keyed by item id, each tagged with the gallery model that embedded it."""

    @property
    def name(self) -> str:
        """The backend's name in :data:`~cmpnas.serving.index.BACKENDS` and in the manifest."""
        ...

    def __len__(self) -> int: ...

    def item(self, item_id: str) -> Item | None: ...

    def present(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored."""
        ...

    def all_ids(self) -> list[str]: ...

    def all_items(self) -> list[Item]:
        """Every item in store order (may read the whole store)."""
        ...

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``ids``, in that order."""
        ...

    def model_of(self, ids: Sequence[str]) -> list[str]:
        """The fingerprint of the gallery model that embedded each of ``ids``."""
        ...

    def model_counts(self) -> dict[str, int] | None:
        """Items per gallery model, or None where counting means reading the whole store."""
        ...

    def set_search_params(self, params: dict[str, Any]) -> None:
        """Query-time knobs, in :class:`~cmpnas.serving.index_format.IndexParams` names."""
        ...

    def search(self, queries: np.ndarray, k: int, rows: ModelRows | None = None) -> Hits:
        """Top-k per query row: ``{"id", "score", "label"}``, best first; with ``rows``, among those rows only."""
        ...

    def replace_vectors(
        self,
        folder: Path,
        ids: Sequence[str],
        vectors: np.ndarray,
        models: Sequence[str],
        manifest: dict[str, Any],
    ) -> None:
        """Store ``vectors`` for ``ids`` (tagged with ``models``) and write ``manifest`` as the folder's, so a
        loader never sees the new manifest without the new vectors."""
        ...

    def shared_uri(self) -> str | None:
        """An address other processes can open this store at when only one process may open it directly
        (they are then given this address); None when every process can open it itself."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class IndexBackend:
    """How an index folder's store is opened and built.

    ``load(folder, manifest, uri)`` opens the store (``uri``: where to reach it instead of what the manifest
    says, or None). ``build(job)`` writes the folder and returns its manifest. With ``append_loads_index`` an
    append loads the existing index first and its ids are skipped up front (the whole index is rewritten);
    otherwise the builder writes into the existing store and skips what it already holds.
    """

    load: Callable[[Path, dict[str, Any], str | None], VectorStore]
    build: Callable[[BuildJob], dict[str, Any]]
    append_loads_index: bool = False
