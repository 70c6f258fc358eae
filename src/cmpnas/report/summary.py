"""One entry per query model from rows.json (one row per model and seed), and the headline sentence.

A model's numbers are mean ± sample std over its seeds (``cmpnas.evaluation.stats``); its validation top-1 (mean
over seeds) is what "the best" of a group is chosen by, so the test split never picks what it then judges.
"""

from __future__ import annotations

import statistics
from typing import Any

from cmpnas.evaluation.stats import Summary, aggregate_model, format_mean_std, group_by_model

VALIDATION_KEYS = ("heterogeneous_top1", "homogeneous_top1")


def model_summary(model: dict[str, Any], setting: str, metric: str = "top1") -> Summary:
    """Mean ± std of one number of an aggregated model (from :func:`aggregate_model`)."""
    return Summary(model[setting][metric], model["std"][setting][metric], model["n_seeds"])


def pm(model: dict[str, Any], setting: str, metric: str = "top1") -> str:
    """Mean ± std over seeds as text ("81.9 ± 0.3"), or the value ("81.91") for one seed."""
    return format_mean_std(model_summary(model, setting, metric))


def val_top1(model: dict[str, Any]) -> float | None:
    """Validation heterogeneous top-1 (mean over seeds), None without a validation split."""
    v = model.get("validation")
    return None if v is None else v["heterogeneous_top1"]


def val_text(model: dict[str, Any]) -> str:
    """:func:`val_top1` as a table cell."""
    top1 = val_top1(model)
    return "-" if top1 is None else f"{top1:.{2 if model['n_seeds'] == 1 else 1}f}"


def mean_validation(group: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Validation top-1 of one model, mean over its seeds (what "the best" of a group is chosen by); None when a
    seed has none (rows of an evaluation without a validation split)."""
    scores = [r.get("validation") for r in group]
    if not scores or any(v is None for v in scores):
        return None
    out: dict[str, Any] = {k: statistics.fmean(v[k] for v in scores) for k in VALIDATION_KEYS}
    return {"split": "val", **out, "n_seeds": len(scores)}


def summarize_models(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """rows.json (one row per model and seed) -> one entry per model: mean, std and each seed's numbers."""
    out = []
    for group in group_by_model(rows):
        model = aggregate_model(group)
        model["split"] = group[0].get("protocol", {}).get("split", "test")
        model["fingerprint"] = group[0]["query"]["fingerprint"]
        model["validation"] = mean_validation(group)
        model["per_seed"] = [
            {
                "seed": int(r["query"].get("seed", 0)),
                "homogeneous": r["homogeneous"],
                "heterogeneous": r["heterogeneous"],
                "gap_to_paragon": r["gap_to_paragon"],
                "compatible": r["compatible"],
                "latency_ms_b1": r["query"].get("latency_ms_b1"),
                "fingerprint": r["query"]["fingerprint"],
                "validation": r.get("validation"),
            }
            for r in group
        ]
        out.append(model)
    return out


def headline(
    models: list[dict[str, Any]], gallery: dict[str, Any] | None, reward: str
) -> tuple[str, dict[str, Any] | None]:
    """One sentence from the measurements (test split) for the headline model (the R-searched query model)."""
    pick = next((m for m in models if m.get("kind") == f"searched-{reward}"), None) or (
        models[-1] if models else None
    )
    if pick is None or gallery is None:
        return "No query model was evaluated.", None
    n = pick["n_seeds"]
    gap = pick["gap_to_paragon"]["top1"]
    digits = 2 if n == 1 else 1
    where = f"within {gap:.{digits}f} points of" if gap >= 0 else f"{-gap:.{digits}f} points above"
    seeds = "" if n == 1 else f" (test split, mean ± std over {n} seeds)"
    return (
        f"The CMP-NAS {reward} query model is {pick['cost_reduction']:.0f}x cheaper than the gallery model "
        f"({pick['macs'] / 1e6:.2f} vs {gallery['macs'] / 1e6:.1f} MMACs); heterogeneous top-1 is "
        f"{pm(pick, 'heterogeneous')}{seeds}, {where} the paragon ({pick['paragon']['top1']:.2f}), against "
        f"{pm(pick, 'homogeneous')} for the query model alone.",
        pick,
    )
