"""Benchmark (not a test): is the supernet's ranking failure noise in its estimates or a bias in them?

The search scores a path by BN recalibration on ``nas.search.recal_images`` training images followed by
leave-one-out retrieval on the validation images. If those estimates moved much with the recalibration draw,
their disagreement with models trained alone could be noise that more calibration images would cure; if they
are stable, the supernet itself orders the architectures differently (a bias no estimator setting removes).

The ranking set of a finished full run (``results.json`` → ``study.ranking.archs``) is re-estimated on a
supernet with ``--recal-seeds`` different calibration draws. Reported: each pair of draws' Kendall τ and the
mean; the estimates' standard deviation across draws (per architecture, averaged) against their spread across
architectures; and the Kendall τ of the mean estimate against the stand-alone target of a ranking-schedule
benchmark (the mean heterogeneous top-1 over its seeds, per architecture), beside the MACs-only τ on the same
target.

    PYTHONPATH=src .venv/bin/python benchmarks/estimator_noise.py --config configs/full.yaml \\
        --gallery runs/full/gallery/model.safetensors --supernet runs/full/supernet/supernet.safetensors \\
        --archs benchmarks/results/full/results.json --target benchmarks/results/ranking_schedule.json \\
        --recal-seeds 0 1 2 [--out benchmarks/results/estimator_noise.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ranking_schedule, write_result  # noqa: E402


def stand_alone_target(path: Path, epochs: float) -> list[dict[str, Any]] | None:
    """Per architecture of a ranking-schedule benchmark: its MACs and the mean stand-alone heterogeneous top-1."""
    sched = ranking_schedule(path, epochs)
    if sched is None:
        return None
    return [
        {"macs": a["macs"], "standalone_het_top1": statistics.fmean(s["het_top1"] for s in a["standalone"])}
        for a in sched["archs"]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--gallery", type=Path, required=True)
    ap.add_argument("--supernet", type=Path, required=True)
    ap.add_argument("--archs", type=Path, required=True, help="a full run's results.json (its ranking set)")
    ap.add_argument("--target", type=Path, required=True, help="a ranking_schedule.json")
    ap.add_argument("--target-epochs", type=float, default=1.0)
    ap.add_argument("--recal-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for need in (args.config, args.gallery, args.supernet, args.archs, args.target):
        if not need.is_file():
            ap.error(f"{need} does not exist: pass the files of one finished full run (see the usage above)")

    from cmpnas.config import load_config
    from cmpnas.evaluation.stats import rank_correlations
    from cmpnas.nas.candidates import build_evaluator
    from cmpnas.nas.supernet import load_supernet
    from cmpnas.stages.common import check_gallery, load_data, supernet_identity

    cfg = load_config(args.config)
    data = load_data(cfg)
    gallery = check_gallery(args.gallery, data)
    supernet, _ = load_supernet(args.supernet, supernet_identity(cfg, data, gallery))
    archs = json.loads(args.archs.read_text())["study"]["ranking"]["archs"]
    target = stand_alone_target(args.target, args.target_epochs)
    if target is None:
        ap.error(
            f"{args.target} has no {args.target_epochs:g}-epoch schedule: pass --target-epochs one it has"
        )
    if [a["macs"] for a in archs] != [t["macs"] for t in target]:
        ap.error("--archs and --target list different architectures: pass files of the same run")
    s = cfg.nas.search
    started = time.time()
    draws: dict[int, list[float]] = {}
    for seed in args.recal_seeds:
        estimate = build_evaluator(supernet, gallery, data, s.recal_images, s.recal_batch, s.val_images, seed)
        draws[seed] = [float(estimate(a["arch"])["het_top1"]) for a in archs]
        print(f"recalibration seed {seed}: {[round(v, 2) for v in draws[seed]]}", flush=True)
    pairs = {
        f"{a}-{b}": rank_correlations(draws[a], draws[b])["kendall"]
        for a, b in itertools.combinations(draws, 2)
    }
    mean_est = [statistics.fmean(draws[k][i] for k in draws) for i in range(len(archs))]
    across_draws = (
        statistics.fmean(statistics.stdev(draws[k][i] for k in draws) for i in range(len(archs)))
        if len(draws) > 1
        else None
    )
    standalone = [t["standalone_het_top1"] for t in target]
    write_result(
        "estimator_noise",
        {
            "config": str(args.config),
            "recal_images": s.recal_images,
            "val_images": s.val_images,
            "target": {"file": str(args.target), "epochs": args.target_epochs},
            "archs": [
                {
                    "macs": a["macs"],
                    "recorded_het_top1": a["supernet"]["het_top1"],
                    **t,
                    "estimates": {str(k): draws[k][i] for k in draws},
                }
                for i, (a, t) in enumerate(zip(archs, target, strict=True))
            ],
            "test_retest_kendall": pairs,
            "test_retest_kendall_mean": statistics.fmean(v for v in pairs.values() if v is not None)
            if pairs
            else None,
            "std_across_draws_mean": across_draws,
            "std_across_archs": statistics.stdev(mean_est),
            "kendall_mean_estimate_vs_standalone": rank_correlations(mean_est, standalone)["kendall"],
            "kendall_macs_vs_standalone": rank_correlations([a["macs"] for a in archs], standalone)[
                "kendall"
            ],
            "seconds": round(time.time() - started, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
