"""SPOS-style evolutionary architecture search, independent of any particular network.

The algorithm follows the official SPOS search (megvii's ``src/Search/search.py``, Guo et al.,
ECCV 2020):
generation 0 is a random population; every later generation takes the top ``parents`` of *everything
evaluated so far* as parents, makes ``mutations`` + ``crossovers`` children and refills with random
architectures up to ``population``. Candidates over the budget are rejected *before* evaluation and every
evaluated candidate is memoised, so no architecture is ever evaluated twice.

Fixes over SPOS that matter for long runs:
- every operator has a bounded number of tries (an infeasible budget fails fast instead of hanging);
- :meth:`EvolutionSearch.state_dict` holds the memo, the history and the RNG state, so a run killed between
  generations resumes to exactly the result of an uninterrupted one (the caller saves it in ``run``'s
  callback).

``cfg.generations`` counts generation 0, so a run evaluates about ``population x generations`` candidates
(1,000 with the SPOS defaults).

Several budgets at once (a family of query models, one per device class): ``is_feasible`` may be a list of
budget checks, one per *niche*. Every niche gets its share of the population, its own parents (the best
candidates that fit it) and children that fit it; the memo is shared, so an architecture is evaluated once and
counts for every budget it fits (:meth:`EvolutionSearch.best` per niche). With one budget this is exactly the
single-budget search: same operators, same random stream, same result.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cmpnas.config import SearchConfig
from cmpnas.errors import CmpnasError

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Search-config fields a resumed run may change: extending a finished run by more generations is legitimate;
# anything else (seed, reward, population, ...) would mix incompatible candidates in one memo.
_RESUMABLE_CONFIG_CHANGES = frozenset({"generations"})
_COUNTER_NAMES = ("n_evaluated", "n_rejected_budget", "n_duplicates")
_MEMO_FIELDS = ("arch", "metrics", "fitness", "macs", "generation")

Metrics = dict[str, float]


class SearchSpace(Protocol):
    """What the search needs from a space. Architectures are JSON-serialisable dicts.

    Every random choice must come from the ``rng`` argument; that is what makes the search reproducible.
    """

    def sample(self, rng: random.Random) -> dict: ...

    def mutate(self, arch: dict, rng: random.Random, prob: float) -> dict: ...

    def crossover(self, a: dict, b: dict, rng: random.Random) -> dict: ...

    def macs(self, arch: dict) -> int: ...

    def arch_key(self, arch: dict) -> str: ...


def pareto_indices(costs: Sequence[float], metrics: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (cost lower-or-equal *and* metric higher-or-equal,
    one of them strictly), ordered by increasing cost. Identical points are all kept."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -metrics[i]))
    front: list[int] = []
    best_of_cheaper = -math.inf  # best metric among strictly cheaper points
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and costs[order[end]] == costs[order[start]]:
            end += 1
        group = order[start:end]
        group_best = metrics[group[0]]  # the group is sorted by metric, descending
        if group_best > best_of_cheaper:
            front.extend(i for i in group if metrics[i] == group_best)
            best_of_cheaper = group_best
        start = end
    return front


def _share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split as evenly as possible over ``parts`` (earlier parts get the remainder)."""
    return total // parts + (1 if index < total % parts else 0)


def _ranking_fitness(value: float) -> float:
    """NaN fitness (e.g. a collapsed candidate's metrics) ranks last instead of breaking the sort."""
    return -math.inf if math.isnan(value) else value


def _rng_state_to_json(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _rng_state_from_json(raw: Any) -> tuple:
    version, internal, gauss_next = raw
    return (int(version), tuple(int(x) for x in internal), gauss_next)


def _json_copy(obj: Any) -> Any:
    """Round-trip through JSON so in-memory state equals what a resumed run loads (e.g. tuples -> lists)."""
    return json.loads(json.dumps(obj))


class EvolutionSearch:
    """Evolutionary search over ``space``.

    Args:
        space: the search space (see :class:`SearchSpace`).
        cfg: population size, operator counts, retries and the seed.
        is_feasible: budget check (MACs / latency), called before any evaluation and at most once per arch;
            or a list of them, one per budget (niche), for a family search.
        evaluate: the candidate's metrics (e.g. ``{"hom_top1": .., "het_top1": ..}``); expensive.
        fitness: maps metrics to the scalar to maximise (see :func:`cmpnas.nas.rewards.fitness_from_config`).
    """

    def __init__(
        self,
        space: SearchSpace,
        cfg: SearchConfig,
        is_feasible: Callable[[dict], bool] | Sequence[Callable[[dict], bool]],
        evaluate: Callable[[dict], Metrics],
        fitness: Callable[[Metrics], float],
        niche_names: Sequence[str] | None = None,
        samplers: Sequence[Callable[[random.Random], dict] | None] | None = None,
    ) -> None:
        self.space = space
        self.cfg = cfg
        self.niches = [is_feasible] if callable(is_feasible) else list(is_feasible)
        if not self.niches:
            raise CmpnasError("The search has no budget.", "pass one budget check, or a list of them")
        self.niche_names = list(niche_names) if niche_names else [f"budget {i}" for i in range(len(self.niches))]
        # random proposals of a niche: its sampler (e.g. one that lands under a tight MACs cap) or space.sample
        self.samplers = list(samplers) if samplers else [None] * len(self.niches)
        self._fit_cache: dict[str, tuple[bool, ...]] = {}
        self.evaluate = evaluate
        self.fitness = fitness
        self.rng = random.Random(cfg.seed)
        self.generation = 0  # number of completed generations
        self.population: list[str] = []  # arch keys of the last generation's new candidates
        self.memo: dict[str, dict[str, Any]] = {}
        self.rejected: set[str] = set()  # keys over every budget: a budget check may be expensive (latency)
        self.history: list[dict[str, Any]] = []
        self.counters: dict[str, int] = dict.fromkeys(_COUNTER_NAMES, 0)

    # ------------------------------------------------------------------ running

    def run(self, on_generation: Callable[[EvolutionSearch], None] | None = None) -> dict[str, Any]:
        """Run generations until ``cfg.generations`` are done; returns :meth:`best`.

        ``on_generation`` is called after every generation; save :meth:`state_dict` there to be resumable.
        """
        while self.generation < self.cfg.generations:
            self.step()
            if on_generation is not None:
                on_generation(self)
        return self.best()

    def step(self) -> dict[str, Any]:
        """Run one generation (generation 0 = random population); returns its history entry."""
        started = time.perf_counter()
        counts = dict.fromkeys(_COUNTER_NAMES, 0)
        cfg = self.cfg
        n = len(self.niches)
        if self.generation == 0:
            new_keys = self._initial_population(counts)
        else:
            new_keys = []
            for niche in range(n):
                parents = [self.memo[k]["arch"] for k in self._ranked_keys(niche)[: cfg.parents]]
                if not parents:
                    continue
                new_keys += self._fill(
                    _share(cfg.mutations, n, niche),
                    lambda parents=parents: self.space.mutate(
                        copy.deepcopy(self.rng.choice(parents)), self.rng, cfg.mutation_prob
                    ),
                    "mutation",
                    counts,
                    niche,
                )
                new_keys += self._fill(
                    _share(cfg.crossovers, n, niche),
                    lambda parents=parents: self._crossover(parents),
                    "crossover",
                    counts,
                    niche,
                )
            randoms = cfg.population - len(new_keys)
            for niche in range(n):
                new_keys += self._fill(_share(randoms, n, niche), self._sampler(niche), "random", counts, niche)
        self.population = new_keys
        entry = self._history_entry(new_keys, counts, time.perf_counter() - started)
        self.history.append(entry)
        self.generation += 1
        log.info(
            "generation %d: %d evaluated, %d over budget, %d duplicates; best %s (this generation %s), %.1fs",
            entry["generation"],
            counts["n_evaluated"],
            counts["n_rejected_budget"],
            counts["n_duplicates"],
            entry["best_fitness"],
            entry["generation_best_fitness"],
            entry["wall_time_s"],
        )
        return entry

    def _initial_population(self, counts: dict[str, int]) -> list[str]:
        cfg = self.cfg
        n = len(self.niches)
        keys: list[str] = []
        for niche in range(n):
            wanted = _share(cfg.population, n, niche)
            found = self._fill(wanted, self._sampler(niche), "random", counts, niche)
            keys += found
            if not found and wanted and not self._ranked_keys(niche):
                self._no_feasible(wanted * cfg.max_tries_factor, niche)
        if len(keys) < cfg.population:
            log.warning(
                "generation 0: only %d of %d feasible unique architectures found in %d tries; continuing",
                len(keys),
                cfg.population,
                cfg.population * cfg.max_tries_factor,
            )
        return keys

    def _no_feasible(self, tries: int, niche: int) -> None:
        cheapest = min((self.space.macs(self._sample()) for _ in range(min(tries, 100))), default=None)
        which = "the search budget" if len(self.niches) == 1 else f"the budget '{self.niche_names[niche]}'"
        raise CmpnasError(
            f"None of {tries} random architectures fits {which} (cheapest one sampled: "
            f"{cheapest} MACs); the budget is below the cheapest architecture of the space.",
            (
                "raise nas.budget_macs / nas.budget_latency_ms (or lower nas.budget_cost_reduction)"
                if len(self.niches) == 1
                else f"loosen the budget '{self.niche_names[niche]}' in nas.budgets"
            )
            + ", or make the search space cheaper (nas.space stage widths / channel scales)",
        )

    def _sample(self) -> dict:
        return self.space.sample(self.rng)

    def _sampler(self, niche: int) -> Callable[[], dict]:
        sampler = self.samplers[niche]
        return self._sample if sampler is None else lambda: sampler(self.rng)

    def _crossover(self, parents: list[dict]) -> dict:
        a, b = self.rng.sample(parents, 2) if len(parents) >= 2 else (parents[0], parents[0])
        return self.space.crossover(copy.deepcopy(a), copy.deepcopy(b), self.rng)

    def _fill(
        self, wanted: int, propose: Callable[[], dict], origin: str, counts: dict[str, int], niche: int = 0
    ) -> list[str]:
        """Evaluate up to ``wanted`` new proposals that fit ``niche``, in at most factor x wanted tries."""
        accepted: list[str] = []
        for _ in range(max(wanted, 0) * self.cfg.max_tries_factor):
            if len(accepted) >= wanted:
                break
            key = self._consider(propose(), origin, counts, niche)
            if key is not None:
                accepted.append(key)
        return accepted

    def _fits(self, key: str, arch: dict) -> tuple[bool, ...]:
        """Which budgets ``arch`` fits; every budget check runs at most once per architecture."""
        if key in self.rejected:
            return (False,) * len(self.niches)
        if key not in self._fit_cache:
            self._fit_cache[key] = tuple(bool(check(arch)) for check in self.niches)
        return self._fit_cache[key]

    def _consider(self, arch: dict, origin: str, counts: dict[str, int], niche: int = 0) -> str | None:
        """Evaluate ``arch`` if it is new and within the niche's budget; returns its key when evaluated."""
        key = self.space.arch_key(arch)
        if key in self.memo:
            self._count("n_duplicates", counts)
            return None
        fits = self._fits(key, arch)
        if not fits[niche]:
            if not any(fits):
                self.rejected.add(key)
            self._count("n_rejected_budget", counts)
            return None
        arch = _json_copy(arch)
        metrics = {name: float(value) for name, value in self.evaluate(copy.deepcopy(arch)).items()}
        self.memo[key] = {
            "arch": arch,
            "metrics": metrics,
            "fitness": float(self.fitness(metrics)),
            "macs": int(self.space.macs(arch)),
            "generation": self.generation,
            "origin": origin,
            "fits": [i for i, ok in enumerate(fits) if ok],
        }
        self._count("n_evaluated", counts)
        return key

    def _count(self, name: str, counts: dict[str, int]) -> None:
        counts[name] += 1
        self.counters[name] += 1

    def _best_fitness(self, niche: int) -> float | None:
        ranked = self._ranked_keys(niche)
        return self.memo[ranked[0]]["fitness"] if ranked else None

    def _history_entry(self, new_keys: list[str], counts: dict[str, int], seconds: float) -> dict[str, Any]:
        finite = [f for f in (self.memo[k]["fitness"] for k in new_keys) if math.isfinite(f)]
        ranked = self._ranked_keys()
        return {
            "generation": self.generation,
            "best_fitness": self.memo[ranked[0]]["fitness"] if ranked else None,
            "best_arch_key": ranked[0] if ranked else None,
            "generation_best_fitness": max(finite) if finite else None,
            **(
                {"best_fitness_per_budget": [self._best_fitness(i) for i in range(len(self.niches))]}
                if len(self.niches) > 1
                else {}
            ),
            "mean_fitness": sum(finite) / len(finite) if finite else None,
            "population_size": len(new_keys),
            **counts,
            "wall_time_s": seconds,
        }

    # ------------------------------------------------------------------ results

    def fits(self, key: str) -> list[int]:
        """The niches (budgets) a visited candidate fits."""
        entry = self.memo[key]
        if "fits" not in entry:  # a state saved before family searches: one budget, which it fit
            fits = self._fits(key, entry["arch"])
            entry["fits"] = [i for i, ok in enumerate(fits) if ok]
        return entry["fits"]

    def _ranked_keys(self, niche: int | None = None) -> list[str]:
        """Memo keys by fitness (best first), ties broken by key so the order never depends on dict order;
        only those that fit ``niche`` when given."""
        keys = self.memo if niche is None or len(self.niches) == 1 else [k for k in self.memo if niche in self.fits(k)]
        return sorted(keys, key=lambda k: (-_ranking_fitness(self.memo[k]["fitness"]), k))

    def best(self, niche: int | None = None) -> dict[str, Any]:
        """The best visited candidate (of one niche's budget, when given): ``{arch_key, arch, metrics, fitness,
        macs, generation, origin, fits}``."""
        ranked = self._ranked_keys(niche)
        if not ranked:
            where = "" if niche is None else f" within the budget '{self.niche_names[niche]}'"
            raise CmpnasError(
                f"The search has not evaluated any candidate{where} yet.",
                "run the search (more generations, or a looser budget) before asking for a result",
            )
        return self._entry(ranked[0])

    def pareto_front(self, cost_key: str = "macs", metric_key: str = "fitness") -> list[dict[str, Any]]:
        """Non-dominated candidates of the memo (low ``cost_key``, high ``metric_key``), cheapest first.

        Keys are ``macs``/``fitness`` or any metric name (e.g. ``het_top1``); non-finite values are left out.
        """
        keys, costs, values = [], [], []
        for key, entry in self.memo.items():
            cost, value = self._field(entry, cost_key), self._field(entry, metric_key)
            if math.isfinite(cost) and math.isfinite(value):
                keys.append(key)
                costs.append(cost)
                values.append(value)
        return [self._entry(keys[i]) for i in pareto_indices(costs, values)]

    def _field(self, entry: dict[str, Any], name: str) -> float:
        if name in ("macs", "fitness"):
            return float(entry[name])
        if name in entry["metrics"]:
            return float(entry["metrics"][name])
        raise CmpnasError(
            f"Unknown candidate field '{name}'.",
            f"use 'macs', 'fitness' or one of the metrics {sorted(entry['metrics'])}",
        )

    def _entry(self, key: str) -> dict[str, Any]:
        return {"arch_key": key, **copy.deepcopy(self.memo[key])}

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, JSON-serialisable (``json.dumps`` works on it as is)."""
        return {
            "version": STATE_VERSION,
            "config": self.cfg.model_dump(mode="json"),
            "generation": self.generation,
            "population": list(self.population),
            "memo": copy.deepcopy(self.memo),
            "rejected": sorted(self.rejected),
            "history": copy.deepcopy(self.history),
            "rng_state": _rng_state_to_json(self.rng.getstate()),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also after a JSON round-trip); refuses a different search config."""
        fix = "resume from a search checkpoint written by this version, or start a new run directory"
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CmpnasError("The search checkpoint has an unknown format or version.", fix)
        self._check_config(state.get("config", {}))
        try:
            memo = {str(k): dict(v) for k, v in state["memo"].items()}
            for key, entry in memo.items():
                absent = [f for f in _MEMO_FIELDS if f not in entry]
                if absent:
                    raise KeyError(f"memo[{key!r}] lacks {absent}")
            population = [str(k) for k in state["population"]]
            missing = [k for k in population if k not in memo]
            if missing:
                raise KeyError(missing[0])
            rng_state = _rng_state_from_json(state["rng_state"])
            rng = random.Random()
            rng.setstate(rng_state)
            counters = {name: int(state["counters"][name]) for name in _COUNTER_NAMES}
            generation = int(state["generation"])
            history = list(state["history"])
            rejected = {str(k) for k in state["rejected"]}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CmpnasError(
                f"The search checkpoint is incomplete or corrupt ({type(exc).__name__}: {exc}).", fix
            ) from None
        self.generation = generation
        self.population = population
        self.memo = memo
        self.rejected = rejected
        self.history = history
        self.rng = rng
        self.counters = counters

    def _check_config(self, saved: dict[str, Any]) -> None:
        current = self.cfg.model_dump(mode="json")
        changed = sorted(
            name
            for name in set(saved) | set(current)
            if name not in _RESUMABLE_CONFIG_CHANGES and saved.get(name) != current.get(name)
        )
        if changed:
            details = ", ".join(f"{n}: {saved.get(n)!r} -> {current.get(n)!r}" for n in changed)
            raise CmpnasError(
                f"The search checkpoint was made with a different search config ({details}).",
                "resume with the original nas.search settings (only nas.search.generations may change), "
                "or start a new run directory",
            )
