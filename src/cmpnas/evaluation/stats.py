"""Statistics over repeated runs: mean ± std over seeds, paired differences with a t interval, rank
correlations.

Why: one training run per model cannot tell a real difference between two query models from
run-to-run noise (README: "the rewards differ by less than run-to-run noise"). Each query model is
trained once per seed on the same gallery and data, so two models are compared *paired* by seed;
with fewer than two seeds there is no interval, and none is invented.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

from cmpnas.errors import CmpnasError

CONFIDENCE = 0.95
SETTINGS = ("paragon", "homogeneous", "heterogeneous", "gap_to_paragon")
MINUS = "\u2212"  # typographic minus, as in "−0.3"


# ------------------------------------------------------------------------------------------ summaries
@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof=1) of one number over ``n`` seeds."""

    mean: float
    std: float | None  # None with a single value: one run says nothing about the spread
    n: int


def summarize(values: Sequence[float]) -> Summary:
    """Mean ± sample std of ``values`` (std is None for one value)."""
    if not values:
        raise CmpnasError("No values to summarize.", "evaluate at least one seed")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Summary(mean, std, n)


def format_mean_std(s: Summary, ndigits: int = 1) -> str:
    """``"81.9 ± 0.4"`` with two or more seeds; the single value to two decimals with one seed."""
    if s.std is None:
        return f"{s.mean:.2f}"
    return f"{s.mean:.{ndigits}f} ± {s.std:.{ndigits}f}"


def _metric_table(rows: Sequence[Mapping[str, Any]], setting: str) -> tuple[dict[str, float], dict]:
    """Mean and std per metric key of one setting (paragon / homogeneous / ...) over rows."""
    keys = [k for k, v in rows[0][setting].items() if isinstance(v, (int, float)) and v is not None]
    means, stds = {}, {}
    for k in keys:
        s = summarize([float(r[setting][k]) for r in rows])
        means[k], stds[k] = s.mean, s.std
    return means, stds


def aggregate_model(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One query model's rows (one per seed, from ``compare``) -> means, stds and the per-seed numbers."""
    first = rows[0]
    out: dict[str, Any] = {
        "name": first["query"]["name"],
        "kind": first["query"].get("kind"),
        "seeds": [int(r["query"].get("seed", 0)) for r in rows],
        "n_seeds": len(rows),
        "macs": first["query"]["macs"],
        "cost_reduction": first["cost_reduction"],
        "latency_ms_b1": summarize([float(r["query"].get("latency_ms_b1", math.nan)) for r in rows]).mean,
        "std": {},
    }
    for setting in SETTINGS:
        out[setting], out["std"][setting] = _metric_table(rows, setting)
    out["compatible"] = out["heterogeneous"]["top1"] > out["homogeneous"]["top1"]
    out["compatible_seeds"] = sum(bool(r["compatible"]) for r in rows)
    return out


def group_by_model(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Rows grouped by query model name, in first-seen order (each group sorted by seed)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["query"]["name"], []).append(r)
    return [sorted(g, key=lambda r: int(r["query"].get("seed", 0))) for g in groups.values()]


def by_seed(rows: Sequence[Mapping[str, Any]], setting: str = "heterogeneous", metric: str = "top1") -> dict:
    """``{seed: value}`` of one model's rows, the input of :func:`paired_comparison`."""
    return {int(r["query"].get("seed", 0)): float(r[setting][metric]) for r in rows}


# ------------------------------------------------------------------------------------------ paired
def t_interval(diffs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided paired-t interval of the mean difference; None with fewer than two pairs."""
    if len(diffs) < 2:
        return None
    with warnings.catch_warnings():  # identical differences: scipy warns, and the interval is the point itself
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_1samp(list(diffs), 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class PairedDifference:
    """A minus B on the seeds both were run with, and its interval (None with one seed)."""

    a: str
    b: str
    mean: float
    interval: tuple[float, float] | None
    seeds: tuple[int, ...]
    confidence: float = CONFIDENCE

    @property
    def verdict(self) -> str:
        """Not distinguishable when the interval holds 0, else which side is better (higher)."""
        if self.interval is None:
            return f"no interval with {len(self.seeds)} seed (run more seeds)"
        low, high = self.interval
        if low <= 0 <= high:
            return "not distinguishable"
        return f"{self.a} better" if self.mean > 0 else f"{self.b} better"

    @property
    def note(self) -> str | None:
        """A zero-width interval (every seed differs by the same amount, e.g. top-1 on a small test split moves
        in whole images) says the spread was not seen, not that there is none."""
        flat = self.interval is not None and math.isclose(*self.interval, rel_tol=0, abs_tol=1e-9)
        if flat and abs(self.mean) > 1e-9:
            return f"every one of the {len(self.seeds)} seeds differs by the same amount: the interval is too narrow to trust"
        return None

    def sentence(self, ndigits: int = 1) -> str:
        """E.g. ``"A vs B: +0.4 [−0.3, +1.1], not distinguishable"`` (numbers to ``ndigits`` decimals)."""
        interval = (
            ""
            if self.interval is None
            else f" [{signed(self.interval[0], ndigits)}, {signed(self.interval[1], ndigits)}]"
        )
        note = f" ({self.note})" if self.note else ""
        return f"{self.a} vs {self.b}: {signed(self.mean, ndigits)}{interval}, {self.verdict}{note}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "mean_difference": self.mean,
            "interval": list(self.interval) if self.interval is not None else None,
            "confidence": self.confidence,
            "method": "paired t over seeds" if self.interval is not None else "none (one seed)",
            "seeds": list(self.seeds),
            "n_seeds": len(self.seeds),
            "verdict": self.verdict,
            "note": self.note,
            "sentence": self.sentence(),
        }


def paired_comparison(
    a: str,
    a_by_seed: Mapping[int, float],
    b: str,
    b_by_seed: Mapping[int, float],
    confidence: float = CONFIDENCE,
) -> PairedDifference:
    """A − B paired by seed (only the seeds both have); a t interval over seeds when there are ≥ 2."""
    seeds = tuple(sorted(set(a_by_seed) & set(b_by_seed)))
    if not seeds:
        raise CmpnasError(
            f"'{a}' and '{b}' share no seed, so they cannot be compared pairwise.",
            "run both with the same run.seeds",
        )
    diffs = [a_by_seed[s] - b_by_seed[s] for s in seeds]
    return PairedDifference(a, b, summarize(diffs).mean, t_interval(diffs, confidence), seeds, confidence)


def signed(x: float, ndigits: int = 1) -> str:
    """``+0.4`` / ``−0.3`` / ``0.0`` (a typographic minus; no signed zero)."""
    r = round(x, ndigits)
    if r == 0:
        return f"{0:.{ndigits}f}"
    return f"{r:+.{ndigits}f}".replace("-", MINUS)


# ------------------------------------------------------------------------------------------ ranks
def rank_correlations(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
    """Kendall τ and Spearman ρ of two paired lists (None when undefined: < 2 points or a constant list)."""
    if len(x) != len(y):
        raise CmpnasError(f"Rank correlation of lists of {len(x)} and {len(y)} values.", "pass paired lists")
    if len(x) < 2:
        return {"kendall": None, "spearman": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        tau = float(stats.kendalltau(x, y)[0])
        rho = float(stats.spearmanr(x, y)[0])
    return {"kendall": None if math.isnan(tau) else tau, "spearman": None if math.isnan(rho) else rho}
