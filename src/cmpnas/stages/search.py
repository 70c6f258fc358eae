"""Stage ``search``: evolution under the MACs (and optional latency) budget with reward R1/R2/R3."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from cmpnas import progress
from cmpnas.config import Config, SearchConfig, dump_config
from cmpnas.data.base import DataBundle
from cmpnas.errors import CmpnasError
from cmpnas.io import make_dirs, read_json, write_json_atomic, write_text_atomic
from cmpnas.manifest import write_manifest
from cmpnas.models.embedding import fingerprint
from cmpnas.nas.candidates import CandidateEvaluator, build_evaluator
from cmpnas.nas.evolution import EvolutionSearch, pareto_indices
from cmpnas.nas.rewards import fitness_from_config
from cmpnas.nas.supernet import load_supernet
from cmpnas.stages.common import (
    StageResult,
    nas_setup,
    supernet_identity,
)


class SharedCandidateCache:
    """Candidate metrics shared by several searches (R1/R2/R3 differ only in fitness), persisted as JSON."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, dict[str, float]] = {}
        if path is not None and path.exists():
            self.data = read_json(
                path, f"delete '{path}' (a cache: the searches measure their candidates again, same results)"
            )

    def wrap(self, space: Any, evaluator: CandidateEvaluator) -> Any:
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
) -> StageResult:
    """Evolutionary search under the MACs (and optional latency) budget; state saved every generation."""
    started = time.time()
    out = Path(out_dir)
    scfg = search_cfg or cfg.nas.search
    setup = nas_setup(cfg, gallery_path, data)
    data, gallery, space, budget, g_macs = (
        setup.data, setup.gallery, setup.space, setup.budget, setup.gallery_macs
    )
    supernet, meta = load_supernet(Path(supernet_path), supernet_identity(cfg, data, gallery))
    embed_dim = gallery.spec.embed_dim
    latency = None
    if cfg.nas.budget_latency_ms is not None:
        latency = space.latency_table(threads=1, embed_dim=embed_dim)  # ORT, the query model's runtime

    def feasible(arch: dict) -> bool:
        if space.query_macs(arch, embed_dim) > budget:
            return False
        return latency is None or latency.latency_ms(arch) <= cfg.nas.budget_latency_ms

    evaluator = build_evaluator(
        supernet, gallery, data, scfg.recal_images, scfg.recal_batch, scfg.val_images, scfg.seed
    )
    cache = SharedCandidateCache(cache_path)
    evo = EvolutionSearch(space, scfg, feasible, cache.wrap(space, evaluator), fitness_from_config(scfg))
    state_path = out / "search_state.json"
    make_dirs(out)
    if resume and state_path.exists():
        _resume(evo, state_path)
        progress.event("resume", message=f"search: resuming after generation {evo.generation}")
    write_text_atomic(out / "config.yaml", dump_config(cfg))
    bar = progress.Bar(scfg.generations - evo.generation, f"search {scfg.reward}", unit="gen")

    def on_generation(e: EvolutionSearch) -> None:
        cache.save()  # first: a kill between the two writes leaves the cache ahead, never behind, the state
        write_json_atomic(state_path, e.state_dict())
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
            "macs": space.query_macs(arch, embed_dim),
            "latency_ms": latency.latency_ms(arch) if latency else None,
        },
        "history": evo.history,
        "pareto_front": [
            {"arch": p["arch"], "macs": space.query_macs(p["arch"], embed_dim), **p["metrics"]}
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
                "macs": space.query_macs(v["arch"], embed_dim),
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
    return StageResult("search", out, result)


def _resume(evo: EvolutionSearch, state_path: Path) -> None:
    """Continue from the saved generation; a corrupt state file is refused, naming it (never overwritten)."""
    fix = f"delete '{state_path}' to restart this search from generation 0, or restore it"
    try:
        evo.load_state_dict(read_json(state_path, fix))
    except CmpnasError as exc:
        if str(state_path) in exc.problem:
            raise
        raise CmpnasError(f"Search state '{state_path}': {exc.problem}", exc.fix) from None


def _pareto(evo: EvolutionSearch, space: Any, embed_dim: int) -> list[dict[str, Any]]:
    """Non-dominated candidates: lower MACs and higher heterogeneous top-1.

    The cost is the whole query model's (with the embedding head), not the supernet path's MACs that
    ``EvolutionSearch.pareto_front`` would use, so the front is computed here on the same memo.
    """
    entries = [v for v in evo.memo.values() if math.isfinite(v["metrics"]["het_top1"])]
    costs = [space.query_macs(v["arch"], embed_dim) for v in entries]
    return [entries[i] for i in pareto_indices(costs, [v["metrics"]["het_top1"] for v in entries])]
