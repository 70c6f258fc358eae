"""Budgets of a query-model family: names, caps from cost reductions, and the supernet band that spans them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cmpnas.config import BudgetConfig, NasConfig
from cmpnas.models.spaces import Budget, family_budgets, sample_bands


@pytest.mark.parametrize(
    ("budget", "label"),
    [
        ({"cost_reduction": 80}, "80x"),
        ({"cost_reduction": 12.5}, "12.5x"),
        ({"macs": 1.2e6}, "1.2MMACs"),
        ({"latency_ms": 0.3}, "0.3ms"),
        ({"cost_reduction": 80, "latency_ms": 0.3}, "80x-0.3ms"),
        ({"cost_reduction": 80, "name": "phone"}, "phone"),
    ],
)
def test_budget_labels(budget: dict, label: str) -> None:
    assert BudgetConfig(**budget).label() == label


@pytest.mark.parametrize(
    "budget", [{}, {"cost_reduction": 40, "macs": 1e6}, {"cost_reduction": 0}, {"macs": 1e6, "name": "a b"}]
)
def test_bad_budgets_are_refused(budget: dict) -> None:
    with pytest.raises(ValidationError):
        BudgetConfig(**budget)


def test_family_budgets_turn_cost_reductions_into_caps() -> None:
    nas = NasConfig(budgets=[{"cost_reduction": 40}, {"macs": 2e6, "latency_ms": 0.5}, {"latency_ms": 0.2}])
    assert family_budgets(nas, 120_000_000) == [
        Budget("40x", 3e6, None),
        Budget("2MMACs-0.5ms", 2e6, 0.5),
        Budget("0.2ms", None, 0.2),
    ]
    assert family_budgets(NasConfig(), 120_000_000) == []


def test_a_family_floor_is_a_fraction_of_each_members_cap() -> None:
    nas = NasConfig(family_floor=0.7, budgets=[{"cost_reduction": 40}, {"latency_ms": 0.2}])
    assert family_budgets(nas, 120_000_000) == [Budget("40x", 3e6, None, 2.1e6), Budget("0.2ms", None, 0.2)]
    assert Budget("40x", 3e6, None, 2.1e6).to_dict()["floor_macs"] == 2.1e6
    assert "floor_macs" not in Budget("40x", 3e6, None).to_dict()


def test_the_supernet_trains_every_caps_band() -> None:
    nas = NasConfig(sample_band=0.5, budgets=[{"cost_reduction": 40}, {"cost_reduction": 160}])
    family = family_budgets(nas, 160_000_000)  # caps 4e6 and 1e6
    # one band per cap, cheapest first (the 2e6 budget is the 80x member's cap): [0.5 x cap, cap]
    assert sample_bands(nas, 2e6, family) == [(0.5e6, 1e6), (1e6, 2e6), (2e6, 4e6)]
    assert sample_bands(nas, 2e6) == [(1e6, 2e6)]  # no family: the one budget
    assert sample_bands(nas.model_copy(update={"sample_band": None}), 2e6, family) == []


def test_sample_below_lands_under_the_cap_where_uniform_sampling_does_not() -> None:
    import random

    from cmpnas.config import SpaceConfig
    from cmpnas.models.spaces.spos import SposSpace

    space = SposSpace(SpaceConfig())
    low, high = space.min_macs(), space.max_macs()
    cap = low + 0.08 * (high - low)  # the cheap end: ~0.85 MMACs in a 0.62-3.5 MMACs space
    rng = random.Random(0)
    uniform = sum(space.macs(space.sample(rng)) <= cap for _ in range(300))
    archs = [space.sample_below(random.Random(seed), cap) for seed in range(100)]
    assert uniform <= 3  # why the sampler exists
    assert all(space.macs(space.validate(a)) <= cap for a in archs)
    assert len({space.arch_key(a) for a in archs}) == len(archs)  # still random
    assert space.sample_below(random.Random(7), cap) == space.sample_below(random.Random(7), cap)
    # below the cheapest arch nothing fits: it stops at the cheapest one, which the budget check then refuses
    assert space.macs(space.sample_below(random.Random(1), low - 1)) == low
