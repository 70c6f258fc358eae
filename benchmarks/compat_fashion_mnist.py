"""Benchmark (not a test): gallery + query (independent and BCT) with the default config.

Writes JSON with both three-way tables (paragon / homogeneous / heterogeneous), wall time per
stage, and training throughput (img/s, achieved GFLOP/s against an fp32 matmul peak measured in
the same run). Usage: python benchmarks/compat_fashion_mnist.py [--config FILE] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import matmul_peak_gflops, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--out-dir", default="runs/bench-compat")
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/compat_fashion_mnist.json)"
    )
    args = ap.parse_args()

    from cmpnas.config import BaselineConfig, load_config
    from cmpnas.pipeline import run_pipeline

    cfg = load_config(args.config)
    q = cfg.query
    baselines = [
        BaselineConfig(name=f"{q.backbone.split(':')[-1]}-independent", model=q, compat="independent"),
        BaselineConfig(name=f"{q.backbone.split(':')[-1]}-bct", model=q, compat="bct"),
    ]
    run = cfg.run.model_copy(
        update={
            "baselines": baselines,
            "rewards": [],
            "study": False,
            "export_onnx": False,
            "build_index": False,
        }
    )
    cfg = cfg.model_copy(update={"run": run})
    peak_before = matmul_peak_gflops()
    state = run_pipeline(cfg, args.out_dir)
    peak_after = matmul_peak_gflops()
    rows = json.loads((Path(args.out_dir) / "evaluation" / "rows.json").read_text())
    train = {}
    for stage, rec in state.items():
        t = (rec.get("outputs") or {}).get("train")
        if t:
            gf = t.get("gflops_per_second")
            train[stage] = {**t, "fraction_of_fp32_matmul_peak": round(gf / peak_before, 3) if gf else None}
    write_result(
        "compat_fashion_mnist",
        {
            "config": args.config,
            "fp32_matmul_peak_gflops": {"before": round(peak_before, 1), "after": round(peak_after, 1)},
            "stage_seconds": {k: v.get("seconds") for k, v in state.items()},
            "training": train,
            "tables": {
                r["query"]["name"] + (f"@s{r['query']['seed']}" if r["query"].get("seed") else ""): {
                    k: r[k]
                    for k in (
                        "paragon",
                        "homogeneous",
                        "heterogeneous",
                        "cost_reduction",
                        "gap_to_paragon",
                        "compatible",
                    )
                }
                | {"macs": r["query"]["macs"]}
                for r in rows
            },
            "gallery": rows[0]["gallery"] if rows else None,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
