"""Benchmark (not a test): what makes the supernet learn, chosen on the VALIDATION split.

The default profile's data, gallery and space. Each variant trains a supernet (one change added at a time) and
is scored two ways, both on validation after BN recalibration, exactly as the search scores candidates:
- health: ``nas.supernet.health_paths`` random paths of the search band (classifier, heterogeneous and
  homogeneous top-1);
- against stand-alone models: ``--standalone`` architectures drawn uniformly from the same band are trained
  alone with BCT on the table schedule (``query_train``, seed 0) and evaluated leave-one-out on validation; the
  supernet's heterogeneous estimate of each, over its stand-alone top-1, is the health ratio.

Resumable: every supernet and stand-alone model resumes from its checkpoint; finished variants are read back
from their folders. The JSON (benchmarks/results/supernet_ablation.json) is rewritten after every variant.

Usage: python benchmarks/supernet_ablation.py --work runs/supernet-ablation [--gallery G] [--variants a,b]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

ALIGN = {"mode": "bct", "bct_weight": 1.0, "align_weight": 4.0, "align": "cosine"}

# name -> (what changes, --set style overrides); each variant adds one change to the one before it
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "1ep": ("the previous default: 1 epoch, rejection sampling, BCT", {}),
    "6ep": ("6 epochs", {"nas.supernet_train.epochs": 6}),
    "6ep+warmup": (
        "+ widest-first warm-up (20 % of steps)",
        {"nas.supernet_train.epochs": 6, "nas.supernet.width_warmup": 0.2},
    ),
    "6ep+warmup+fair": (
        "+ widest-first warm-up (20 % of steps) and fair width sampling",
        {"nas.supernet_train.epochs": 6, "nas.supernet.width_warmup": 0.2, "nas.supernet.sampling": "fair"},
    ),
    "6ep+warmup+fair+align4": (
        "+ cosine distillation 4 to the cached gallery embeddings (no augmentation)",
        {
            "nas.supernet_train.epochs": 6,
            "nas.supernet.width_warmup": 0.2,
            "nas.supernet.sampling": "fair",
            "nas.supernet.compat": ALIGN,
            "nas.supernet_train.augment": False,
        },
    ),
    "6ep+warmup+fair+align4+clip": (
        "+ gradient clipping at 1.0",
        {
            "nas.supernet_train.epochs": 6,
            "nas.supernet.width_warmup": 0.2,
            "nas.supernet.sampling": "fair",
            "nas.supernet.compat": ALIGN,
            "nas.supernet_train.augment": False,
            "nas.supernet_train.grad_clip": 1.0,
        },
    ),
}


def config(profile: str, overrides: dict[str, Any]) -> Any:
    from cmpnas.config import _set_dotted, build_config, load_config_dict, profile_path

    raw = load_config_dict(profile_path(profile))
    for key, value in overrides.items():
        _set_dotted(raw, key, value)
    # the supernet's recalibration and reward images as the search uses them
    _set_dotted(raw, "nas.search.recal_images", 2000)
    return build_config(raw)


def standalone(cfg: Any, gallery_path: Path, data: Any, work: Path, n: int) -> list[dict[str, Any]]:
    """``n`` in-band architectures trained alone (BCT, table schedule, seed 0), scored on validation."""
    from cmpnas.evaluation.compare import compare
    from cmpnas.evaluation.evaluate import LeaveOneOut
    from cmpnas.models.embedding import load_model
    from cmpnas.nas.arch_io import query_config_for_arch
    from cmpnas.stages.common import nas_setup
    from cmpnas.stages.query import train_query
    from cmpnas.stages.study import sample_archs

    setup = nas_setup(cfg, gallery_path, data)
    dim = setup.gallery.spec.embed_dim
    archs = sample_archs(setup.space, cfg.nas.sample_band * setup.budget, setup.budget, n, 1234, dim)
    rows, cache = [], {}
    for i, arch in enumerate(archs):
        sub = work / "standalone" / f"arch{i}"
        t0 = time.perf_counter()
        train_query(
            cfg,
            gallery_path,
            sub,
            resume=True,
            data=data,
            model_cfg=query_config_for_arch(cfg, arch),
            train_cfg=cfg.query_train,
            name=f"standalone-{i}",
            stage="standalone",
        )
        res = compare(
            setup.gallery, load_model(sub / "model.safetensors"), LeaveOneOut(data.val), gallery_cache=cache
        )
        rows.append(
            {
                "arch": arch,
                "macs": res["query"]["macs"],
                "het_top1": res["heterogeneous"]["top1"],
                "hom_top1": res["homogeneous"]["top1"],
                "het_map": res["heterogeneous"]["map"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(f"standalone {i}: het {rows[-1]['het_top1']:.2f} hom {rows[-1]['hom_top1']:.2f}", flush=True)
    return rows


def variant(
    cfg: Any, gallery_path: Path, data: Any, out: Path, reference: list[dict[str, Any]]
) -> dict[str, Any]:
    from cmpnas.nas.candidates import build_evaluator
    from cmpnas.nas.supernet import load_supernet
    from cmpnas.stages.common import nas_setup, supernet_identity
    from cmpnas.stages.supernet import SUPERNET_FILE, train_supernet

    t0 = time.perf_counter()
    res = train_supernet(cfg, gallery_path, out, resume=True, data=data)
    seconds = time.perf_counter() - t0
    setup = nas_setup(cfg, gallery_path, data)
    supernet, _ = load_supernet(out / SUPERNET_FILE, supernet_identity(cfg, data, setup.gallery))
    s = cfg.nas.search
    evaluate = build_evaluator(
        supernet, setup.gallery, data, s.recal_images, s.recal_batch, s.val_images, s.seed
    )
    estimates = [evaluate(r["arch"]) for r in reference]
    ratios = [e["het_top1"] / r["het_top1"] for e, r in zip(estimates, reference, strict=True)]
    health = res["health"]
    return {
        "train": res["train"],
        "wall_seconds": round(seconds, 1),
        "health": health,
        "reference_estimates": estimates,
        "health_ratio_same_archs": round(statistics.fmean(ratios), 4),
        "health_ratio_band": round(
            health["het_top1"]["mean"] / statistics.fmean(r["het_top1"] for r in reference), 4
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/supernet-ablation")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--gallery", default=None, help="a trained gallery of this profile (else trained here)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--standalone", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from cmpnas.stages.common import load_data
    from cmpnas.stages.gallery import train_gallery

    work = Path(args.work)
    base = config(args.profile, {})
    data = load_data(base)
    gallery_path = Path(args.gallery) if args.gallery else work / "gallery" / "model.safetensors"
    if not args.gallery:
        train_gallery(base, work / "gallery", resume=True, data=data)
    reference = standalone(base, gallery_path, data, work, args.standalone)
    payload: dict[str, Any] = {
        "profile": args.profile,
        "split": "val",
        "standalone": {"schedule": base.query_train.model_dump(mode="json"), "rows": reference},
        "variants": {},
    }
    for name in args.variants.split(","):
        desc, overrides = VARIANTS[name]
        cfg = config(args.profile, overrides)
        payload["variants"][name] = {
            "change": desc,
            "overrides": overrides,
            **variant(cfg, gallery_path, data, work / name, reference),
        }
        h = payload["variants"][name]["health"]
        print(
            f"{name}: cls {h['cls_top1']['mean']:.1f} het {h['het_top1']['mean']:.1f} hom {h['hom_top1']['mean']:.1f} "
            f"ratio {payload['variants'][name]['health_ratio_same_archs']:.3f}",
            flush=True,
        )
        write_result("supernet_ablation", payload, args.out)


if __name__ == "__main__":
    main()
