"""results.json: the run's numbers, each with the split it comes from.

The query-model table and the paired comparisons are on the test split (reported, never used to pick anything);
the search rewards, the study and the scores that choose "the best" model of a group are on the validation split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cmpnas.config import Config
from cmpnas.errors import CmpnasError
from cmpnas.io import read_json
from cmpnas.manifest import environment
from cmpnas.models.embedding import safetensors_header
from cmpnas.report.comparisons import paired_comparisons, what_the_search_buys
from cmpnas.report.learning_check import learning_check
from cmpnas.report.summary import headline
from cmpnas.report.supernet import supernet_results

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


def load_output(path: Path) -> Any:
    """A stage's JSON output, None when the stage did not write it."""
    fix = "restore it, or redo the stage that wrote it (cmpnas run ... --force STAGE)"
    return read_json(path, fix) if path.exists() else None


def table_num_classes(rows: list[dict[str, Any]], gallery_model: Path | None) -> int | None:
    """The classes of the split the table was scored on (what chance is one over), as the evaluate stage
    recorded them; for tables written before it recorded them, the gallery model's class count."""
    recorded = {r.get("protocol", {}).get("n_classes") for r in rows} - {None}
    return int(recorded.pop()) if len(recorded) == 1 else gallery_num_classes(gallery_model)


def gallery_num_classes(path: Path | None) -> int | None:
    """The number of classes in the gallery model's file header, None when it cannot be read."""
    try:
        spec = json.loads(safetensors_header(path)["spec"]) if path is not None and path.is_file() else None
    except (OSError, KeyError, ValueError, CmpnasError):
        return None
    return int(spec["num_classes"]) if spec and spec.get("num_classes") else None


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


def build_results(
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
