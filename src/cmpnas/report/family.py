"""The query-model family section: one search, several budgets, each member against the hand-designed models."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from cmpnas.evaluation.stats import Summary, format_mean_std
from cmpnas.report.summary import model_summary
from cmpnas.tables import markdown_table, num


def family_rows(
    models: list[dict[str, Any]], family: dict[str, Any], comparisons: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per family member: budget, cost (LUT and counted MACs; predicted and measured latency), test
    accuracy over seeds, and its comparison with the best hand-designed model at <= its MACs."""
    by_kind = {m["kind"]: m for m in models}
    rows = []
    for member in family["members"]:
        model = by_kind.get(f"family-{member['name']}")
        if model is None:
            continue
        versus = next((c for c in comparisons if c["a"] == model["name"]), None)
        rows.append(
            {
                "name": member["name"],
                "budget": member["budget"],
                "macs_lut": member["macs"],
                "macs_counted": member.get("macs_counted"),
                "cost_reduction": model["cost_reduction"],
                "latency_ms_predicted": member.get("latency_ms_predicted"),
                "latency_ms_measured": member.get("latency_ms_measured"),
                "latency_error_pct": member.get("latency_error_pct"),
                "homogeneous_top1": asdict(model_summary(model, "homogeneous")),
                "heterogeneous_top1": asdict(model_summary(model, "heterogeneous")),
                "versus_best_hand_designed": versus,
                "model": model["name"],
                "budget_used": round(member["macs"] / member["budget"]["macs"], 3) if member["budget"].get("macs") else None,
                "arch": member.get("arch"),
            }
        )
    return rows


BUDGET_USE = 0.7  # a member whose MACs sit under this share of its cap left its budget unused


def budget_use_notes(rows: list[dict[str, Any]]) -> list[str]:
    """What the family's members made of their budgets: each one below ``BUDGET_USE`` of its cap, and members of
    different budgets that got the same architecture (a search that found nothing better with more room)."""
    notes = [
        f"Member {r['name']} uses {100 * r['budget_used']:.0f} % of its MACs cap (under {100 * BUDGET_USE:.0f} %): "
        "the search found nothing it scored higher with more room."
        for r in rows
        if r["budget_used"] is not None and r["budget_used"] < BUDGET_USE
    ]
    seen: dict[str, str] = {}
    for r in rows:
        key = json.dumps(r["arch"], sort_keys=True)
        if r["arch"] is not None and key in seen:
            notes.append(f"Members {seen[key]} and {r['name']} got the same architecture.")
        seen.setdefault(key, r["name"])
    return notes


def _member_cells(r: dict[str, Any]) -> list[str]:
    cap = r["budget"]["macs"]
    lat = r["budget"]["latency_ms"]
    cap_text = (f"{cap / 1e6:.2f} M" if cap else "-") + (f", <= {lat:g} ms" if lat else "")
    counted = f"{r['macs_counted'] / 1e6:.3f}" if r["macs_counted"] is not None else "-"
    versus = r["versus_best_hand_designed"]
    return [
        r["name"],
        cap_text,
        f"{r['macs_lut'] / 1e6:.3f} / {counted}",
        f"{r['cost_reduction']:.0f}x",
        f"{num(r['latency_ms_predicted'], 3)} / {num(r['latency_ms_measured'], 3)}",
        f"{num(r['latency_error_pct'])} %",
        format_mean_std(Summary(**r["homogeneous_top1"])),
        format_mean_std(Summary(**r["heterogeneous_top1"])),
        versus["sentence"] if versus else "no hand-designed model at <= its MACs",
    ]


def family_markdown(rows: list[dict[str, Any]], latency_check: dict[str, Any] | None) -> str:
    """The family table (test split), what the members made of their budgets, and the latency table's error."""
    headers = [
        "member", "MACs cap", "MMACs (LUT / counted)", "cost red.", "latency pred. / measured (ms)", "error",
        "homogeneous top-1", "heterogeneous top-1", "vs best hand-designed at <= MACs (het top-1)",
    ]  # fmt: skip
    lines = [
        "One search for every budget; each member retrained with the compat objective on the table's schedule and "
        "exported to ONNX. MACs from the search's lookup table and counted on the exported model; latency predicted "
        "by the table and measured whole"
        + (f" ({latency_check['measured_as']})" if latency_check and latency_check.get("measured_as") else "")
        + ". Accuracy: test split.\n",
        markdown_table(headers, [_member_cells(r) for r in rows], "lrrrrrlll"),
    ]
    notes = budget_use_notes(rows)
    lines.append("\n" + ("\n".join(f"- {n}" for n in notes) if notes else f"Every member uses >= {100 * BUDGET_USE:.0f} % of its MACs cap, each with its own architecture.") + "\n")
    if latency_check and latency_check.get("mean_abs_error_pct") is not None:
        lines.append(
            f"\nLatency table vs measured (members): mean |error| {latency_check['mean_abs_error_pct']:.1f} %, "
            f"max {latency_check['max_abs_error_pct']:.1f} % (goal <= 10 %).\n"
        )
    return "\n".join(lines) + "\n"
