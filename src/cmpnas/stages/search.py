"""Stage ``search``: evolution under the MACs (and optional latency) budget with reward R1/R2/R3.

With several budgets (``nas.budgets``, a family of query models) it is still one search: every candidate is
evaluated once and counts for every budget it fits; per budget the best candidate becomes a member of
``family.json``, and the Pareto fronts (heterogeneous accuracy vs MACs and vs predicted latency) cover the whole
search. The latency table is measured once on the deployment runtime and kept beside the search.
"""

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
from cmpnas.models.cost import LatencyTable
from cmpnas.models.embedding import fingerprint
from cmpnas.models.spaces import Budget, family_budgets, sample_bands
from cmpnas.models.spaces.spos.latency import measure_latency_table
from cmpnas.nas.candidates import CandidateEvaluator, build_evaluator
from cmpnas.nas.evolution import EvolutionSearch, pareto_indices
from cmpnas.nas.health import check_health
from cmpnas.nas.rewards import fitness_from_config
from cmpnas.nas.supernet import load_supernet
from cmpnas.serving.family import FAMILY_FILE, FAMILY_FORMAT
from cmpnas.stages.common import (
    StageResult,
    nas_setup,
    supernet_identity,
)
from cmpnas.stages.supernet import measure_health


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
    family: bool = False,
    latency_path: Path | None = None,
) -> StageResult:
    """Evolutionary search under the MACs (and optional latency) budget; state saved every generation.

    ``family``: one search for every budget of ``nas.budgets``, ``family.json`` with the best candidate of each.
    ``latency_path``: where the latency table is kept (default: the search folder), reused when it matches.
    """
    started = time.time()
    scfg = search_cfg or cfg.nas.search
    setup = nas_setup(cfg, gallery_path, data)
    data, gallery, space, budget, g_macs = (
        setup.data, setup.gallery, setup.space, setup.budget, setup.gallery_macs
    )
    supernet, meta = load_supernet(Path(supernet_path), supernet_identity(cfg, data, gallery))
    embed_dim = gallery.spec.embed_dim
    health = meta.get("health")
    if health is None:  # a supernet saved before health was recorded: measure it now
        bands = sample_bands(cfg.nas, budget, family_budgets(cfg.nas, g_macs))
        health = measure_health(cfg, supernet, gallery, data, space, bands)
    check_health(health, str(supernet_path), cfg.nas.supernet.min_skill)
    budgets = family_budgets(cfg.nas, g_macs) if family else [Budget("main", budget, cfg.nas.budget_latency_ms)]
    if not budgets:
        raise CmpnasError("A family search needs nas.budgets.", "add nas.budgets to the config (docs/family.md)")
    for b in budgets:
        if b.macs is not None:
            space.check_budget(b.macs, embed_dim)
    out = Path(out_dir)
    latency = None
    table_path = (latency_path or out / "latency_table.json").resolve()
    if family or any(b.latency_ms is not None for b in budgets):
        latency = latency_table(cfg, space, embed_dim, table_path)
    checks = [_budget_check(b, space, embed_dim, latency) for b in budgets]

    evaluator = build_evaluator(
        supernet, gallery, data, scfg.recal_images, scfg.recal_batch, scfg.val_images, scfg.seed
    )
    cache = SharedCandidateCache(cache_path)
    head = space.head_macs(embed_dim)
    samplers = [_member_sampler(b, space, head) if family else None for b in budgets]
    evo = EvolutionSearch(
        space,
        scfg,
        checks,
        cache.wrap(space, evaluator),
        fitness_from_config(scfg),
        [b.name for b in budgets],
        samplers,
    )
    state_path = out / "search_state.json"
    make_dirs(out)
    budget_record = [b.to_dict() for b in budgets]
    if resume and state_path.exists():
        _resume(evo, state_path, budget_record)
        progress.event("resume", message=f"search: resuming after generation {evo.generation}")
    write_text_atomic(out / "config.yaml", dump_config(cfg))
    bar = progress.Bar(scfg.generations - evo.generation, f"search {scfg.reward}", unit="gen")

    def on_generation(e: EvolutionSearch) -> None:
        cache.save()  # first: a kill between the two writes leaves the cache ahead, never behind, the state
        write_json_atomic(state_path, {**e.state_dict(), "budgets": budget_record})
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
    def summary(entry: dict[str, Any]) -> dict[str, Any]:
        arch = entry["arch"]
        return {
            "arch": arch,
            "metrics": entry["metrics"],
            "fitness": entry["fitness"],
            "macs": space.query_macs(arch, embed_dim),
            "latency_ms": latency.latency_ms(arch) if latency else None,
        }

    def point(arch: dict) -> dict[str, Any]:
        return {"macs": space.query_macs(arch, embed_dim), **({"latency_ms": latency.latency_ms(arch)} if latency else {})}

    result = {
        "reward": scfg.reward,
        "reward_weight": scfg.reward_weight,
        "metric": scfg.metric,
        "budget_macs": budgets[0].macs,
        "gallery_macs": g_macs,
        "best": summary(evo.best(0)),
        "budgets": [{**b.to_dict(), "best": summary(evo.best(i))} for i, b in enumerate(budgets)],
        "history": evo.history,
        "pareto_front": [{"arch": p["arch"], **point(p["arch"]), **p["metrics"]} for p in _pareto(evo, "macs", point)],
        "pareto_front_latency": (
            [{"arch": p["arch"], **point(p["arch"]), **p["metrics"]} for p in _pareto(evo, "latency_ms", point)]
            if latency
            else None
        ),
        "latency_table": latency.meta if latency else None,
        "counters": evo.counters,
        "n_candidates": len(evo.memo),
        "seconds": round(seconds, 2),
        "evaluator_timings": {k: round(v, 3) for k, v in evaluator.timings.items()},
        "evaluator_calls": evaluator.n_evaluated,
        "supernet_health": {k: v for k, v in health.items() if k != "paths"},
        "candidates": [
            {
                "arch": v["arch"],
                **point(v["arch"]),
                **v["metrics"],
                "fitness": v["fitness"],
                "generation": v.get("generation"),
                "budgets": [budgets[i].name for i in evo.fits(k)],
            }
            for k, v in evo.memo.items()
        ],
    }
    write_json_atomic(out / "search.json", result)
    if family:
        write_json_atomic(out / FAMILY_FILE, family_document(result, g_macs, table_path))
    write_manifest(
        out,
        "search",
        cfg.model_dump(mode="json"),
        {"gallery": fingerprint(gallery), "supernet": str(supernet_path)},
        {"search": "search.json", "best": result["best"]},
        started,
    )
    return StageResult("search", out, result)


def _resume(evo: EvolutionSearch, state_path: Path, budgets: list[dict[str, Any]]) -> None:
    """Continue from the saved generation; a corrupt state file is refused, naming it (never overwritten), and
    so is one saved for other budgets (its candidates were admitted under other caps)."""
    fix = f"delete '{state_path}' to restart this search from generation 0, or restore it"
    state = read_json(state_path, fix)
    saved = state.get("budgets", budgets) if isinstance(state, dict) else budgets  # older states: one budget
    if saved != budgets:
        raise CmpnasError(f"Search state '{state_path}' was saved for other budgets ({saved}).", fix)
    try:
        evo.load_state_dict(state)
    except CmpnasError as exc:
        if str(state_path) in exc.problem:
            raise
        raise CmpnasError(f"Search state '{state_path}': {exc.problem}", exc.fix) from None


def _pareto(evo: EvolutionSearch, cost: str, point: Any) -> list[dict[str, Any]]:
    """Non-dominated candidates: lower cost (``macs`` or ``latency_ms``) and higher heterogeneous top-1.

    The cost is the whole query model's (with the embedding head), not the supernet path's MACs that
    ``EvolutionSearch.pareto_front`` would use, so the front is computed here on the same memo.
    """
    entries = [v for v in evo.memo.values() if math.isfinite(v["metrics"]["het_top1"])]
    costs = [point(v["arch"])[cost] for v in entries]
    return [entries[i] for i in pareto_indices(costs, [v["metrics"]["het_top1"] for v in entries])]


def family_document(result: dict[str, Any], gallery_macs: int, latency_table: Path) -> dict[str, Any]:
    """``family.json`` of a search: one member per budget (its best candidate); retraining and export add paths.
    ``latency_table``: the table its predictions come from (export checks them against measured members)."""
    return {
        "format": FAMILY_FORMAT,
        "reward": result["reward"],
        "gallery_macs": gallery_macs,
        "latency_table": str(latency_table),
        "members": [
            {
                "name": b["name"],
                "budget": {"macs": b["macs"], "latency_ms": b["latency_ms"]},
                "arch": b["best"]["arch"],
                "macs": b["best"]["macs"],
                "cost_reduction": round(gallery_macs / b["best"]["macs"], 2),
                "latency_ms_predicted": b["best"]["latency_ms"],
                "supernet_metrics": b["best"]["metrics"],
            }
            for b in result["budgets"]
        ],
    }


def _member_sampler(budget: Budget, space: Any, head: float) -> Any:
    """Random proposals of a family member: a family's tight caps are out of reach of uniform samples (one budget
    keeps SPOS's uniform sampling), and a member with a floor draws inside [floor, cap]."""
    if budget.macs is None:
        return None
    cap = budget.macs - head
    if budget.floor_macs is not None:
        return lambda rng: space.sample_in_band_or_fair(rng, budget.floor_macs - head, cap, max_tries=200)
    return lambda rng: space.sample_below(rng, cap)


def _budget_check(budget: Budget, space: Any, embed_dim: int, latency: LatencyTable | None) -> Any:
    def fits(arch: dict) -> bool:
        macs = space.query_macs(arch, embed_dim)
        if budget.macs is not None and macs > budget.macs:
            return False
        if budget.floor_macs is not None and macs < budget.floor_macs:
            return False
        return budget.latency_ms is None or latency is None or latency.latency_ms(arch) <= budget.latency_ms

    return fits


def latency_table(cfg: Config, space: Any, embed_dim: int, path: Path) -> LatencyTable:
    """The space's latency table on the configured runtime, measured once and kept at ``path``.

    A kept table is reused only when it was measured for the same space, runtime and settings; otherwise it is
    measured again (and replaced). Measure on an idle machine: a loaded one inflates every entry.
    """
    lcfg = cfg.nas.latency
    wanted = {
        "space": cfg.nas.space.model_dump(mode="json"),
        "runtime": lcfg.runtime,
        "threads": lcfg.threads,
        "repeats": lcfg.repeats,
        "warmup": lcfg.warmup,
        "rounds": lcfg.rounds,
        "statistic": lcfg.statistic,
        "embed_dim": embed_dim,
    }
    if path.exists():
        table = LatencyTable.from_dict(read_json(path, f"delete '{path}' (a cache: it is measured again)"))
        if all(table.meta.get(k) == v for k, v in wanted.items()):
            return table
    table = measure_latency_table(
        space,
        threads=lcfg.threads,
        repeats=lcfg.repeats,
        warmup=lcfg.warmup,
        runtime=lcfg.runtime,
        embed_dim=embed_dim,
        rounds=lcfg.rounds,
        statistic=lcfg.statistic,
    )
    table.meta.update(wanted)
    make_dirs(path.parent)
    table.save(path)
    return table
