"""Did the supernet learn? Random in-band paths scored on validation, and the search's refusal of a weak one.

A supernet whose paths sit at chance still gives every candidate an estimate, so an evolution over it quietly
returns a random pick. The health record makes that visible (kept in the supernet's metadata, the stage
manifest and the report), and :func:`check_health` stops a search from ranking noise.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from cmpnas.errors import CmpnasError

# what a path's learning is judged on: the supernet's own classifier and the heterogeneous retrieval top-1
JUDGED = ("cls_top1", "het_top1")
METRICS = ("cls_top1", "hom_top1", "het_top1", "het_map")


def health_paths(
    sample: Callable[[random.Random], dict], key: Callable[[dict], str], n: int, seed: int
) -> list[dict]:
    """``n`` distinct paths from ``sample`` (the space's in-band sampler), seeded: the same paths every time."""
    rng = random.Random(seed)
    paths: dict[str, dict] = {}
    for _ in range(n * 20):
        if len(paths) >= n:
            break
        arch = sample(rng)
        paths.setdefault(key(arch), arch)
    return list(paths.values())


def supernet_health(
    evaluate: Callable[[dict], dict[str, float]],
    paths: Sequence[dict],
    num_classes: int,
    min_skill: float,
    macs: Callable[[dict], float] | None = None,
) -> dict[str, Any]:
    """Score ``paths`` with the candidate evaluator (BN recalibrated, validation split): per-metric mean, min
    and max, chance, and whether the supernet is fit to search (every judged mean above the skill floor).

    ``num_classes`` is the number of classes in the validation split (retrieval chance is one over it). A metric
    the evaluator cannot measure (the classifier on an open-set split, whose classes it never saw) is ``None``
    and not judged."""
    if not paths:
        raise CmpnasError("The supernet's health needs at least one in-band path.", "check nas.sample_band")
    rows = []
    for arch in paths:
        rows.append({"arch": arch, **({"macs": macs(arch)} if macs else {}), **evaluate(arch)})
    summary: dict[str, Any] = {"n_paths": len(rows), "split": "val", "chance": round(100.0 / num_classes, 2)}
    for m in METRICS:
        values = [r[m] for r in rows if r.get(m) is not None]
        if not values:
            summary[m] = None
            continue
        summary[m] = {
            "mean": round(statistics.fmean(values), 2),
            "min": round(min(values), 2),
            "max": round(max(values), 2),
        }
    return {**judge(summary, min_skill), "paths": rows}


def judge(health: dict[str, Any], min_skill: float) -> dict[str, Any]:
    """``health`` with its verdict for ``min_skill``: the floor every judged mean must reach, which fall short."""
    chance = health["chance"]
    floor = chance + min_skill * (100.0 - chance)
    weak = [m for m in JUDGED if health.get(m) is not None and health[m]["mean"] < floor]
    return {**health, "min_skill": min_skill, "floor": round(floor, 2), "ok": not weak, "weak": weak}


def health_line(health: dict[str, Any]) -> str:
    """One line for the progress output and the report."""
    verdict = "learned" if health["ok"] else f"NEAR CHANCE (floor {health['floor']:.1f} %)"
    cls = health.get("cls_top1")
    classifier = f"classifier top-1 {cls['mean']:.1f} %, " if cls is not None else ""
    return (
        f"supernet health over {health['n_paths']} in-band paths (val, after BN recalibration): {classifier}"
        f"heterogeneous top-1 {health['het_top1']['mean']:.1f} %, homogeneous "
        f"top-1 {health['hom_top1']['mean']:.1f} % (chance {health['chance']:.1f} %): {verdict}"
    )


def check_health(health: dict[str, Any], source: str, min_skill: float) -> None:
    """Refuse to search a supernet whose paths are near chance: its ranking would be a random pick."""
    health = judge(health, min_skill)
    if health["ok"]:
        return
    figures = ", ".join(
        f"{'classifier' if m == 'cls_top1' else 'heterogeneous'} top-1 {health[m]['mean']:.1f} %" for m in health["weak"]
    )
    raise CmpnasError(
        f"Supernet '{source}' is near chance: {figures} over {health['n_paths']} in-band paths (chance "
        f"{health['chance']:.1f} %, needed >= {health['floor']:.1f} %), so a search would rank noise.",
        "train it longer or with the width warm-up (nas.supernet_train.epochs, nas.supernet.width_warmup) and "
        "retrain it (cmpnas run ... --force supernet)",
    )
