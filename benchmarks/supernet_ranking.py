"""Benchmark (not a test): which supernet recipe ranks architectures, chosen on the VALIDATION split.

A profile's data, gallery and space (``--profile``, the default one unless given). One ranking set is the
target for every recipe: architectures stratified by MACs over the search band (the study stage's ranking
set, drawn from the first recipe's space), each trained stand-alone with BCT on the table schedule (``query_train``) for two seeds and scored
leave-one-out on validation. Each recipe trains a supernet and estimates the same architectures as the search
does (BN recalibration, validation images); per recipe the JSON gives Kendall τ with its bootstrap interval,
the MACs-only τ, the target's split-half reliability and the τ ceiling it implies, and the verdict
(heterogeneous and homogeneous), beside the supernet's health and training time. Compare recipes at similar
training time (``train.seconds``).

Resumable: the gallery, every supernet and every stand-alone model resume from their checkpoints; a finished
supernet (its ``manifest.json``), its estimates (``NAME/estimates-EST.json``) and finished stand-alone rows
(``targets/study_rows.json``) are read back; ``--estimate-only`` scores the ranking set without its targets
(to run beside them). The JSON is rewritten after every recipe. ``--rescore FILE`` recomputes a written
result's statistics from its own per-architecture rows with the current code (no training).

    PYTHONPATH=src .venv/bin/python benchmarks/supernet_ranking.py --work runs/supernet-ranking \\
        [--profile full] [--variants fair,sandwich-kd] [--out benchmarks/results/supernet_ranking.json]

A recipe's supernet can be trained beside the benchmark (``cmpnas train-supernet`` with the recipe's overrides
into ``WORK/NAME``): a finished one is read back, not trained again. ``NAME-seed1``/``-seed2`` train the same
recipe from other supernet seeds; ``recipes`` in the JSON sums each recipe up over its seeds. ``--also-target``
scores every recipe against a second measurement of the same ranking set's targets too (the 1-epoch schedule of
a ``ranking_schedule.json`` of the same profile); ``--target`` takes such a file's models as the only target
instead of training the ranking set here (the profile's own space's ranking set). Per recipe and target, ``pick_vs_random`` says what picking
each band's best-estimated architecture gains over the band's mean (a random pick), beside picking its
costliest one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ranking_schedule, write_result  # noqa: E402
from supernet_ablation import config  # noqa: E402

# the ranking set and the estimator's images, the same for every recipe
RANKING = {
    "nas.study_archs": 0,
    "nas.ranking_archs": 16,
    "nas.ranking_seeds": [0, 1],
    "nas.study_train.epochs": 1.0,
    "nas.study_train.warmup_epochs": 0.1,
    "nas.search.val_images": 5000,
}

# a sandwich step trains three paths: 2.5 sandwich epochs took the time of 6 single-path ones (full profile,
# train.seconds 671 vs 648 in supernet_ranking.json), so a recipe "at parity" divides the profile's supernet
# epochs by this
SANDWICH_COST = 2.4
EPOCHS_PARITY = "supernet epochs divided by"

# name -> (what it is, --set style overrides on top of the profile)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fair": (
        "the profile's recipe (its supernet epochs), widest-first warm-up, fair width sampling, one path per step",
        {},
    ),
    "sandwich-kd": (
        "sandwich rule (the space's widest path, the band's narrowest and a random in-band path every step) "
        "with in-place distillation from the widest path; 2.5 epochs (a sandwich step trains three paths: about the default's training time, see train.seconds)",
        {
            "nas.supernet.sandwich": True,
            "nas.supernet.inplace_distill": True,
            "nas.supernet_train.epochs": 2.5,
        },
    ),
    "sandwich": (
        "sandwich rule without distillation; 2.5 epochs",
        {"nas.supernet.sandwich": True, "nas.supernet_train.epochs": 2.5},
    ),
    # at any profile: its own supernet schedule, or that schedule's training time spent on sandwich steps
    "sandwich-kd-parity": (
        f"sandwich rule with in-place distillation for the profile's supernet epochs / {SANDWICH_COST:g} "
        "(the profile's training time)",
        {"nas.supernet.sandwich": True, "nas.supernet.inplace_distill": True, EPOCHS_PARITY: SANDWICH_COST},
    ),
    "sandwich-kd-long": (
        f"sandwich-kd-parity for twice the time: the profile's supernet epochs / {SANDWICH_COST / 2:g}",
        {
            "nas.supernet.sandwich": True,
            "nas.supernet.inplace_distill": True,
            EPOCHS_PARITY: SANDWICH_COST / 2,
        },
    ),
    "stage-width": (
        "the profile's recipe in the space with one channel scale per stage (nas.space.name spos-stage); listed "
        "first without --target, its space's architectures are the ranking set, which every per-layer recipe can "
        "score too",
        {"nas.space.name": "spos-stage"},
    ),
}
# the same recipes with other supernet seeds: how far one recipe's ranking moves with the seed
for _seed in (1, 2):
    for _name in ("fair", "sandwich-kd-parity", "sandwich-kd-long", "stage-width"):
        VARIANTS[f"{_name}-seed{_seed}"] = (
            f"{_name} with supernet seed {_seed}",
            {**VARIANTS[_name][1], "nas.supernet_train.seed": _seed},
        )


def resolve(profile: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with an ``EPOCHS_PARITY`` divisor turned into supernet epochs of ``profile``."""
    out = {k: v for k, v in overrides.items() if k != EPOCHS_PARITY}
    if EPOCHS_PARITY in overrides:
        epochs = config(profile, {}).nas.supernet_train.epochs
        out["nas.supernet_train.epochs"] = round(epochs / overrides[EPOCHS_PARITY], 2)
    return out


# name -> fine-tuning steps of each path before it is scored (0: the one-shot estimate the search uses)
ESTIMATORS = {"one-shot": 0, "fine-tune-100": 100}
FINE_TUNE_LR = 0.02  # a tenth of the supernet schedule's peak: the inherited weights are a starting point


def fine_tuned(cfg: Any, gallery: Any, gallery_path: Path, data: Any, base: Any, steps: int) -> Any:
    """``base`` with every path first trained ``steps`` SGD steps alone (BCT, fixed shuffled training batches)."""
    import torch

    from cmpnas.compat.targets import compat_losses_for
    from cmpnas.data.base import stratified_subset
    from cmpnas.data.batching import fetch_batch
    from cmpnas.data.transforms import normalize_batch
    from cmpnas.nas.finetune import FineTunedEvaluator
    from cmpnas.training.finetune import fine_tune
    from cmpnas.training.tasks import CompatTask

    tcfg = cfg.nas.supernet_train
    compat = cfg.nas.supernet.compat or cfg.compat
    losses = compat_losses_for(cfg, gallery, gallery_path, data, compat, tcfg.label_smoothing)
    rows = torch.tensor(
        sorted(int(i) for i in stratified_subset(data.train.labels, steps * tcfg.batch_size, 0))
    )
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    imgs, labels = fetch_batch(data.train, rows.tolist())
    x = normalize_batch(imgs, data.mean, data.std).contiguous(memory_format=torch.channels_last)
    b = tcfg.batch_size
    batches = [(x[i : i + b], labels[i : i + b], rows[i : i + b]) for i in range(0, len(rows), b)]
    schedule = tcfg.model_copy(update={"optim": tcfg.optim.model_copy(update={"lr": FINE_TUNE_LR})})

    def tune(model: Any, arch: dict) -> None:
        task = CompatTask(model, losses, tcfg.label_smoothing, arch_sampler=lambda step: arch)
        fine_tune(task, batches, schedule)

    return FineTunedEvaluator(base, tune)


def targets(cfg: Any, gallery_path: Path, supernet_path: Path, data: Any, work: Path) -> list[dict[str, Any]]:
    """The ranking set trained stand-alone (resumable rows): the study stage's ranking protocol."""
    from cmpnas.stages.study import study

    res = study(cfg, gallery_path, work / "targets", supernet_path=supernet_path, data=data)
    return [r for r in res["rows"] if r.get("set") == "ranking"]


def ranking_archs(cfg: Any, setup: Any) -> list[dict]:
    """The study stage's ranking set for ``cfg`` and its ``nas_setup`` (stratified by MACs over the supernet's
    bands, seeded)."""
    from cmpnas.models.spaces import family_budgets, sample_bands
    from cmpnas.stages.study import sample_ranking_archs

    bands = sample_bands(cfg.nas, setup.budget, family_budgets(cfg.nas, setup.gallery_macs))
    dim = setup.gallery.spec.embed_dim
    return sample_ranking_archs(
        setup.space, bands, cfg.nas.ranking_archs, cfg.nas.search.seed + 29, dim, set()
    )


def estimate(
    cfg: Any, gallery_path: Path, folder: Path, data: Any, archs: list[dict], est: str, rank_space: Any
) -> dict[str, dict[str, Any]]:
    """Estimator ``est``'s scores of ``archs`` (architectures of ``rank_space``) on the recipe's supernet, by arch
    key, kept (and read back) in ``folder/estimates-EST.json`` arch by arch, with the seconds each took.

    A recipe whose space only restricts the ranking set's (one scale per stage) scores its architectures with the
    same weights: the layers must be the same, the paths outside its sampling are what is asked of it."""
    from cmpnas.io import read_json, write_json_atomic
    from cmpnas.nas.candidates import build_evaluator
    from cmpnas.nas.supernet import load_supernet
    from cmpnas.stages.common import nas_setup, supernet_identity
    from cmpnas.stages.supernet import SUPERNET_FILE

    path = folder / f"estimates-{est}.json"
    done: dict[str, dict[str, Any]] = read_json(path, f"delete '{path}'") if path.is_file() else {}
    if all(rank_space.arch_key(a) in done for a in archs):
        return done
    setup = nas_setup(cfg, gallery_path, data)
    supernet, _ = load_supernet(folder / SUPERNET_FILE, supernet_identity(cfg, data, setup.gallery), rank_space)
    s = cfg.nas.search
    evaluate = build_evaluator(
        supernet, setup.gallery, data, s.recal_images, s.recal_batch, s.val_images, s.seed
    )
    if ESTIMATORS[est]:
        evaluate = fine_tuned(cfg, setup.gallery, gallery_path, data, evaluate, ESTIMATORS[est])
    for arch in archs:
        key = rank_space.arch_key(arch)
        if key not in done:
            t0 = time.perf_counter()
            done[key] = {**evaluate(arch), "seconds": round(time.perf_counter() - t0, 2)}
            write_json_atomic(path, done)
    return done


# what each recipe's JSON keeps of a ranking summary, per side
KEEP = ("split_half", "estimate", "macs_only", "given_macs", "verdict")


def score(
    cfg: Any,
    gallery_path: Path,
    data: Any,
    rows: list[dict[str, Any]],
    estimates: dict,
    also: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The study's ranking summary of the stand-alone rows against one estimator's scores (and against the
    rows of ``also``, a second measurement of the same ranking set's targets, when given)."""
    import statistics

    from cmpnas.evaluation.stats import rank_correlations
    from cmpnas.models.spaces import family_budgets, sample_bands
    from cmpnas.stages.common import nas_setup
    from cmpnas.stages.study import ranking_summary

    keys = ("het_top1", "hom_top1", "het_map", "hom_map")
    scored = [{**r, **{f"supernet_{k}": estimates[r["arch_key"]][k] for k in keys}} for r in rows]
    setup = nas_setup(cfg, gallery_path, data)
    bands = sample_bands(cfg.nas, setup.budget, family_budgets(cfg.nas, setup.gallery_macs))
    summary = ranking_summary(scored, bands)
    out_also = None
    if also is not None:
        by_macs = {r["macs"]: r["arch_key"] for r in rows}
        extra = [
            {**r, **{f"supernet_{k}": estimates[by_macs[r["macs"]]][k] for k in keys}} for r in also["rows"]
        ]
        other = ranking_summary(extra, bands)
        out_also = {
            "file": also["file"],
            "epochs": also["epochs"],
            **{side: {k: other[side].get(k) for k in KEEP} for side in ("heterogeneous", "homogeneous")},
            "pick_vs_random": pick_vs_random(other["archs"]),
        }
    macs = [a["macs"] for a in summary["archs"]]
    return {
        "seconds_per_arch": round(statistics.fmean(estimates[r["arch_key"]]["seconds"] for r in rows), 2),
        "n_archs": summary["n"],
        "seeds": summary["seeds"],
        **{
            side: {k: summary[side].get(k) for k in KEEP}
            for side in ("heterogeneous", "homogeneous")
            if side in summary
        },
        # does the supernet see cost at all? (the stand-alone models' order follows it closely)
        "kendall_estimate_vs_macs": {
            side: rank_correlations([a["supernet"][f"{key}_top1"] for a in summary["archs"]], macs)["kendall"]
            for side, key in (("heterogeneous", "het"), ("homogeneous", "hom"))
        },
        "pick_vs_random": pick_vs_random(summary["archs"]),
        "also_target": out_also,
        "archs": [
            {"macs": a["macs"], "supernet": a["supernet"], "standalone": a["standalone"]}
            for a in summary["archs"]
        ],
    }


def pick_vs_random(archs: list[dict[str, Any]]) -> dict[str, Any]:
    """What a search over this ranking set would have bought, per band: the stand-alone top-1 (mean over seeds) of
    the band's architecture with the highest estimate, and of its costliest one, minus the band's mean (what a
    random pick of the band gets on average)."""
    import statistics

    out: dict[str, Any] = {}
    bands = sorted({i for a in archs for i in a["in_band"]})
    for side in ("het", "hom"):
        per_band = []
        for band in bands:
            members = [a for a in archs if band in a["in_band"]]
            if len(members) < 2:
                continue
            target = [statistics.fmean(x[f"{side}_top1"] for x in a["standalone"]) for a in members]
            mean = statistics.fmean(target)
            best_estimate = max(range(len(members)), key=lambda i: members[i]["supernet"][f"{side}_top1"])
            costliest = max(range(len(members)), key=lambda i: members[i]["macs"])
            per_band.append(
                {
                    "band": band,
                    "n": len(members),
                    "estimate_pick": round(target[best_estimate] - mean, 3),
                    "macs_pick": round(target[costliest] - mean, 3),
                }
            )
        out["heterogeneous" if side == "het" else "homogeneous"] = {
            "bands": per_band,
            "estimate_pick_mean": round(statistics.fmean(b["estimate_pick"] for b in per_band), 3)
            if per_band
            else None,
            "macs_pick_mean": round(statistics.fmean(b["macs_pick"] for b in per_band), 3)
            if per_band
            else None,
        }
    return out


def second_target(path: Path, sched: dict[str, Any], ranking_macs: list[int]) -> dict[str, Any]:
    """A ranking-schedule's ``sched`` as study rows, checked to rank the same architectures as this benchmark."""
    if sorted(a["macs"] for a in sched["archs"]) != sorted(ranking_macs):
        print(
            f"{path} ranks other architectures: pass the ranking_schedule.json of this profile",
            file=sys.stderr,
        )
        raise SystemExit(2)
    metrics = ("het_top1", "het_map", "hom_top1", "hom_map")
    rows = [
        {
            "arch_key": str(a["macs"]),
            "arch": None,
            "macs": a["macs"],
            "seed": x["seed"],
            **{k: x[k] for k in metrics},
        }
        for a in sched["archs"]
        for x in a["standalone"]
    ]
    return {"file": str(path), "epochs": sched["epochs"], "rows": rows}


def given_target(path: Path, sched: dict[str, Any], cfg: Any, setup: Any) -> list[dict[str, Any]]:
    """A ranking-schedule's ``sched`` as the target rows of the profile's ranking set (``cfg`` and its
    ``nas_setup``), matched by MACs (nothing trains alone here)."""
    archs = ranking_archs(cfg, setup)
    by_macs = {setup.space.query_macs(a, setup.gallery.spec.embed_dim): a for a in archs}
    if len(by_macs) != len(archs):
        print(f"two ranking architectures cost the same: {path} cannot be matched by MACs", file=sys.stderr)
        raise SystemExit(2)
    rows = second_target(path, sched, list(by_macs))["rows"]
    return [
        {**r, "arch_key": setup.space.arch_key(by_macs[r["macs"]]), "arch": by_macs[r["macs"]]} for r in rows
    ]


def recipes(variants: dict[str, Any]) -> dict[str, Any]:
    """Per recipe (a variant name without its ``-seedN``), against each target: the one-shot τ of each supernet
    seed and their mean beside the MACs-only τ, what its pick of each band gains over a random one, and (for
    every recipe after the first) its τ minus the first recipe's, paired by supernet seed (95 % t interval)."""
    import re
    import statistics

    from cmpnas.evaluation.stats import t_interval

    out: dict[str, Any] = {}
    for name, v in variants.items():
        scored = v["ranking"].get("one-shot")
        if scored is None:
            continue
        recipe = re.sub(r"-seed\d+$", "", name)
        entry = out.setdefault(recipe, {"variants": []})
        entry["variants"].append(name)
        for target, src in (("own", scored), ("also", scored.get("also_target"))):
            if not src:
                continue
            for side in ("heterogeneous", "homogeneous"):
                slot = entry.setdefault(target, {}).setdefault(
                    side, {"kendall": [], "macs_only": None, "estimate_pick": [], "macs_pick": None}
                )
                slot["kendall"].append(src[side]["estimate"]["kendall"])
                slot["macs_only"] = src[side]["macs_only"]["kendall"]
                picks = src["pick_vs_random"][side]
                slot["estimate_pick"].append(picks["estimate_pick_mean"])
                slot["macs_pick"] = picks["macs_pick_mean"]
        for side in ("heterogeneous", "homogeneous"):
            entry.setdefault("kendall_estimate_vs_macs", {}).setdefault(side, []).append(
                scored["kendall_estimate_vs_macs"][side]
            )
    recipes_seen = list(out)
    for entry in out.values():
        for target in ("own", "also"):
            for slot in entry.get(target, {}).values():
                taus = [t for t in slot["kendall"] if t is not None]
                slot["mean"] = round(statistics.fmean(taus), 4) if taus else None
                picks = [p for p in slot["estimate_pick"] if p is not None]
                slot["estimate_pick_mean"] = round(statistics.fmean(picks), 3) if picks else None
    # every later recipe against the first, paired by supernet seed (the seed also fixes the initial weights)
    if len(recipes_seen) > 1:
        base = out[recipes_seen[0]]
        for name in recipes_seen[1:]:
            entry = out[name]
            for target in ("own", "also"):
                for side, slot in entry.get(target, {}).items():
                    ref = base.get(target, {}).get(side)
                    if ref is None or len(ref["kendall"]) != len(slot["kendall"]):
                        continue
                    diffs = [a - b for a, b in zip(slot["kendall"], ref["kendall"], strict=True)]
                    interval = t_interval(diffs)
                    slot[f"minus_{recipes_seen[0]}"] = {
                        "by_seed": [round(d, 4) for d in diffs],
                        "mean": round(statistics.fmean(diffs), 4),
                        "interval_95": [round(x, 4) for x in interval] if interval else None,
                    }
    return out


def rescore(path: Path, out: Path) -> None:
    """Recompute every recipe's and estimator's ranking statistics from the file's per-architecture rows."""
    from cmpnas.io import read_json, write_json_atomic
    from cmpnas.stages.study import ranking_summary

    payload = read_json(path, "pass a JSON written by this benchmark") if path.is_file() else None
    if not isinstance(payload, dict) or not isinstance(payload.get("variants"), dict):
        print(
            f"{path} is not a result of this benchmark: pass a supernet_ranking*.json to --rescore",
            file=sys.stderr,
        )
        raise SystemExit(2)
    metrics = ("het_top1", "het_map", "hom_top1", "hom_map")
    for variant in payload["variants"].values():
        for scored in variant["ranking"].values():
            rows = [
                {
                    "arch_key": str(i),
                    "arch": None,
                    "macs": a["macs"],
                    "seed": s["seed"],
                    **{f"supernet_{k}": a["supernet"][k] for k in metrics},
                    **{k: s[k] for k in metrics},
                }
                for i, a in enumerate(scored["archs"])
                for s in a["standalone"]
            ]
            summary = ranking_summary(rows, [])
            for side in ("heterogeneous", "homogeneous"):
                if side in summary:
                    scored[side] = {k: summary[side].get(k) for k in KEEP}
    payload["rescored"] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "what": "statistics recomputed from the rows above by the current code (no training)",
    }
    write_json_atomic(out, payload)
    print(f"rescored {path} -> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/supernet-ranking")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--variants", default="fair,sandwich-kd")
    ap.add_argument("--out", default=None)
    ap.add_argument("--estimators", default=",".join(ESTIMATORS), help=f"from {', '.join(ESTIMATORS)}")
    ap.add_argument(
        "--estimate-only", action="store_true", help="score the ranking set with every recipe, no targets"
    )
    ap.add_argument("--rescore", default=None, help="a JSON of this benchmark: recompute its statistics only")
    ap.add_argument(
        "--also-target",
        type=Path,
        default=None,
        help="a ranking_schedule.json of the same profile: score every recipe against its 1-epoch targets too",
    )
    ap.add_argument(
        "--target",
        type=Path,
        default=None,
        help="a ranking_schedule.json of the same profile: its 1-epoch stand-alone models are the target instead "
        "of training the ranking set here (the ranking set is then the profile's own space's)",
    )
    args = ap.parse_args()
    if args.rescore:
        rescore(Path(args.rescore), Path(args.out or args.rescore))
        return
    if args.target is not None and args.also_target is not None:
        ap.error("--target replaces the trained target: pass --target or --also-target, not both")

    def schedule_of(path: Path | None) -> dict[str, Any] | None:
        if path is None:
            return None
        if not path.is_file():
            ap.error(f"{path} does not exist: pass the ranking_schedule.json of the same profile")
        sched = ranking_schedule(path, RANKING["nas.study_train.epochs"])
        if sched is None:
            ap.error(
                f"{path} has no {RANKING['nas.study_train.epochs']:g}-epoch schedule: pass a "
                "ranking_schedule.json that has one"
            )
        return sched

    also_sched, target_sched = schedule_of(args.also_target), schedule_of(args.target)
    estimators = args.estimators.split(",")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    unknown += [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        print(
            f"unknown recipe or estimator {unknown[0]!r}: pass --variants from {', '.join(VARIANTS)} and "
            f"--estimators from {', '.join(ESTIMATORS)}",
            file=sys.stderr,
        )
        raise SystemExit(2)

    from cmpnas.io import read_json
    from cmpnas.stages.common import load_data, nas_setup
    from cmpnas.stages.gallery import train_gallery
    from cmpnas.stages.supernet import SUPERNET_FILE, train_supernet

    work = Path(args.work)
    base = config(args.profile, RANKING)
    data = load_data(base)
    gallery_path = work / "gallery" / "model.safetensors"
    train_gallery(base, work / "gallery", resume=True, data=data)
    payload: dict[str, Any] = {
        "profile": args.profile,
        "split": "val",
        "ranking_set": RANKING,
        "target_schedule": base.nas.study_train.model_dump(mode="json"),
        "variants": {},
    }
    if target_sched is not None:  # the file's models are the target: its schedule, not this benchmark's
        payload["target_schedule"] = {
            "file": str(args.target),
            **{k: v for k, v in target_sched.items() if k in ("epochs", "warmup_epochs", "seeds", "n_archs")},
        }
    # the ranking set's space: the first recipe's, or the profile's when a file holds the targets
    first = config(args.profile, {**RANKING, **resolve(args.profile, VARIANTS[args.variants.split(",")[0]][1])})
    rank_cfg = base if target_sched is not None else first
    rank_setup = nas_setup(rank_cfg, gallery_path, data)
    rank_space = rank_setup.space
    if args.estimate_only:  # the estimators' scores of the ranking set, without the stand-alone targets
        archs = ranking_archs(rank_cfg, rank_setup)
        for name in args.variants.split(","):
            cfg = config(args.profile, {**RANKING, **resolve(args.profile, VARIANTS[name][1])})
            for est in estimators:
                estimate(cfg, gallery_path, work / name, data, archs, est, rank_space)
        return
    rows: list[dict[str, Any]] | None = None
    for name in args.variants.split(","):
        desc, listed = VARIANTS[name]
        overrides = resolve(args.profile, listed)
        cfg = config(args.profile, {**RANKING, **overrides})
        t0 = time.perf_counter()
        done = work / name / "manifest.json"
        if (work / name / SUPERNET_FILE).is_file() and done.is_file():  # a finished recipe is read back
            res = read_json(done, f"delete '{work / name}' to train the recipe again")["outputs"]
            wall = None
        else:
            res = train_supernet(cfg, gallery_path, work / name, resume=True, data=data)
            wall = round(time.perf_counter() - t0, 1)
        if rows is None:
            if target_sched is not None:
                rows = given_target(args.target, target_sched, rank_cfg, rank_setup)
            else:
                rows = targets(cfg, gallery_path, work / name / SUPERNET_FILE, data, work)
            archs = list({r["arch_key"]: r["arch"] for r in rows}.values())
            also = (
                second_target(args.also_target, also_sched, [r["macs"] for r in rows])
                if also_sched is not None
                else None
            )
        payload["variants"][name] = {
            "change": desc,
            "overrides": overrides,
            "train": res["train"],
            "wall_seconds": wall,
            "health": res["health"],
            "ranking": {
                est: score(
                    cfg,
                    gallery_path,
                    data,
                    rows,
                    estimate(cfg, gallery_path, work / name, data, archs, est, rank_space),
                    also,
                )
                for est in estimators
            },
        }
        for est, r in payload["variants"][name]["ranking"].items():
            for side in ("heterogeneous", "homogeneous"):
                print(
                    f"{name} {est} {side}: {r[side]['estimate']} macs-only {r[side]['macs_only']} "
                    f"verdict {r[side]['verdict']}",
                    flush=True,
                )
        payload["recipes"] = recipes(payload["variants"])
        write_result("supernet_ranking", payload, args.out)


if __name__ == "__main__":
    main()
