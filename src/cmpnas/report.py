"""The run report: results.json, report.md and a self-contained report.html (PNG plots inlined).

Every number says which split it comes from: the query-model table and the paired comparisons are on
the test split (reported, never used to pick anything); the search rewards, the study and the scores that
choose "the best" model of a group for a comparison (the best hand-designed model at <= the searched model's
MACs, the best random control) are on the validation split. With several seeds (``run.seeds``) a query
model's numbers are mean ± sample std over its seeds, and models are compared paired by seed
(``cmpnas.evaluation.stats``).
"""

from __future__ import annotations

import base64
import io
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from markdown_it import MarkdownIt

from cmpnas.config import Config
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.stats import (
    PairedDifference,
    Summary,
    aggregate_model,
    by_seed,
    format_mean_std,
    group_by_model,
    paired_comparison,
)
from cmpnas.io import read_json, write_json_atomic, write_text_atomic
from cmpnas.learning_check import learning_check, learning_markdown
from cmpnas.manifest import environment
from cmpnas.models.embedding import safetensors_header
from cmpnas.progress import format_seconds
from cmpnas.stages.common import MODEL_FILE
from cmpnas.stages.upgrade import upgrade_markdown
from cmpnas.supernet_report import supernet_markdown, supernet_results

# Which split each number of results.json comes from (None: no split, e.g. MACs or timings).
SPLITS = {
    "headline": "test",
    "cost_reduction": None,
    "gap_to_paragon": "test",
    "paragon": "test",
    "query_models": "test",
    "paired_comparisons": "test",
    "what_the_search_buys": "test",
    "random_controls": None,
    "gallery": None,
    "searches": "val",
    "study": "val",
    "supernet": "val",
    "learning_check": "test",
    "stage_seconds": None,
    "environment": None,
}


def _load(path: Path) -> Any:
    fix = "restore it, or redo the stage that wrote it (cmpnas run ... --force STAGE)"
    return read_json(path, fix) if path.exists() else None


def _summary(model: dict[str, Any], setting: str, metric: str = "top1") -> Summary:
    """Mean ± std of one number of an aggregated model (from :func:`aggregate_model`)."""
    return Summary(model[setting][metric], model["std"][setting][metric], model["n_seeds"])


def _pm(model: dict[str, Any], setting: str, metric: str = "top1") -> str:
    """Mean ± std over seeds as text ("81.9 ± 0.3"), or the value ("81.91") for one seed."""
    return format_mean_std(_summary(model, setting, metric))


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
        f"{_pm(pick, 'heterogeneous')}{seeds}, {where} the paragon ({pick['paragon']['top1']:.2f}), against "
        f"{_pm(pick, 'homogeneous')} for the query model alone.",
        pick,
    )


VALIDATION_KEYS = ("heterogeneous_top1", "homogeneous_top1")


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


# ------------------------------------------------------------------------------------------ paired
CONTROL_KIND = "control-random"
CHOSEN = "chosen on validation"
# what the headline model is measured against -> how the report says it
AGAINST = {
    "random": "a random architecture from the same space",
    "matched": "the best hand-designed model with the search space's stem at <= its MACs",
    "stock": "the best hand-designed model with a stock stem at <= its MACs",
}
# a baseline's stem label -> how a comparison names its group (None: every hand-designed model)
STEM_GROUPS = {None: "baseline", "matched": "model with the search space's stem", "stock": "model with a stock stem"}


class Pair(NamedTuple):
    """One comparison A - B: why it is made, whether B is "the best" of a group (then chosen on validation), and
    what the headline model is measured against (for the summary of what the search buys)."""

    a: str
    b: str
    why: str
    chosen_on: str | None = None
    against: str | None = None


def _same_model(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Both names point at the same weights on every seed (two rewards that found one architecture)."""
    return [r["query"]["fingerprint"] for r in a] == [r["query"]["fingerprint"] for r in b]


def _val_top1(model: dict[str, Any]) -> float | None:
    v = model.get("validation")
    return None if v is None else v["heterogeneous_top1"]


def best_on_validation(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The candidate with the highest heterogeneous top-1 on the validation split (mean over seeds), or None.

    The test split only reports: had it also picked the competitor, the comparison would be judged on the very
    numbers that chose one side of it.
    """
    scored = [m for m in candidates if _val_top1(m) is not None]
    return max(scored, key=lambda m: _val_top1(m)) if scored else None


def _reward_pairs(cfg: Config, head: dict[str, Any], by_kind: dict[str, Any]) -> list[Pair]:
    """The headline reward's model against each other reward's (R3 vs R1, R3 vs R2)."""
    others = [by_kind.get(f"searched-{r}") for r in cfg.run.rewards]
    return [
        Pair(head["name"], o["name"], f"reward {cfg.run.headline_reward} vs {o['kind'].split('-', 1)[1]}")
        for o in others
        if o is not None and o is not head
    ]


def hand_designed(cfg: Config, models: list[dict[str, Any]], stem: str | None = None) -> list[dict[str, Any]]:
    """The baseline rows of the run, of one stem label ('stock' / 'matched') or all."""
    stems = {b.name: b.stem for b in cfg.run.baselines}
    return [m for m in models if m["kind"] == "baseline" and stem in (None, stems.get(m["name"], "stock"))]


def _baseline_pair(
    head: dict[str, Any], candidates: list[dict[str, Any]], stem: str | None = None
) -> list[Pair]:
    """The searched model against the best hand-designed baseline (of ``candidates``) that costs at most as many
    MACs.

    "Best" is the highest heterogeneous top-1 on the validation split (mean over seeds), and the comparison
    itself is on the test split, paired by seed: choosing on test would let the test split both pick the
    competitor and judge it.
    """
    best = best_on_validation([m for m in candidates if m["macs"] <= head["macs"]])
    if best is None:
        return []
    why = f"searched vs the best hand-designed {STEM_GROUPS[stem]} at <= its MACs ({CHOSEN})"
    return [Pair(head["name"], best["name"], why, "val", stem)]


def _control_pair(head: dict[str, Any], models: list[dict[str, Any]]) -> list[Pair]:
    """The searched model against the best random control (same space, same MACs band, same training)."""
    controls = [m for m in models if m["kind"] == CONTROL_KIND]
    best = best_on_validation(controls)
    if best is None:
        return []
    n = len(controls)
    why = f"searched vs the best of {n} random architectures of the same space and MACs band ({CHOSEN})"
    return [Pair(head["name"], best["name"], why, "val", "random")]


def _compat_pairs(cfg: Config, names: set[str]) -> list[Pair]:
    """Each BCT baseline against the independent baseline of the same architecture."""
    return [
        Pair(bct.name, ind.name, "BCT vs independent, same architecture")
        for bct in cfg.run.baselines
        for ind in cfg.run.baselines
        if (bct.compat, ind.compat) == ("bct", "independent")
        and bct.model == ind.model
        and {bct.name, ind.name} <= names
    ]


def _pairs(cfg: Config, models: list[dict[str, Any]]) -> list[Pair]:
    """The comparisons the report makes, where both rows exist: the headline reward against the other rewards,
    the best random control, the best stem-matched and the best stock-stem hand-designed model at <= its MACs;
    each family member against the best hand-designed model at <= its MACs; BCT against independent."""
    by_kind = {m["kind"]: m for m in models}
    head = by_kind.get(f"searched-{cfg.run.headline_reward}")
    pairs = []
    if head is not None:
        pairs += _reward_pairs(cfg, head, by_kind) + _control_pair(head, models)
        for stem in ("matched", "stock"):
            pairs += _baseline_pair(head, hand_designed(cfg, models, stem), stem)
    for member in (m for m in models if m["kind"].startswith("family-")):
        pairs += _baseline_pair(member, hand_designed(cfg, models))
    return pairs + _compat_pairs(cfg, {m["name"] for m in models})


def paired_comparisons(cfg: Config, rows: list[dict[str, Any]], models: list[dict[str, Any]]) -> list[dict]:
    """Heterogeneous top-1 (test) of each pair of :func:`_pairs`, paired by seed, with a t interval."""
    groups = {g[0]["query"]["name"]: g for g in group_by_model(rows)}
    out = []
    for pair in _pairs(cfg, models):
        a, b = pair.a, pair.b
        diff: PairedDifference = paired_comparison(a, by_seed(groups[a]), b, by_seed(groups[b]))
        entry = {"comparison": pair.why, "metric": "heterogeneous top1", "split": "test", **diff.to_dict()}
        entry["chosen_on"] = pair.chosen_on
        entry["against"] = pair.against
        if _same_model(groups[a], groups[b]):
            entry["same_model"] = True
            entry["sentence"] += " (the same model: both rewards found one architecture)"
        out.append(entry)
    return out


def what_the_search_buys(cfg: Config, models: list[dict[str, Any]], comparisons: list[dict]) -> list[str]:
    """In words, the headline model against a random pick and the best hand-designed models (test, paired by
    seed), for each group the run has; a group with no comparable model says why."""
    head = next((m for m in models if m["kind"] == f"searched-{cfg.run.headline_reward}"), None)
    if head is None:
        return []
    groups = {
        "random": [m for m in models if m["kind"] == CONTROL_KIND],
        "matched": hand_designed(cfg, models, "matched"),
        "stock": hand_designed(cfg, models, "stock"),
    }
    out = []
    for against, candidates in groups.items():
        if not candidates:
            continue
        c = next((c for c in comparisons if c["a"] == head["name"] and c.get("against") == against), None)
        lead = f"Search vs {AGAINST[against]}"
        if c is not None:
            chosen = f"the best of {len(candidates)}" if against == "random" else c["b"]
            rest = c["sentence"].removeprefix(f"{c['a']} vs {c['b']}: ")
            out.append(f"{lead} ({chosen}, {CHOSEN}): {rest}")
        elif all(_val_top1(m) is None for m in candidates):
            out.append(f"{lead}: not compared (no validation scores to choose by; redo the evaluate stage)")
        else:
            out.append(f"{lead}: none of the {len(candidates)} costs <= its MACs ({head['macs'] / 1e6:.2f} M)")
    return out


def random_controls(state: dict[str, Any]) -> dict[str, Any] | None:
    """The random controls' draw as the stages recorded it (seed, MACs band, each arch and its MACs)."""
    recs: dict[str, dict[str, Any]] = {}  # one record per control (each seed trained the same arch)
    for name, rec in state.items():
        if name.startswith("control-") and rec.get("status") == "done" and rec.get("outputs"):
            recs.setdefault(name.split("@", 1)[0], rec["outputs"])
    if not recs:
        return None
    draw = next(iter(recs.values()))["draw"]
    archs = [
        {"stage": k, "index": o["draw"]["index"], "arch": o["arch"], "macs": o.get("macs")}
        for k, o in recs.items()
    ]
    return {"seed": draw["seed"], "band": draw["band"], "archs": sorted(archs, key=lambda a: a["index"])}


# ------------------------------------------------------------------------------------------ tables
def _val_text(model: dict[str, Any]) -> str:
    """Validation heterogeneous top-1 (mean over seeds), the number "the best" of a group is chosen by."""
    top1 = _val_top1(model)
    return "-" if top1 is None else f"{top1:.{2 if model['n_seeds'] == 1 else 1}f}"


def models_table(models: list[dict[str, Any]]) -> str:
    """Paragon / homogeneous / heterogeneous per query model: mean ± std over seeds (test split), and the
    validation heterogeneous top-1 the comparisons choose by."""
    lines = [
        "| query model | MACs | cost reduction | seeds | paragon top-1 / mAP | homogeneous top-1 / mAP | "
        "heterogeneous top-1 / mAP | gap to paragon (top-1) | M(q,g) > M(q,q) | val heterogeneous top-1 |",
        "|---|---:|---:|---:|---|---|---|---:|:---:|---:|",
    ]
    for m in models:
        p = m["paragon"]
        compatible = "yes" if m["compatible"] else "no"
        if m["n_seeds"] > 1:
            compatible += f" ({m['compatible_seeds']}/{m['n_seeds']} seeds)"
        lines.append(
            f"| {m['name']} | {m['macs'] / 1e6:.2f} M | {m['cost_reduction']:.1f}x | {m['n_seeds']} | "
            f"{p['top1']:.2f} / {p['map']:.2f} | {_pm(m, 'homogeneous')} / {_pm(m, 'homogeneous', 'map')} | "
            f"{_pm(m, 'heterogeneous')} / {_pm(m, 'heterogeneous', 'map')} | {_pm(m, 'gap_to_paragon')} | "
            f"{compatible} | {_val_text(m)} |"
        )
    return "\n".join(lines) + "\n"


def per_seed_table(models: list[dict[str, Any]]) -> str:
    """Each seed's homogeneous / heterogeneous top-1 and mAP (test split), the rows the means come from."""
    lines = [
        "| query model | seed | homogeneous top-1 / mAP | heterogeneous top-1 / mAP |",
        "|---|---:|---|---|",
    ]
    for m in models:
        for r in m["per_seed"]:
            h, x = r["homogeneous"], r["heterogeneous"]
            lines.append(
                f"| {m['name']} | {r['seed']} | {h['top1']:.2f} / {h['map']:.2f} | {x['top1']:.2f} / {x['map']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(
    models: list[dict[str, Any]],
    gallery: dict[str, Any] | None,
    searches: dict[str, Any],
    study: dict[str, Any] | None,
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    if models and gallery:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        ax.axhline(
            models[0]["paragon"]["top1"],
            color="tab:orange",
            ls="--",
            label=f"paragon M(g,g) ({gallery['macs'] / 1e6:.0f} MMACs)",
        )
        # one colour per model, named in the legend (labels on the points overlap when models have similar
        # MACs); hollow circles = homogeneous, filled triangles = heterogeneous
        colors = plt.get_cmap("tab10").colors
        for i, r in enumerate(models):
            m, color = r["macs"] / 1e6, colors[i % len(colors)]
            for setting, marker, face in (("homogeneous", "o", "none"), ("heterogeneous", "^", color)):
                ax.errorbar(
                    m,
                    r[setting]["top1"],
                    yerr=r["std"][setting]["top1"] or 0.0,
                    fmt=marker,
                    color=color,
                    mfc=face,
                    capsize=2,
                    label=r["name"] if setting == "heterogeneous" else None,
                )
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="black", label="homogeneous M(q,q)")
        ax.scatter([], [], marker="^", color="black", label="heterogeneous M(q,g)")
        for (reward, s), ls in zip(searches.items(), ("-", "--", ":", "-."), strict=False):
            front = s.get("pareto_front") or []
            if front:
                ax.plot(
                    [p["macs"] / 1e6 for p in front],
                    [p["het_top1"] for p in front],
                    lw=0.8,
                    color="grey",
                    ls=ls,
                    label=f"search {reward} Pareto front (val, supernet)",
                )
        ax.set_xlabel("query model MMACs")
        ax.set_ylabel("top-1 (%), test split")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        n = max(r["n_seeds"] for r in models)
        ax.set_title("Accuracy vs cost" + (f" (mean ± std over {n} seeds)" if n > 1 else ""))
        plots["accuracy_vs_macs"] = _png(fig)
    if searches:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for reward, s in searches.items():
            h = s.get("history") or []
            ax.plot(
                [e["generation"] for e in h],
                [e["best_fitness"] for e in h],
                marker=".",
                label=f"{reward} best",
            )
            ax.plot(
                [e["generation"] for e in h], [e["mean_fitness"] for e in h], ls=":", label=f"{reward} mean"
            )
        ax.set_xlabel("generation")
        ax.set_ylabel("reward (val, %)")
        ax.legend(fontsize=7)
        ax.set_title("Search progress")
        plots["search_progress"] = _png(fig)
    if study and study.get("rows"):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        for mode, color in (("bct", "tab:green"), ("independent", "tab:red")):
            rs = [r for r in study["rows"] if r["mode"] == mode and r.get("set", "study") == "study"]
            axes[0].scatter(
                [r["hom_top1"] for r in rs], [r["het_top1"] for r in rs], color=color, label=mode, s=14
            )
            axes[1].scatter(
                [r["macs"] / 1e6 for r in rs], [r["het_top1"] for r in rs], color=color, label=mode, s=14
            )
        axes[0].set_xlabel("homogeneous top-1")
        axes[0].set_ylabel("heterogeneous top-1")
        axes[1].set_xlabel("MMACs")
        axes[1].set_ylabel("heterogeneous top-1")
        for a in axes:
            a.legend(fontsize=7)
        fig.suptitle("Random architectures at equal cost (val)")
        plots["study"] = _png(fig)
    estimated = [r for r in (study or {}).get("rows", []) if r.get("supernet_het_top1") is not None]
    if estimated:
        fig, ax = plt.subplots(figsize=(4.8, 3.8))
        for arch_set, color in (("ranking", "tab:blue"), ("study", "tab:green")):
            rs = [r for r in estimated if r.get("set", "study") == arch_set]
            if rs:
                ax.scatter(
                    [r["supernet_het_top1"] for r in rs],
                    [r["het_top1"] for r in rs],
                    color=color,
                    s=14,
                    label=f"{arch_set} archs ({len(rs)})",
                )
        tau = (study.get("ranking") or {}).get("kendall_supernet_vs_standalone_het")
        ax.set_xlabel("supernet estimate, heterogeneous top-1")
        ax.set_ylabel("stand-alone (BCT), heterogeneous top-1")
        ax.set_title(
            "Supernet vs stand-alone (val)" + (f", ranking set Kendall {tau:.2f}" if tau is not None else "")
        )
        ax.legend(fontsize=7)
        plots["supernet_vs_standalone"] = _png(fig)
    return plots


def backfill_figure(res: dict[str, Any]) -> Any:
    """The backfill curve of an upgrade evaluation: top-1 of new-model queries against the fraction of the gallery
    re-embedded, both orders, with M(old, old) and M(new, new) as the ends to compare against."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top1 = {(r["query"], r["gallery"]): r["top1"] for r in res["table"]}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for order, style in (("uncertainty", "o-"), ("random", "s--")):
        pts = res["backfill_curve"][order]
        ax.plot([100 * p["fraction"] for p in pts], [p["top1"] for p in pts], style, label=f"backfill order: {order}")
    ax.axhline(top1[("old", "old")], color="grey", lw=1, ls=":", label=f"M(old, old) {top1[('old', 'old')]:.1f}")
    ax.axhline(top1[("new", "new")], color="black", lw=1, ls="-.", label=f"M(new, new) {top1[('new', 'new')]:.1f}")
    ax.set_xlabel("gallery re-embedded by the new model (%)")
    ax.set_ylabel(f"top-1 (%), new-model queries, {res['split']} split")
    ax.set_title("Backfilling an old index with the upgraded gallery model")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ family
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
                "homogeneous_top1": asdict(_summary(model, "homogeneous")),
                "heterogeneous_top1": asdict(_summary(model, "heterogeneous")),
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


def family_markdown(rows: list[dict[str, Any]], latency_check: dict[str, Any] | None) -> str:
    lines = [
        "One search for every budget; each member retrained with the compat objective on the table's schedule and "
        "exported to ONNX. MACs from the search's lookup table and counted on the exported model; latency predicted "
        "by the table and measured whole"
        + (f" ({latency_check['measured_as']})" if latency_check and latency_check.get("measured_as") else "")
        + ". Accuracy: test split.\n",
        "| member | MACs cap | MMACs (LUT / counted) | cost red. | latency pred. / measured (ms) | error | "
        "homogeneous top-1 | heterogeneous top-1 | vs best hand-designed at <= MACs (het top-1) |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        cap = r["budget"]["macs"]
        lat = r["budget"]["latency_ms"]
        cap_text = (f"{cap / 1e6:.2f} M" if cap else "-") + (f", <= {lat:g} ms" if lat else "")
        counted = f"{r['macs_counted'] / 1e6:.3f}" if r["macs_counted"] is not None else "-"
        versus = r["versus_best_hand_designed"]
        lines.append(
            f"| {r['name']} | {cap_text} | {r['macs_lut'] / 1e6:.3f} / {counted} | {r['cost_reduction']:.0f}x | "
            f"{_num(r['latency_ms_predicted'], 3)} / {_num(r['latency_ms_measured'], 3)} | "
            f"{_num(r['latency_error_pct'])} % | {format_mean_std(Summary(**r['homogeneous_top1']))} | "
            f"{format_mean_std(Summary(**r['heterogeneous_top1']))} | "
            f"{versus['sentence'] if versus else 'no hand-designed model at <= its MACs'} |"
        )
    notes = budget_use_notes(rows)
    lines.append("\n" + ("\n".join(f"- {n}" for n in notes) if notes else f"Every member uses >= {100 * BUDGET_USE:.0f} % of its MACs cap, each with its own architecture.") + "\n")
    if latency_check and latency_check.get("mean_abs_error_pct") is not None:
        lines.append(
            f"\nLatency table vs measured (members): mean |error| {latency_check['mean_abs_error_pct']:.1f} %, "
            f"max {latency_check['max_abs_error_pct']:.1f} % (goal <= 10 %).\n"
        )
    return "\n".join(lines) + "\n"


def family_figure(
    models: list[dict[str, Any]], gallery: dict[str, Any], family: dict[str, Any], baselines: Any
) -> Any:
    """Heterogeneous top-1 against MACs and against measured ONNX latency: the searched family, each hand-designed
    family (a line through its widths), the independent baseline(s), the paragon as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = {m["name"]: m.get("latency_ms_measured") for m in family["members"]}
    latency |= {f"ref:{r['name']}": r.get("latency_ms_measured") for r in family.get("references", [])}
    by_name = {m["name"]: m for m in models}
    groups: dict[str, list[tuple[dict[str, Any], float | None]]] = {}
    for member in family["members"]:
        model = next((m for m in models if m["kind"] == f"family-{member['name']}"), None)
        if model is not None:
            groups.setdefault("CMP-NAS family (searched, BCT)", []).append((model, latency[member["name"]]))
    for b in baselines:
        model = by_name.get(b.name)
        if model is None:
            continue
        label = f"{b.family} (hand-designed, {b.compat})" if b.family else f"{b.name} ({b.compat})"
        groups.setdefault(label, []).append((model, latency.get(f"ref:{b.name}")))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    markers = ("o", "s", "D", "^", "v", "P", "X")
    for ax, axis in zip(axes, ("macs", "latency"), strict=True):
        ax.axhline(models[0]["paragon"]["top1"], color="tab:orange", ls="--",
                   label=f"paragon M(g,g) ({gallery['macs'] / 1e6:.0f} MMACs)")
        for i, (label, points) in enumerate(groups.items()):
            pts = sorted(
                ((m["macs"] / 1e6 if axis == "macs" else lat, m) for m, lat in points if axis == "macs" or lat),
                key=lambda t: t[0],
            )
            if not pts:
                continue
            ax.errorbar(
                [x for x, _ in pts],
                [m["heterogeneous"]["top1"] for _, m in pts],
                yerr=[m["std"]["heterogeneous"]["top1"] or 0.0 for _, m in pts],
                fmt=markers[i % len(markers)] + ("-" if len(pts) > 1 else ""),
                capsize=2,
                lw=1.2 if i == 0 else 0.8,
                label=label,
            )
        ax.set_xlabel("query model MMACs" if axis == "macs" else "measured latency (ms, ONNX Runtime, batch 1, 1 thread)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("heterogeneous top-1 M(q,g) (%), test split")
    n = max(m["n_seeds"] for m in models)
    fig.suptitle("Query-model family vs hand-designed families" + (f" (mean ± std over {n} seeds)" if n > 1 else ""))
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def _results(
    cfg: Config,
    rows: list[dict[str, Any]],
    models: list[dict[str, Any]],
    searches: dict[str, Any],
    study: dict[str, Any] | None,
    state: dict[str, Any],
    num_classes: int | None = None,
) -> dict[str, Any]:
    """results.json: the headline, each model's mean ± std and per-seed numbers, the paired comparisons,
    searches and study, each with the split it comes from (``splits``)."""
    gallery = rows[0]["gallery"] if rows else None
    head, pick = headline(models, gallery, cfg.run.headline_reward)
    timings = {k: v.get("seconds") for k, v in state.items() if v.get("status") == "done"}
    comparisons = paired_comparisons(cfg, rows, models)
    return {
        "headline": head,
        "splits": SPLITS,
        "protocol": rows[0].get("protocol") if rows else None,
        "seeds": list(cfg.run.seeds),
        "seeds_note": "query models (baselines, retrains) trained once per seed s with their TrainConfig "
        "seed + s; one gallery, one supernet, one search (the search is not repeated per seed)",
        "cost_reduction": pick["cost_reduction"] if pick else None,
        "gap_to_paragon": pick["gap_to_paragon"] if pick else None,
        "paragon": pick["paragon"] if pick else None,
        "query_models": models,
        "paired_comparisons": comparisons,
        "selection": "the best hand-designed model and the best random control of a comparison are chosen by "
        "heterogeneous top-1 on the validation split (mean over seeds); the comparison itself is on test",
        "what_the_search_buys": what_the_search_buys(cfg, models, comparisons),
        "random_controls": random_controls(state),
        "gallery": gallery,
        "searches": {
            k: {
                "best": v["best"],
                "n_candidates": v["n_candidates"],
                "seconds": v["seconds"],
                "split": "val",
            }
            for k, v in searches.items()
        },
        "study": ({k: v for k, v in study.items() if k != "rows"} | {"split": "val"}) if study else None,
        "learning_check": learning_check(
            models,
            (pick or {}).get("paragon", {}).get("top1") if pick else None,
            num_classes,
            {b.name for b in cfg.run.baselines if b.compat == "independent"},
            cfg.nas.supernet.min_skill,
        ),
        "supernet": supernet_results(
            (state.get("supernet") or {}).get("outputs", {}).get("health"), (study or {}).get("ranking"), models
        ),
        "stage_seconds": timings,
        "total_seconds": round(sum(t for t in timings.values() if t), 1),
        "environment": environment(),
    }


def _num_classes(out: Path) -> int | None:
    """The gallery model's number of classes (from its file's header), None when it cannot be read."""
    path = out / "gallery" / MODEL_FILE
    try:
        spec = json.loads(safetensors_header(path)["spec"]) if path.is_file() else None
    except (OSError, KeyError, ValueError, CmpnasError):
        return None
    return int(spec["num_classes"]) if spec and spec.get("num_classes") else None


def _markdown(cfg: Config, results: dict[str, Any], searches: dict[str, Any], study: dict | None) -> str:
    models = results["query_models"]
    n_seeds = len(cfg.run.seeds)
    seeds = (
        f"{n_seeds} seeds {list(cfg.run.seeds)}: each query model trained once per seed (its training seed + s) "
        "over one gallery, one supernet and one search; numbers are mean ± sample std over seeds"
        if n_seeds > 1
        else "1 seed: no spread and no intervals (set run.seeds or `cmpnas run --seeds 0,1,2` for both)"
    )
    md = [
        f"# cmpnas report\n\n**{results['headline']}**\n",
        f"Data: {cfg.data.name}; protocol: leave-one-out retrieval on the test split "
        "(every image queries all other images; top-1 = nearest neighbour has the same class). "
        "Test numbers are reported only: the search rewards, the study and the choice of the best hand-designed "
        "model and the best random control in the comparisons use the validation split, and nothing is chosen "
        "by a test number.\n",
        f"Seeds: {seeds}.\n",
        *learning_markdown(results.get("learning_check")),
        f"## Paragon / homogeneous / heterogeneous (test split, {n_seeds} seed{'s' if n_seeds > 1 else ''})\n",
        models_table(models) if models else "(no models evaluated)\n",
    ]
    if models:
        md.append(
            "Latency (batch 1, torch eager, 1 thread, p50): "
            + ", ".join(f"{m['name']} {m['latency_ms_b1']:.2f} ms" for m in models)
            + f"; gallery {results['gallery'].get('latency_ms_b1', float('nan')):.2f} ms.\n"
        )
    md += _rows_note(cfg, models, results.get("random_controls"))
    if models and n_seeds > 1:
        md += ["### Per seed (test split)\n", per_seed_table(models)]
    md += _paired_section(results["paired_comparisons"], n_seeds)
    md += _search_buys_section(results["what_the_search_buys"], n_seeds)
    if searches:
        md.append(
            "## Searches (val split, supernet weights after BN recalibration; run once, not per seed)\n"
        )
        md.append(
            "| reward | best MMACs | hom top-1 | het top-1 | candidates | seconds |\n|---|---:|---:|---:|---:|---:|"
        )
        for k, v in searches.items():
            b = v["best"]
            md.append(
                f"| {k} | {b['macs'] / 1e6:.3f} | {b['metrics']['hom_top1']:.2f} | {b['metrics']['het_top1']:.2f} "
                f"| {v['n_candidates']} | {v['seconds']:.0f} |"
            )
        md.append("")
    md += supernet_markdown(results.get("supernet"))
    if study:
        md += _study_section(study)
    md.append("## Stage timings\n")
    md.append("| stage | time |\n|---|---:|")
    md += [f"| {k} | {format_seconds(v)} |" for k, v in results["stage_seconds"].items() if v is not None]
    md.append(f"| **total** | **{format_seconds(results['total_seconds'])}** |\n")
    md += _environment_section(results["environment"])
    return "\n".join(md) + "\n"


ENVIRONMENT_ROWS = (
    ("CPU", "cpu"), ("torch threads", "threads"), ("platform", "platform"), ("python", "python"),
    ("cmpnas", "cmpnas"), ("torch", "torch"), ("torchvision", "torchvision"), ("timm", "timm"),
    ("numpy", "numpy"), ("faiss", "faiss"), ("onnxruntime", "onnxruntime"),
)  # fmt: skip


def _environment_section(env: dict[str, Any]) -> list[str]:
    md = ["## Environment\n", "| | |\n|---|---|"]
    md += [f"| {label} | {env[key]} |" for label, key in ENVIRONMENT_ROWS if env.get(key) is not None]
    md.append("")
    return md


def _paired_section(comparisons: list[dict[str, Any]], n_seeds: int) -> list[str]:
    """One sentence per comparison: A − B of heterogeneous top-1 (test), its 95 % interval and the verdict."""
    method = (
        f"paired by seed over {n_seeds} seeds, 95 % paired-t interval"
        if n_seeds > 1
        else "1 seed: no interval can be given"
    )
    md = [f"## Paired comparisons (heterogeneous top-1, test split; {method})\n"]
    if not comparisons:
        md.append("(no pair of comparable query models in this run)\n")
        return md
    md += [f"- {c['sentence']} — {c['comparison']}" for c in comparisons]
    md.append("")
    return md


def _rows_note(cfg: Config, models: list[dict[str, Any]], controls: dict[str, Any] | None) -> list[str]:
    """Which hand-designed rows have the search space's stem, and how the random controls were drawn."""
    md = []
    matched = [m["name"] for m in hand_designed(cfg, models, "matched")]
    if matched:
        md.append(
            f"Stem-matched hand-designed rows (they downsample as the search space does, same final feature-map "
            f"size): {', '.join(matched)}; the other hand-designed rows keep their stock stems.\n"
        )
    if controls:
        low, high = controls["band"]
        md.append(
            f"Random controls: {len(controls['archs'])} distinct architectures drawn uniformly from the search "
            f"space with query MACs in [{low / 1e6:.2f}, {high / 1e6:.2f}] MMACs (the band the search samples; "
            f"draw seed {controls['seed']}), each trained like the searched model (same schedule, compat "
            "objective and seeds).\n"
        )
    return md


def _search_buys_section(sentences: list[str], n_seeds: int) -> list[str]:
    """The headline comparisons in words: what the search buys over a random pick and the hand-designed models."""
    if not sentences:
        return []
    how = f"paired by seed over {n_seeds} seeds" if n_seeds > 1 else "1 seed: no interval"
    md = [f"## What the search buys (heterogeneous top-1, test split; {how})\n"]
    md += [f"- {s}" for s in sentences]
    md.append("")
    return md


def _num(x: Any, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _study_section(study: dict[str, Any]) -> list[str]:
    """The random-architecture study (val split) as tables: Q1 (is architecture a lever at equal cost? the spread
    of heterogeneous top-1), Q2 (does the homogeneous rank predict the heterogeneous one? Kendall τ), and how
    well the supernet ranks architectures against the same ones trained stand-alone."""
    band = study.get("band")
    budget = study.get("budget_macs")
    where = f" at {budget / 1e6:.2f} MMACs ± {100 * band:.0f} %" if budget and band is not None else ""
    md = [
        "## Random-architecture study (val split)\n",
        f"Random architectures{where}, each trained stand-alone on the study schedule. Q1: the spread of "
        "heterogeneous top-1 says whether the architecture is a lever at equal cost. Q2: Kendall τ between the "
        "homogeneous and the heterogeneous rank says whether a compatibility-agnostic search would pick the "
        "compatible architecture.\n",
        "| training | archs | het top-1 mean ± std | het top-1 range (max − min) | τ(hom, het) | ρ(hom, het) | "
        "M(q,g) > M(q,q) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("bct", "independent"):
        s = study.get(mode) or {}
        if not s.get("n"):
            continue
        het = [r["het_top1"] for r in study.get("rows", []) if r["mode"] == mode and r.get("set", "study") == "study"]
        std = f" ± {statistics.stdev(het):.1f}" if len(het) > 1 else ""
        md.append(
            f"| {mode} | {s['n']} | {_num(s.get('het_mean'))}{std} | {_num(s.get('het_spread'))} | "
            f"{_num(s.get('kendall_hom_het'), 2)} | {_num(s.get('spearman_hom_het'), 2)} | "
            f"{100 * s.get('fraction_compatible', 0):.0f} % |"
        )
    rows = []
    for label, s in (("study archs (BCT)", study.get("bct") or {}), ("ranking set", study.get("ranking") or {})):
        if not s.get("n") or s.get("kendall_supernet_vs_standalone_het") is None:
            continue
        span = s.get("macs_range")
        label += f" ({span[0] / 1e6:.2f}-{span[1] / 1e6:.2f} MMACs)" if span else ""
        rows.append(
            f"| {label} | {s['n']} | {_num(s.get('kendall_supernet_vs_standalone_het'), 2)} | "
            f"{_num(s.get('spearman_supernet_vs_standalone_het'), 2)} | "
            f"{_num(s.get('kendall_supernet_vs_standalone_hom'), 2)} | "
            f"{_num(s.get('spearman_supernet_vs_standalone_hom'), 2)} |"
        )
    if rows:
        md += [
            "",
            "Supernet estimate (after BN recalibration) against the same architecture trained stand-alone with "
            "BCT, rank agreement (goal: τ ≥ 0.5 on heterogeneous top-1):\n",
            "| architectures | n | het τ | het ρ | hom τ | hom ρ |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    md.append("")
    return md


def write_report(out: Path, cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    rows = _load(out / "evaluation" / "rows.json") or []
    searches = {r: _load(out / "search" / r / "search.json") for r in cfg.run.rewards}
    searches = {k: v for k, v in searches.items() if v}
    study = _load(out / "study" / "study.json")
    upgrade = _load(out / "upgrade" / "evaluate" / "results.json")
    family = _load(out / "export" / "family" / "family.json")
    models = summarize_models(rows)
    results = _results(cfg, rows, models, searches, study, state, _num_classes(out))
    if upgrade:
        results["upgrade"] = upgrade
    if family:
        results["family"] = {
            "members": family_rows(models, family, results["paired_comparisons"]),
            "latency_check": family.get("latency_check"),
            "references": family.get("references", []),
            "split": "test",
        }
    write_json_atomic(out / "results.json", results)
    markdown = _markdown(cfg, results, searches, study)
    if upgrade:
        markdown += "\n## Gallery-model upgrade\n\n" + upgrade_markdown(upgrade)
    if family:
        markdown += "\n## Query-model family (one search, several budgets)\n\n" + family_markdown(
            results["family"]["members"], family.get("latency_check")
        )
    write_text_atomic(out / "report.md", markdown)
    plots = _plots(models, results["gallery"], searches, study)
    if upgrade:
        plots["backfill_curve"] = _png(backfill_figure(upgrade))
    if family and models and results["gallery"]:
        plots["family"] = _png(family_figure(models, results["gallery"], family, cfg.run.baselines))
    write_text_atomic(out / "report.html", _html(markdown, plots))
    return {
        "results": "results.json",
        "report_md": "report.md",
        "report_html": "report.html",
        "headline": results["headline"],
        "plots": sorted(plots),
    }


def _html(markdown: str, plots: dict[str, str]) -> str:
    """The report's Markdown as HTML (CommonMark + tables, raw HTML off), then the plots; no external assets."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    imgs = "".join(
        f'<figure><img alt="{k}" src="data:image/png;base64,{v}"><figcaption>{k}</figcaption></figure>'
        for k, v in plots.items()
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "img{max-width:100%}figure{display:inline-block;margin:8px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>cmpnas report</title><style>{style}</style>"
        f"</head><body>{body}<h2>Plots</h2>{imgs}</body></html>"
    )
