"""Benchmark (not a test): is the training schedule what keeps the searched query model from the paragon?

A finished run's searched architecture (``search/<REWARD>/search.json``) is retrained against the run's own
gallery with the run's compat objective, on the table schedule (``query_train``) stretched to each ``--epochs``
(warm-up scaled with it), for each seed exactly as the run seeds its rows (``query_train.seed + s``). Every model
is scored leave-one-out on the test split (the split of the run's table) and on validation. Per schedule: the
mean heterogeneous top-1, its gap to the paragon M(g, g), and the paired difference by seed against the first
schedule. Each row keeps the run's own figure for that seed beside it (``run_het_top1``, ``matches_run``): with
another thread count than the run's (``OMP_NUM_THREADS``) float sums run in another order, and a retrain on the
run's schedule is then a second draw of it, not a copy.

Resumable: each (schedule, seed) model resumes from its checkpoint; the JSON is rewritten after every model.

    PYTHONPATH=src .venv/bin/python benchmarks/gap_schedule.py --run runs/full --reward R1 --epochs 1 3 \\
        --seeds 0 1 2 --work runs/gap-schedule [--out benchmarks/results/gap_schedule.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402


def schedule(cfg: Any, epochs: float, seed: int) -> Any:
    """The table schedule stretched to ``epochs`` (warm-up in proportion), seeded as the run seeds row ``seed``."""
    from cmpnas.pipeline.graph import seeded, table_schedule

    base = table_schedule(cfg)
    warmup = base.warmup_epochs * epochs / base.epochs
    return seeded(base.model_copy(update={"epochs": epochs, "warmup_epochs": warmup}), seed)


def run_rows(run: Path, reward: str) -> dict[int, float]:
    """The run's own test heterogeneous top-1 of the searched ``reward`` model, by seed (from its results.json)."""
    path = run / "results.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["query_models"]
    row = next((r for r in rows if r["name"].startswith(f"CMP-NAS {reward} ")), None)
    return {int(s["seed"]): float(s["heterogeneous"]["top1"]) for s in (row or {}).get("per_seed", [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished `cmpnas run` folder with a search")
    ap.add_argument(
        "--reward", default="R1", help="which search's architecture (search/<REWARD>/search.json)"
    )
    ap.add_argument("--epochs", type=float, nargs="+", required=True, help="query schedules to measure")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for need in (args.run / "config.yaml", args.run / "gallery" / "model.safetensors"):
        if not need.is_file():
            ap.error(f"{need} does not exist: pass --run a finished `cmpnas run` folder")
    if not (args.run / "search" / args.reward / "search.json").is_file():
        ap.error(f"{args.run} has no search for reward {args.reward}: pass --reward R1, R2 or R3 of that run")

    from cmpnas.config import load_config
    from cmpnas.evaluation.compare import compare
    from cmpnas.evaluation.evaluate import LeaveOneOut
    from cmpnas.evaluation.stats import paired_comparison, summarize
    from cmpnas.models.embedding import load_model
    from cmpnas.nas.arch_io import read_arch
    from cmpnas.pipeline.layout import RunLayout
    from cmpnas.stages.common import check_gallery, load_data
    from cmpnas.stages.query import retrain

    cfg = load_config(args.run / "config.yaml")
    layout = RunLayout(args.run)
    arch = read_arch(layout.search_dir(args.reward) / "search.json")
    data = load_data(cfg)
    gallery = check_gallery(layout.gallery_model, data)
    caches: dict[str, dict] = {"test": {}, "val": {}}
    by_run = run_rows(args.run, args.reward)
    started = time.time()
    schedules: list[dict[str, Any]] = []
    paragon: float | None = None
    for epochs in args.epochs:
        rows = []
        for seed in args.seeds:
            folder = args.work / f"epochs{epochs:g}" / f"seed{seed}"
            t0 = time.perf_counter()
            retrain(
                cfg,
                layout.gallery_model,
                arch,
                folder,
                resume=True,
                data=data,
                name=f"cmpnas-{args.reward}",
                train_cfg=schedule(cfg, epochs, seed),
            )
            query = load_model(folder / "model.safetensors")
            test = compare(gallery, query, LeaveOneOut(data.test), gallery_cache=caches["test"])
            val = compare(gallery, query, LeaveOneOut(data.val), gallery_cache=caches["val"])
            paragon = test["paragon"]["top1"]
            row = {
                "seed": seed,
                "het_top1": test["heterogeneous"]["top1"],
                "hom_top1": test["homogeneous"]["top1"],
                "het_map": test["heterogeneous"]["map"],
                "gap_to_paragon": test["gap_to_paragon"]["top1"],
                "val_het_top1": val["heterogeneous"]["top1"],
                "macs": test["query"]["macs"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
            if seed in by_run:
                row["run_het_top1"] = by_run[seed]
                row["matches_run"] = abs(by_run[seed] - row["het_top1"]) < 0.005  # one query in 10k is 0.01
            rows.append(row)
            print(
                f"epochs {epochs:g} seed {seed}: het {row['het_top1']:.2f} gap {row['gap_to_paragon']:.2f}",
                flush=True,
            )
        het = [r["het_top1"] for r in rows]
        entry: dict[str, Any] = {
            "epochs": epochs,
            "rows": rows,
            "het_top1": dataclasses.asdict(summarize(het)),
            "mean_gap_to_paragon": round(statistics.fmean(r["gap_to_paragon"] for r in rows), 4),
        }
        if schedules:
            first = schedules[0]
            entry["vs_first_schedule"] = paired_comparison(
                f"{epochs:g} epochs",
                {r["seed"]: r["het_top1"] for r in rows},
                f"{first['epochs']:g} epochs",
                {r["seed"]: r["het_top1"] for r in first["rows"]},
            ).to_dict()
        schedules.append(entry)
        write_result(
            "gap_schedule",
            {
                "run": str(args.run),
                "reward": args.reward,
                "arch": arch,
                "gallery": {"paragon_top1": paragon, "epochs": cfg.gallery_train.epochs},
                "compat": cfg.compat.model_dump(mode="json"),
                "split": "test",
                "schedules": schedules,
                "seconds": round(time.time() - started, 1),
            },
            args.out,
        )


if __name__ == "__main__":
    main()
