"""What the supernet learned and how far its ranking can be trusted, for results.json and the report.

Three figures, all on the validation split: the health of random in-band paths (near chance = the search ranks
noise), the band ratio (those paths' heterogeneous top-1 against random in-band architectures of the same space
trained alone on the table's schedule, the random controls), and the ranking protocol's verdict (Kendall tau
against stand-alone models, with the target's reliability, its ceiling and a MACs-only predictor).
"""

from __future__ import annotations

import statistics
from typing import Any

from cmpnas.nas.health import health_line
from cmpnas.report.comparisons import CONTROL_KIND


def band_ratio(health: dict[str, Any] | None, models: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean heterogeneous top-1 of the supernet's health paths over that of the random controls (validation);
    None without either. Both are uniform draws from the search band, not the same architectures."""
    controls = [m["validation"]["heterogeneous_top1"] for m in models if m["kind"] == CONTROL_KIND and m.get("validation")]
    if not health or not controls:
        return None
    standalone = statistics.fmean(controls)
    return {
        "supernet_het_top1": health["het_top1"]["mean"],
        "standalone_het_top1": round(standalone, 2),
        "ratio": round(health["het_top1"]["mean"] / standalone, 4),
        "n_standalone": len(controls),
        "split": "val",
    }


def supernet_results(
    health: dict[str, Any] | None, ranking: dict[str, Any] | None, models: list[dict[str, Any]]
) -> dict[str, Any] | None:
    if not health and not ranking:
        return None
    return {"health": health, "band_ratio": band_ratio(health, models), "ranking": ranking}


def _tau_text(side: dict[str, Any]) -> str:
    """The ranking's figures in words; an unreliable target gets no τ (it would be read as a result)."""
    est, macs, half, verdict = side["estimate"], side["macs_only"], side["split_half"], side["verdict"]
    lo, hi = est["kendall_interval"]
    ceiling = half.get("tau_ceiling")
    r1 = half.get("r1")
    if verdict["verdict"] == "not measurable":
        return (
            f"**not measurable at this schedule**: the split-half reliability of the stand-alone target is r1 "
            f"{'n/a' if r1 is None else f'{r1:.2f}'} (< 0.4), so no τ is quoted; train the ranking archs longer "
            "(nas.study_train) or with more seeds (nas.ranking_seeds)"
        )
    given = side.get("given_macs")
    at_equal_cost = (
        f", at equal MACs τ {given['kendall']:+.2f} [{given['kendall_interval'][0]:+.2f}, "
        f"{given['kendall_interval'][1]:+.2f}]"
        if given and given.get("kendall") is not None and given.get("kendall_interval")
        else ""
    )
    return (
        f"Kendall τ {est['kendall']:+.2f} [{lo:+.2f}, {hi:+.2f}] (90 % bootstrap), MACs-only τ {macs['kendall']:+.2f}"
        f"{at_equal_cost}; "
        f"split-half reliability r1 {'n/a' if r1 is None else f'{r1:.2f}'}, ceiling τ "
        f"{'n/a' if ceiling is None else f'{ceiling:.2f}'}: **{verdict['verdict']}** ({verdict['reason']})"
    )


def supernet_markdown(results: dict[str, Any] | None) -> list[str]:
    """The report's supernet section: health, band ratio, ranking verdicts."""
    if not results:
        return []
    md = ["## The supernet (validation split)\n"]
    health = results.get("health")
    if health:
        md.append(f"- {health_line(health)}.")
    ratio = results.get("band_ratio")
    if ratio:
        md.append(
            f"- Band ratio: the paths' heterogeneous top-1 {ratio['supernet_het_top1']:.1f} is "
            f"{100 * ratio['ratio']:.0f} % of the {ratio['n_standalone']} random in-band architectures trained "
            f"alone on the table's schedule ({ratio['standalone_het_top1']:.1f})."
        )
    ranking = results.get("ranking") or {}
    for side, label in (("heterogeneous", "heterogeneous (top-1 + mAP)"), ("homogeneous", "homogeneous (top-1 + mAP)")):
        if ranking.get(side):
            md.append(
                f"- Ranking, {label}, {ranking['n']} architectures x {len(ranking['seeds'])} seeds: "
                f"{_tau_text(ranking[side])}."
            )
    return md + [""]
