"""Stage ``study``: the paper's Q1/Q2, random architectures at equal cost trained with and without BCT.

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


def sample_study_archs(
    space: Any, budget: float, band: float, n: int, seed: int, embed_dim: int
) -> list[dict]:
    """N distinct archs with query MACs within budget*(1 +- band) (bounded rejection sampling)."""
    rng = random.Random(seed)
    hm = space.head_macs(embed_dim)
    lo, hi = budget * (1 - band) - hm, budget * (1 + band) - hm
    archs: dict[str, dict] = {}
    for _ in range(n * 50):
        if len(archs) >= n:
            break
        a = space.sample_in_band(rng, lo, hi, max_tries=200)
        if a is not None:
            archs.setdefault(space.arch_key(a), a)
    if not archs:
        raise CmpnasError(
            f"No architecture of the space lies within {band:.0%} of the budget {budget / 1e6:.2f} MMACs.",
            "widen nas.study_band or change the budget",
        )
    return list(archs.values())


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
    archs = sample_study_archs(
        space, budget, cfg.nas.study_band, n, cfg.nas.search.seed + 17, gallery.spec.embed_dim
    )
    estimator = None
    if supernet_path is not None:
        supernet, _ = load_supernet(Path(supernet_path), supernet_identity(cfg, data, gallery))
        s = cfg.nas.search
        estimator = build_evaluator(
            supernet, gallery, data, s.recal_images, s.recal_batch, s.val_images, s.seed
        )
    rows: list[dict[str, Any]] = []
    rows_path = out / "study_rows.json"
    if rows_path.exists():
        rows = read_json(
            rows_path, f"delete '{rows_path}' to measure the study's architectures again, or restore it"
        )
    done = {(r["arch_key"], r["mode"]) for r in rows}
    cache: dict = {}
    protocol = LeaveOneOut(data.val)
    for i, arch in enumerate(archs):
        key = space.arch_key(arch)
        est = estimator(arch) if estimator is not None else None
        for mode in ("bct", "independent"):
            if (key, mode) in done:
                continue
            sub = out / f"arch{i:03d}_{mode}"
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
                name=f"study{i:03d}-{mode}",
                stage="study",
            )
            res = compare(gallery, load_model(sub / "model.safetensors"), protocol, gallery_cache=cache)
            rows.append(
                {
                    "arch_key": key,
                    "arch": arch,
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
                "study", message=f"study: arch {i + 1}/{len(archs)} {mode} het {rows[-1]['het_top1']:.2f}"
            )

    def corr(mode: str) -> dict[str, Any]:
        rs = [r for r in rows if r["mode"] == mode]
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

    summary = {
        "budget_macs": budget,
        "band": cfg.nas.study_band,
        "n_archs": len(archs),
        "bct": corr("bct"),
        "independent": corr("independent"),
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
