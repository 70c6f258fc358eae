"""Ranking of architectures against a noisy stand-alone target, against hand-computed numbers:
z-scores, the composite target, split-half reliability and its τ ceiling, the bootstrap, the verdict."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from cmpnas.errors import CmpnasError
from cmpnas.evaluation.ranking import (
    bootstrap_rank_interval,
    composite_target,
    kendall_ceiling,
    pearson,
    ranking_report,
    ranking_verdict,
    residual_on_log_cost,
    spearman_brown,
    split_half,
    zscores,
)


# ------------------------------------------------------------------------------------------ z-scores
def test_zscores_use_the_sample_std() -> None:
    # mean 72, sample std sqrt((4 + 0 + 4) / 2) = 2
    assert zscores([70.0, 72.0, 74.0]) == pytest.approx([-1.0, 0.0, 1.0])
    # mean 2.5, sample std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3); population std would give ±1.3416
    sd = math.sqrt(5 / 3)
    assert zscores([1.0, 2.0, 3.0, 4.0]) == pytest.approx([-1.5 / sd, -0.5 / sd, 0.5 / sd, 1.5 / sd])


def test_zscores_of_a_constant_list_are_zero() -> None:
    assert zscores([3.0, 3.0, 3.0]) == [0.0, 0.0, 0.0]
    assert zscores([5.0]) == [0.0]
    assert zscores([]) == []


# ------------------------------------------------------------------------------------------ composite
# 3 architectures x 2 seeds.
TOP1 = np.array([[70.0, 60.0], [72.0, 70.0], [74.0, 65.0]])
MAP = np.array([[40.0, 32.0], [46.0, 34.0], [43.0, 30.0]])


def test_composite_target_by_hand() -> None:
    # seed 0: top1 [70, 72, 74] mean 72 std 2 -> z [-1, 0, 1]; mAP [40, 46, 43] mean 43 std 3 -> z [-1, 1, 0]
    #         composite 0.5 * ([-1, 0, 1] + [-1, 1, 0]) = [-1, 0.5, 0.5]
    # seed 1: top1 [60, 70, 65] mean 65 std 5 -> z [-1, 1, 0]; mAP [32, 34, 30] mean 32 std 2 -> z [0, 1, -1]
    #         composite 0.5 * ([-1, 1, 0] + [0, 1, -1]) = [-0.5, 1, -0.5]
    per_seed = composite_target(TOP1, MAP)
    assert per_seed.shape == (3, 2)
    np.testing.assert_allclose(per_seed, [[-1.0, -0.5], [0.5, 1.0], [0.5, -0.5]], atol=1e-12)
    # target = mean over seeds: [-0.75, 0.75, 0]
    np.testing.assert_allclose(per_seed.mean(axis=1), [-0.75, 0.75, 0.0], atol=1e-12)


def test_composite_target_ignores_scale_and_seed_offsets() -> None:
    # top1 as a fraction instead of %, mAP of seed 1 shifted by +10 points: same z-scores
    shifted = MAP.copy()
    shifted[:, 1] += 10.0
    np.testing.assert_allclose(
        composite_target(TOP1 / 100.0, shifted), composite_target(TOP1, MAP), atol=1e-12
    )


def test_composite_target_rejects_bad_input() -> None:
    with pytest.raises(CmpnasError, match="shape"):
        composite_target(TOP1, MAP[:2])
    with pytest.raises(CmpnasError, match="n_archs, n_seeds"):
        composite_target(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    bad = TOP1.copy()
    bad[0, 0] = np.nan
    with pytest.raises(CmpnasError, match="non-finite"):
        composite_target(bad, MAP)


# ------------------------------------------------------------------------------------------ split half
def test_split_half_by_hand() -> None:
    # seed 0 = [1, 2, 3, 4] centred [-1.5, -0.5, 0.5, 1.5]; seed 1 = [2, 1, 4, 3] centred [-0.5, -1.5, 1.5, 0.5]
    # cross products 0.75 + 0.75 + 0.75 + 0.75 = 3; sums of squares 5 and 5 -> r1 = 3 / 5 = 0.6
    # Spearman–Brown r2 = 2 * 0.6 / 1.6 = 0.75
    # ceiling (2/π) asin(sqrt(0.75)) = (2/π) asin(sqrt(3)/2) = (2/π)(π/3) = 2/3
    per_seed = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 4.0], [4.0, 3.0]])
    out = split_half(per_seed)
    assert out["r1"] == pytest.approx(0.6)
    assert out["r2"] == pytest.approx(0.75)
    assert out["tau_ceiling"] == pytest.approx(2.0 / 3.0)
    assert out["r1"] == pytest.approx(np.corrcoef(per_seed[:, 0], per_seed[:, 1])[0, 1])


def test_split_half_pairs_even_and_odd_seeds() -> None:
    rng = np.random.default_rng(3)
    per_seed = rng.normal(size=(7, 4))
    even, odd = per_seed[:, [0, 2]].mean(axis=1), per_seed[:, [1, 3]].mean(axis=1)
    r1 = float(np.corrcoef(even, odd)[0, 1])
    out = split_half(per_seed)
    assert out["r1"] == pytest.approx(r1)
    assert out["r2"] == pytest.approx(2 * r1 / (1 + r1))


def test_split_half_undefined_cases() -> None:
    none = {"r1": None, "r2": None, "tau_ceiling": None}
    assert split_half(np.array([[1.0, 2.0], [2.0, 1.0]])) == none  # 2 architectures
    assert split_half(np.array([[1.0], [2.0], [3.0]])) == none  # 1 seed
    assert split_half(np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])) == none  # seed 1 constant


def test_negative_reliability_has_zero_ceiling() -> None:
    # seed 1 reverses seed 0: r1 = -1, Spearman–Brown at its pole -> r2 None, ceiling 0
    out = split_half(np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]))
    assert out["r1"] == pytest.approx(-1.0)
    assert out["r2"] is None
    assert out["tau_ceiling"] == 0.0
    # r1 = -0.5 -> r2 = -1 / 0.5 = -2 -> ceiling 0
    assert spearman_brown(-0.5) == pytest.approx(-2.0)
    assert kendall_ceiling(spearman_brown(-0.5)) == 0.0
    assert kendall_ceiling(1.0) == pytest.approx(1.0)  # asin(1) = π/2


@settings(max_examples=200, deadline=None)
@given(st.floats(-0.999, 1.0), st.floats(-0.999, 1.0))
def test_ceiling_is_in_unit_interval_and_monotone_in_r1(a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    c_lo, c_hi = kendall_ceiling(spearman_brown(lo)), kendall_ceiling(spearman_brown(hi))
    assert 0.0 <= c_lo <= c_hi <= 1.0


@settings(max_examples=100, deadline=None)
@given(st.integers(3, 12), st.integers(2, 5), st.integers(0, 2**32 - 1))
def test_split_half_ceiling_is_in_unit_interval(n_archs: int, n_seeds: int, seed: int) -> None:
    per_seed = np.random.default_rng(seed).normal(size=(n_archs, n_seeds))
    out = split_half(per_seed)
    assert out["r1"] is not None and -1.0 <= out["r1"] <= 1.0
    assert out["tau_ceiling"] is not None and 0.0 <= out["tau_ceiling"] <= 1.0


# ------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_of_concordant_data_is_exactly_one() -> None:
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    y = [10.0, 20.0, 25.0, 40.0, 41.0, 90.0]
    out = bootstrap_rank_interval(x, y, n_boot=300, seed=1)
    assert out is not None
    assert out["kendall"] == pytest.approx(1.0)
    assert out["kendall_interval"] == pytest.approx([1.0, 1.0])
    assert out["spearman_interval"] == pytest.approx([1.0, 1.0])
    # a resample with a single distinct architecture is undefined and skipped: 6 of 6**6 draws, so rare
    assert 290 <= out["n_resamples"] <= 300


def _noisy(n: int = 12, seed: int = 5) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return list(x), list(x + rng.normal(scale=0.8, size=n))


def test_bootstrap_point_estimates_match_scipy_and_intervals_contain_them() -> None:
    x, y = _noisy()
    out = bootstrap_rank_interval(x, y, n_boot=500, confidence=0.9, seed=0)
    assert out is not None
    assert out["kendall"] == pytest.approx(stats.kendalltau(x, y)[0])
    assert out["spearman"] == pytest.approx(stats.spearmanr(x, y)[0])
    lo, hi = out["kendall_interval"]
    assert lo < out["kendall"] < hi and hi - lo > 0.05  # noisy data: a real interval, not a point
    lo, hi = out["spearman_interval"]
    assert lo < out["spearman"] < hi


def test_residual_on_log_cost_matches_numpy_polyfit() -> None:
    rng = np.random.default_rng(3)
    cost = rng.uniform(1e5, 3e6, size=9)
    values = rng.normal(size=9)
    slope, intercept = np.polyfit(np.log(cost), values, 1)
    expected = values - (slope * np.log(cost) + intercept)
    assert residual_on_log_cost(values, cost) == pytest.approx(expected)
    assert residual_on_log_cost([1.0, 2.0, 6.0], [5.0, 5.0, 5.0]) == pytest.approx([-2.0, -1.0, 3.0])


def test_tau_given_cost_by_hand() -> None:
    """Cost pulls the target up and the estimate down, but at equal cost both order the architectures the same
    way: τ given cost is exactly 1 where the plain τ is negative."""
    cost = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    wobble = np.array([0.3, -0.2, 0.1, -0.4, 0.5, 0.0])
    target = 10.0 * np.log(cost) + wobble
    estimate = -5.0 * np.log(cost) + 2.0 * wobble
    plain = bootstrap_rank_interval(list(estimate), list(target), n_boot=100, seed=0)
    given = bootstrap_rank_interval(list(estimate), list(target), n_boot=100, seed=0, cost=cost)
    assert plain is not None and given is not None
    assert plain["kendall"] == pytest.approx(stats.kendalltau(estimate, target)[0]) and plain["kendall"] < 0
    assert given["kendall"] == pytest.approx(1.0) and given["spearman"] == pytest.approx(1.0)
    assert given["kendall_interval"] == pytest.approx([1.0, 1.0])  # every resample refits the line


def test_tau_given_equal_costs_is_the_plain_tau() -> None:
    x, y = _noisy()
    plain = bootstrap_rank_interval(x, y, n_boot=50, seed=2)
    assert plain == bootstrap_rank_interval(x, y, n_boot=50, seed=2, cost=[7.0] * len(x))


def test_tau_given_cost_rejects_bad_costs() -> None:
    with pytest.raises(CmpnasError, match="cost 2"):
        bootstrap_rank_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], cost=[1.0, 2.0])
    with pytest.raises(CmpnasError, match="cost of 0 or less"):
        bootstrap_rank_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], cost=[1.0, 0.0, 2.0])


def test_bootstrap_is_reproducible_with_a_seed() -> None:
    x, y = _noisy()
    a = bootstrap_rank_interval(x, y, n_boot=200, seed=7)
    assert a == bootstrap_rank_interval(x, y, n_boot=200, seed=7)
    assert a != bootstrap_rank_interval(x, y, n_boot=200, seed=8)


def test_wider_confidence_gives_a_wider_interval() -> None:
    x, y = _noisy()
    narrow = bootstrap_rank_interval(x, y, n_boot=400, confidence=0.5, seed=0)
    wide = bootstrap_rank_interval(x, y, n_boot=400, confidence=0.95, seed=0)
    assert narrow is not None and wide is not None
    assert wide["kendall_interval"][0] <= narrow["kendall_interval"][0]
    assert wide["kendall_interval"][1] >= narrow["kendall_interval"][1]


def test_bootstrap_undefined_and_invalid() -> None:
    assert bootstrap_rank_interval([1.0, 2.0], [2.0, 1.0]) is None
    with pytest.raises(CmpnasError, match="paired"):
        bootstrap_rank_interval([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(CmpnasError, match="Confidence"):
        bootstrap_rank_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], confidence=1.5)
    const = bootstrap_rank_interval([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], n_boot=20)
    assert const is not None
    assert const["kendall"] is None and const["kendall_interval"] is None and const["n_resamples"] == 0


# ------------------------------------------------------------------------------------------ verdict
def test_verdict_not_measurable_below_min_reliability() -> None:
    out = ranking_verdict(tau=0.9, tau_interval=[0.8, 1.0], tau_macs=0.1, r1=0.3, tau_ceiling=0.5)
    assert out["verdict"] == "not measurable"
    assert "r1=0.30 < 0.4" in out["reason"]
    assert out["beats_macs"] is None
    out = ranking_verdict(tau=0.9, tau_interval=[0.8, 1.0], tau_macs=0.1, r1=None, tau_ceiling=None)
    assert out["verdict"] == "not measurable" and "undefined" in out["reason"]


def test_verdict_pass() -> None:
    # r1 = 0.6 -> ceiling 2/3; tau 0.6 >= 0.5; 0.6 / (2/3) = 0.9 >= 0.7; 0.6 - 0.3 = 0.3 > half-width 0.1
    out = ranking_verdict(tau=0.6, tau_interval=[0.5, 0.7], tau_macs=0.3, r1=0.6, tau_ceiling=2.0 / 3.0)
    assert out["verdict"] == "pass"
    assert (out["tau_at_least_min"], out["fraction_at_least_min"], out["beats_macs"]) == (True, True, True)
    assert out["fraction_of_ceiling"] == pytest.approx(0.9)


def test_verdict_pass_at_the_reliability_boundary() -> None:
    out = ranking_verdict(tau=0.6, tau_interval=[0.5, 0.7], tau_macs=0.3, r1=0.4, tau_ceiling=0.8)
    assert out["verdict"] == "pass"  # r1 = 0.4 is not < 0.4; 0.6 / 0.8 = 0.75 >= 0.7


def test_verdict_fails_by_ceiling_fraction() -> None:
    # tau 0.55 >= 0.5, but 0.55 / 0.9 = 0.611 < 0.7; 0.55 - 0.2 = 0.35 > half-width 0.1
    out = ranking_verdict(tau=0.55, tau_interval=[0.45, 0.65], tau_macs=0.2, r1=0.8, tau_ceiling=0.9)
    assert out["verdict"] == "fail"
    assert (out["tau_at_least_min"], out["fraction_at_least_min"], out["beats_macs"]) == (True, False, True)
    assert out["fraction_of_ceiling"] == pytest.approx(0.55 / 0.9)
    assert "tau/ceiling=0.61" in out["reason"] and "ceiling 0.90" in out["reason"]
    assert "tau_macs" not in out["reason"]  # only the failing figure is named


def test_verdict_fails_by_macs_baseline() -> None:
    # tau 0.6, 0.6 / (2/3) = 0.9 fine; 0.6 - 0.45 = 0.15 not > half-width (0.8 - 0.4) / 2 = 0.2
    out = ranking_verdict(tau=0.6, tau_interval=[0.4, 0.8], tau_macs=0.45, r1=0.6, tau_ceiling=2.0 / 3.0)
    assert out["verdict"] == "fail"
    assert (out["tau_at_least_min"], out["fraction_at_least_min"], out["beats_macs"]) == (True, True, False)
    assert "tau - tau_macs=0.15" in out["reason"] and "half-width 0.20" in out["reason"]


def test_verdict_fails_by_min_tau() -> None:
    # tau 0.45 < 0.5 although 0.45 / 0.5 = 0.9 of its ceiling and 0.45 - 0 > half-width 0.05
    out = ranking_verdict(tau=0.45, tau_interval=[0.4, 0.5], tau_macs=0.0, r1=0.5, tau_ceiling=0.5)
    assert out["verdict"] == "fail"
    assert (out["tau_at_least_min"], out["fraction_at_least_min"], out["beats_macs"]) == (False, True, True)
    assert "tau=0.45 not >= 0.5" in out["reason"]


def test_verdict_thresholds_are_parameters() -> None:
    kw = {"tau": 0.55, "tau_interval": [0.45, 0.65], "tau_macs": 0.2, "r1": 0.8, "tau_ceiling": 0.9}
    assert ranking_verdict(**kw, min_fraction=0.6)["verdict"] == "pass"
    assert ranking_verdict(**kw, min_fraction=0.6, min_reliability=0.9)["verdict"] == "not measurable"


# ------------------------------------------------------------------------------------------ report
def _seeds(n_archs: int = 10, n_seeds: int = 2, noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    quality = np.linspace(0.0, 3.0, n_archs)
    top1 = 70.0 + 3.0 * (quality[:, None] + rng.normal(scale=noise, size=(n_archs, n_seeds)))
    map_ = 50.0 + 2.0 * (quality[:, None] + rng.normal(scale=noise, size=(n_archs, n_seeds)))
    return quality, top1, map_


def test_report_ties_the_pieces_together() -> None:
    quality, top1, map_ = _seeds()
    macs = [1.0, 3.0, 2.0, 5.0, 4.0, 1.5, 2.5, 9.0, 0.5, 6.0]  # a weak MACs signal
    report = ranking_report(list(quality), macs, top1, map_, n_boot=300)
    json.dumps(report)  # plain, serialisable
    per_seed = composite_target(top1, map_)
    target = per_seed.mean(axis=1)
    assert report["n_archs"] == 10 and report["n_seeds"] == 2
    assert report["target"] == pytest.approx(list(target), abs=1e-4)
    assert report["split_half"]["r1"] == pytest.approx(
        np.corrcoef(per_seed[:, 0], per_seed[:, 1])[0, 1], abs=1e-4
    )
    assert report["estimate"]["kendall"] == pytest.approx(stats.kendalltau(quality, target)[0], abs=1e-4)
    assert report["macs_only"]["kendall"] == pytest.approx(stats.kendalltau(macs, target)[0], abs=1e-4)
    given = stats.kendalltau(residual_on_log_cost(quality, macs), residual_on_log_cost(target, macs))[0]
    assert report["given_macs"]["kendall"] == pytest.approx(given, abs=1e-4)
    assert report["verdict"]["verdict"] == "pass", report["verdict"]["reason"]
    assert all(round(v, 4) == v for v in report["target"])


def test_report_fails_an_estimator_that_is_just_macs() -> None:
    quality, top1, map_ = _seeds()
    macs = list(10.0 * quality + 1.0)  # MACs order the architectures perfectly: the estimate adds nothing
    report = ranking_report(list(quality), macs, top1, map_, n_boot=300)
    assert report["verdict"]["verdict"] == "fail"
    assert report["verdict"]["beats_macs"] is False


def test_report_on_pure_noise_is_not_measurable() -> None:
    rng = np.random.default_rng(11)
    top1, map_ = rng.normal(size=(10, 2)), rng.normal(size=(10, 2))
    split = split_half(composite_target(top1, map_))
    assert split["r1"] is not None and split["r1"] < 0.4  # the seeds do not agree with each other
    report = ranking_report(list(range(10)), list(range(10)), top1, map_, n_boot=50)
    assert report["verdict"]["verdict"] == "not measurable"


def test_report_rejects_mismatched_lengths() -> None:
    _, top1, map_ = _seeds()
    with pytest.raises(CmpnasError, match="9 estimates for 10 architectures"):
        ranking_report([0.0] * 9, [0.0] * 10, top1, map_)


def test_pearson_matches_scipy_and_is_none_when_a_side_is_constant() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.normal(size=7), rng.normal(size=7)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([5.0, 5.0, 5.0])) is None
