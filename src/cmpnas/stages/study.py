"""Stage ``study``: the paper's Q1/Q2, random architectures at equal cost trained with and without BCT,
and a ranking set spread over the search band that measures how well the supernet ranks architectures.

Everything here is measured on the validation split. Rank agreement (Kendall τ and Spearman ρ) is
reported between homogeneous and heterogeneous top-1, and between the supernet's estimates and the
stand-alone models (heterogeneous and homogeneous top-1): how far the search's ranking can be trusted.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmpnas import progress
from cmpnas.config import CompatConfig, Config
from cmpnas.data.base import DataBundle
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.compare import compare
from cmpnas.evaluation.evaluate import LeaveOneOut
from cmpnas.evaluation.ranking import pearson, ranking_report
from cmpnas.evaluation.stats import rank_correlations
from cmpnas.io import read_json, write_json_atomic
from cmpnas.manifest import write_manifest
from cmpnas.models.embedding import fingerprint, load_model
from cmpnas.models.spaces import family_budgets, sample_bands
from cmpnas.nas.arch_io import query_config_for_arch
from cmpnas.nas.candidates import build_evaluator
from cmpnas.nas.supernet import load_supernet
from cmpnas.stages.common import (
    StageResult,
    nas_setup,
    supernet_identity,
)
from cmpnas.stages.query import train_query


def sample_archs(
    space: Any,
    lo_macs: float,
    hi_macs: float,
    n: int,
    seed: int,
    embed_dim: int,
    exclude: set[str] = frozenset(),
) -> list[dict]:
    """Up to N distinct archs with query MACs in [lo_macs, hi_macs] (bounded rejection sampling)."""
    rng = random.Random(seed)
    hm = space.head_macs(embed_dim)
    archs: dict[str, dict] = {}
    for _ in range(n * 50):
        if len(archs) >= n:
            break
        a = space.sample_in_band(rng, lo_macs - hm, hi_macs - hm, max_tries=200)
        if a is not None and space.arch_key(a) not in exclude:
            archs.setdefault(space.arch_key(a), a)
    return list(archs.values())


def sample_study_archs(
    space: Any, budget: float, band: float, n: int, seed: int, embed_dim: int
) -> list[dict]:
    """N distinct archs with query MACs within budget*(1 +- band)."""
    archs = sample_archs(space, budget * (1 - band), budget * (1 + band), n, seed, embed_dim)
    if not archs:
        raise CmpnasError(
            f"No architecture of the space lies within {band:.0%} of the budget {budget / 1e6:.2f} MMACs.",
            "widen nas.study_band or change the budget",
        )
    return archs


def sample_ranking_archs(
    space: Any, bands: list[tuple[float, float]], n: int, seed: int, embed_dim: int, exclude: set[str]
) -> list[dict]:
    """N distinct archs stratified by query MACs over the bands the supernet trains: the span [lowest, highest]
    cut into n/2 equal strata, two archs each. A spread in cost widens the architectures' true differences,
    so a ranking can be told from seed noise; archs are drawn inside the bands only."""
    if not bands:
        raise CmpnasError("The ranking set needs the supernet's sampling band.", "set nas.sample_band")
    lo, hi = min(b[0] for b in bands), max(b[1] for b in bands)
    hm = space.head_macs(embed_dim)
    strata = max(1, n // 2)
    edges = [lo + (hi - lo) * i / strata for i in range(strata + 1)]
    rng = random.Random(seed)
    archs: dict[str, dict] = {}
    for i in range(strata):
        want = n // strata + (1 if i < n % strata else 0)
        found = 0
        for _ in range(want * 50):
            if found >= want:
                break
            a, b = edges[i], edges[i + 1]
            arch = space.sample_in_band_or_fair(rng, a - hm, b - hm, max_tries=200)
            cost = space.query_macs(arch, embed_dim)
            key = space.arch_key(arch)
            inside = a <= cost <= b and any(bl <= cost <= bh for bl, bh in bands)
            if inside and key not in exclude and key not in archs:
                archs[key] = arch
                found += 1
    return list(archs.values())


def ranking_summary(rows: list[dict[str, Any]], bands: list[tuple[float, float]]) -> dict[str, Any]:
    """The ranking set's verdict: per architecture the supernet's estimate and the stand-alone models of every
    seed; Kendall tau with its bootstrap interval, the MACs-only tau, the split-half reliability and the ceiling
    it implies (heterogeneous: top-1 + mAP composite; homogeneous alike), and tau inside each search band."""
    by_arch: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_arch.setdefault(r["arch_key"], []).append(r)
    seeds = sorted({r.get("seed", 0) for r in rows})
    complete = [sorted(g, key=lambda r: r.get("seed", 0)) for g in by_arch.values() if len(g) == len(seeds)]
    archs = [
        {
            "arch": g[0]["arch"],
            "macs": g[0]["macs"],
            "supernet": {k: g[0].get(f"supernet_{k}") for k in ("het_top1", "het_map", "hom_top1", "hom_map")},
            "standalone": [
                {"seed": r.get("seed", 0), **{k: r.get(k) for k in ("het_top1", "het_map", "hom_top1", "hom_map")}}
                for r in g
            ],
            "in_band": [i for i, (lo, hi) in enumerate(bands) if lo <= g[0]["macs"] <= hi],
        }
        for g in complete
    ]
    out: dict[str, Any] = {"n": len(archs), "seeds": seeds, "bands": [list(b) for b in bands], "archs": archs}
    if len(archs) < 3 or any(a["supernet"]["het_top1"] is None for a in archs):
        return out
    macs = [a["macs"] for a in archs]
    for side in ("het", "hom"):
        top1 = np.array([[s[f"{side}_top1"] for s in a["standalone"]] for a in archs], dtype=float)
        map_ = np.array([[s[f"{side}_map"] for s in a["standalone"]] for a in archs], dtype=float)
        estimates = [a["supernet"][f"{side}_top1"] for a in archs]
        report = ranking_report(estimates, macs, top1, map_)
        inside = [i for i, a in enumerate(archs) if a["in_band"]]
        report["kendall_in_search_band"] = (
            rank_correlations([estimates[i] for i in inside], [report["target"][i] for i in inside])["kendall"]
            if len(inside) >= 3
            else None
        )
        out["heterogeneous" if side == "het" else "homogeneous"] = report
        # the supernet against the seed-mean stand-alone top-1 (the figure earlier runs reported)
        ranks = rank_correlations(estimates, top1.mean(axis=1).tolist())
        out[f"kendall_supernet_vs_standalone_{side}"] = ranks["kendall"]
        out[f"spearman_supernet_vs_standalone_{side}"] = ranks["spearman"]
    return out


def supernet_agreement(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Kendall τ / Spearman ρ between the supernet's estimates and the stand-alone models' top-1 (het, hom);
    empty when the study ran without a supernet."""
    out: dict[str, float | None] = {}
    for side in ("het", "hom"):
        sup = [r[f"supernet_{side}_top1"] for r in rows]
        if any(s is None for s in sup):
            return {}
        ranks = rank_correlations(sup, [r[f"{side}_top1"] for r in rows])
        out[f"kendall_supernet_vs_standalone_{side}"] = ranks["kendall"]
        out[f"spearman_supernet_vs_standalone_{side}"] = ranks["spearman"]
    return out


def study(
    cfg: Config,
    gallery_path: str | Path,
    out_dir: str | Path,
    supernet_path: str | Path | None = None,
    data: DataBundle | None = None,
    n_archs: int | None = None,
) -> StageResult:
    """The paper's Q1/Q2: random archs at equal cost, trained briefly with and without BCT."""
    started = time.time()
    out = Path(out_dir)
    setup = nas_setup(cfg, gallery_path, data)
    data, gallery, space, budget = setup.data, setup.gallery, setup.space, setup.budget
    n = cfg.nas.study_archs if n_archs is None else n_archs
    dim = gallery.spec.embed_dim
    archs = (
        sample_study_archs(space, budget, cfg.nas.study_band, n, cfg.nas.search.seed + 17, dim) if n else []
    )
    # (arch, set, modes, folder prefix): the equal-cost study, then the ranking set over the search band
    jobs = [(a, "study", cfg.nas.study_modes, f"arch{i:03d}", 0) for i, a in enumerate(archs)]
    estimator = None
    bands: list[tuple[float, float]] = []
    if supernet_path is not None:
        supernet, _ = load_supernet(Path(supernet_path), supernet_identity(cfg, data, gallery))
        s = cfg.nas.search
        estimator = build_evaluator(
            supernet, gallery, data, s.recal_images, s.recal_batch, s.val_images, s.seed
        )
        bands = sample_bands(cfg.nas, budget, family_budgets(cfg.nas, setup.gallery_macs))
        ranking = sample_ranking_archs(
            space, bands, cfg.nas.ranking_archs, cfg.nas.search.seed + 29, dim, {space.arch_key(a) for a in archs}
        )
        jobs += [
            (a, "ranking", ["bct"], f"rank{i:03d}", seed)
            for seed in cfg.nas.ranking_seeds
            for i, a in enumerate(ranking)
        ]
    rows: list[dict[str, Any]] = []
    rows_path = out / "study_rows.json"
    if rows_path.exists():
        rows = read_json(
            rows_path, f"delete '{rows_path}' to measure the study's architectures again, or restore it"
        )
    done = {(r["arch_key"], r["mode"], r.get("seed", 0)) for r in rows}
    cache: dict = {}
    estimates: dict[str, dict[str, float]] = {}
    protocol = LeaveOneOut(data.val)
    for i, (arch, arch_set, modes, prefix, seed) in enumerate(jobs):
        key = space.arch_key(arch)
        if all((key, mode, seed) in done for mode in modes):
            continue
        if estimator is not None and key not in estimates:
            estimates[key] = estimator(arch)
        est = estimates.get(key)
        for mode in modes:
            if (key, mode, seed) in done:
                continue
            sub = out / f"{prefix}_{mode}{f'_s{seed}' if seed else ''}"
            compat = CompatConfig(**{**cfg.compat.model_dump(), "mode": mode})
            train_query(
                cfg,
                gallery_path,
                sub,
                resume=True,
                data=data,
                model_cfg=query_config_for_arch(cfg, arch),
                compat=compat,
                train_cfg=cfg.nas.study_train.model_copy(update={"seed": cfg.nas.study_train.seed + seed}),
                name=f"{arch_set}-{prefix}-{mode}",
                stage="study",
            )
            res = compare(gallery, load_model(sub / "model.safetensors"), protocol, gallery_cache=cache)
            rows.append(
                {
                    "arch_key": key,
                    "arch": arch,
                    "set": arch_set,
                    "mode": mode,
                    "seed": seed,
                    "macs": res["query"]["macs"],
                    "hom_top1": res["homogeneous"]["top1"],
                    "het_top1": res["heterogeneous"]["top1"],
                    "hom_map": res["homogeneous"]["map"],
                    "het_map": res["heterogeneous"]["map"],
                    "paragon_top1": res["paragon"]["top1"],
                    **{f"supernet_{k}": est[k] if est else None for k in ("het_top1", "hom_top1", "het_map", "hom_map")},
                }
            )
            write_json_atomic(rows_path, rows)
            progress.event(
                "study",
                message=f"study: {arch_set} arch {i + 1}/{len(jobs)} {mode} het {rows[-1]['het_top1']:.2f}",
            )

    def corr(mode: str) -> dict[str, Any]:
        rs = [r for r in rows if r["mode"] == mode and r.get("set", "study") == "study"]
        hom = [r["hom_top1"] for r in rs]
        het = [r["het_top1"] for r in rs]
        out_: dict[str, Any] = {
            "n": len(rs),
            "het_mean": float(torch.tensor(het).mean()) if het else None,
            "het_spread": (max(het) - min(het)) if het else None,
            "fraction_compatible": sum(h > o for h, o in zip(het, hom, strict=True)) / max(1, len(rs)),
        }
        if len(rs) >= 3:
            out_["pearson_hom_het"] = pearson(np.asarray(hom, float), np.asarray(het, float))  # None if constant
            ranks = rank_correlations(hom, het)
            out_["kendall_hom_het"], out_["spearman_hom_het"] = ranks["kendall"], ranks["spearman"]
            if mode == "bct":
                out_.update(supernet_agreement(rs))
        return out_

    ranked = [r for r in rows if r.get("set") == "ranking"]
    summary = {
        "budget_macs": budget,
        "band": cfg.nas.study_band,
        "n_archs": len(archs),
        "bct": corr("bct"),
        "independent": corr("independent"),
        "ranking": {
            "macs_range": [min(r["macs"] for r in ranked), max(r["macs"] for r in ranked)] if ranked else None,
            **ranking_summary(ranked, bands),
        },
        "rows": rows,
    }
    write_json_atomic(out / "study.json", summary)
    write_manifest(
        out,
        "study",
        cfg.model_dump(mode="json"),
        {"gallery": fingerprint(gallery)},
        {"study": "study.json"},
        started,
    )
    return StageResult("study", out, summary)
