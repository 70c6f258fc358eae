"""Search spaces as a registry: ``name -> class(space_cfg, in_chans, input_size)``.

A space owns everything a search needs of it (encoding, sample/mutate/crossover, MACs from a lookup
table, budget checks, the supernet and the standalone subnet), so the NAS code never names a space.
It sits on the model floor because a searched architecture is also a backbone (``backbone: spos``)
that ``load_model`` must build without importing the search code.

Adding a space: a module with the class, and one line in ``SPACES`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cmpnas.config import NasConfig, SpaceConfig
from cmpnas.errors import CmpnasError
from cmpnas.models.spaces.spos import SposSpace

SPACES: dict[str, Callable[..., Any]] = {
    "spos": SposSpace,
}


def register_space(name: str, cls: Callable[..., Any]) -> None:
    """Add a space under ``name`` (what ``nas.space.name`` selects)."""
    SPACES[name] = cls


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


def band_limits(nas: NasConfig, budget: float) -> tuple[float | None, float | None]:
    """The MACs band supernet paths are sampled from (None: uniform over the whole space)."""
    if nas.sample_band is None:
        return None, None
    return nas.sample_band * budget, budget
