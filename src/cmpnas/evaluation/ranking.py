"""How well an estimator ranks architectures against a noisy stand-alone target, and whether that
target is reliable enough to judge it.

Why: a supernet's estimate is only useful if it *orders* architectures the way stand-alone training
does. But the stand-alone numbers are themselves noisy (one training run per seed), so a low Kendall τ
can mean a bad estimator or a target that does not agree with itself. The split-half reliability of
the target (seed halves against each other) says which: it gives the τ a perfect estimator could
expect (the ceiling), and below a minimum reliability there is nothing to judge. A MACs-only predictor
is the baseline a supernet has to beat, since bigger models are often simply better. The same τ with the
cost taken out of both sides (``given_macs``) says whether the estimator orders architectures of equal cost,
which is all a search under a budget asks of it.

The target of one architecture is the mean over seeds of a composite: per seed, the average of the
z-scores (over architectures) of heterogeneous top-1 and heterogeneous mAP, so that neither metric's
scale dominates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmpnas.errors import CmpnasError
from cmpnas.evaluation.stats import rank_correlations

MIN_POINTS = 3  # fewer architectures than this: no correlation worth an interval


# ------------------------------------------------------------------------------------------ target
def zscores(values: Sequence[float]) -> list[float]:
    """``(v - mean) / std`` with the sample std (ddof=1), so metrics on different scales can be averaged.

    A constant list (or a single value) has no spread to standardise by: all zeros, it orders nothing.
    """
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return [0.0] * int(v.size)
    std = float(v.std(ddof=1))
    if std == 0.0 or not math.isfinite(std):
        return [0.0] * int(v.size)
    return [float(z) for z in (v - v.mean()) / std]


def _as_matrix(a: Any, name: str) -> np.ndarray:
    """``a`` as a finite float array of shape [n_archs, n_seeds], or a CmpnasError saying what is wrong."""
    m = np.asarray(a, dtype=float)
    if m.ndim != 2:
        raise CmpnasError(
            f"{name} has shape {m.shape}, not [n_archs, n_seeds].",
            "pass one row per architecture and one column per seed",
        )
    if not np.isfinite(m).all():
        raise CmpnasError(
            f"{name} holds a non-finite value (NaN or inf).", "evaluate every (architecture, seed)"
        )
    return m


def composite_target(top1: np.ndarray, map_: np.ndarray) -> np.ndarray:
    """Per-seed composite score, shape [n_archs, n_seeds]: 0.5 * (z(top1) + z(mAP)), z over architectures
    within one seed column. The target of an architecture is ``composite_target(...).mean(axis=1)``.

    Why per seed: the split-half reliability compares seeds, so each seed needs its own score; z within
    a seed removes a seed-wide offset (one seed trained better overall) that says nothing about order.
    """
    t, m = _as_matrix(top1, "top1"), _as_matrix(map_, "map_")
    if t.shape != m.shape:
        raise CmpnasError(
            f"top1 has shape {t.shape} and map_ {m.shape}.",
            "pass both metrics for the same architectures and seeds",
        )
    out = np.zeros_like(t)
    for s in range(t.shape[1]):
        out[:, s] = 0.5 * (np.asarray(zscores(t[:, s])) + np.asarray(zscores(m[:, s])))
    return out


# ------------------------------------------------------------------------------------------ reliability
def spearman_brown(r: float) -> float | None:
    """Reliability of the whole (both halves) from the correlation ``r`` of its halves: 2r / (1 + r).

    None at r = -1, where the formula has its pole.
    """
    r = min(max(float(r), -1.0), 1.0)
    if r <= -1.0:
        return None
    return 2.0 * r / (1.0 + r)


def kendall_ceiling(reliability: float | None) -> float:
    """The Kendall τ a perfect estimator can expect against a target of this reliability.

    Under a bivariate normal model the estimator–target correlation is at most sqrt(reliability), and
    Greiner's relation turns a Pearson ρ into τ = (2/π) arcsin(ρ). No positive reliability: 0.
    """
    if reliability is None or reliability <= 0.0:
        return 0.0
    return (2.0 / math.pi) * math.asin(math.sqrt(min(reliability, 1.0)))


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson r of two vectors; None when either is constant."""
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if den == 0.0:
        return None
    return min(max(float(dx @ dy) / den, -1.0), 1.0)


def split_half(per_seed: np.ndarray) -> dict[str, float | None]:
    """Split-half reliability of a per-seed target, shape [n_archs, n_seeds >= 2].

    r1: Pearson r between the mean of the even-indexed seed columns and the mean of the odd-indexed ones
    (two seeds: seed 0 against seed 1) — how well one half of the training runs predicts the other.
    r2: Spearman–Brown, the reliability of the mean over all seeds (the target actually used).
    tau_ceiling: :func:`kendall_ceiling` of r2. All None when undefined (fewer than 3 architectures,
    fewer than 2 seeds, a constant half).
    """
    m = _as_matrix(per_seed, "per_seed")
    none: dict[str, float | None] = {"r1": None, "r2": None, "tau_ceiling": None}
    if m.shape[0] < MIN_POINTS or m.shape[1] < 2:
        return none
    r1 = pearson(m[:, 0::2].mean(axis=1), m[:, 1::2].mean(axis=1))
    if r1 is None:
        return none
    r2 = spearman_brown(r1)
    return {"r1": r1, "r2": r2, "tau_ceiling": kendall_ceiling(r2)}


# ------------------------------------------------------------------------------------------ cost
def residual_on_log_cost(values: Sequence[float], cost: Sequence[float]) -> np.ndarray:
    """``values`` minus their least-squares line in log(cost): what is left once cost has said its part.

    Log, because accuracy grows about linearly in log MACs over a space's range. Equal costs leave the
    values minus their mean.
    """
    y = np.asarray(values, dtype=float)
    x = np.log(np.asarray(cost, dtype=float))
    if np.ptp(x) == 0:
        return y - y.mean()
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return y - design @ coef


def _correlations(x: np.ndarray, y: np.ndarray, cost: np.ndarray | None) -> dict[str, float | None]:
    if cost is not None:
        if len(np.unique(np.stack([x, y, cost], axis=1), axis=0)) < 3:
            # a line through two architectures fits them exactly: what is left is rounding noise, not an order
            return {"kendall": None, "spearman": None}
        # rounded: residuals equal but for float rounding are ties, not an order
        x, y = np.round(residual_on_log_cost(x, cost), 10), np.round(residual_on_log_cost(y, cost), 10)
    return rank_correlations(list(x), list(y))


# ------------------------------------------------------------------------------------------ bootstrap
def bootstrap_rank_interval(
    x: Sequence[float],
    y: Sequence[float],
    n_boot: int = 2000,
    confidence: float = 0.9,
    seed: int = 0,
    cost: Sequence[float] | None = None,
) -> dict[str, Any] | None:
    """Kendall τ and Spearman ρ of ``x`` against ``y`` with percentile bootstrap intervals.

    Why resample architectures (pairs): the architectures are the sample — another draw from the search
    space would give another τ — so the interval says how much τ depends on which ones were measured.
    Resamples where a correlation is undefined (all one value) are skipped; ``n_resamples`` counts the
    ones used. None with fewer than 3 points. With ``cost`` (> 0, one per point) both sides are first
    replaced by :func:`residual_on_log_cost`, in every resample: the rank agreement at equal cost.
    """
    if len(x) != len(y) or (cost is not None and len(cost) != len(x)):
        sizes = f"{len(x)} and {len(y)}" + ("" if cost is None else f" (cost {len(cost)})")
        raise CmpnasError(f"Bootstrap of lists of {sizes} values.", "pass paired lists")
    if cost is not None and not (np.asarray(cost, dtype=float) > 0).all():
        raise CmpnasError("A cost of 0 or less (its log is undefined).", "pass MACs > 0 for every point")
    if not 0.0 < confidence < 1.0:
        raise CmpnasError(f"Confidence {confidence} is not between 0 and 1.", "pass e.g. confidence=0.9")
    if n_boot < 1:
        raise CmpnasError(f"n_boot={n_boot} resamples.", "pass n_boot >= 1, e.g. 2000")
    n = len(x)
    if n < MIN_POINTS:
        return None
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ca = None if cost is None else np.asarray(cost, dtype=float)
    point = _correlations(xa, ya, ca)
    rng = np.random.Generator(np.random.PCG64(seed))
    taus: list[float] = []
    rhos: list[float] = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        r = _correlations(xa[idx], ya[idx], None if ca is None else ca[idx])
        if r["kendall"] is None or r["spearman"] is None:
            continue
        taus.append(r["kendall"])
        rhos.append(r["spearman"])
    q = [100.0 * (1.0 - confidence) / 2.0, 100.0 * (1.0 + confidence) / 2.0]

    def interval(values: list[float]) -> list[float] | None:
        return [float(v) for v in np.percentile(values, q)] if values else None

    return {
        "kendall": point["kendall"],
        "kendall_interval": interval(taus),
        "spearman": point["spearman"],
        "spearman_interval": interval(rhos),
        "n_resamples": len(taus),
        "confidence": confidence,
    }


# ------------------------------------------------------------------------------------------ verdict
def ranking_verdict(
    tau: float | None,
    tau_interval: Sequence[float] | None,
    tau_macs: float | None,
    r1: float | None,
    tau_ceiling: float | None,
    min_reliability: float = 0.4,
    min_tau: float = 0.5,
    min_fraction: float = 0.7,
) -> dict[str, Any]:
    """Pass / fail / not measurable for an estimator's ranking.

    Why three checks: τ alone cannot tell a weak estimator from a noisy target (hence τ as a fraction of
    the ceiling), and a good τ may just be "bigger is better" (hence the margin over the MACs-only τ,
    which must exceed the half-width of τ's interval to be more than resampling noise). Below
    ``min_reliability`` the seeds disagree too much for any τ to mean anything: not measurable.
    A constant MACs list (τ undefined) orders no pair and counts as τ = 0.
    """
    out: dict[str, Any] = {
        "verdict": "not measurable",
        "reason": "",
        "tau_at_least_min": None,
        "fraction_at_least_min": None,
        "beats_macs": None,
        "fraction_of_ceiling": None,
    }
    if r1 is None or r1 < min_reliability:
        shown = "undefined" if r1 is None else f"r1={r1:.2f} < {min_reliability:g}"
        out["reason"] = f"split-half reliability {shown}: the seeds disagree too much to judge a ranking"
        return out

    fraction = tau / tau_ceiling if tau is not None and tau_ceiling else None
    half_width = (tau_interval[1] - tau_interval[0]) / 2.0 if tau_interval is not None else None
    macs = 0.0 if tau_macs is None else tau_macs
    margin = tau - macs if tau is not None else None
    tau_ok = tau is not None and tau >= min_tau
    fraction_ok = fraction is not None and fraction >= min_fraction
    beats = margin is not None and half_width is not None and margin > half_width

    tau_s = "undefined" if tau is None else f"{tau:.2f}"
    frac_s = "undefined" if fraction is None else f"{fraction:.2f}"
    ceil_s = "undefined" if tau_ceiling is None else f"{tau_ceiling:.2f}"
    margin_s = "undefined" if margin is None else f"{margin:.2f}"
    hw_s = "undefined" if half_width is None else f"{half_width:.2f}"
    parts = [
        f"tau={tau_s} {'>=' if tau_ok else 'not >='} {min_tau:g}",
        f"tau/ceiling={frac_s} (ceiling {ceil_s}) {'>=' if fraction_ok else 'not >='} {min_fraction:g}",
        f"tau - tau_macs={margin_s} (tau_macs {macs:.2f}) {'>' if beats else 'not >'} interval half-width {hw_s}",
    ]
    checks = (tau_ok, fraction_ok, beats)
    if all(checks):
        reason = "; ".join(parts)
    else:
        reason = "; ".join(p for p, ok in zip(parts, checks, strict=True) if not ok)
    out.update(
        verdict="pass" if all(checks) else "fail",
        reason=reason,
        tau_at_least_min=tau_ok,
        fraction_at_least_min=fraction_ok,
        beats_macs=beats,
        fraction_of_ceiling=fraction,
    )
    return out


# ------------------------------------------------------------------------------------------ report
def _rounded(obj: Any, ndigits: int = 4) -> Any:
    """Plain, JSON-serialisable copy with floats rounded (numpy scalars and arrays included)."""
    if isinstance(obj, dict):
        return {k: _rounded(v, ndigits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_rounded(v, ndigits) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return round(float(obj), ndigits)
    return obj


def ranking_report(
    estimates: Sequence[float],
    macs: Sequence[float],
    top1: np.ndarray,
    map_: np.ndarray,
    n_boot: int = 2000,
    confidence: float = 0.9,
    seed: int = 0,
    **verdict_kwargs: float,
) -> dict[str, Any]:
    """The estimator's ranking against the stand-alone target, the MACs-only baseline and the verdict.

    ``estimates`` and ``macs`` have one value per architecture (higher = predicted better); ``top1`` and
    ``map_`` are the heterogeneous metrics, shape [n_archs, n_seeds]. ``given_macs`` is the estimate's τ with
    log MACs taken out of both sides (informative; not part of the verdict). ``verdict_kwargs`` go to
    :func:`ranking_verdict`. Plain floats and lists rounded to 4 digits, ready for ``json.dumps``.
    """
    per_seed = composite_target(top1, map_)
    n_archs, n_seeds = per_seed.shape
    for name, values in (("estimates", estimates), ("macs", macs)):
        if len(values) != n_archs:
            raise CmpnasError(
                f"{len(values)} {name} for {n_archs} architectures.",
                f"pass one {name} value per row of top1/map_",
            )
        if not np.isfinite(np.asarray(values, dtype=float)).all():
            raise CmpnasError(
                f"{name} holds a non-finite value (NaN or inf).", f"give every architecture its {name}"
            )
    target = per_seed.mean(axis=1)
    reliability = split_half(per_seed)
    est = bootstrap_rank_interval(estimates, list(target), n_boot=n_boot, confidence=confidence, seed=seed)
    mac = bootstrap_rank_interval(macs, list(target), n_boot=n_boot, confidence=confidence, seed=seed)
    given_macs = (
        bootstrap_rank_interval(
            estimates, list(target), n_boot=n_boot, confidence=confidence, seed=seed, cost=macs
        )
        if min(macs) > 0
        else None  # log MACs undefined
    )
    verdict = ranking_verdict(
        tau=est["kendall"] if est else None,
        tau_interval=est["kendall_interval"] if est else None,
        tau_macs=mac["kendall"] if mac else None,
        r1=reliability["r1"],
        tau_ceiling=reliability["tau_ceiling"],
        **verdict_kwargs,
    )
    return _rounded(
        {
            "n_archs": n_archs,
            "n_seeds": n_seeds,
            "target": target,
            "target_per_seed": per_seed,
            "split_half": reliability,
            "estimate": est,
            "macs_only": mac,
            "given_macs": given_macs,
            "verdict": verdict,
        }
    )
