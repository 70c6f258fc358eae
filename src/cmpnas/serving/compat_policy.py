"""Which model may read an index, and which may write into it.

An index holds the embeddings of a chain of compatible gallery models (its lineage, newest first). Reading is
allowed to any model trained compatible with a model of that chain; writing only to the chain's newest
gallery model or a gallery model upgraded from it, so the stored vectors always stay comparable. Every
entry point (query, serve, index swap, append, backfill) asks here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cmpnas.errors import CmpnasError
from cmpnas.serving.encoder import Encoder

if TYPE_CHECKING:
    from cmpnas.serving.index import GalleryIndex


def check_compatible(index: GalleryIndex, encoder: Encoder, allow_incompatible: bool = False) -> str:
    """'homogeneous' (query model = the index's newest gallery model), 'heterogeneous' (trained compatible
    with it), 'lineage' (the query model is, or is compatible with, an older gallery model of the index's
    chain: an upgrade kept the spaces comparable), or refuse.

    With ``allow_incompatible`` a mismatch returns 'incompatible-override' instead of raising; a different
    embedding dim is always refused (the vectors cannot be compared at all).
    """
    gallery, lineage = index.gallery_fingerprint, index.lineage
    if encoder.dim != index.dim:
        raise CmpnasError(
            f"Query model {encoder.fingerprint} embeds into {encoder.dim} dims, index '{index.path}' "
            f"holds {index.dim}-dim gallery vectors.",
            "use a query model trained against this gallery",
        )
    if encoder.fingerprint == gallery:
        return "homogeneous"
    if encoder.compatible_with == gallery:
        return "heterogeneous"
    if encoder.fingerprint in lineage or encoder.compatible_with in lineage:
        return "lineage"
    if allow_incompatible:
        return "incompatible-override"
    chain = gallery if len(lineage) == 1 else f"{gallery} (compatible chain: {' <- '.join(lineage)})"
    raise CmpnasError(
        f"Query model {encoder.fingerprint} was trained compatible with gallery model "
        f"{encoder.compatible_with or '(none recorded)'}, but index '{index.path}' was built with gallery "
        f"model {chain}; their embeddings are not comparable.",
        f"query with a model trained against gallery {gallery} (or the gallery model itself), rebuild the "
        "index with the matching gallery model, or pass --allow-incompatible if you know better",
    )


def space_of(encoder: Encoder) -> str:
    """The gallery model whose vectors ``encoder``'s embeddings are made to be compared with: itself for a
    gallery model (also an upgraded one), else the gallery model it was trained against."""
    if encoder.spec.name == "gallery" or not encoder.compatible_with:
        return encoder.fingerprint
    return encoder.compatible_with


def lineage_after(manifest: dict[str, Any] | None, encoder: Encoder, where: str = "the index") -> list[str]:
    """The index's chain of compatible gallery models once ``encoder`` writes into it, newest first.

    A new index starts at the model (and the model it was trained compatible with, if any); the model that
    built an index keeps its chain; a *gallery* model trained compatible with the index's newest model (``cmpnas
    upgrade-gallery``, which names it ``gallery`` like ``train-gallery`` does) becomes the new head. Anything
    else is refused: a query model trained against the gallery is comparable but would fill the index with its
    weaker embeddings, and an unrelated model's embeddings are not comparable at all.
    """
    if manifest is None:
        return [encoder.fingerprint, *([encoder.compatible_with] if encoder.compatible_with else [])]
    chain = list(manifest.get("lineage") or [manifest["gallery_fingerprint"]])
    if encoder.fingerprint == chain[0]:
        return chain
    if encoder.compatible_with == chain[0] and encoder.spec.name == "gallery":
        return [encoder.fingerprint, *chain]
    what = "a query model trained against it" if encoder.compatible_with == chain[0] else "not compatible with it"
    raise CmpnasError(
        f"Model {encoder.fingerprint} ('{encoder.spec.name}') cannot write into {where}, whose newest gallery "
        f"model is {chain[0]}: it is {what}.",
        f"append with the same gallery model ({chain[0]}) or a gallery model upgraded from it (cmpnas "
        "upgrade-gallery --old ...), or build a new index",
    )
