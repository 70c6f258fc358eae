"""Benchmark (not a test): a family of query models on Fashion-MNIST — one search for three budgets (40x, 80x and
160x cheaper than the gallery), each member retrained with BCT, exported and measured on ONNX Runtime, beside
hand-designed families trained on the same schedule, compat objective and seeds (MobileNetV2 x0.25/x0.35/x0.5,
ShuffleNetV2 x0.5/x1.0, stock stems) and the independent MobileNetV2 x0.35 baseline.

It is the full profile's family (configs/full.yaml: ``nas.budgets``, the hand-designed baselines, 3 seeds) without
the R1/R2/R3 searches, the study and the index: ``cmpnas run`` with ``run.rewards=[]``, ``run.study=false``,
``run.build_index=false``. Stages whose inputs equal those of a finished full-profile run (``--reuse``, default
runs/full: the gallery model and the MobileNetV2 x0.35 baselines) are copied from it instead of trained again —
the same stage key means the same config and inputs, so the result is what training them here would give.

Choose on validation, report on test: the search ranks candidates on the validation split; every number in the
table is the test split, and the comparison with the hand-designed families (the best one at <= the member's
MACs, chosen on validation by the report) decides nothing that was trained.

Usage: python benchmarks/family.py [--out runs/family] [--reuse runs/full]
Writes benchmarks/results/family.json and benchmarks/results/family.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["run.rewards=[]", "run.study=false", "run.build_index=false"]


def reuse_finished_stages(cfg: Any, out: Path, source: Path) -> list[str]:
    """Copy into ``out`` every stage ``source`` finished with the same key (same config and inputs)."""
    from cmpnas.io import read_json, write_json_atomic
    from cmpnas.pipeline import STATE_FILE, build_stages, stage_key, stage_paths

    src_state = read_json(source / STATE_FILE, "") if (source / STATE_FILE).exists() else {}
    state_path = out / STATE_FILE
    state = read_json(state_path, "") if state_path.exists() else {}
    copied = []
    for stage in build_stages(cfg):
        key = stage_key(stage, cfg, state)
        rec = src_state.get(stage.name)
        if stage.name in state or not rec or rec.get("key") != key or rec.get("status") != "done":
            continue
        for p in stage_paths(source, stage.name):
            target = out / p.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            if p.is_dir():
                shutil.copytree(p, target, dirs_exist_ok=True)
            elif p.exists():
                shutil.copy2(p, target)
        state[stage.name] = rec
        copied.append(stage.name)
    if copied:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state_path, state)
    return copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "family")
    ap.add_argument("--reuse", type=Path, default=REPO / "runs" / "full", help="a finished full-profile run")
    ap.add_argument("--force", action="append", default=[], help="redo this stage (and what uses it)")
    args = ap.parse_args()

    from cmpnas.config import load_config
    from cmpnas.io import read_json
    from cmpnas.pipeline import run_pipeline
    from cmpnas.report import family_figure, summarize_models

    started = time.time()
    cfg = load_config(REPO / "configs" / "full.yaml", OVERRIDES)
    copied = reuse_finished_stages(cfg, args.out, args.reuse) if args.reuse.exists() else []
    state = run_pipeline(cfg, args.out, force=args.force)
    results = read_json(args.out / "results.json", "")
    family = read_json(args.out / "export" / "family" / "family.json", "")
    models = summarize_models(read_json(args.out / "evaluation" / "rows.json", ""))
    png = RESULTS / "family.png"
    family_figure(models, results["gallery"], family, cfg.run.baselines).savefig(png, dpi=120, bbox_inches="tight")
    search = read_json(args.out / "search" / "family" / "search.json", "")
    write_result(
        "family",
        {
            "config": "configs/full.yaml with " + " ".join(OVERRIDES),
            "reused_from": {"run": str(args.reuse), "stages": copied},
            "family": results["family"],
            "query_models": [
                {k: m[k] for k in ("name", "kind", "macs", "cost_reduction", "homogeneous", "heterogeneous", "std", "n_seeds")}
                for m in models
            ],
            "paragon": results["paragon"] or models[0]["paragon"],
            "paired_comparisons": results["paired_comparisons"],
            "search": {
                "n_candidates": search["n_candidates"],
                "evaluator_calls": search["evaluator_calls"],
                "seconds": search["seconds"],
                "budgets": [{k: b[k] for k in ("name", "macs", "latency_ms", "best")} for b in search["budgets"]],
                "latency_table": search["latency_table"],
            },
            "plot": str(png.relative_to(REPO)),
            "stage_seconds": {k: v.get("seconds") for k, v in state.items()},
            "wall_time_s": round(time.time() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
