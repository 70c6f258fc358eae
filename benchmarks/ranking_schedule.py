"""Benchmark (not a test): how long must the ranking set train before its target can judge a supernet?

The ranking protocol (the study stage's ranking set: architectures stratified by MACs over the supernet's
bands, each trained stand-alone with BCT for every ranking seed) is only informative when the seeds agree
about the architectures' order: its split-half reliability must reach ``MIN_RELIABILITY`` before Kendall τ
is quoted. A profile's ranking schedule is bounded by the profile's time; this benchmark reruns the same
ranking set, against the same gallery and supernet of a finished run, at longer stand-alone schedules and
reports per schedule the reliability, the τ ceiling it implies, the supernet's τ with its interval, the
MACs-only τ and the verdict (heterogeneous and homogeneous), with the wall time of each schedule.

Resumable: each schedule's study folder keeps its finished rows (``study_rows.json``) and checkpoints.

    PYTHONPATH=src .venv/bin/python benchmarks/ranking_schedule.py --run runs/full --epochs 1 \\
        --work runs/ranking-schedule [--out benchmarks/results/ranking_schedule.json]

The run's own schedule (``nas.study_train`` in its config.yaml) is read from its study folder when present.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

KEYS = ("split_half", "estimate", "macs_only", "given_macs", "verdict", "kendall_in_search_band")


def summarise(ranking: dict[str, Any]) -> dict[str, Any]:
    """The verdict-bearing parts of a study's ranking summary, per side (the per-arch rows stay in the run)."""
    out: dict[str, Any] = {"n_archs": ranking.get("n"), "seeds": ranking.get("seeds")}
    for side in ("heterogeneous", "homogeneous"):
        if side in ranking:
            out[side] = {k: ranking[side].get(k) for k in KEYS}
    out["archs"] = [
        {"macs": a["macs"], "supernet": a["supernet"], "standalone": a["standalone"]}
        for a in ranking.get("archs", [])
    ]
    return out


def run_schedule(run: Path, epochs: float, work: Path) -> dict[str, Any]:
    """The ranking set of ``run`` trained for ``epochs`` (warm-up scaled with it), scored as the run scores it."""
    from cmpnas.config import load_config
    from cmpnas.stages.study import study

    base = load_config(run / "config.yaml")
    warmup = base.nas.study_train.warmup_epochs * epochs / base.nas.study_train.epochs
    cfg = load_config(
        run / "config.yaml",
        [f"nas.study_train.epochs={epochs}", f"nas.study_train.warmup_epochs={warmup}", "nas.study_archs=0"],
    )
    started = time.time()
    res = study(
        cfg,
        run / "gallery" / "model.safetensors",
        work / f"epochs-{epochs:g}",
        supernet_path=run / "supernet" / "supernet.safetensors",
    )
    return {
        "epochs": epochs,
        "warmup_epochs": warmup,
        "seconds": round(time.time() - started, 1),
        **summarise(res["ranking"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished `cmpnas run` folder with a supernet")
    ap.add_argument("--epochs", type=float, nargs="+", required=True, help="stand-alone schedules to measure")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for need in ("config.yaml", "gallery/model.safetensors", "supernet/supernet.safetensors"):
        if not (args.run / need).is_file():
            print(f"{args.run / need} does not exist: pass --run, the folder of a finished `cmpnas run`", file=sys.stderr)
            raise SystemExit(2)

    from cmpnas.config import load_config
    from cmpnas.io import read_json

    schedules: list[dict[str, Any]] = []
    own = args.run / "study" / "study.json"
    if own.exists():
        cfg = load_config(args.run / "config.yaml")
        done = read_json(own, "rerun the study stage of the run")
        schedules.append(
            {"epochs": cfg.nas.study_train.epochs, "source": str(own), **summarise(done["ranking"])}
        )
    for epochs in args.epochs:
        schedules.append(run_schedule(args.run, epochs, args.work))
        write_result("ranking_schedule", {"run": str(args.run), "schedules": schedules}, args.out)


if __name__ == "__main__":
    main()
