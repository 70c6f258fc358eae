"""The report's supernet section on hand-made figures: the ranking line quotes τ, the MACs-only τ and τ at
equal MACs as given, and quotes no τ for a target that is not measurable."""

from __future__ import annotations

from typing import Any

from cmpnas.report.supernet import supernet_markdown


def side(verdict: str, given: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "estimate": {"kendall": 0.24, "kendall_interval": [-0.18, 0.59]},
        "macs_only": {"kendall": 0.62},
        "given_macs": given,
        "split_half": {"r1": 0.73, "tau_ceiling": 0.74},
        "verdict": {"verdict": verdict, "reason": "tau=0.24 not >= 0.5"},
    }


def ranking_lines(ranking: dict[str, Any]) -> list[str]:
    return [line for line in supernet_markdown({"ranking": ranking}) if line.startswith("- Ranking")]


def test_ranking_line_quotes_tau_at_equal_macs() -> None:
    given = {"kendall": 0.3714, "kendall_interval": [-0.0571, 0.6381]}
    (line,) = ranking_lines({"n": 15, "seeds": [0, 1], "homogeneous": side("fail", given)})
    assert line == (
        "- Ranking, homogeneous (top-1 + mAP), 15 architectures x 2 seeds: Kendall τ +0.24 [-0.18, +0.59] "
        "(90 % bootstrap), MACs-only τ +0.62, at equal MACs τ +0.37 [-0.06, +0.64]; split-half reliability r1 "
        "0.73, ceiling τ 0.74: **fail** (tau=0.24 not >= 0.5)."
    )


def test_ranking_line_without_tau_at_equal_macs_and_when_not_measurable() -> None:
    (line,) = ranking_lines({"n": 15, "seeds": [0, 1], "homogeneous": side("fail", None)})
    assert "MACs-only τ +0.62; split-half" in line and "equal MACs" not in line
    (line,) = ranking_lines({"n": 15, "seeds": [0, 1], "heterogeneous": side("not measurable", None)})
    assert "not measurable at this schedule" in line and "Kendall τ" not in line
