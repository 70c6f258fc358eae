"""How queries are answered while a gallery is being backfilled (the "query policy" of the transition).

``new``: the new model embeds the query and searches the mixed index, old and re-embedded vectors alike. One
embedding per query, but until the last item is re-embedded every query depends on how comparable the new
model's query is with the old vectors (M(new, old) at 0 %), which is below M(old, old) whenever the upgrade is
not perfectly compatible.

``dual``: the distance rank merge of online backfilling (Seo et al., "Metric Compatible Training for Online
Backfilling in Large-Scale Retrieval", WACV 2025, arXiv 2301.03767). The query is embedded by both models; the
old embedding searches the items not yet re-embedded, the new one the re-embedded items, and the two lists merge
by cosine. At 0 % it is exactly the old system and at 100 % exactly the new one, so neither end can regress;
between them it costs one more query embedding, and only while the backfill lasts.

The merge is one inner product, so it runs on any inner-product index: the query becomes ``[q_old, q_new]`` and
a gallery row ``[g_old, 0]`` before it is re-embedded and ``[0, g_new]`` after (each half L2-normalised), so
``<query, row>`` is the cosine in whichever space the row lives in. Normalising the whole query scales every
score of that query by the same factor and leaves its ranking unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

POLICIES = ("new", "dual")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def dual_vectors(
    old_query: torch.Tensor,
    new_query: torch.Tensor,
    old_gallery: torch.Tensor,
    new_gallery: torch.Tensor,
    backfilled: np.ndarray | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query [Q, 2D] and gallery [N, 2D] vectors whose inner products are the dual policy's merged scores.

    ``backfilled`` [N] bool marks the gallery rows already re-embedded by the new model.
    """
    if old_query.shape != new_query.shape or old_gallery.shape != new_gallery.shape:
        raise ValueError(
            f"dual queries need both models on the same items: queries {tuple(old_query.shape)} vs "
            f"{tuple(new_query.shape)}, gallery {tuple(old_gallery.shape)} vs {tuple(new_gallery.shape)}"
        )
    mask = torch.as_tensor(np.asarray(backfilled, dtype=bool))
    if mask.shape != (len(old_gallery),):
        raise ValueError(f"backfilled has shape {tuple(mask.shape)}, the gallery {len(old_gallery)} rows")
    query = torch.cat([_unit(old_query), _unit(new_query)], dim=1)
    zeros = torch.zeros_like(old_gallery, dtype=torch.float32)
    old_half = torch.where(mask[:, None], zeros, _unit(old_gallery))
    new_half = torch.where(mask[:, None], _unit(new_gallery), zeros)
    return query, torch.cat([old_half, new_half], dim=1)
