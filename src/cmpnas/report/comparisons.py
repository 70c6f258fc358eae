"""Which query models the report compares, and the paired comparisons (test split, paired by seed).

"The best" hand-designed model or random control of a comparison is chosen on the validation split; the
comparison itself is on test: had test also picked the competitor, the verdict would be judged on the very
numbers that chose one side of it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from cmpnas.config import Config
from cmpnas.evaluation.stats import PairedDifference, by_seed, group_by_model, paired_comparison
from cmpnas.report.summary import val_top1

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


def best_on_validation(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The candidate with the highest heterogeneous top-1 on the validation split (mean over seeds), or None."""
    scored = [m for m in candidates if val_top1(m) is not None]
    return max(scored, key=lambda m: val_top1(m)) if scored else None


def hand_designed(cfg: Config, models: list[dict[str, Any]], stem: str | None = None) -> list[dict[str, Any]]:
    """The baseline rows of the run, of one stem label ('stock' / 'matched') or all."""
    stems = {b.name: b.stem for b in cfg.run.baselines}
    return [m for m in models if m["kind"] == "baseline" and stem in (None, stems.get(m["name"], "stock"))]


def _reward_pairs(cfg: Config, head: dict[str, Any], by_kind: dict[str, Any]) -> list[Pair]:
    """The headline reward's model against each other reward's (R3 vs R1, R3 vs R2)."""
    others = [by_kind.get(f"searched-{r}") for r in cfg.run.rewards]
    return [
        Pair(head["name"], o["name"], f"reward {cfg.run.headline_reward} vs {o['kind'].split('-', 1)[1]}")
        for o in others
        if o is not None and o is not head
    ]


def _baseline_pair(
    head: dict[str, Any], candidates: list[dict[str, Any]], stem: str | None = None
) -> list[Pair]:
    """The searched model against the best hand-designed baseline (of ``candidates``) that costs at most as many
    MACs."""
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


def comparison_pairs(cfg: Config, models: list[dict[str, Any]]) -> list[Pair]:
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
    """Heterogeneous top-1 (test) of each pair of :func:`comparison_pairs`, paired by seed, with a t interval."""
    groups = {g[0]["query"]["name"]: g for g in group_by_model(rows)}
    out = []
    for pair in comparison_pairs(cfg, models):
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
        elif all(val_top1(m) is None for m in candidates):
            out.append(f"{lead}: not compared (no validation scores to choose by; redo the evaluate stage)")
        else:
            out.append(f"{lead}: none of the {len(candidates)} costs <= its MACs ({head['macs'] / 1e6:.2f} M)")
    return out
