"""The three-way comparison and its verdicts, in one place.

Every result is reported as paragon M(g,g), homogeneous M(q,q) and heterogeneous M(q,g), with the
cost reduction MACs(g)/MACs(q), the gap to the paragon and the compatibility verdict
(M(q,g) > M(q,q)). The leave-one-out table, the benchmark protocols (DeepFashion2, IJB-C) and the
candidate scores of the search all go through these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cmpnas.evaluation.evaluate import three_way
from cmpnas.models.cost import count_macs
from cmpnas.models.embedding import EmbeddingModel, fingerprint
from cmpnas.tables import markdown_table

SETTINGS = ("paragon", "homogeneous", "heterogeneous")


@dataclass(frozen=True)
class Setting:
    """One scored combination: which feature source embeds the queries and which the gallery."""

    name: str  # paragon / homogeneous / heterogeneous
    query_side: str  # a key of the feature sources
    gallery_side: str


def settings_for(sides: Sequence[str]) -> list[Setting]:
    """Settings to score for the available feature sources (models by role, or npz files)."""
    if "embeddings" in sides:
        if "gallery_embeddings" in sides:
            return [Setting("heterogeneous", "embeddings", "gallery_embeddings")]
        return [Setting("homogeneous", "embeddings", "embeddings")]
    settings = []
    if "gallery" in sides:
        settings.append(Setting("paragon", "gallery", "gallery"))
    if "query" in sides:
        settings.append(Setting("homogeneous", "query", "query"))
    if "gallery" in sides and "query" in sides:
        settings.append(Setting("heterogeneous", "query", "gallery"))
    return settings


def score_settings(
    features: Mapping[str, tuple[Any, Any]],
    score: Callable[[Any, Any], dict[str, Any]],
    only: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every setting the feature sources allow: ``features[side] = (query rows, gallery rows)``."""
    return {
        s.name: score(features[s.query_side][0], features[s.gallery_side][1])
        for s in settings_for(list(features))
        if only is None or s.name in only
    }


def cost_reduction(gallery_macs: float, query_macs: float) -> float:
    """MACs(g) / MACs(q), the paper's cost reduction."""
    return round(gallery_macs / max(1, query_macs), 2)


def is_compatible(settings: Mapping[str, Any], headline: Callable[[Any], float]) -> bool:
    """BCT's criterion: the heterogeneous system beats the query model alone, M(q,g) > M(q,q)."""
    return bool(headline(settings["heterogeneous"]) > headline(settings["homogeneous"]))


def gap_to_paragon(
    settings: Mapping[str, Any],
    keys: Sequence[str] | None = None,
    ndigits: int | None = None,
    relative: bool = False,
    pick: Callable[[Any], Mapping[str, float]] = lambda m: m,
) -> dict[str, float | None]:
    """Paragon minus heterogeneous per metric key (in percent of the paragon with ``relative``)."""
    paragon, hetero = pick(settings["paragon"]), pick(settings["heterogeneous"])
    out: dict[str, float | None] = {}
    for k in keys if keys is not None else list(paragon):
        diff = paragon[k] - hetero[k]
        if relative:
            diff = diff / paragon[k] * 100 if paragon[k] else None
        out[k] = diff if ndigits is None or diff is None else round(diff, ndigits)
    return out


def metric_subset(m: dict[str, float]) -> dict[str, float]:
    keys = ("top1", "top5", "top10", "map", "map_at_r")
    return {k: round(float(m[k]), 4) for k in keys if k in m}


def compare(
    gallery: EmbeddingModel,
    query: EmbeddingModel,
    protocol: Any,
    batch_size: int = 512,
    gallery_cache: dict | None = None,
) -> dict[str, Any]:
    """The three-way table for one query model, with costs and the compatibility verdict."""
    tw = three_way(query, gallery, protocol, batch_size=batch_size, gallery_cache=gallery_cache)
    g_macs = count_macs(gallery, gallery.input_shape(1))
    q_macs = count_macs(query, query.input_shape(1))
    res: dict[str, Any] = {k: metric_subset(v) for k, v in tw.items()}
    res["n_queries"] = int(tw["heterogeneous"].get("n_queries", 0))
    res["gallery"] = {
        "name": gallery.spec.name or gallery.spec.backbone,
        "macs": g_macs,
        "fingerprint": fingerprint(gallery),
    }
    res["query"] = {
        "name": query.spec.name or query.spec.backbone,
        "macs": q_macs,
        "fingerprint": fingerprint(query),
        "compatible_with": query.spec.compatible_with,
    }
    res["cost_reduction"] = cost_reduction(g_macs, q_macs)
    res["gap_to_paragon"] = gap_to_paragon(res, ndigits=4)
    res["relative_gap_to_paragon"] = gap_to_paragon(res, ndigits=4, relative=True)
    res["compatible"] = is_compatible(res, lambda m: m["top1"])
    return res


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """paragon / homogeneous / heterogeneous (top-1, mAP) per query model, with MACs and cost reduction."""
    headers = [
        "query model",
        "MACs",
        "cost reduction",
        "paragon top-1 / mAP",
        "homogeneous top-1 / mAP",
        "heterogeneous top-1 / mAP",
        "gap to paragon (top-1)",
        "M(q,g) > M(q,q)",
    ]
    cells = []
    for r in rows:
        p, h, x = r["paragon"], r["homogeneous"], r["heterogeneous"]
        cells.append(
            [
                r["query"]["name"],
                f"{r['query']['macs'] / 1e6:.2f} M",
                f"{r['cost_reduction']:.1f}x",
                f"{p['top1']:.2f} / {p['map']:.2f}",
                f"{h['top1']:.2f} / {h['map']:.2f}",
                f"{x['top1']:.2f} / {x['map']:.2f}",
                f"{r['gap_to_paragon']['top1']:+.2f}",
                "yes" if r["compatible"] else "no",
            ]
        )
    return markdown_table(headers, cells, align="lrrlllrc") + "\n"
