"""Did every trained model learn? A model at chance is a failure the report names, not a row of its table.

Judged on the run's table (test split, mean over seeds) with the supernet's rule: a top-1 below chance +
``min_skill`` x (100 - chance) is near chance. The gallery by its paragon top-1; every query model by its
homogeneous top-1 (its own embedding), and by its heterogeneous top-1 unless it was trained without a
compatibility objective (an independent model is expected to be at chance against the gallery index: that is
what it shows).
"""

from __future__ import annotations

from typing import Any


def learning_check(
    models: list[dict[str, Any]],
    paragon_top1: float | None,
    num_classes: int | None,
    independent: set[str],
    min_skill: float,
) -> dict[str, Any] | None:
    """The near-chance figures of the run (empty ``failed`` when every model learned); None without classes."""
    if not num_classes:
        return None
    chance = 100.0 / num_classes
    floor = chance + min_skill * (100.0 - chance)
    failed = []
    if paragon_top1 is not None and paragon_top1 < floor:
        failed.append({"model": "gallery", "figure": "paragon top-1", "value": round(paragon_top1, 2)})
    for m in models:
        figures = [("homogeneous", "homogeneous top-1")]
        if m["name"] not in independent:
            figures.append(("heterogeneous", "heterogeneous top-1"))
        for side, label in figures:
            value = m[side]["top1"]
            if value < floor:
                failed.append({"model": m["name"], "figure": label, "value": round(value, 2)})
    return {"split": "test", "chance": round(chance, 2), "floor": round(floor, 2), "failed": failed}


def learning_markdown(check: dict[str, Any] | None) -> list[str]:
    """A warning section naming every model near chance (nothing when all learned)."""
    if not check or not check["failed"]:
        return []
    lines = [
        f"- **{f['model']}**: {f['figure']} {f['value']:.1f} % (chance {check['chance']:.1f} %, floor "
        f"{check['floor']:.1f} %)"
        for f in check["failed"]
    ]
    return ["## Models that did not learn\n", "These are at or near chance: their rows are failures.\n", *lines, ""]
