"""The SPOS space with one channel scale per stage instead of one per layer.

Every layer of a stage shares its mid-channel scale (OFA / BigNAS keep width per stage too), so the supernet
shares its channels among far fewer width patterns: 8^4 for the default four stages against 8^10 per layer.
Blocks stay per layer. Architectures keep the per-layer JSON of :class:`SposSpace` (a stage's layers repeat
its scale), so building, MACs, export and the latency table are the parent's.
"""

from __future__ import annotations

import random
from typing import Any

from cmpnas.errors import CmpnasError
from cmpnas.models.spaces.spos.blocks import Arch
from cmpnas.models.spaces.spos.space import SposSpace


class SposStageWidthSpace(SposSpace):
    """SPOS blocks per layer, one mid-channel scale per stage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stages = sorted({spec.stage for spec in self.layers})
        self.stage_layers: list[list[int]] = [
            [spec.index for spec in self.layers if spec.stage == s] for s in stages
        ]

    # ----------------------------------------------------------------------------------- encoding
    def expand(self, stage_scales: list[float]) -> list[float]:
        """Per-layer scales from one scale per stage."""
        out = [0.0] * self.num_layers
        for scale, layers in zip(stage_scales, self.stage_layers, strict=True):
            for i in layers:
                out[i] = scale
        return out

    def stage_scales(self, arch: Arch) -> list[float]:
        """One scale per stage (the scale of each stage's first layer)."""
        return [arch["scales"][layers[0]] for layers in self.stage_layers]

    def validate(self, arch: Any) -> Arch:
        """The parent's checks, and every layer of a stage at the same scale."""
        a = super().validate(arch)
        for stage, layers in enumerate(self.stage_layers):
            found = sorted({a["scales"][i] for i in layers})
            if len(found) > 1:
                raise CmpnasError(
                    f"Architecture scales of stage {stage} (layers {layers[0]}-{layers[-1]}) differ: {found}.",
                    "give every layer of a stage the same scale, or search the per-layer space "
                    "(nas.space.name: spos)",
                )
        return a

    # ----------------------------------------------------------------------------------- operators
    def sample(self, rng: random.Random) -> Arch:
        """Uniform over blocks per layer and over scales per stage."""
        blocks = [rng.randrange(len(self.choices)) for _ in range(self.num_layers)]
        return {"blocks": blocks, "scales": self.expand([rng.choice(self.scales) for _ in self.stage_layers])}

    def mutate(self, arch: Arch, rng: random.Random, prob: float) -> Arch:
        """Resample each layer's block and each stage's scale independently with probability ``prob``."""
        a = self._mutable(arch, prob)
        for layer in range(self.num_layers):
            if rng.random() < prob:
                a["blocks"][layer] = rng.randrange(len(self.choices))
        scales = self.stage_scales(a)
        for stage in range(len(scales)):
            if rng.random() < prob:
                scales[stage] = rng.choice(self.scales)
        a["scales"] = self.expand(scales)
        return a

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Each layer's block and each stage's scale from ``a`` or ``b`` with probability 1/2."""
        a, b = self.validate(a), self.validate(b)
        blocks = [x if rng.random() < 0.5 else y for x, y in zip(a["blocks"], b["blocks"], strict=True)]
        scales = [
            x if rng.random() < 0.5 else y
            for x, y in zip(self.stage_scales(a), self.stage_scales(b), strict=True)
        ]
        return {"blocks": blocks, "scales": self.expand(scales)}

    def _stage_macs(self, arch: Arch, stage: int, scale: float) -> int:
        return sum(self.lut_macs(i, arch["blocks"][i], scale) for i in self.stage_layers[stage])

    def sample_below(self, rng: random.Random, high: float) -> Arch:
        """A random architecture with feature-extractor MACs <= ``high``: a uniform one, then a random layer's
        block or a random stage's scale moved to a random cheaper option until it fits (or nothing is cheaper)."""
        a = self.sample(rng)
        total = self.macs(a)
        while total > high:
            moves: list[tuple[str, int, Any, int]] = []
            for i in range(self.num_layers):
                now = self.lut_macs(i, a["blocks"][i], a["scales"][i])
                moves += [
                    ("block", i, c, m - now)
                    for c in range(len(self.choices))
                    if (m := self.lut_macs(i, c, a["scales"][i])) < now
                ]
            for stage, layers in enumerate(self.stage_layers):
                now = self._stage_macs(a, stage, a["scales"][layers[0]])
                moves += [
                    ("scale", stage, s, m - now)
                    for s in self.scales
                    if (m := self._stage_macs(a, stage, s)) < now
                ]
            if not moves:
                break
            units = sorted({(kind, unit) for kind, unit, *_ in moves})
            kind, unit = units[rng.randrange(len(units))]
            _, _, value, delta = rng.choice([m for m in moves if (m[0], m[1]) == (kind, unit)])
            if kind == "block":
                a["blocks"][unit] = value
            else:
                for i in self.stage_layers[unit]:
                    a["scales"][i] = value
            total += delta
        return a

    def sample_fair(self, rng: random.Random, low: float, high: float) -> Arch:
        """A path in the backbone-MACs band [low, high] that does not starve any stage's channels: one random stage
        keeps a uniformly drawn scale, the others move one scale step at a time (random stage each time) down
        while the path costs too much, or up while it costs too little."""
        a = self.sample(rng)
        keep = rng.randrange(len(self.stage_layers))
        idx = [self.scales.index(s) for s in self.stage_scales(a)]
        top = len(self.scales) - 1
        total = self.macs(a)
        for direction, outside in ((-1, lambda t: t > high), (1, lambda t: t < low)):
            while outside(total):
                movable = [
                    s for s in range(len(idx)) if s != keep and 0 <= idx[s] + direction <= top
                ]
                if not movable:
                    break
                stage = rng.choice(movable)
                before = self._stage_macs(a, stage, self.scales[idx[stage]])
                idx[stage] += direction
                total += self._stage_macs(a, stage, self.scales[idx[stage]]) - before
        a["scales"] = self.expand([self.scales[i] for i in idx])
        if total > high:  # the kept stage alone is too wide for the band: shrink anything
            return self.sample_below(rng, high)
        return a
