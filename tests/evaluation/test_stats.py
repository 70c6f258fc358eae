"""Statistics over seeds against hand-computed numbers: mean ± std, the paired t interval, verdicts, ranks."""

from __future__ import annotations

import math

import pytest

from cmpnas.errors import CmpnasError
from cmpnas.evaluation.stats import (
    Summary,
    aggregate_model,
    by_seed,
    format_mean_std,
    group_by_model,
    paired_comparison,
    rank_correlations,
    signed,
    summarize,
)

# Two-sided 95 % quantiles of Student's t, from a printed table (not from scipy): t_{0.975, df}.
T975 = {2: 4.302652729749464, 3: 3.182446305284263}


def test_mean_and_sample_std() -> None:
    s = summarize([80.0, 82.0, 84.0])
    assert (s.mean, s.std, s.n) == (82.0, 2.0, 3)  # sqrt((4 + 0 + 4) / (3 - 1)) = 2
    assert summarize([81.5]) == Summary(81.5, None, 1)
    assert format_mean_std(s) == "82.0 ± 2.0"
    assert format_mean_std(summarize([81.5])) == "81.50"
    with pytest.raises(CmpnasError):
        summarize([])


def test_paired_t_interval_by_hand_contains_zero() -> None:
    # differences 1, 2, 3: mean 2, sample std 1, half width t_{0.975,2} * 1 / sqrt(3) = 2.48414
    a = {0: 80.0, 1: 82.0, 2: 84.0}
    b = {0: 79.0, 1: 80.0, 2: 81.0}
    d = paired_comparison("A", a, "B", b)
    half = T975[2] * 1.0 / math.sqrt(3)
    assert d.mean == pytest.approx(2.0)
    assert d.interval == pytest.approx((2.0 - half, 2.0 + half))
    assert d.interval[0] == pytest.approx(-0.48414, abs=1e-5)
    assert d.seeds == (0, 1, 2)
    assert d.verdict == "not distinguishable"
    assert d.sentence() == "A vs B: +2.0 [\u22120.5, +4.5], not distinguishable"


def test_paired_t_interval_by_hand_excludes_zero_both_ways() -> None:
    # differences 1.0, 1.2, 0.8, 1.0: mean 1, sample std sqrt(0.08 / 3), half width t_{0.975,3} * std / 2
    a = {0: 71.0, 1: 70.2, 2: 69.8, 3: 72.0}
    b = {0: 70.0, 1: 69.0, 2: 69.0, 3: 71.0}
    half = T975[3] * math.sqrt(0.08 / 3) / 2
    d = paired_comparison("A", a, "B", b)
    assert d.interval == pytest.approx((1.0 - half, 1.0 + half))
    assert d.verdict == "A better"
    assert d.sentence() == "A vs B: +1.0 [+0.7, +1.3], A better"
    swapped = paired_comparison("B", b, "A", a)
    assert swapped.interval == pytest.approx((-1.0 - half, -1.0 + half))
    assert swapped.verdict == "A better"
    assert swapped.sentence() == "B vs A: \u22121.0 [\u22121.3, \u22120.7], A better"


def test_a_zero_width_interval_is_flagged() -> None:
    d = paired_comparison("A", {0: 12.0, 1: 11.0}, "B", {0: 10.0, 1: 9.0})
    assert d.interval == (2.0, 2.0) and d.verdict == "A better"
    assert d.sentence() == (
        "A vs B: +2.0 [+2.0, +2.0], A better (every one of the 2 seeds differs by the same amount: "
        "the interval is too narrow to trust)"
    )
    assert paired_comparison("A", {0: 81.0, 1: 80.4}, "B", {0: 80.0, 1: 79.4}).note is not None  # float noise
    assert paired_comparison("A", {0: 1.0, 1: 2.0}, "B", {0: 1.0, 1: 2.0}).note is None  # identical models


def test_one_seed_gives_no_interval_and_no_verdict() -> None:
    d = paired_comparison("A", {0: 81.0}, "B", {0: 80.6})
    assert d.interval is None
    assert d.sentence() == "A vs B: +0.4, no interval with 1 seed (run more seeds)"
    assert "better" not in d.sentence() and "[" not in d.sentence()
    assert d.to_dict()["interval"] is None and d.to_dict()["n_seeds"] == 1


def test_only_shared_seeds_are_paired() -> None:
    d = paired_comparison("A", {0: 1.0, 1: 3.0, 2: 5.0}, "B", {1: 2.0, 2: 2.0, 7: 0.0})
    assert d.seeds == (1, 2) and d.mean == pytest.approx(2.0)  # (1 + 3) / 2
    with pytest.raises(CmpnasError, match="share no seed"):
        paired_comparison("A", {0: 1.0}, "B", {1: 1.0})


def test_signed_numbers() -> None:
    assert [signed(x) for x in (0.44, -0.3, 0.04, -0.04, 12.35)] == [
        "+0.4",
        "\u22120.3",
        "0.0",
        "0.0",
        "+12.3",
    ]


def test_kendall_and_spearman_of_a_known_ranking() -> None:
    # one swapped pair out of six: tau = (5 - 1) / 6; rho = 1 - 6 * (0 + 1 + 1 + 0) / (4 * (16 - 1)) = 0.8
    r = rank_correlations([1, 2, 3, 4], [10, 30, 20, 40])
    assert r["kendall"] == pytest.approx(2 / 3)
    assert r["spearman"] == pytest.approx(0.8)
    assert rank_correlations([1, 2, 3], [3, 2, 1]) == pytest.approx({"kendall": -1.0, "spearman": -1.0})
    assert rank_correlations([1, 2, 3], [5, 5, 5]) == {"kendall": None, "spearman": None}
    assert rank_correlations([1], [2]) == {"kendall": None, "spearman": None}


def _row(name: str, seed: int, hom: float, het: float, paragon: float = 90.0) -> dict:
    metrics = lambda top1: {"top1": top1, "map": top1 / 2}  # noqa: E731
    return {
        "query": {"name": name, "kind": "baseline", "seed": seed, "macs": 1000, "latency_ms_b1": 1.0 + seed},
        "paragon": metrics(paragon),
        "homogeneous": metrics(hom),
        "heterogeneous": metrics(het),
        "gap_to_paragon": {"top1": paragon - het, "map": (paragon - het) / 2},
        "cost_reduction": 10.0,
        "compatible": het > hom,
    }


def test_rows_of_seeds_aggregate_per_model() -> None:
    rows = [_row("a", 1, 70, 74), _row("b", 0, 60, 50), _row("a", 0, 72, 70)]
    groups = group_by_model(rows)
    assert [[r["query"]["seed"] for r in g] for g in groups] == [[0, 1], [0]]
    a = aggregate_model(groups[0])
    assert (a["name"], a["seeds"], a["n_seeds"]) == ("a", [0, 1], 2)
    assert a["heterogeneous"]["top1"] == pytest.approx(72.0)
    assert a["std"]["heterogeneous"]["top1"] == pytest.approx(math.sqrt(8))  # 70, 74
    assert a["gap_to_paragon"]["top1"] == pytest.approx(18.0) and a["std"]["paragon"]["top1"] == 0.0
    assert a["compatible"] is True and a["compatible_seeds"] == 1
    assert a["latency_ms_b1"] == pytest.approx(1.5)
    b = aggregate_model(groups[1])
    assert b["std"]["heterogeneous"]["top1"] is None and b["compatible"] is False
    assert by_seed(groups[0]) == {0: 70.0, 1: 74.0}
