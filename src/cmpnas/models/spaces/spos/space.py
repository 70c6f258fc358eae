"""The SPOS space itself: encoding, sampling and the evolution's operators, the MAC lookup table, budgets and
the path sampler of supernet training. Its latency table is measured apart (:mod:`.latency`)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from cmpnas.config import SpaceConfig, build_config
from cmpnas.errors import CmpnasError
from cmpnas.models.cost import LatencyTable
from cmpnas.models.spaces.spos.blocks import Arch, ChoiceBlock, LayerSpec, block_macs, mid_channels, out_size
from cmpnas.models.spaces.spos.networks import SposNet, Supernet


class SposSpace:
    """The search space: shapes, architecture encoding and operators, and the MAC lookup table."""

    def __init__(self, cfg: SpaceConfig | dict[str, Any], in_chans: int = 1, input_size: int = 28) -> None:
        if isinstance(cfg, dict):
            cfg = build_config(cfg, model=SpaceConfig)
        self.cfg = cfg
        self.in_chans, self.input_size = int(in_chans), int(input_size)
        _check_space(cfg, self.in_chans, self.input_size)
        self.choices: list[str] = list(cfg.choices)
        self.scales: list[float] = [float(s) for s in cfg.channel_scales]
        self.stem_size = out_size(self.input_size, cfg.stem_stride)
        self.layers: list[LayerSpec] = self._layer_specs()
        self.num_layers = len(self.layers)
        final = self.layers[-1]
        self.stem_macs = self.stem_size**2 * self.in_chans * cfg.stem_channels * 9
        self.last_macs = final.out_size**2 * final.out_channels * cfg.last_channels
        # _table[layer][choice][scale] -> MACs; min/max per layer make min_macs/max_macs exact.
        self._table = [
            [[block_macs(spec, choice, mid) for mid in spec.mids] for choice in self.choices]
            for spec in self.layers
        ]

    def _layer_specs(self) -> list[LayerSpec]:
        cfg, specs = self.cfg, []
        channels, size = cfg.stem_channels, self.stem_size
        for stage, (repeats, width, stride) in enumerate(
            zip(cfg.stage_repeats, cfg.stage_widths, cfg.stage_strides, strict=True)
        ):
            for i in range(repeats):
                s = stride if i == 0 else 1
                mids = tuple(mid_channels(width, scale) for scale in cfg.channel_scales)
                out = out_size(size, s)
                specs.append(LayerSpec(len(specs), stage, channels, width, s, i == 0, size, out, mids))
                channels, size = width, out
        return specs

    # ----------------------------------------------------------------------------------- encoding
    def validate(self, arch: Any) -> Arch:
        """Return a normalised copy of ``arch`` or raise CmpnasError naming the bad gene."""
        fix = (
            f"use {self.num_layers} block indices in 0..{len(self.choices) - 1} and scales from {self.scales}"
        )
        if not isinstance(arch, dict) or "blocks" not in arch:
            raise CmpnasError(f"Architecture must be a mapping with a 'blocks' list (got {arch!r:.80}).", fix)
        extra = set(arch) - {"blocks", "scales"}
        if extra:
            raise CmpnasError(
                f"Architecture has unknown keys {sorted(extra)}.", "keep only 'blocks' and 'scales'"
            )
        blocks = arch["blocks"]
        scales = arch.get("scales")
        if scales is None and len(self.scales) == 1 and isinstance(blocks, Sequence):
            scales = [self.scales[0]] * len(blocks)  # single-scale space: scales may be omitted
        for name, genes in (("blocks", blocks), ("scales", scales)):
            if not isinstance(genes, Sequence) or isinstance(genes, str):
                raise CmpnasError(f"Architecture '{name}' must be a list (got {genes!r:.80}).", fix)
            if len(genes) != self.num_layers:
                raise CmpnasError(
                    f"Architecture '{name}' has {len(genes)} entries, the space {self.num_layers} layers.",
                    fix,
                )
        out_blocks = []
        for layer, gene in enumerate(blocks):
            if isinstance(gene, bool) or not isinstance(gene, int) or not 0 <= gene < len(self.choices):
                raise CmpnasError(
                    f"Architecture blocks[{layer}] = {gene!r} is not a valid choice index.", fix
                )
            out_blocks.append(int(gene))
        out_scales = []
        for layer, gene in enumerate(scales):
            match = None
            if isinstance(gene, int | float) and not isinstance(gene, bool):
                match = next((s for s in self.scales if math.isclose(s, float(gene), abs_tol=1e-9)), None)
            if match is None:
                raise CmpnasError(
                    f"Architecture scales[{layer}] = {gene!r} is not one of the space's scales.", fix
                )
            out_scales.append(match)
        return {"blocks": out_blocks, "scales": out_scales}

    def arch_key(self, arch: Arch) -> str:
        """Canonical string of an architecture (memo-table key); equal archs give equal keys."""
        a = self.validate(arch)
        return "b" + "".join(str(b) for b in a["blocks"]) + "|s" + ",".join(f"{s:g}" for s in a["scales"])

    def mid(self, layer: int, scale: float) -> int:
        return self.layers[layer].mids[self.scales.index(scale)]

    # ----------------------------------------------------------------------------------- operators
    def sample(self, rng: random.Random) -> Arch:
        """Uniform over blocks and scales, independently per layer (SPOS single-path sampling)."""
        return {
            "blocks": [rng.randrange(len(self.choices)) for _ in range(self.num_layers)],
            "scales": [rng.choice(self.scales) for _ in range(self.num_layers)],
        }

    def sample_below(self, rng: random.Random, high: float) -> Arch:
        """A random architecture with feature-extractor MACs <= ``high``: a uniform one, then random layers moved
        to a random cheaper (block, scale) until it fits (or nothing is cheaper).

        Uniform rejection sampling rarely reaches the cheap end of the space, so a family's tightest budget would
        get no random candidates at all; shrinking keeps every layer's pick random while ending inside the cap.
        """
        a = self.sample(rng)
        cost = [self.lut_macs(i, a["blocks"][i], a["scales"][i]) for i in range(self.num_layers)]
        total = self.stem_macs + self.last_macs + sum(cost)
        while total > high:
            cheaper = [
                (i, c, s, m)
                for i in range(self.num_layers)
                for c in range(len(self.choices))
                for s in self.scales
                if (m := self.lut_macs(i, c, s)) < cost[i]
            ]
            if not cheaper:
                break
            layer = rng.choice(sorted({i for i, *_ in cheaper}))
            _, c, s, m = rng.choice([x for x in cheaper if x[0] == layer])
            a["blocks"][layer], a["scales"][layer] = c, s
            total += m - cost[layer]
            cost[layer] = m
        return a

    def mutate(self, arch: Arch, rng: random.Random, prob: float) -> Arch:
        """Resample every gene (each layer's block and its scale) independently with probability ``prob``."""
        a = self._mutable(arch, prob)
        for layer in range(self.num_layers):
            if rng.random() < prob:
                a["blocks"][layer] = rng.randrange(len(self.choices))
            if rng.random() < prob:
                a["scales"][layer] = rng.choice(self.scales)
        return a

    def _mutable(self, arch: Arch, prob: float) -> Arch:
        """A validated copy of ``arch`` to mutate with probability ``prob`` (checked)."""
        if not 0.0 <= prob <= 1.0:
            raise CmpnasError(
                f"Mutation probability {prob} is outside [0, 1].", "use e.g. 0.1 (SPOS default)"
            )
        return self.validate(arch)

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Per-gene uniform crossover: each block and scale comes from ``a`` or ``b`` with probability 1/2."""
        a, b = self.validate(a), self.validate(b)
        return {
            key: [x if rng.random() < 0.5 else y for x, y in zip(a[key], b[key], strict=True)]
            for key in ("blocks", "scales")
        }

    # ----------------------------------------------------------------------------------- MACs
    def macs(self, arch: Arch) -> int:
        """Feature-extractor MACs: stem + the chosen block per layer + last conv (no embedding head)."""
        a = self.validate(arch)
        total = self.stem_macs + self.last_macs
        for layer, (choice, scale) in enumerate(zip(a["blocks"], a["scales"], strict=True)):
            total += self.lut_macs(layer, choice, scale)
        return total

    def lut_macs(self, layer: int, choice: int, scale: float) -> int:
        """MACs of one (layer, choice index, scale) entry of the lookup table."""
        return self._table[layer][choice][self.scales.index(scale)]

    def min_macs(self) -> int:
        return self.stem_macs + self.last_macs + sum(min(min(row) for row in layer) for layer in self._table)

    def max_macs(self) -> int:
        return self.stem_macs + self.last_macs + sum(max(max(row) for row in layer) for layer in self._table)

    def sample_in_band(
        self, rng: random.Random, low: float, high: float, max_tries: int = 500
    ) -> Arch | None:
        """Rejection-sample a uniform architecture with ``low <= macs <= high``.

        SPOS's FLOPs-binned sampling draws a bin, then calls this. Returns None when the band is infeasible
        or all ``max_tries`` draws miss it (the caller decides whether to fall back to uniform sampling).
        """
        if low > high:
            raise CmpnasError(f"MAC band [{low:g}, {high:g}] is empty.", "pass low <= high")
        if high < self.min_macs() or low > self.max_macs():
            return None
        for _ in range(max_tries):
            arch = self.sample(rng)
            if low <= self.macs(arch) <= high:
                return arch
        return None

    def lut(self) -> dict[str, Any]:
        """The MAC lookup table as JSON: fixed parts plus per-(layer, choice, scale) block MACs."""
        layers = []
        for spec, row in zip(self.layers, self._table, strict=True):
            layers.append(
                {
                    "index": spec.index,
                    "stage": spec.stage,
                    "in_channels": spec.in_channels,
                    "out_channels": spec.out_channels,
                    "stride": spec.stride,
                    "project": spec.project,
                    "in_size": spec.in_size,
                    "out_size": spec.out_size,
                    "mids": {
                        LatencyTable.scale_key(s): m for s, m in zip(self.scales, spec.mids, strict=True)
                    },
                    "macs": {
                        choice: {
                            LatencyTable.scale_key(s): m for s, m in zip(self.scales, per_scale, strict=True)
                        }
                        for choice, per_scale in zip(self.choices, row, strict=True)
                    },
                }
            )
        return {
            "unit": "MACs",
            "input_shape": [1, self.in_chans, self.input_size, self.input_size],
            "stem": self.stem_macs,
            "last": self.last_macs,
            "choices": self.choices,
            "scales": self.scales,
            "layers": layers,
        }

    # ----------------------------------------------------------------------------------- budget
    def head_macs(self, embed_dim: int) -> int:
        """MACs of the embedding head on top of the space's features (Linear last_channels -> D)."""
        return self.cfg.last_channels * embed_dim

    def query_macs(self, arch: Arch, embed_dim: int) -> int:
        """Cost of a query model built from ``arch``: backbone LUT + embedding head (what count_macs gives)."""
        return self.macs(arch) + self.head_macs(embed_dim)

    def check_budget(self, budget: float, embed_dim: int) -> None:
        cheapest = self.min_macs() + self.head_macs(embed_dim)
        if budget < cheapest:
            raise CmpnasError(
                f"The MACs budget {_macs_text(budget)} is below the cheapest architecture of the space "
                f"({_macs_text(cheapest)}).",
                "raise nas.budget_macs / lower nas.budget_cost_reduction, or shrink the space (stage_widths, channel_scales)",
            )

    def path_sampler(
        self,
        seed: int,
        low: float | None,
        high: float | None,
        embed_dim: int,
        *,
        sampling: str = "rejection",
        widest_until: int = 0,
        bands: Sequence[tuple[float, float]] | None = None,
        sandwich: bool = False,
    ) -> Callable[[int], Arch | list[Arch]]:
        """Path for a global step: seeded by (seed, step) so every DDP rank samples the same path.

        Steps before ``widest_until`` train random blocks at every layer's widest scale (widest-first warm-up).
        After that a path lies in the query-MACs band [low, high], or in one of ``bands`` drawn per step (a
        family: every budget's band is trained, not only the union). ``rejection``: uniform paths rejected
        until one fits (SPOS's budget-binned sampling with one bin; after 100 misses the fair repair is used
        so training never stalls on a narrow band); ``fair``: see :meth:`sample_fair`. With ``sandwich`` a
        step after the warm-up is three paths: the space's widest (random blocks), the in-band path and the
        space's narrowest (random blocks), widest first.
        """
        hm = self.head_macs(embed_dim)
        if bands is None:
            bands = [] if low is None or high is None else [(low, high)]
        widest, narrowest = max(self.scales), min(self.scales)

        def at_scale(rng: random.Random, scale: float) -> Arch:
            return {
                "blocks": [rng.randrange(len(self.choices)) for _ in range(self.num_layers)],
                "scales": [scale] * self.num_layers,
            }

        def in_band(rng: random.Random) -> Arch:
            if not bands:
                return self.sample(rng)
            lo, hi = bands[rng.randrange(len(bands))]
            if sampling == "fair":
                return self.sample_fair(rng, lo - hm, hi - hm)
            return self.sample_in_band_or_fair(rng, lo - hm, hi - hm, max_tries=100)

        def sample(step: int) -> Arch | list[Arch]:
            rng = random.Random(seed * 1_000_003 + step)
            if step < widest_until:
                return at_scale(rng, widest)
            if sandwich:
                return [at_scale(rng, widest), in_band(rng), at_scale(rng, narrowest)]
            return in_band(rng)

        return sample

    def sample_in_band_or_fair(self, rng: random.Random, low: float, high: float, max_tries: int) -> Arch:
        """A uniform in-band path (rejection), or the fair repair when ``max_tries`` draws miss a narrow band."""
        arch = self.sample_in_band(rng, low, high, max_tries=max_tries)
        return arch if arch is not None else self.sample_fair(rng, low, high)

    def sample_fair(self, rng: random.Random, low: float, high: float) -> Arch:
        """A path in the backbone-MACs band [low, high] whose width does not starve any layer's channels.

        Rejection keeps only paths that happen to be narrow where the band is cheap, so wide channels are rarely
        trained. Here one random layer keeps a uniformly drawn scale and the other layers are moved one scale step
        at a time (random layer each time) down while the path costs too much, or up while it costs too little.
        """
        a = self.sample(rng)
        keep = rng.randrange(self.num_layers)
        idx = [self.scales.index(s) for s in a["scales"]]
        top = len(self.scales) - 1

        def cost(layer: int) -> int:
            return self.lut_macs(layer, a["blocks"][layer], self.scales[idx[layer]])

        total = self.stem_macs + self.last_macs + sum(cost(i) for i in range(self.num_layers))
        for direction, outside in ((-1, lambda t: t > high), (1, lambda t: t < low)):
            while outside(total):
                movable = [
                    i for i in range(self.num_layers) if i != keep and 0 <= idx[i] + direction <= top
                ]
                if not movable:
                    break
                layer = rng.choice(movable)
                before = cost(layer)
                idx[layer] += direction
                total += cost(layer) - before
        a["scales"] = [self.scales[i] for i in idx]
        if total > high:  # the kept layer alone is too wide for the band: shrink anything
            return self.sample_below(rng, high)
        return a

    # ----------------------------------------------------------------------------------- networks
    def build(self, arch: Arch) -> SposNet:
        """The standalone network of ``arch`` (for retraining, counting MACs, export)."""
        return SposNet(self, arch)

    def supernet(self) -> Supernet:
        """The weight-sharing supernet over every path of the space."""
        return Supernet(self)

    def block(self, layer: int, choice: int, scale: float, affine: bool = True) -> ChoiceBlock:
        """A standalone block of ``layer`` at exactly the mid width of ``scale``."""
        return ChoiceBlock(self.layers[layer], self.choices[choice], self.mid(layer, scale), affine=affine)


def _check_space(cfg: SpaceConfig, in_chans: int, input_size: int) -> None:
    """Shape rules the pydantic model cannot express; each error names the key to change."""
    n = len(cfg.stage_repeats)
    if n == 0 or len(cfg.stage_widths) != n or len(cfg.stage_strides) != n:
        raise CmpnasError(
            f"nas.space has {n} stage_repeats, {len(cfg.stage_widths)} stage_widths and "
            f"{len(cfg.stage_strides)} stage_strides.",
            "give the three lists the same (non-zero) length",
        )
    if any(r < 1 for r in cfg.stage_repeats):
        raise CmpnasError(
            f"nas.space.stage_repeats {cfg.stage_repeats} has a stage with < 1 block.", "use >= 1"
        )
    if any(s not in (1, 2) for s in cfg.stage_strides):
        raise CmpnasError(
            f"nas.space.stage_strides {cfg.stage_strides} must be 1 or 2.", "use 1 or 2 per stage"
        )
    previous = cfg.stem_channels
    for width in cfg.stage_widths:
        if width % 2 or width <= previous:
            raise CmpnasError(
                f"nas.space.stage_widths {cfg.stage_widths}: width {width} must be even and larger than the "
                f"previous width {previous} (the first stage: above stem_channels).",
                "use increasing even widths, each above stem_channels",
            )
        previous = width
    if not cfg.choices or len(set(cfg.choices)) != len(cfg.choices):
        raise CmpnasError(
            f"nas.space.choices {cfg.choices} must be non-empty and distinct.", "remove duplicates"
        )
    if not cfg.channel_scales or any(s <= 0 for s in cfg.channel_scales):
        raise CmpnasError(
            f"nas.space.channel_scales {cfg.channel_scales} must be positive.", "use e.g. [1.0]"
        )
    if len(set(cfg.channel_scales)) != len(cfg.channel_scales):
        raise CmpnasError(
            f"nas.space.channel_scales {cfg.channel_scales} has duplicates.", "remove duplicates"
        )
    if in_chans < 1 or input_size < 1:
        raise CmpnasError(
            f"Input {in_chans}x{input_size}x{input_size} is not an image shape.", "use e.g. 1x28x28"
        )


def _macs_text(macs: float) -> str:
    """MACs for a message: millions with 3 decimals, or the plain count when that would read 0.000 M."""
    return f"{macs / 1e6:.3f} M MACs" if macs >= 1e4 else f"{macs:,.0f} MACs"
