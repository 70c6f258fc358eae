"""Benchmark (not a test): how well the SPOS latency table predicts whole query models.

    PYTHONPATH=src .venv/bin/python benchmarks/latency_table.py [--runtime onnxruntime|torch] [--builds 3]
        [--archs 8] [--embed-dim 128] [--calibrate 3] [--rounds 10] [--statistic min|p50] [--out FILE]

Per build: ``measure_latency_table`` of the default 28x28 space (build time), then ``check_predictions``
on ``--archs`` random architectures (seed 100, not the table's calibration archs 0..calibrate-1): each
whole query model (backbone + embedding head) is exported and timed in the same runtime, 1 thread, the
way the table's blocks were. Reports the signed error per arch and the mean / max absolute error.
Timing on a shared machine: see the ``load_average`` recorded with every build.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runtime", default="onnxruntime")
    ap.add_argument("--builds", type=int, default=3)
    ap.add_argument("--archs", type=int, default=8)
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--calibrate", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--statistic", default="min")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from cmpnas.config import SpaceConfig
    from cmpnas.models.cost import check_predictions
    from cmpnas.models.spaces.spos import SposSpace
    from cmpnas.models.spaces.spos.latency import measure_latency_table, query_net

    space = SposSpace(SpaceConfig())
    rng = random.Random(100)
    archs = [space.sample(rng) for _ in range(args.archs)]
    builds = []
    for _ in range(args.builds):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        table = measure_latency_table(
            space,
            threads=1,
            runtime=args.runtime,
            embed_dim=args.embed_dim,
            rounds=args.rounds,
            statistic=args.statistic,
            calibrate=args.calibrate,
        )
        build_s = time.perf_counter() - t0
        models = [(query_net(space, a, args.embed_dim), a) for a in archs]
        rows = check_predictions(table, models, (1, space.in_chans, space.input_size, space.input_size))
        errors = [r["error_pct"] for r in rows]
        builds.append(
            {
                "load_average": load,
                "build_seconds": round(build_s, 2),
                "overhead_ms": table.meta["overhead_ms"],
                "probe_ms": table.meta["probe_ms"],
                "calibration_error_pct": [c["error_pct"] for c in table.meta["calibration"]],
                "rows": rows,
                "mean_abs_error_pct": statistics.fmean(abs(e) for e in errors),
                "max_abs_error_pct": max(abs(e) for e in errors),
                "mean_signed_error_pct": statistics.fmean(errors),
            }
        )
        print(
            f"build {len(builds)}: {build_s:.1f} s, |error| mean {builds[-1]['mean_abs_error_pct']:.2f} % "
            f"max {builds[-1]['max_abs_error_pct']:.2f} %",
            flush=True,
        )
    write_result(
        f"latency_table_{args.runtime}",
        {"settings": vars(args), "archs": archs, "builds": builds},
        args.out,
    )


if __name__ == "__main__":
    main()
