"""Rewards R1 / R2 / R3 on hand-computed values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmpnas.config import SearchConfig
from cmpnas.errors import CmpnasError
from cmpnas.nas.rewards import REWARDS, fitness_from_config, reward

METRICS = {"hom_top1": 0.6, "het_top1": 0.8, "hom_map": 0.3, "het_map": 0.2}


def test_registry_holds_the_three_rewards():
    assert set(REWARDS) == {"R1", "R2", "R3"}


@pytest.mark.parametrize(
    ("name", "weight", "metric", "expected"),
    [
        ("R1", 0.5, "top1", 0.6),
        ("R2", 0.5, "top1", 0.8),
        ("R3", 0.5, "top1", 0.7),
        ("R3", 0.25, "top1", 0.25 * 0.8 + 0.75 * 0.6),  # 0.65
        ("R3", 0.0, "top1", 0.6),
        ("R3", 1.0, "top1", 0.8),
        ("R1", 0.5, "map", 0.3),
        ("R2", 0.5, "map", 0.2),
        ("R3", 0.75, "map", 0.75 * 0.2 + 0.25 * 0.3),  # 0.225
    ],
)
def test_reward_on_hand_values(name, weight, metric, expected):
    assert reward(METRICS, name, weight, metric) == pytest.approx(expected)


def test_r3_default_is_the_even_mix():
    assert reward({"hom_top1": 0.2, "het_top1": 0.4}) == pytest.approx(0.3)


def test_r1_and_r2_ignore_the_weight():
    assert reward(METRICS, "R1", 0.9) == reward(METRICS, "R1", 0.1) == 0.6
    assert reward(METRICS, "R2", 0.9) == reward(METRICS, "R2", 0.1) == 0.8


@given(
    hom=st.floats(0, 1),
    het=st.floats(0, 1),
    weight=st.floats(0, 1),
)
def test_r3_lies_between_homogeneous_and_heterogeneous(hom, het, weight):
    value = reward({"hom_top1": hom, "het_top1": het}, "R3", weight)
    assert min(hom, het) - 1e-12 <= value <= max(hom, het) + 1e-12


def test_unknown_reward_is_a_user_error():
    with pytest.raises(CmpnasError, match="Unknown reward 'R4'"):
        reward(METRICS, "R4")


@pytest.mark.parametrize("missing", ["hom_top1", "het_top1"])
def test_missing_metric_is_a_user_error(missing):
    metrics = {k: v for k, v in METRICS.items() if k != missing}
    with pytest.raises(CmpnasError, match=missing):
        reward(metrics, "R3")


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_weight_outside_unit_interval_is_a_user_error(weight):
    with pytest.raises(CmpnasError, match="weight"):
        reward(METRICS, "R3", weight)


def test_fitness_from_config_binds_reward_weight_and_metric():
    fitness = fitness_from_config(SearchConfig(reward="R3", reward_weight=0.25, metric="map"))
    assert fitness(METRICS) == pytest.approx(0.25 * 0.2 + 0.75 * 0.3)
    assert fitness_from_config(SearchConfig(reward="R2"))(METRICS) == pytest.approx(0.8)


def test_fitness_from_config_rejects_a_bad_reward_before_any_evaluation():
    cfg = SearchConfig.model_construct(reward="R9", reward_weight=0.5, metric="top1")
    with pytest.raises(CmpnasError, match="Unknown reward"):
        fitness_from_config(cfg)
