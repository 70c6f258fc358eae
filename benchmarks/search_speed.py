"""Benchmark (not a test): candidates evaluated per minute in the search.

Compares the cached-gallery design (gallery val embeddings computed once) with re-embedding the
gallery for every candidate, on the same random feasible architectures, and reports the time split
(recalibration / query pass / gallery pass / metric). Needs a run folder with a gallery and a
supernet (from `cmpnas run`, default runs/default).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default="runs/default", help="run folder with gallery/ and supernet/")
    ap.add_argument("--candidates", type=int, default=40)
    ap.add_argument("--uncached-candidates", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from cmpnas.config import load_config
    from cmpnas.models.embedding import load_model
    from cmpnas.nas.candidates import build_evaluator
    from cmpnas.nas.supernet import load_supernet
    from cmpnas.stages import load_data
    from cmpnas.stages.common import make_space, space_budget, supernet_identity

    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    data = load_data(cfg)
    gallery = load_model(run / "gallery" / "model.safetensors")
    space = make_space(cfg, data)
    budget, _ = space_budget(cfg, space, gallery)
    supernet, _ = load_supernet(
        run / "supernet" / "supernet.safetensors", supernet_identity(cfg, data, gallery)
    )
    s = cfg.nas.search
    rng = random.Random(0)
    archs = []
    while len(archs) < args.candidates:
        a = space.sample(rng)
        if space.query_macs(a, gallery.spec.embed_dim) <= budget:
            archs.append(a)

    t = time.perf_counter()
    cached = build_evaluator(supernet, gallery, data, s.recal_images, s.recal_batch, s.val_images, s.seed)
    setup_cached = time.perf_counter() - t
    t = time.perf_counter()
    for a in archs:
        cached(a)
    cached_s = time.perf_counter() - t

    uncached = build_evaluator(
        supernet, gallery, data, s.recal_images, s.recal_batch, s.val_images, s.seed, cache_gallery=False
    )
    t = time.perf_counter()
    for a in archs[: args.uncached_candidates]:
        uncached(a)
    uncached_s = time.perf_counter() - t

    per_min_cached = len(archs) / cached_s * 60
    per_min_uncached = args.uncached_candidates / uncached_s * 60
    write_result(
        "search_speed",
        {
            "run": str(run),
            "val_images": len(cached.val_images),
            "recal_images": s.recal_images,
            "cached": {
                "candidates": len(archs),
                "seconds": round(cached_s, 2),
                "candidates_per_min": round(per_min_cached, 1),
                "setup_seconds_gallery_pass_once": round(setup_cached, 2),
                "time_split_seconds": {k: round(v, 3) for k, v in cached.timings.items()},
            },
            "reembed_gallery_per_candidate": {
                "candidates": args.uncached_candidates,
                "seconds": round(uncached_s, 2),
                "candidates_per_min": round(per_min_uncached, 1),
                "time_split_seconds": {k: round(v, 3) for k, v in uncached.timings.items()},
            },
            "speedup": round(per_min_cached / per_min_uncached, 2),
            "targets": {"candidates_per_min": 60, "speedup": 5},
        },
        args.out,
    )


if __name__ == "__main__":
    main()
