"""Search spaces as a registry: ``name -> class(space_cfg, in_chans, input_size)``.

A space owns everything a search needs of it (encoding, sample/mutate/crossover, MACs from a lookup
table, budget checks, the supernet and the standalone subnet), so the NAS code never names a space.
It sits on the model floor because a searched architecture is also a backbone (``backbone: spos``)
that ``load_model`` must build without importing the search code.

Adding a space: a module with the class, and one line in ``SPACES`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cmpnas.config import NasConfig, SpaceConfig
from cmpnas.errors import CmpnasError
from cmpnas.models.spaces.spos import SposSpace, SposStageWidthSpace
from cmpnas.registry import Registry

SPACES: Registry[Callable[..., Any]] = Registry(
    "search space", {"spos": SposSpace, "spos-stage": SposStageWidthSpace}
)


def register_space(name: str, cls: Callable[..., Any]) -> None:
    """Add a space under ``name`` (what ``nas.space.name`` selects)."""
    SPACES.register(name, cls)


def create_space(cfg: SpaceConfig | dict[str, Any], in_chans: int = 1, input_size: int = 28) -> Any:
    """The space named by ``cfg.name`` for inputs of ``in_chans`` x ``input_size`` px."""
    name = cfg.get("name", "spos") if isinstance(cfg, dict) else cfg.name
    if name not in SPACES:
        raise CmpnasError(f"Unknown search space '{name}'.", f"set nas.space.name to one of: {', '.join(SPACES)}")
    return SPACES[name](cfg, in_chans=in_chans, input_size=input_size)


def space_backbone(in_chans: int = 1, arch: dict | None = None, **kwargs: Any) -> tuple[Any, int]:
    """Backbone factory for a searched architecture (``backbone: spos``, ``arch: {...}``)."""
    if arch is None:
        raise CmpnasError(
            "Backbone 'spos' needs an architecture.", "pass --arch FILE.json (e.g. from search.json)"
        )
    space = create_space(
        dict(kwargs.get("space", {})), in_chans=in_chans, input_size=int(kwargs.get("input_size", 28))
    )
    net = space.build(space.validate(arch))
    return net, int(net.num_features)


def budget_from(nas: NasConfig, gallery_macs: int) -> float:
    """The query MACs budget: absolute, or the gallery's MACs over the wanted cost reduction."""
    if nas.budget_macs is not None:
        return float(nas.budget_macs)
    if nas.budget_cost_reduction is None:
        raise CmpnasError("No query budget set.", "set nas.budget_macs or nas.budget_cost_reduction")
    return gallery_macs / nas.budget_cost_reduction


@dataclass(frozen=True)
class Budget:
    """A resolved budget of one family member: the query model's MACs cap (embedding head included) and/or a cap
    on the latency table's prediction; None = no cap of that kind."""

    name: str
    macs: float | None
    latency_ms: float | None
    floor_macs: float | None = None  # a member must cost at least this much (``nas.family_floor`` x cap)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "macs": self.macs, "latency_ms": self.latency_ms}
        return out if self.floor_macs is None else {**out, "floor_macs": self.floor_macs}


def family_budgets(nas: NasConfig, gallery_macs: int) -> list[Budget]:
    """``nas.budgets`` with cost reductions turned into MACs caps, and ``nas.family_floor`` into MACs floors ([]
    when the config has no family)."""
    out = []
    for b in nas.budgets or []:
        cap = float(b.macs) if b.macs is not None else (gallery_macs / b.cost_reduction if b.cost_reduction else None)
        floor = nas.family_floor * cap if nas.family_floor is not None and cap is not None else None
        out.append(Budget(b.label(), cap, b.latency_ms, floor))
    return out


def sample_bands(nas: NasConfig, budget: float, family: list[Budget] | None = None) -> list[tuple[float, float]]:
    """The query-MACs bands supernet paths are drawn from, one per MACs cap: [band x cap, cap] ([] = uniform).

    A family's caps each get their own band, drawn in turn: the union's uniform samples would almost never reach
    the tightest cap, and a budget whose band was never trained is one the supernet cannot rank.
    """
    if nas.sample_band is None:
        return []
    caps = sorted({budget, *(b.macs for b in family or [] if b.macs is not None)})
    return [(nas.sample_band * cap, cap) for cap in caps]
