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

import torch
from scipy import stats

from cmpnas import progress
from cmpnas.config import CompatConfig, Config
from cmpnas.data.base import DataBundle
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.compare import compare
from cmpnas.evaluation.evaluate import LeaveOneOut
from cmpnas.evaluation.stats import rank_correlations
from cmpnas.io import read_json, write_json_atomic
from cmpnas.manifest import write_manifest
from cmpnas.models.embedding import fingerprint, load_model
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
    space: Any, budget: float, sample_band: float | None, n: int, seed: int, embed_dim: int, exclude: set[str]
) -> list[dict]:
    """N distinct archs spread over the band the search samples, [sample_band*budget, budget]."""
    return sample_archs(space, (sample_band or 0.0) * budget, budget, n, seed, embed_dim, exclude)


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
    jobs = [(a, "study", cfg.nas.study_modes, f"arch{i:03d}") for i, a in enumerate(archs)]
    estimator = None
    if supernet_path is not None:
        supernet, _ = load_supernet(Path(supernet_path), supernet_identity(cfg, data, gallery))
        s = cfg.nas.search
        estimator = build_evaluator(
            supernet, gallery, data, s.recal_images, s.recal_batch, s.val_images, s.seed
        )
        ranking = sample_ranking_archs(
            space,
            budget,
            cfg.nas.sample_band,
            cfg.nas.ranking_archs,
            cfg.nas.search.seed + 29,
            dim,
            exclude={space.arch_key(a) for a in archs},
        )
        jobs += [(a, "ranking", ["bct"], f"rank{i:03d}") for i, a in enumerate(ranking)]
    rows: list[dict[str, Any]] = []
    rows_path = out / "study_rows.json"
    if rows_path.exists():
        rows = read_json(
            rows_path, f"delete '{rows_path}' to measure the study's architectures again, or restore it"
        )
    done = {(r["arch_key"], r["mode"]) for r in rows}
    cache: dict = {}
    protocol = LeaveOneOut(data.val)
    for i, (arch, arch_set, modes, prefix) in enumerate(jobs):
        key = space.arch_key(arch)
        if all((key, mode) in done for mode in modes):
            continue
        est = estimator(arch) if estimator is not None else None
        for mode in modes:
            if (key, mode) in done:
                continue
            sub = out / f"{prefix}_{mode}"
            compat = CompatConfig(**{**cfg.compat.model_dump(), "mode": mode})
            train_query(
                cfg,
                gallery_path,
                sub,
                resume=True,
                data=data,
                model_cfg=query_config_for_arch(cfg, arch),
                compat=compat,
                train_cfg=cfg.nas.study_train,
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
                    "macs": res["query"]["macs"],
                    "hom_top1": res["homogeneous"]["top1"],
                    "het_top1": res["heterogeneous"]["top1"],
                    "paragon_top1": res["paragon"]["top1"],
                    "supernet_het_top1": est["het_top1"] if est else None,
                    "supernet_hom_top1": est["hom_top1"] if est else None,
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
            out_["pearson_hom_het"] = float(stats.pearsonr(hom, het)[0])
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
            "n": len(ranked),
            "macs_range": [min(r["macs"] for r in ranked), max(r["macs"] for r in ranked)]
            if ranked
            else None,
            **(supernet_agreement(ranked) if len(ranked) >= 3 else {}),
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
