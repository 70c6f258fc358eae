"""Benchmark (not a test): which compatibility objective for the query model, selected on VALIDATION.

The default profile's data, gallery and query settings (query = MobileNetV2 x0.35, the profile's
``query_train``); the gallery is trained once (or reused with ``--gallery``), then the query model is
trained with each objective and each seed (``query_train.seed``) and evaluated leave-one-out on the
5,000-image validation split held out of training (``evaluate_models(..., split="val")``). The test split is
never touched.

  A  BCT alone                         bct 1, align 0
  B  BCT + cosine alignment 4          the default profile's compat
  C  B + CSD 1 (k 16, t 0.05, pool 4096)
  D  B + L2 regression (weight --regress-weight, chosen from the initial term values on one batch,
     which this script measures and records under "probe")
  E  BCT + CSD 1, no alignment

Resumable: a run whose ``run.json`` exists is skipped; an interrupted training resumes from its
checkpoint. Runs go seed-major (every setting's seed 0 first). The JSON
(benchmarks/results/compat_ablation.json) is rewritten atomically after every run.

Usage: python benchmarks/compat_ablation.py [--gallery G] [--regress-weight W] [--probe-only]
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402

ALIGN = 4.0
CSD_OPTIONS = {"k": 16, "temperature": 0.05, "pool": 4096}
METRICS = ("top1", "map")
SIDES = ("homogeneous", "heterogeneous", "paragon")


def settings(regress_weight: float) -> dict[str, dict[str, Any]]:
    """Setting name -> (description, compat section)."""
    base = {"mode": "bct", "bct_weight": 1.0, "align": "cosine"}
    return {
        "A": {"desc": "BCT alone", "compat": {**base, "align_weight": 0.0}},
        "B": {"desc": "BCT + cosine alignment 4 (default)", "compat": {**base, "align_weight": ALIGN}},
        "C": {
            "desc": "BCT + alignment 4 + CSD 1",
            "compat": {**base, "align_weight": ALIGN, "terms": {"csd": 1.0}, "options": {"csd": CSD_OPTIONS}},
        },
        "D": {
            "desc": f"BCT + alignment 4 + L2 regression {regress_weight:g}",
            "compat": {**base, "align_weight": ALIGN, "terms": {"regress": regress_weight}},
        },
        "E": {
            "desc": "BCT + CSD 1 (no alignment)",
            "compat": {**base, "align_weight": 0.0, "terms": {"csd": 1.0}, "options": {"csd": CSD_OPTIONS}},
        },
    }


def probe(cfg: Any, gallery_path: Path, data: Any, seed: int = 0, batch: int | None = None) -> dict[str, Any]:
    """Every term's value at initialisation on one training batch (no augmentation, BN in training mode as
    in the first step): the scale each weight multiplies."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cmpnas.compat.targets import compat_losses_for
    from cmpnas.config import CompatConfig
    from cmpnas.data.batching import fetch_batch
    from cmpnas.data.transforms import normalize_batch
    from cmpnas.models.classifiers import classifier_logits
    from cmpnas.models.embedding import EmbeddingModel, load_model
    from cmpnas.stages.common import make_spec

    batch = batch or cfg.query_train.batch_size
    compat = CompatConfig(
        mode="bct",
        bct_weight=1.0,
        align_weight=1.0,
        align="cosine",
        terms={"csd": 1.0, "regress": 1.0},
        options={"csd": CSD_OPTIONS},
    )
    gallery = load_model(gallery_path)
    losses = compat_losses_for(cfg, gallery, gallery_path, data, compat, cfg.query_train.label_smoothing)
    idx = np.random.default_rng([seed, 0]).permutation(len(data.train))[:batch]
    imgs, labels = fetch_batch(data.train, idx.tolist())
    x = normalize_batch(imgs, data.mean, data.std)
    index = torch.as_tensor(idx, dtype=torch.int64)
    torch.manual_seed(seed)
    model = EmbeddingModel(make_spec(cfg.query, data, "probe", "x"), pretrained=False)
    model.train()
    losses.train()
    with torch.no_grad():
        emb = model(x)
        own = F.cross_entropy(
            classifier_logits(model.classifier, emb, labels).float(),
            labels,
            label_smoothing=cfg.query_train.label_smoothing,
        )
        _, logs = losses(emb.float(), labels, index)
        g = losses.terms[1].gallery_embeddings[index]  # the alignment term's cached gallery embeddings
    return {
        "seed": seed,
        "batch": batch,
        "initial_terms": {"own_ce": round(float(own), 4), **{k: round(v, 4) for k, v in logs.items()}},
        "query_embedding_sq_norm_mean": round(float(emb.pow(2).sum(1).mean()), 2),
        "gallery_embedding_sq_norm_mean": round(float(g.pow(2).sum(1).mean()), 2),
        "gallery_embeddings_all_sq_norm_mean": round(
            float(losses.terms[1].gallery_embeddings.pow(2).sum(1).mean()), 2
        ),
    }


def mean_std(xs: list[float]) -> dict[str, Any]:
    return {
        "mean": round(statistics.fmean(xs), 4),
        "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else None,
        "n": len(xs),
    }


def summarise(runs: dict[str, dict[str, dict]], seeds: list[int]) -> dict[str, Any]:
    """Means ± sample std over seeds; paired differences vs B (same seed); the winner rule."""
    per_setting: dict[str, Any] = {}
    for name, by_seed in runs.items():
        if not by_seed:
            continue
        s: dict[str, Any] = {"seeds": sorted(int(k) for k in by_seed)}
        for side in SIDES:
            for m in METRICS:
                s[f"{side}_{m}"] = mean_std([r["val"][side][m] for r in by_seed.values()])
        s["wall_seconds"] = mean_std([r["wall_seconds"] for r in by_seed.values()])
        per_setting[name] = s
    paired: dict[str, Any] = {}
    b = runs.get("B", {})
    for name, by_seed in runs.items():
        if name == "B":
            continue
        common = sorted(set(by_seed) & set(b), key=int)
        if not common:
            continue
        d: dict[str, Any] = {"seeds": [int(k) for k in common]}
        for side in ("homogeneous", "heterogeneous"):
            for m in METRICS:
                diffs = [round(by_seed[k]["val"][side][m] - b[k]["val"][side][m], 4) for k in common]
                d[f"{side}_{m}"] = {"per_seed": diffs, **mean_std(diffs)}
        paired[name] = d

    # Winner: best mean heterogeneous top-1 on val, if its advantage over B exceeds the seed spread.
    complete = {k: v for k, v in per_setting.items() if v["heterogeneous_top1"]["n"] == len(seeds)}
    verdict: dict[str, Any] = {
        "rule": (
            "best mean heterogeneous top-1 on val among settings with every seed; it wins only if its mean paired "
            "advantage over B exceeds the seed spread, i.e. > max(seed std of B, seed std of it, std of the paired "
            "differences) and every per-seed paired difference is > 0; otherwise 'not distinguishable from B'"
        ),
        "settings_compared": sorted(complete),
        "n_seeds": len(seeds),
    }
    if "B" in complete and len(complete) > 1:
        best = max(complete, key=lambda k: complete[k]["heterogeneous_top1"]["mean"])
        verdict["best_mean_heterogeneous_top1"] = best
        if best == "B":
            verdict["winner"] = "B"
            verdict["statement"] = "B (the default) has the best mean heterogeneous top-1 on val"
        else:
            pd = paired[best]["heterogeneous_top1"]
            spread = max(
                x or 0.0
                for x in (
                    complete["B"]["heterogeneous_top1"]["std"],
                    complete[best]["heterogeneous_top1"]["std"],
                    pd["std"],
                )
            )
            adv = pd["mean"]
            verdict.update({"advantage_over_B": adv, "seed_spread": round(spread, 4)})
            if adv > spread and all(x > 0 for x in pd["per_seed"]):
                verdict["winner"] = best
                verdict["statement"] = (
                    f"{best} beats B by {adv:+.2f} heterogeneous top-1 (spread {spread:.2f}, from "
                    f"{len(seeds)} seeds only)"
                )
            else:
                verdict["winner"] = None
                verdict["statement"] = (
                    f"{best} has the best mean ({adv:+.2f} vs B) but is not distinguishable from B "
                    f"(seed spread {spread:.2f}, from {len(seeds)} seeds only)"
                )
    else:
        verdict["winner"] = None
        verdict["statement"] = "incomplete: not every setting has every seed yet"
    if len(seeds) <= 2:
        verdict["caveat"] = (
            f"std and spread are from {len(seeds)} seeds only (query training seed; one gallery): a rough scale "
            "of the noise, not a confidence interval"
        )
    return {"per_setting": per_setting, "paired_vs_B": paired, "verdict": verdict}


def table(summary: dict[str, Any], specs: dict[str, dict]) -> str:
    def f(s: dict) -> str:
        return f"{s['mean']:.2f} ± {s['std']:.2f}" if s["std"] is not None else f"{s['mean']:.2f}"

    lines = [
        "| setting | seeds | hom top-1 | hom mAP | het top-1 | het mAP | het top-1 vs B (per seed) | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["per_setting"].items():
        p = summary["paired_vs_B"].get(name, {}).get("heterogeneous_top1")
        diff = f"{p['mean']:+.2f} ({', '.join(f'{x:+.2f}' for x in p['per_seed'])})" if p else "-"
        lines.append(
            f"| {name}: {specs[name]['desc']} | {','.join(map(str, s['seeds']))} | {f(s['homogeneous_top1'])} | "
            f"{f(s['homogeneous_map'])} | {f(s['heterogeneous_top1'])} | {f(s['heterogeneous_map'])} | {diff} | "
            f"{s['wall_seconds']['mean']:.0f} |"
        )
    para = [s["paragon_top1"]["mean"] for s in summary["per_setting"].values()]
    if para:
        lines.append(f"\nparagon M(g,g) on val: top-1 {para[0]:.2f}")
    lines.append(f"verdict: {summary['verdict']['statement']}")
    if "caveat" in summary["verdict"]:
        lines.append(f"caveat: {summary['verdict']['caveat']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="config YAML (default: the packaged 'default' profile)")
    ap.add_argument("--out-dir", default="runs/compat-ablation")
    ap.add_argument("--gallery", default=None, help="reuse this gallery model instead of training one")
    ap.add_argument("--settings", nargs="+", default=["A", "B", "C", "D", "E"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument(
        "--regress-weight",
        default="auto",
        help="weight of the L2 regression term in D; 'auto' = 4 x initial cosine-alignment value / initial "
        "regression value on one batch (the probe), to one significant figure: at the start the regression "
        "term then weighs as much as the alignment term it is added to",
    )
    ap.add_argument(
        "--probe-only", action="store_true", help="train/reuse the gallery, print the probe, stop"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the base config (compute settings, e.g. gallery_train.threads=1); recorded in the JSON",
    )
    ap.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the data section (e.g. name=digits, open_set=true): another setting; recorded in the JSON",
    )
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/compat_ablation.json)")
    args = ap.parse_args()

    from cmpnas.config import _set_dotted, build_config, load_config_dict, parse_override, profile_path
    from cmpnas.io import write_json_atomic
    from cmpnas.manifest import environment
    from cmpnas.stages import evaluate_models, train_gallery, train_query
    from cmpnas.stages.common import MODEL_FILE, load_data

    started = time.time()
    config_path = Path(args.config) if args.config else profile_path("default")
    raw = load_config_dict(config_path)
    for item in args.set:
        key, value = parse_override(item)
        if key.split(".")[0] in ("compat", "data") or key.startswith("query_train.seed"):
            raise SystemExit(f"--set {key}: the ablation owns compat, data and the query seed")
        _set_dotted(raw, key, value)
    for item in args.data:
        key, value = parse_override(item)
        _set_dotted(raw, f"data.{key}", value)
    cfg = build_config(raw)
    out_dir = Path(args.out_dir)
    out_json = Path(args.out) if args.out else RESULTS / "compat_ablation.json"
    data = load_data(cfg)
    print(f"data: train {len(data.train)} val {len(data.val)} (test split not used); {data.notes}", flush=True)

    # The gallery: once.
    if args.gallery:
        gallery_path, gallery_info = Path(args.gallery), {"reused": str(args.gallery)}
    else:
        gdir = out_dir / "gallery"
        gallery_path = gdir / MODEL_FILE
        if gallery_path.exists() and (gdir / "manifest.json").exists():
            print(f"gallery: reusing {gallery_path}", flush=True)
        else:
            t = time.time()
            train_gallery(cfg, gdir, resume=True, data=data)
            print(f"gallery: trained in {time.time() - t:.0f} s", flush=True)
        man = json.loads((gdir / "manifest.json").read_text())
        gallery_info = {"trained": str(gallery_path), "train": (man.get("outputs") or {}).get("train")}

    probe_path = out_dir / "probe.json"
    if probe_path.exists():
        probe_res = json.loads(probe_path.read_text())
    else:
        probe_res = probe(cfg, gallery_path, data)
        write_json_atomic(probe_path, probe_res)
    print("probe (initial term values, one batch):", json.dumps(probe_res, indent=1), flush=True)
    if args.regress_weight == "auto":
        t0 = probe_res["initial_terms"]
        regress_weight = float(f"{ALIGN * t0['loss_align_cosine'] / t0['loss_regress']:.1g}")
        regress_rule = "auto: 4 x initial align_cosine / initial regress (one batch), 1 significant figure"
    else:
        regress_weight, regress_rule = float(args.regress_weight), "given on the command line"
    probe_res["regress_weight"] = regress_weight
    probe_res["regress_weight_rule"] = regress_rule
    probe_res["weighted_at_start_in_D"] = {
        "own_ce": probe_res["initial_terms"]["own_ce"],
        "bct": probe_res["initial_terms"]["loss_bct"],
        "align_cosine x4": round(ALIGN * probe_res["initial_terms"]["loss_align_cosine"], 4),
        f"regress x{regress_weight:g}": round(regress_weight * probe_res["initial_terms"]["loss_regress"], 4),
    }
    print(f"regression weight for D: {regress_weight:g} ({regress_rule})", flush=True)
    specs = settings(regress_weight)
    if args.probe_only:
        return

    runs: dict[str, dict[str, dict]] = {name: {} for name in args.settings}
    configs: dict[str, Any] = {}

    def write() -> None:
        summary = summarise(runs, args.seeds)
        payload = {
            "benchmark": "compat_ablation",
            "split": "val",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": {"hostname": socket.gethostname(), "platform": platform.platform(), **environment()},
            "profile": str(config_path),
            "overrides": args.set,
            "data_overrides": args.data,
            "data": data.describe(),
            "protocol": "leave-one-out on the validation split (held out of training); test split unused",
            "base_config": {
                k: raw.get(k) for k in ("data", "gallery", "gallery_train", "query", "query_train")
            },
            "gallery": gallery_info,
            "probe": probe_res,
            "regress_weight": regress_weight,
            "settings": configs,
            "runs": runs,
            **summary,
            "total_wall_seconds_this_invocation": round(time.time() - started, 1),
        }
        write_json_atomic(out_json, payload)

    for seed in args.seeds:  # seed-major: every setting's seed 0 first
        for name in args.settings:
            spec = specs[name]
            cfg_run = build_config(
                {**raw, "compat": spec["compat"], "query_train": {**raw.get("query_train", {}), "seed": seed}}
            )
            configs[name] = {"desc": spec["desc"], "compat": cfg_run.compat.model_dump(mode="json")}
            rdir = out_dir / name / f"seed{seed}"
            rfile = rdir / "run.json"
            if rfile.exists():
                runs[name][str(seed)] = json.loads(rfile.read_text())
                print(f"{name} seed {seed}: done before, skipped", flush=True)
                continue
            print(f"{name} seed {seed}: {spec['desc']} ...", flush=True)
            t = time.time()
            q = train_query(cfg_run, gallery_path, rdir / "query", resume=True, data=data)
            t_train = time.time() - t
            res = evaluate_models(cfg_run, gallery_path, q.path(), rdir / "eval", data=data, split="val")
            assert res["protocol"]["split"] == "val"
            rec = {
                "setting": name,
                "seed": seed,
                "val": {side: {m: res[side][m] for m in METRICS} for side in SIDES},
                "wall_seconds": round(time.time() - t, 1),
                "train_seconds": round(t_train, 1),
                "eval_seconds": round(time.time() - t - t_train, 1),
                "resumed_from_step": (q.get("train") or {}).get("resumed_from_step"),
                "train_loss_final": (q.get("train") or {}).get("final_loss"),
                "n_val_queries": res["n_queries"],
                "query_fingerprint": res["query"]["fingerprint"],
            }
            write_json_atomic(rfile, rec)
            runs[name][str(seed)] = rec
            v = rec["val"]
            print(
                f"{name} seed {seed}: hom {v['homogeneous']['top1']:.2f}/{v['homogeneous']['map']:.2f} "
                f"het {v['heterogeneous']['top1']:.2f}/{v['heterogeneous']['map']:.2f} "
                f"paragon {v['paragon']['top1']:.2f} in {rec['wall_seconds']:.0f} s",
                flush=True,
            )
            write()
    write()
    summary = summarise(runs, args.seeds)
    print(table(summary, specs))
    print(f"wrote {out_json}; total {time.time() - started:.0f} s this invocation")


if __name__ == "__main__":
    main()
