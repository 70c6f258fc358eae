"""CMP-NAS stages: supernet training with BCT, evolutionary search (R1/R2/R3), retrain, study."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from cmpnas import progress
from cmpnas.config import Config, SearchConfig, dump_config
from cmpnas.data.base import DataBundle
from cmpnas.errors import CmpnasError
from cmpnas.io import write_json_atomic, write_text_atomic
from cmpnas.manifest import write_manifest
from cmpnas.models.cost import count_macs
from cmpnas.models.embedding import EmbeddingModel, fingerprint
from cmpnas.models.spos import SposSpace
from cmpnas.nas.arch_io import query_config_for_arch
from cmpnas.nas.candidates import CandidateEvaluator, build_evaluator
from cmpnas.nas.evolution import EvolutionSearch, pareto_indices
from cmpnas.nas.rewards import fitness_from_config
from cmpnas.nas.supernet import (
    SupernetEmbedding,
    band_limits,
    budget_from,
    check_budget,
    load_supernet,
    path_sampler,
    query_macs,
    save_supernet,
)
from cmpnas.stages import (
    check_gallery,
    compat_losses_for,
    load_data,
    train_query,
)
from cmpnas.training.distributed import barrier, init_distributed
from cmpnas.training.loop import train
from cmpnas.training.tasks import CompatTask

SUPERNET_FILE = "supernet.safetensors"


def make_space(cfg: Config, data: DataBundle) -> SposSpace:
    return SposSpace(cfg.nas.space, in_chans=data.in_chans, input_size=data.image_size)


def _budget(cfg: Config, space: SposSpace, gallery: EmbeddingModel) -> tuple[float, int]:
    g_macs = count_macs(gallery, gallery.input_shape(1))
    budget = budget_from(cfg.nas, g_macs)
    check_budget(space, budget, gallery.spec.embed_dim)
    return budget, g_macs


def _supernet_identity(cfg: Config, data: DataBundle, gallery: EmbeddingModel) -> dict[str, Any]:
    return {
        "space": cfg.nas.space.model_dump(mode="json"),
        "in_chans": data.in_chans,
        "input_size": data.image_size,
        "embed_dim": gallery.spec.embed_dim,
        "num_classes": data.num_classes,
        "gallery_fingerprint": fingerprint(gallery),
        "train_data": data.train_identity(),
    }


def train_supernet(
    cfg: Config,
    gallery_path: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    data: DataBundle | None = None,
) -> dict[str, Any]:
    """One-shot supernet trained with own CE + the BCT loss through the frozen gallery classifier."""
    started = time.time()
    out = Path(out_dir)
    data = data or load_data(cfg)
    gallery = check_gallery(gallery_path, data)
    space = make_space(cfg, data)
    budget, g_macs = _budget(cfg, space, gallery)
    ident = _supernet_identity(cfg, data, gallery)
    torch.manual_seed(cfg.nas.supernet_train.seed)  # the seed fixes the initial weights too
    model = SupernetEmbedding(
        space, gallery.spec.embed_dim, data.num_classes, cfg.query.classifier, cfg.query.cosine_scale
    )
    compat = cfg.compat
    tcfg = cfg.nas.supernet_train
    losses = compat_losses_for(cfg, gallery, gallery_path, data, compat, tcfg.label_smoothing)
    low, high = band_limits(cfg.nas, budget)
    sampler = path_sampler(space, tcfg.seed, low, high, gallery.spec.embed_dim)
    task = CompatTask(model, losses, tcfg.label_smoothing, arch_sampler=sampler)
    result = train(
        task,
        data.train,
        tcfg,
        out,
        mean=data.mean,
        std=data.std,
        stage="supernet",
        resume=resume,
        identity_extra=json.dumps(ident, sort_keys=True) + compat.model_dump_json(),
        on_start=lambda: write_text_atomic(out / "config.yaml", dump_config(cfg)),
    )
    outputs: dict[str, Any] = {}
    if init_distributed().is_main:
        save_supernet(
            model,
            out / SUPERNET_FILE,
            {
                **ident,
                "classifier": cfg.query.classifier,
                "cosine_scale": cfg.query.cosine_scale,
                "budget_macs": budget,
            },
        )
        outputs = {
            "supernet": SUPERNET_FILE,
            "budget_macs": budget,
            "gallery_macs": g_macs,
            "sample_band": [low, high],
            "space_macs_range": [space.min_macs(), space.max_macs()],
            "train": {
                "steps": result.steps,
                "seconds": round(result.seconds, 2),
                "images_per_second": round(result.images_per_second, 1),
            },
        }
        write_manifest(
            out,
            "train-supernet",
            cfg.model_dump(mode="json"),
            {
                "data": data.describe(),
                "gallery": {"path": str(gallery_path), "fingerprint": ident["gallery_fingerprint"]},
            },
            outputs,
            started,
        )
    barrier(init_distributed())
    return outputs


class SharedCandidateCache:
    """Candidate metrics shared by several searches (R1/R2/R3 differ only in fitness), persisted as JSON."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, dict[str, float]] = {}
        if path is not None and path.exists():
            self.data = json.loads(path.read_text())

    def wrap(self, space: SposSpace, evaluator: CandidateEvaluator) -> Any:
        def evaluate(arch: dict) -> dict[str, float]:
            key = space.arch_key(arch)
            if key not in self.data:
                self.data[key] = evaluator(arch)
            return dict(self.data[key])

        return evaluate

    def save(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.data)


def search(
    cfg: Config,
    gallery_path: str | Path,
    supernet_path: str | Path,
    out_dir: str | Path,
    resume: bool = True,
    data: DataBundle | None = None,
    search_cfg: SearchConfig | None = None,
    cache_path: Path | None = None,
) -> dict[str, Any]:
    """Evolutionary search under the MACs (and optional latency) budget; state saved every generation."""
    started = time.time()
    out = Path(out_dir)
    data = data or load_data(cfg)
    scfg = search_cfg or cfg.nas.search
    gallery = check_gallery(gallery_path, data)
    space = make_space(cfg, data)
    budget, g_macs = _budget(cfg, space, gallery)
    supernet, meta = load_supernet(Path(supernet_path), _supernet_identity(cfg, data, gallery))
    embed_dim = gallery.spec.embed_dim
    latency = None
    if cfg.nas.budget_latency_ms is not None:
        latency = space.latency_table(threads=1)

    def feasible(arch: dict) -> bool:
        if query_macs(space, arch, embed_dim) > budget:
            return False
        return latency is None or latency.latency_ms(arch) <= cfg.nas.budget_latency_ms

    evaluator = build_evaluator(
        supernet, gallery, data, scfg.recal_images, scfg.recal_batch, scfg.val_images, scfg.seed
    )
    cache = SharedCandidateCache(cache_path)
    evo = EvolutionSearch(space, scfg, feasible, cache.wrap(space, evaluator), fitness_from_config(scfg))
    state_path = out / "search_state.json"
    out.mkdir(parents=True, exist_ok=True)
    if resume and state_path.exists():
        evo.load_state_dict(json.loads(state_path.read_text()))
        progress.event("resume", message=f"search: resuming after generation {evo.generation}")
    write_text_atomic(out / "config.yaml", dump_config(cfg))
    bar = progress.Bar(scfg.generations - evo.generation, f"search {scfg.reward}", unit="gen")

    def on_generation(e: EvolutionSearch) -> None:
        write_json_atomic(state_path, e.state_dict())
        cache.save()
        bar.update(1)
        h = e.history[-1]
        progress.event(
            "generation",
            message=(
                f"search {scfg.reward}: generation {e.generation}/{scfg.generations} best fitness "
                f"{h.get('best_fitness', float('nan')):.2f}"
            ),
        )

    t0 = time.perf_counter()
    try:
        evo.run(on_generation)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    best = evo.best()
    arch = best["arch"]
    result = {
        "reward": scfg.reward,
        "reward_weight": scfg.reward_weight,
        "metric": scfg.metric,
        "budget_macs": budget,
        "gallery_macs": g_macs,
        "best": {
            "arch": arch,
            "metrics": best["metrics"],
            "fitness": best["fitness"],
            "macs": query_macs(space, arch, embed_dim),
            "latency_ms": latency.latency_ms(arch) if latency else None,
        },
        "history": evo.history,
        "pareto_front": [
            {"arch": p["arch"], "macs": query_macs(space, p["arch"], embed_dim), **p["metrics"]}
            for p in _pareto(evo, space, embed_dim)
        ],
        "counters": evo.counters,
        "n_candidates": len(evo.memo),
        "seconds": round(seconds, 2),
        "evaluator_timings": {k: round(v, 3) for k, v in evaluator.timings.items()},
        "evaluator_calls": evaluator.n_evaluated,
        "candidates": [
            {
                "arch": v["arch"],
                "macs": query_macs(space, v["arch"], embed_dim),
                **v["metrics"],
                "fitness": v["fitness"],
                "generation": v.get("generation"),
            }
            for v in evo.memo.values()
        ],
    }
    write_json_atomic(out / "search.json", result)
    write_manifest(
        out,
        "search",
        cfg.model_dump(mode="json"),
        {"gallery": fingerprint(gallery), "supernet": str(supernet_path)},
        {"search": "search.json", "best": result["best"]},
        started,
    )
    return result


def _pareto(evo: EvolutionSearch, space: SposSpace, embed_dim: int) -> list[dict[str, Any]]:
    """Non-dominated candidates: lower MACs and higher heterogeneous top-1.

    The cost is the whole query model's (with the embedding head), not the supernet path's MACs that
    ``EvolutionSearch.pareto_front`` would use, so the front is computed here on the same memo.
    """
    entries = [v for v in evo.memo.values() if math.isfinite(v["metrics"]["het_top1"])]
    costs = [query_macs(space, v["arch"], embed_dim) for v in entries]
    return [entries[i] for i in pareto_indices(costs, [v["metrics"]["het_top1"] for v in entries])]


def retrain(
    cfg: Config,
    gallery_path: str | Path,
    arch: str | Path | dict,
    out_dir: str | Path,
    resume: bool = False,
    data: DataBundle | None = None,
    name: str = "cmpnas",
) -> dict[str, Any]:
    """The found architecture trained from scratch with BCT against the frozen gallery."""
    mcfg = query_config_for_arch(cfg, arch)
    return train_query(
        cfg,
        gallery_path,
        out_dir,
        resume=resume,
        data=data,
        model_cfg=mcfg,
        train_cfg=cfg.nas.retrain,
        name=name,
        stage="retrain",
    )


def sample_study_archs(
    space: SposSpace, budget: float, band: float, n: int, seed: int, embed_dim: int
) -> list[dict]:
    """N distinct archs with query MACs within budget*(1 +- band) (bounded rejection sampling)."""
    rng = random.Random(seed)
    hm = query_macs(space, space.sample(random.Random(0)), embed_dim) - space.macs(
        space.sample(random.Random(0))
    )
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


def study(
    cfg: Config,
    gallery_path: str | Path,
    out_dir: str | Path,
    supernet_path: str | Path | None = None,
    data: DataBundle | None = None,
    n_archs: int | None = None,
) -> dict[str, Any]:
    """The paper's Q1/Q2: random archs at equal cost, trained briefly with and without BCT."""
    from scipy import stats

    from cmpnas.config import CompatConfig
    from cmpnas.evaluation.evaluate import LeaveOneOut
    from cmpnas.models.embedding import load_model
    from cmpnas.stages import compare

    started = time.time()
    out = Path(out_dir)
    data = data or load_data(cfg)
    gallery = check_gallery(gallery_path, data)
    space = make_space(cfg, data)
    budget, _ = _budget(cfg, space, gallery)
    n = cfg.nas.study_archs if n_archs is None else n_archs
    archs = sample_study_archs(
        space, budget, cfg.nas.study_band, n, cfg.nas.search.seed + 17, gallery.spec.embed_dim
    )
    estimator = None
    if supernet_path is not None:
        supernet, _ = load_supernet(Path(supernet_path), _supernet_identity(cfg, data, gallery))
        s = cfg.nas.search
        estimator = build_evaluator(
            supernet, gallery, data, s.recal_images, s.recal_batch, s.val_images, s.seed
        )
    rows: list[dict[str, Any]] = []
    rows_path = out / "study_rows.json"
    if rows_path.exists():
        rows = json.loads(rows_path.read_text())
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
            out_["kendall_hom_het"] = float(stats.kendalltau(hom, het)[0])
            sup = [r["supernet_het_top1"] for r in rs]
            if all(s is not None for s in sup) and mode == "bct":
                out_["kendall_supernet_vs_standalone_het"] = float(stats.kendalltau(sup, het)[0])
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
    return summary
