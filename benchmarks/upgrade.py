"""Benchmark (not a test): a gallery-model upgrade on Fashion-MNIST, with a fair control, negative flips and the
backfill orders chosen on validation.

  v1          the default profile's gallery model (resnet_small, 1.25 epochs, plain CE, seed 0); ``--v1`` reuses one
  v2@s        the same backbone, ``--v2-epochs`` epochs, trained with the default profile's compat objective
              against v1 (``cmpnas upgrade-gallery``), seed s
  control@s   v2's recipe without the compatibility term (``--independent``), the SAME seed s: the pair differs only
              in the compat term, and s differs from v1's seed, so neither inherits v1's initialisation
  same-init   v2's recipe without the compat term from v1's seed (v1's initial weights and batch order): what an
              operator gets from "retrain the same model longer", reported as its own row
  small       a query model trained with BCT against v1 (MobileNetV2 x0.35, the default profile's query_train)
  FCT         a transformation v1 -> control@first seed, fitted on ``--fct-images`` training images

Per seed, ``evaluate_upgrade`` on the validation split (to choose the backfill order and query policy: the best
mean area under the curve over seeds) and on the test split (to report). Negative flips count queries right under M(old, old)
and wrong after. The BCT effect is the paired difference M(v2@s, v1) - M(control@s, v1) over seeds with a
t interval. Resumable: finished models are reused, an interrupted training continues from its checkpoint.

Usage: python benchmarks/upgrade.py [--v1 G] [--seeds 1 2] [--work DIR] [--v2-epochs 2.0]
Writes benchmarks/results/upgrade.json and benchmarks/results/upgrade_backfill.png. The same backfill through the
running service (``cmpnas serve --watch-index``, probed after every index swap): benchmarks/upgrade_service.py,
which reuses v1 and v2@s from the same ``--work``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
V1_SEED = 0
FLIP_TARGET = 2.0  # percent of queries, at every backfill fraction
AREA_MARGIN = 1.0  # points of mean top-1 over random order


def _trained(out: Path, train: Any) -> Path:
    """``out/model.safetensors``, trained by ``train(resume)`` unless it is already there."""
    model = out / "model.safetensors"
    if not model.exists():
        train(resume=(out / "checkpoint.pt").exists())
    return model


def _fitted_transformation(out: Path, fit: Any) -> dict[str, Any]:
    """The FCT fit's outputs: ``fit()``, or read back from ``out/manifest.json`` when an earlier run fitted it."""
    manifest = out / "manifest.json"
    if (out / "transformation.safetensors").exists() and manifest.exists():
        return json.loads(manifest.read_text())["outputs"]
    return dict(fit())


def _interval(diffs: list[float]) -> dict[str, Any]:
    from scipy import stats

    out: dict[str, Any] = {
        "per_seed": [round(d, 3) for d in diffs],
        "mean": round(statistics.fmean(diffs), 3),
    }
    if len(diffs) > 1 and len(set(diffs)) > 1:
        ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        out["ci95"] = [round(float(ci.low), 3), round(float(ci.high), 3)]
    return out


def _row(res: dict[str, Any], query: str, gallery: str) -> dict[str, float]:
    return next(r for r in res["table"] if r["query"] == query and r["gallery"] == gallery)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v1", type=Path, default=None, help="trained v1 gallery model (else trained here)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "upgrade-benchmark")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2], help="seeds of v2 and the control (not v1's)"
    )
    ap.add_argument("--v2-epochs", type=float, default=2.0)
    ap.add_argument("--fct-images", type=int, default=15000)
    ap.add_argument(
        "--config", type=Path, default=REPO / "configs" / "default.yaml", help="profile (default: default)"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every model"
    )
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/upgrade.json)")
    args = ap.parse_args()
    if V1_SEED in args.seeds:
        raise SystemExit(f"--seeds must not contain v1's seed {V1_SEED}: that is the same-init row's job")

    from cmpnas.config import load_config
    from cmpnas.stages import (
        evaluate_upgrade,
        train_gallery,
        train_query,
        train_transformation,
        upgrade_gallery,
    )
    from cmpnas.stages.common import load_data

    started = time.time()
    profile = args.config
    cfg = load_config(profile, args.set)
    data = load_data(cfg)
    work = args.work

    # what each step took when it ran, kept across runs of the same --work (a resumed run reuses finished steps)
    seconds_file = work / "seconds.json"
    seconds: dict[str, Any] = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
    reused: list[str] = []

    def timed(name: str, fn: Any, made: Path | None = None) -> Any:
        """``fn()``, its seconds recorded under ``name``; when ``made`` (what it makes) is already there, ``name``
        is listed as reused and keeps the seconds its run recorded (``seconds.json`` or ``made``'s manifest)."""
        if made is not None and made.exists():
            reused.append(name)
            manifest = made.parent / "manifest.json"
            if name not in seconds and manifest.exists():
                seconds[name] = json.loads(manifest.read_text()).get("seconds")
            return fn()
        t0 = time.time()
        out = fn()
        seconds[name] = round(time.time() - t0, 1)
        work.mkdir(parents=True, exist_ok=True)
        seconds_file.write_text(json.dumps(seconds, indent=1))
        return out

    v1 = args.v1 or timed(
        "v1",
        lambda: _trained(
            work / "v1", lambda resume: train_gallery(cfg, work / "v1", resume=resume, data=data)
        ),
        work / "v1" / "model.safetensors",
    )

    def upgraded(name: str, seed: int, independent: bool) -> Path:
        ucfg = load_config(
            profile, [*args.set, f"gallery_train.epochs={args.v2_epochs}", f"gallery_train.seed={seed}"]
        )
        return timed(
            name,
            lambda: _trained(
                work / name,
                lambda resume: upgrade_gallery(
                    ucfg, v1, work / name, resume=resume, data=data, independent=independent
                ),
            ),
            work / name / "model.safetensors",
        )

    models = {s: (upgraded(f"v2@{s}", s, False), upgraded(f"control@{s}", s, True)) for s in args.seeds}
    same_init = upgraded("same-init", V1_SEED, True)
    small = timed(
        "small",
        lambda: _trained(
            work / "small", lambda resume: train_query(cfg, v1, work / "small", resume=resume, data=data)
        ),
        work / "small" / "model.safetensors",
    )
    first = args.seeds[0]
    fct_cfg = load_config(profile, [*args.set, f"data.subset_train={args.fct_images}"])
    fct = timed(
        "fct",
        lambda: _fitted_transformation(
            work / "fct", lambda: train_transformation(fct_cfg, v1, models[first][1], work / "fct")
        ),
        work / "fct" / "transformation.safetensors",
    )

    evaluations: dict[str, dict[str, Any]] = {}
    for s, (v2, control) in models.items():
        for split in ("val", "test"):
            key = f"{split}@{s}"
            cached = work / "evaluate" / key / "results.json"
            if cached.exists():
                evaluations[key] = json.loads(cached.read_text())
                continue
            extra: dict[str, Any] = {"small": small} if s == first else {}
            if s == first and split == "test":
                extra["transformation"] = work / "fct" / "transformation.safetensors"
            res = timed(
                f"evaluate {key}",
                lambda v2=v2, control=control, split=split, key=key, extra=extra: evaluate_upgrade(
                    cfg, v1, v2, work / "evaluate" / key, independent=control, data=data, split=split, **extra
                ),
            )
            evaluations[key] = dict(res)
    same_key = "test@same-init"
    cached = work / "evaluate" / same_key / "results.json"
    if cached.exists():
        same_res = json.loads(cached.read_text())
    else:
        same_res = dict(
            timed(
                "evaluate same-init",
                lambda: evaluate_upgrade(
                    cfg, v1, models[first][0], work / "evaluate" / same_key, independent=same_init, data=data
                ),
            )
        )

    # the backfill order: best mean area under the curve on validation, over seeds
    orders = list(evaluations[f"val@{first}"]["backfill_summary"])
    val_area = {
        o: round(
            statistics.fmean(evaluations[f"val@{s}"]["backfill_summary"][o]["auc_top1"] for s in models), 3
        )
        for o in orders
    }
    chosen = max(orders, key=lambda o: val_area[o])

    test = {s: evaluations[f"test@{s}"] for s in models}
    old_old = statistics.fmean(_row(r, "old", "old")["top1"] for r in test.values())
    per_order = {}
    for o in orders:
        summaries = [r["backfill_summary"][o] for r in test.values()]
        per_order[o] = {
            "auc_top1": round(statistics.fmean(x["auc_top1"] for x in summaries), 3),
            "min_top1": round(min(x["min_top1"] for x in summaries), 3),
            "max_negative_flips": round(max(x["max_negative_flips"] for x in summaries), 3),
            "never_below_old": all(x["never_below_old"] for x in summaries),
        }
    pick = per_order[chosen]
    area_vs_random = _interval(
        [r["backfill_summary"][chosen]["auc_top1"] - r["backfill_summary"]["random"]["auc_top1"] for r in test.values()]
    )
    closest = {  # per target, the curve (any order or policy) that came nearest, on test
        "min_top1_minus_old_old": max(
            ((o, round(per_order[o]["min_top1"] - old_old, 3)) for o in orders), key=lambda x: x[1]
        ),
        "max_negative_flips": min(((o, per_order[o]["max_negative_flips"]) for o in orders), key=lambda x: x[1]),
        "area_minus_random": max(
            ((o, round(per_order[o]["auc_top1"] - per_order["random"]["auc_top1"], 3)) for o in orders if o != "random"),
            key=lambda x: x[1],
        ),
    }
    targets = {
        "never_below_old_old": pick["never_below_old"],
        f"negative_flips_le_{FLIP_TARGET:g}pct": pick["max_negative_flips"] <= FLIP_TARGET,
        f"area_ge_random_plus_{AREA_MARGIN:g}": pick["auc_top1"]
        >= per_order["random"]["auc_top1"] + AREA_MARGIN,
    }
    bct_effect = _interval(
        [_row(r, "new", "old")["top1"] - _row(r, "independent", "old")["top1"] for r in test.values()]
    )
    fair_table = {
        "M(old, old)": round(old_old, 3),
        "M(v2, v1)": _interval([_row(r, "new", "old")["top1"] for r in test.values()]),
        "M(v2, v2)": _interval([_row(r, "new", "new")["top1"] for r in test.values()]),
        "M(control, v1)": _interval([_row(r, "independent", "old")["top1"] for r in test.values()]),
        "M(control, control)": _interval(
            [_row(r, "independent", "independent")["top1"] for r in test.values()]
        ),
        "M(same-init, v1)": round(_row(same_res, "independent", "old")["top1"], 3),
        "M(same-init, same-init)": round(_row(same_res, "independent", "independent")["top1"], 3),
        "negative_flips M(v2, v1)": _interval(
            [_row(r, "new", "old")["negative_flips"] for r in test.values()]
        ),
        "negative_flips M(v2, v2)": _interval(
            [_row(r, "new", "new")["negative_flips"] for r in test.values()]
        ),
        "negative_flips M(same-init, v1)": round(_row(same_res, "independent", "old")["negative_flips"], 3),
    }

    from cmpnas.report import backfill_figure

    out_json = Path(args.out) if args.out else RESULTS / "upgrade.json"
    png = out_json.with_name(out_json.stem + "_backfill.png")
    backfill_figure(test[first]).savefig(png, dpi=120)
    write_result(
        "upgrade",
        {
            "protocol": (
                "v2 and the control share seed s (not v1's); order chosen on val (mean area over seeds), reported "
                "on test; flips against M(old, old) on the same queries"
            ),
            "seeds": args.seeds,
            "models": {
                "v1": {
                    "path": str(v1),
                    "recipe": f"default profile gallery: resnet_small, CE, seed {V1_SEED}",
                },
                "v2": {
                    "recipe": f"same backbone, {args.v2_epochs} epochs, {cfg.compat.mode} against v1, seed s"
                },
                "control": {"recipe": "v2's recipe without the compat term (--independent), seed s"},
                "same-init": {"recipe": f"v2's recipe without the compat term, v1's seed {V1_SEED}"},
                "small": {"path": str(small), "recipe": "MobileNetV2 x0.35, BCT against v1"},
                "fct": {k: fct[k] for k in ("old", "new", "train_cosine_identity", "train_cosine")}
                | {"images": args.fct_images, "into": f"control@{first}"},
            },
            "compat": cfg.compat.model_dump(mode="json"),
            "fair_table_test": fair_table,
            "bct_effect_top1_test": bct_effect,
            "backfill": {
                "val_area_by_order": val_area,
                "chosen_on_val": chosen,
                "test_by_order": per_order,
                "chosen_area_minus_random_test": area_vs_random,
                "closest_on_test": {k: {"curve": o, "value": v} for k, (o, v) in closest.items()},
                "targets": targets,
            },
            "evaluations": evaluations,
            "same_init_evaluation": same_res,
            "plot": png.name,
            "seconds": seconds,
            "reused_from_earlier_runs": reused,
            "wall_time_s_this_run": round(time.time() - started, 1),
        },
        out=str(out_json),
    )


if __name__ == "__main__":
    main()
