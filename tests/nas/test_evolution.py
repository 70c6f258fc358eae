"""Evolutionary search on a tiny fake space: budget, dedup, SPOS parents, exact resume, Pareto front."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from cmpnas.config import SearchConfig
from cmpnas.errors import CmpnasError
from cmpnas.nas.evolution import EvolutionSearch, pareto_indices

BUDGET = 1000


class GeneSpace:
    """``n_genes`` layers with ``n_choices`` ops each; choice c of any layer costs 100 + 50c MACs."""

    def __init__(self, n_genes: int = 6, n_choices: int = 4) -> None:
        self.n_genes = n_genes
        self.n_choices = n_choices

    def sample(self, rng: random.Random) -> dict:
        return {"genes": [rng.randrange(self.n_choices) for _ in range(self.n_genes)]}

    def mutate(self, arch: dict, rng: random.Random, prob: float) -> dict:
        return {"genes": [rng.randrange(self.n_choices) if rng.random() < prob else g for g in arch["genes"]]}

    def crossover(self, a: dict, b: dict, rng: random.Random) -> dict:
        return {"genes": [rng.choice(pair) for pair in zip(a["genes"], b["genes"], strict=True)]}

    def macs(self, arch: dict) -> int:
        return sum(100 + 50 * g for g in arch["genes"])

    def arch_key(self, arch: dict) -> str:
        return "-".join(str(g) for g in arch["genes"])


def fake_metrics(arch: dict) -> dict[str, float]:
    """A deterministic, arbitrary function of the architecture."""
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).digest()
    return {"hom_top1": digest[0] / 255, "het_top1": digest[1] / 255}


def het_fitness(metrics: dict[str, float]) -> float:
    return metrics["het_top1"]


class Recorder:
    """Counts evaluate / is_feasible calls and fails the test if an over-budget arch is ever evaluated."""

    def __init__(self, space: GeneSpace, fail_after: int | None = None) -> None:
        self.space = space
        self.evaluated: list[str] = []
        self.feasibility_checks: list[str] = []
        self.fail_after = fail_after

    def is_feasible(self, arch: dict) -> bool:
        self.feasibility_checks.append(self.space.arch_key(arch))
        return self.space.macs(arch) <= BUDGET

    def evaluate(self, arch: dict) -> dict[str, float]:
        assert self.space.macs(arch) <= BUDGET, "an over-budget architecture was evaluated"
        if self.fail_after is not None and len(self.evaluated) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.evaluated.append(self.space.arch_key(arch))
        return fake_metrics(arch)


def small_cfg(**overrides) -> SearchConfig:
    values = dict(
        population=8,
        generations=5,
        parents=3,
        mutations=4,
        crossovers=4,
        mutation_prob=0.3,
        max_tries_factor=10,
    )
    values.update(overrides)
    return SearchConfig(**values)


def make_search(cfg: SearchConfig, space: GeneSpace | None = None, fail_after: int | None = None):
    space = space or GeneSpace()
    rec = Recorder(space, fail_after)
    return EvolutionSearch(space, cfg, rec.is_feasible, rec.evaluate, het_fitness), rec


def without_wall_time(state: dict) -> dict:
    state = json.loads(json.dumps(state))
    for entry in state["history"]:
        entry.pop("wall_time_s")
    return state


def test_budget_respected_and_nothing_evaluated_twice():
    search, rec = make_search(small_cfg(generations=6))
    search.run()
    assert len(rec.evaluated) == len(set(rec.evaluated)) == len(search.memo)
    assert set(rec.evaluated) == set(search.memo)
    assert (
        search.counters["n_evaluated"] == len(rec.evaluated) == sum(h["n_evaluated"] for h in search.history)
    )
    assert all(entry["macs"] <= BUDGET for entry in search.memo.values())
    # the budget and the dedup actually had something to do, and each arch was budget-checked only once
    assert search.counters["n_rejected_budget"] > 0
    assert search.counters["n_duplicates"] > 0
    assert len(rec.feasibility_checks) == len(set(rec.feasibility_checks))


def test_history_matches_memo():
    cfg = small_cfg()
    search, _ = make_search(cfg)
    search.run()
    assert [h["generation"] for h in search.history] == list(range(cfg.generations))
    assert search.history[0]["population_size"] == cfg.population
    for h in search.history:
        g = h["generation"]
        this_gen = [e["fitness"] for e in search.memo.values() if e["generation"] == g]
        so_far = [e["fitness"] for e in search.memo.values() if e["generation"] <= g]
        assert h["n_evaluated"] == h["population_size"] == len(this_gen) == cfg.population
        assert h["generation_best_fitness"] == max(this_gen)
        assert h["mean_fitness"] == pytest.approx(sum(this_gen) / len(this_gen))
        assert h["best_fitness"] == max(so_far)
        assert h["wall_time_s"] >= 0
    later = [e for e in search.memo.values() if e["generation"] > 0]
    assert sum(e["origin"] == "mutation" for e in later) <= cfg.mutations * (cfg.generations - 1)
    assert {e["origin"] for e in later} <= {"mutation", "crossover", "random"}


class SpySpace(GeneSpace):
    """Records which archs the search uses as parents, and in which generation."""

    def __init__(self) -> None:
        super().__init__()
        self.search: EvolutionSearch | None = None
        self.parents_used: list[tuple[int, str]] = []

    def mutate(self, arch, rng, prob):
        self.parents_used.append((self.search.generation, self.arch_key(arch)))
        return super().mutate(arch, rng, prob)

    def crossover(self, a, b, rng):
        self.parents_used += [(self.search.generation, self.arch_key(p)) for p in (a, b)]
        return super().crossover(a, b, rng)


def test_random_refill_tops_up_every_generation():
    cfg = small_cfg(mutations=2, crossovers=1, generations=3)
    search, _ = make_search(cfg)
    search.run()
    for generation in (1, 2):
        origins = [e["origin"] for e in search.memo.values() if e["generation"] == generation]
        assert len(origins) == cfg.population
        assert origins.count("mutation") <= 2 and origins.count("crossover") <= 1
        assert origins.count("random") >= cfg.population - 3


class TupleSpace(GeneSpace):
    def sample(self, rng):
        return {"genes": tuple(super().sample(rng)["genes"])}


def test_memo_holds_archs_as_a_resumed_run_would_see_them():
    search, _ = make_search(small_cfg(generations=2), TupleSpace())
    search.run()
    assert all(isinstance(e["arch"]["genes"], list) for e in search.memo.values())


def test_parents_are_the_top_k_of_everything_evaluated_so_far():
    cfg = small_cfg()
    space = SpySpace()
    search, _ = make_search(cfg, space)
    space.search = search
    search.run()
    assert space.parents_used
    for generation in range(1, cfg.generations):
        earlier = [(k, e) for k, e in search.memo.items() if e["generation"] < generation]
        top = {k for k, _ in sorted(earlier, key=lambda ke: (-ke[1]["fitness"], ke[0]))[: cfg.parents]}
        used = {key for g, key in space.parents_used if g == generation}
        assert used and used <= top


def test_resume_after_a_crash_reproduces_the_uninterrupted_run():
    cfg = small_cfg()
    reference, _ = make_search(cfg)
    reference.run()

    saved: list[str] = []
    crashing, rec = make_search(cfg, fail_after=20)  # dies in the middle of generation 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run(on_generation=lambda s: saved.append(json.dumps(s.state_dict())))
    assert len(saved) == 2

    resumed, rec = make_search(cfg)
    resumed.load_state_dict(json.loads(saved[-1]))
    best = resumed.run()
    assert without_wall_time(resumed.state_dict()) == without_wall_time(reference.state_dict())
    assert best == reference.best()
    # nothing evaluated before the checkpoint was evaluated again
    assert len(rec.evaluated) == sum(e["generation"] >= 2 for e in reference.memo.values())


@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate])  # no slow shrinking
@given(seed=st.integers(0, 2**31), after=st.integers(0, 3))
def test_resume_from_any_generation_is_exact(seed, after):
    cfg = small_cfg(seed=seed)
    reference, _ = make_search(cfg)
    states: list[str] = []
    reference.run(on_generation=lambda s: states.append(json.dumps(s.state_dict())))
    resumed, _ = make_search(cfg)
    resumed.load_state_dict(json.loads(states[after]))
    assert resumed.run() == reference.best()
    assert without_wall_time(resumed.state_dict()) == without_wall_time(reference.state_dict())


def test_more_generations_can_be_added_on_resume():
    longer, _ = make_search(small_cfg(generations=5))
    longer.run()
    shorter, _ = make_search(small_cfg(generations=3))
    shorter.run()
    extended, _ = make_search(small_cfg(generations=5))
    extended.load_state_dict(json.loads(json.dumps(shorter.state_dict())))
    extended.run()
    state = without_wall_time(extended.state_dict())
    expected = without_wall_time(longer.state_dict())
    assert state["memo"] == expected["memo"] and state["history"] == expected["history"]


def test_resume_with_another_search_config_is_refused():
    search, _ = make_search(small_cfg(generations=2))
    search.run()
    other, _ = make_search(small_cfg(generations=2, seed=1))
    with pytest.raises(CmpnasError, match="seed"):
        other.load_state_dict(search.state_dict())


@pytest.mark.parametrize("damage", ["memo", "rng_state", "version"])
def test_corrupt_checkpoint_is_a_user_error(damage):
    search, _ = make_search(small_cfg(generations=1))
    search.run()
    state = search.state_dict()
    state[damage] = {"memo": {"x": {}}, "rng_state": [3, [1, 2]], "version": 99}[damage]
    fresh, _ = make_search(small_cfg(generations=1))
    with pytest.raises(CmpnasError):
        fresh.load_state_dict(state)


def test_budget_below_the_cheapest_architecture_raises():
    space = GeneSpace()
    calls = []
    search = EvolutionSearch(
        space, small_cfg(), lambda a: False, lambda a: calls.append(a) or {}, het_fitness
    )
    with pytest.raises(CmpnasError, match="budget is below the cheapest"):
        search.run()
    assert calls == []


def test_small_space_proceeds_with_what_there_is():
    space = GeneSpace(n_genes=2, n_choices=2)  # only 4 architectures exist
    search, rec = make_search(small_cfg(population=10, generations=3), space)
    search.run()
    assert len(search.memo) == 4 == len(rec.evaluated)
    assert [h["population_size"] for h in search.history] == [4, 0, 0]
    assert search.history[1]["mean_fitness"] is None
    assert search.history[1]["best_fitness"] == search.history[0]["best_fitness"]


def test_best_breaks_ties_by_key():
    space = GeneSpace(n_genes=3, n_choices=3)

    def coarse_fitness(metrics):
        return float(metrics["het_top1"] > 0.3)

    rec = Recorder(space)
    search = EvolutionSearch(
        space, small_cfg(population=20, generations=2), rec.is_feasible, rec.evaluate, coarse_fitness
    )
    with pytest.raises(CmpnasError):
        search.best()
    search.run()
    winners = sorted(k for k, e in search.memo.items() if e["fitness"] == 1.0)
    assert len(winners) > 1
    best = search.best()
    assert best["arch_key"] == winners[0]
    assert best["arch"] == search.memo[winners[0]]["arch"] and best["fitness"] == 1.0


def test_nan_fitness_never_wins():
    space = GeneSpace(n_genes=3, n_choices=3)
    rec = Recorder(space)

    def mostly_nan(metrics):
        return metrics["het_top1"] if metrics["het_top1"] < 0.3 else math.nan

    search = EvolutionSearch(
        space, small_cfg(population=20, generations=1), rec.is_feasible, rec.evaluate, mostly_nan
    )
    search.run()
    finite = [e["fitness"] for e in search.memo.values() if not math.isnan(e["fitness"])]
    assert 0 < len(finite) < len(search.memo) / 2
    assert search.best()["fitness"] == max(finite)
    assert search.history[0]["best_fitness"] == max(finite)
    assert search.history[0]["mean_fitness"] == pytest.approx(sum(finite) / len(finite))


def test_pareto_indices_on_hand_made_points():
    costs = [1, 2, 2, 3, 4, 5, 4]
    metrics = [0.5, 0.7, 0.6, 0.7, 0.9, 0.9, 0.9]
    # (2,.6) and (3,.7) are dominated by (2,.7); (5,.9) by (4,.9); the two identical (4,.9) points both stay
    assert pareto_indices(costs, metrics) == [0, 1, 4, 6]
    assert pareto_indices([], []) == []
    assert pareto_indices([3, 1], [0.1, 0.2]) == [1]


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=25))
def test_pareto_indices_match_the_definition(points):
    costs = [c for c, _ in points]
    metrics = [m for _, m in points]

    def dominated(i):
        return any(
            costs[j] <= costs[i]
            and metrics[j] >= metrics[i]
            and (costs[j], metrics[j]) != (costs[i], metrics[i])
            for j in range(len(points))
        )

    front = pareto_indices(costs, metrics)
    assert sorted(front) == [i for i in range(len(points)) if not dominated(i)]
    assert [costs[i] for i in front] == sorted(costs[i] for i in front)


def test_pareto_front_of_the_memo():
    search, _ = make_search(small_cfg())
    search.run()
    front = search.pareto_front(cost_key="macs", metric_key="hom_top1")
    points = {k: (e["macs"], e["metrics"]["hom_top1"]) for k, e in search.memo.items()}
    front_keys = {e["arch_key"] for e in front}
    for key, (cost, value) in points.items():
        beaten = any(c <= cost and v >= value and (c, v) != (cost, value) for c, v in points.values())
        assert (key in front_keys) == (not beaten)
    assert [e["macs"] for e in front] == sorted(e["macs"] for e in front)
    with pytest.raises(CmpnasError, match="Unknown candidate field"):
        search.pareto_front(metric_key="no_such_metric")


# ------------------------------------------------------------------------------------------ several budgets
FAMILY_BUDGETS = (700, 850, 1000)  # the space's cheapest arch costs 600


class FamilyRecorder(Recorder):
    """Per-budget checks (recorded per budget) and the evaluations."""

    def checks(self) -> list:
        def check(budget: int):
            def fits(arch: dict) -> bool:
                self.feasibility_checks.append(f"{budget}:{self.space.arch_key(arch)}")
                return self.space.macs(arch) <= budget

            return fits

        return [check(b) for b in FAMILY_BUDGETS]


def make_family(cfg: SearchConfig, fail_after: int | None = None):
    space = GeneSpace()
    rec = FamilyRecorder(space, fail_after)
    names = [f"{b}-macs" for b in FAMILY_BUDGETS]
    return EvolutionSearch(space, cfg, rec.checks(), rec.evaluate, het_fitness, names), rec


def test_one_budget_as_a_list_is_the_single_budget_search():
    single, _ = make_search(small_cfg(generations=6))
    single.run()
    space = GeneSpace()
    rec = Recorder(space)
    listed = EvolutionSearch(space, small_cfg(generations=6), [rec.is_feasible], rec.evaluate, het_fitness)
    listed.run()
    assert without_wall_time(listed.state_dict()) == without_wall_time(single.state_dict())


def test_family_search_evaluates_each_arch_once_for_every_budget_it_fits():
    search, rec = make_family(small_cfg(population=12, generations=6))
    search.run()
    # one evaluation per distinct architecture, whatever the number of budgets it fits
    assert len(rec.evaluated) == len(set(rec.evaluated)) == len(search.memo)
    # each budget check ran at most once per architecture
    assert len(rec.feasibility_checks) == len(set(rec.feasibility_checks))
    for key, entry in search.memo.items():
        expected = [i for i, b in enumerate(FAMILY_BUDGETS) if entry["macs"] <= b]
        assert search.fits(key) == expected and expected, key
    for i, budget in enumerate(FAMILY_BUDGETS):
        inside = [e for e in search.memo.values() if e["macs"] <= budget]
        assert len(inside) >= small_cfg(population=12).population // len(FAMILY_BUDGETS)
        best = search.best(i)
        assert best["macs"] <= budget
        assert best["fitness"] == max(e["fitness"] for e in inside)  # brute force over the memo
    # the tightest budget got its own parents: mutations and crossovers inside it after generation 0
    tight = [e for e in search.memo.values() if e["macs"] <= FAMILY_BUDGETS[0] and e["generation"] > 0]
    assert any(e["origin"] in ("mutation", "crossover") for e in tight)
    assert len(search.history[-1]["best_fitness_per_budget"]) == len(FAMILY_BUDGETS)


def test_family_search_resumes_exactly():
    cfg = small_cfg(population=12, generations=5)
    whole, _ = make_family(cfg)
    whole.run()
    crashed, _ = make_family(cfg, fail_after=20)
    saved: dict = {}
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.run(lambda s: saved.update(state=json.loads(json.dumps(s.state_dict()))))
    resumed, _ = make_family(cfg)
    resumed.load_state_dict(saved["state"])
    resumed.run()
    assert without_wall_time(resumed.state_dict()) == without_wall_time(whole.state_dict())


def test_family_budget_below_the_space_names_the_budget():
    space = GeneSpace()
    rec = Recorder(space)
    search = EvolutionSearch(
        space, small_cfg(), [lambda a: space.macs(a) <= 1000, lambda a: space.macs(a) <= 100], rec.evaluate,
        het_fitness, ["big", "tiny"],
    )
    with pytest.raises(CmpnasError, match="budget 'tiny'"):
        search.run()


def test_a_niche_sampler_proposes_that_niches_random_candidates():
    space = GeneSpace()
    rec = Recorder(space)
    cheap = lambda rng: {"genes": [rng.randrange(2) for _ in range(space.n_genes)]}  # noqa: E731 (<= 900 MACs)
    search = EvolutionSearch(
        space, small_cfg(population=8, generations=2), [lambda a: space.macs(a) <= 1000, lambda a: space.macs(a) <= 900],
        rec.evaluate, het_fitness, ["loose", "tight"], [None, cheap],
    )
    search.run()
    gen0 = [e for e in search.memo.values() if e["generation"] == 0]
    assert sum(1 in e["fits"] for e in gen0) >= 4  # the tight niche's half of generation 0
    assert search.best(1)["macs"] <= 900
