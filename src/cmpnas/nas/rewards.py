"""Search rewards R1 / R2 / R3 built from a candidate's homogeneous and heterogeneous retrieval accuracy.

- R1 = M(q, q): homogeneous accuracy only (ordinary, compatibility-agnostic NAS).
- R2 = M(q, g): heterogeneous accuracy only (query model vs. the fixed gallery model).
- R3 = w * M(q, g) + (1 - w) * M(q, q).

The paper's exact form of R3 is not available from its public abstract and summaries; the weighted sum
is a configurable reconstruction. With w = 0.5 it ranks candidates exactly like the plain sum
M(q, g) + M(q, q) (it is that sum halved). New forms go into :data:`REWARDS`; nothing else has to change.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from cmpnas.config import SearchConfig
from cmpnas.errors import CmpnasError
from cmpnas.registry import Registry

# (homogeneous, heterogeneous, weight) -> reward to maximise
RewardFn = Callable[[float, float, float], float]


def _r1_homogeneous(hom: float, het: float, weight: float) -> float:
    return hom


def _r2_heterogeneous(hom: float, het: float, weight: float) -> float:
    return het


def _r3_weighted(hom: float, het: float, weight: float) -> float:
    return weight * het + (1.0 - weight) * hom


REWARDS: Registry[RewardFn] = Registry(
    "reward", {"R1": _r1_homogeneous, "R2": _r2_heterogeneous, "R3": _r3_weighted}
)


def reward(metrics: dict[str, float], name: str = "R3", weight: float = 0.5, metric: str = "top1") -> float:
    """Reward ``name`` of a candidate whose ``metrics`` hold ``hom_<metric>`` and ``het_<metric>``."""
    fn = _lookup(name)
    _check_weight(weight)
    values = []
    for side in ("hom", "het"):
        key = f"{side}_{metric}"
        if key not in metrics:
            raise CmpnasError(
                f"Reward {name} needs the metric '{key}', but the candidate only has {sorted(metrics)}.",
                "set nas.search.metric to a metric the evaluation computes (top1 or map)",
            )
        values.append(float(metrics[key]))
    return float(fn(values[0], values[1], weight))


def fitness_from_config(cfg: SearchConfig) -> Callable[[dict[str, float]], float]:
    """The fitness function the evolutionary search maximises, bound to the configured reward.

    Validates the reward name and weight now, so a typo fails before any candidate is evaluated.
    """
    _lookup(cfg.reward)
    _check_weight(cfg.reward_weight)

    def fitness(metrics: dict[str, float]) -> float:
        return reward(metrics, cfg.reward, cfg.reward_weight, cfg.metric)

    return fitness


def _lookup(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise CmpnasError(
            f"Unknown reward '{name}'.", f"set nas.search.reward to one of {sorted(REWARDS)}"
        ) from None


def _check_weight(weight: float) -> None:
    if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise CmpnasError(
            f"Reward weight {weight} is outside [0, 1].", "set nas.search.reward_weight in [0, 1]"
        )
