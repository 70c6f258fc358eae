"""Benchmark (not a test): the default compatibility objective, chosen on VALIDATION across several settings.

An objective picked on one dataset's closed-set split may not carry (a query model trained with BCT alone can
sit well below its own homogeneous accuracy on other images). So the two candidates are compared on the
validation splits of four settings, each with its own gallery trained once:

  fmnist          Fashion-MNIST, closed set (the default profile's data)
  fmnist-open     Fashion-MNIST, 3 of 10 classes held out of training; val from their training images
  digits          scikit-learn's digits (1,797 8x8 scans at 28 px), closed set, 15 epochs
  digits-open     the same, 3 of 10 classes held out

  A  BCT alone                      bct 1, align 0
  B  BCT + cosine alignment 4       bct 1, align 4

Each setting runs ``benchmarks/compat_ablation.py`` (same gallery, query model and schedule as the default
profile; resumable); a setting already measured by that script with the default data is reused from its JSON.

The rule, fixed before the run (``RULE``): per setting, the mean over seeds of heterogeneous top-1 on val; the
objective with the higher mean of those per-setting means wins, unless the two differ by no more than the mean
per-setting seed spread (sample std, pooled over both objectives): then it is "not distinguishable" and the tie
goes to the objective with M(q,g) >= M(q,q) in more settings, then to the simpler one (A). The test split is
never read.

Usage: python benchmarks/compat_objective.py [--only SETTING ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402

OBJECTIVES = {"A": "BCT alone", "B": "BCT + cosine alignment 4"}
SIMPLER = "A"
DIGITS_SCHEDULE = ["gallery_train.epochs=15", "query_train.epochs=15"]
SETTINGS: dict[str, dict[str, Any]] = {
    "fmnist": {
        "desc": "Fashion-MNIST, closed set",
        "data": [],
        "set": [],
        "seeds": [0, 1],
        "reuse": "compat_ablation.json",
    },
    "fmnist-open": {
        "desc": "Fashion-MNIST, 3 of 10 classes unseen in training",
        "data": ["open_set=true"],
        "set": [],
        "seeds": [0, 1],
    },
    "digits": {
        "desc": "scikit-learn digits, closed set",
        "data": ["name=digits"],
        "set": DIGITS_SCHEDULE,
        "seeds": [0, 1, 2],
    },
    "digits-open": {
        "desc": "scikit-learn digits, 3 of 10 classes unseen in training",
        "data": ["name=digits", "open_set=true"],
        "set": DIGITS_SCHEDULE,
        "seeds": [0, 1, 2],
    },
}
RULE = (
    "per setting: mean over seeds of heterogeneous top-1 on val; winner = higher mean of the per-setting means, "
    "unless the difference <= the mean per-setting seed spread (sample std pooled over both objectives), then "
    "not distinguishable: the tie goes to the objective with M(q,g) >= M(q,q) in more settings, then to A (simpler)"
)
OUT = RESULTS / "compat_objective"


def setting_json(name: str) -> Path:
    reuse = SETTINGS[name].get("reuse")
    if reuse and (RESULTS / reuse).exists():
        return RESULTS / reuse
    return OUT / f"{name}.json"


def run_setting(name: str) -> None:
    spec = SETTINGS[name]
    path = setting_json(name)
    if path.exists() and all(
        len(json.loads(path.read_text())["runs"].get(o, {})) >= len(spec["seeds"]) for o in OBJECTIVES
    ):
        print(f"{name}: measured in {path}", flush=True)
        return
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent / "compat_ablation.py"),
        "--out-dir",
        f"runs/compat-objective/{name}",
        "--out",
        str(path),
        "--settings",
        *OBJECTIVES,
        "--seeds",
        *map(str, spec["seeds"]),
    ]
    for item in spec["data"]:
        cmd += ["--data", item]
    for item in spec["set"]:
        cmd += ["--set", item]
    print(f"{name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def per_setting(name: str) -> dict[str, Any]:
    d = json.loads(setting_json(name).read_text())
    row: dict[str, Any] = {
        "desc": SETTINGS[name]["desc"],
        "source": str(setting_json(name).relative_to(RESULTS)),
    }
    row["data"] = {k: (d.get("data") or {}).get(k) for k in ("name", "num_classes", "open_set", "counts")}
    for o in OBJECTIVES:
        runs = list(d["runs"][o].values())
        het = [r["val"]["heterogeneous"]["top1"] for r in runs]
        hom = [r["val"]["homogeneous"]["top1"] for r in runs]
        row[o] = {
            "seeds": sorted(r["seed"] for r in runs),
            "het_top1": het,
            "hom_top1": hom,
            "het_mean": round(statistics.fmean(het), 2),
            "het_std": round(statistics.stdev(het), 2) if len(het) > 1 else 0.0,
            "hom_mean": round(statistics.fmean(hom), 2),
            "het_map_mean": round(statistics.fmean(r["val"]["heterogeneous"]["map"] for r in runs), 2),
            "het_ge_hom": statistics.fmean(het) >= statistics.fmean(hom),
        }
    row["paragon_top1"] = round(
        statistics.fmean(r["val"]["paragon"]["top1"] for r in d["runs"]["A"].values()), 2
    )
    row["B_minus_A"] = round(row["B"]["het_mean"] - row["A"]["het_mean"], 2)
    return row


def verdict(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    means = {o: round(statistics.fmean(r[o]["het_mean"] for r in rows.values()), 2) for o in OBJECTIVES}
    spread = round(
        statistics.fmean(statistics.fmean([r["A"]["het_std"], r["B"]["het_std"]]) for r in rows.values()), 2
    )
    compatible = {o: sum(r[o]["het_ge_hom"] for r in rows.values()) for o in OBJECTIVES}
    best, other = sorted(OBJECTIVES, key=lambda o: -means[o])
    diff = round(means[best] - means[other], 2)
    out = {
        "rule": RULE,
        "settings": sorted(rows),
        "mean_het_top1": means,
        "seed_spread": spread,
        "settings_with_het_ge_hom": compatible,
        "difference": diff,
    }
    if diff > spread:
        out.update(
            winner=best,
            statement=(
                f"{best} ({OBJECTIVES[best]}) wins: mean heterogeneous top-1 on val over {len(rows)} settings "
                f"{means[best]:.2f} vs {means[other]:.2f} ({diff:+.2f}, seed spread {spread:.2f})"
            ),
        )
    else:
        tie = max(OBJECTIVES, key=lambda o: (compatible[o], o == SIMPLER))
        out.update(
            winner=tie,
            statement=(
                f"not distinguishable ({diff:+.2f} vs seed spread {spread:.2f}); {tie} ({OBJECTIVES[tie]}) by the "
                f"tie-break (M(q,g) >= M(q,q) in {compatible[tie]} of {len(rows)} settings)"
            ),
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(SETTINGS), default=None)
    ap.add_argument("--summarise", action="store_true", help="do not train: summarise what is measured")
    args = ap.parse_args()
    from cmpnas.io import write_json_atomic
    from cmpnas.manifest import environment

    OUT.mkdir(parents=True, exist_ok=True)
    names = args.only or list(SETTINGS)
    if not args.summarise:
        for name in names:
            run_setting(name)
    rows = {n: per_setting(n) for n in SETTINGS if setting_json(n).exists()}
    complete = {
        n: r
        for n, r in rows.items()
        if all(len(r[o]["seeds"]) >= len(SETTINGS[n]["seeds"]) for o in OBJECTIVES)
    }
    payload = {
        "benchmark": "compat_objective",
        "split": "val",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": environment(),
        "objectives": OBJECTIVES,
        "per_setting": rows,
        "verdict": verdict(complete)
        if len(complete) == len(SETTINGS)
        else {"rule": RULE, "statement": "incomplete"},
    }
    write_json_atomic(RESULTS / "compat_objective.json", payload)
    for n, r in rows.items():
        print(
            f"{n:12s} A het {r['A']['het_mean']:.2f}±{r['A']['het_std']:.2f} (hom {r['A']['hom_mean']:.2f})  "
            f"B het {r['B']['het_mean']:.2f}±{r['B']['het_std']:.2f} (hom {r['B']['hom_mean']:.2f})  "
            f"B-A {r['B_minus_A']:+.2f}  paragon {r['paragon_top1']:.2f}"
        )
    print(payload["verdict"]["statement"])


if __name__ == "__main__":
    main()
