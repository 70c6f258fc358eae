"""The SPOS space itself: encoding, sampling and the evolution's operators, the MAC lookup table, budgets, the
path sampler of supernet training and the latency table."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from cmpnas.config import SpaceConfig, build_config
from cmpnas.errors import CmpnasError
from cmpnas.models import onnx_runtime
from cmpnas.models.cost import LatencyTable, fit_overhead, latency_runtime
from cmpnas.models.heads import embedding_head
from cmpnas.models.spaces.spos.blocks import Arch, ChoiceBlock, LayerSpec, block_macs, mid_channels, out_size
from cmpnas.models.spaces.spos.networks import Head, SposNet, Stem, Supernet
from cmpnas.models.timing import STATISTICS, Timer, check_timing_args, measure_rounds


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

        Uniform rejection sampling almost never reaches the cheap end of the space (here under 1 % of uniform
        archs cost under 0.85 MMACs in a 0.62-3.5 MMACs space), so a family's tightest budget would get no
        random candidates at all; shrinking keeps every layer's pick random while ending inside the cap.
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
        if not 0.0 <= prob <= 1.0:
            raise CmpnasError(
                f"Mutation probability {prob} is outside [0, 1].", "use e.g. 0.1 (SPOS default)"
            )
        a = self.validate(arch)
        for layer in range(self.num_layers):
            if rng.random() < prob:
                a["blocks"][layer] = rng.randrange(len(self.choices))
            if rng.random() < prob:
                a["scales"][layer] = rng.choice(self.scales)
        return a

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
    ) -> Callable[[int], Arch]:
        """Path for a global step: seeded by (seed, step) so every DDP rank samples the same path.

        Steps before ``widest_until`` train random blocks at every layer's widest scale (widest-first warm-up).
        After that a path lies in the query-MACs band [low, high], or in one of ``bands`` drawn per step (a
        family: every budget's band is trained, not only the union). ``rejection``: uniform paths rejected
        until one fits (SPOS's budget-binned sampling with one bin; after 100 misses the fair repair is used
        so training never stalls on a narrow band); ``fair``: see :meth:`sample_fair`.
        """
        hm = self.head_macs(embed_dim)
        if bands is None:
            bands = [] if low is None or high is None else [(low, high)]
        widest = max(self.scales)

        def sample(step: int) -> Arch:
            rng = random.Random(seed * 1_000_003 + step)
            if step < widest_until:
                return {
                    "blocks": [rng.randrange(len(self.choices)) for _ in range(self.num_layers)],
                    "scales": [widest] * self.num_layers,
                }
            if not bands:
                return self.sample(rng)
            lo, hi = bands[rng.randrange(len(bands))]
            if sampling == "fair":
                return self.sample_fair(rng, lo - hm, hi - hm)
            return self.sample_in_band_or_fair(rng, lo - hm, hi - hm, max_tries=100)

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

    # ----------------------------------------------------------------------------------- latency
    def block(self, layer: int, choice: int, scale: float, affine: bool = True) -> ChoiceBlock:
        """A standalone block of ``layer`` at exactly the mid width of ``scale``."""
        return ChoiceBlock(self.layers[layer], self.choices[choice], self.mid(layer, scale), affine=affine)

    def query_net(self, arch: Arch, embed_dim: int | None = None) -> nn.Module:
        """The standalone net of ``arch`` + the embedding head: the ops an exported query model runs, so the
        model to check a latency table built with the same ``embed_dim`` against (None: the backbone)."""
        net = self.build(arch)
        if embed_dim is None:
            return net
        return nn.Sequential(net, embedding_head(self.cfg.last_channels, embed_dim))

    def latency_table(
        self,
        threads: int = 1,
        repeats: int = 20,
        warmup: int = 3,
        runtime: str = "onnxruntime",
        embed_dim: int | None = None,
        rounds: int = 10,
        statistic: str = "min",
        calibrate: int = 3,
    ) -> LatencyTable:
        """Measure every (layer, choice, scale) block alone at batch 1 (eval) in ``runtime``.

        ONNX Runtime by default: query models are deployed with it, and it runs these nets ~20x
        faster than torch eager, so a torch table says little about a deployed model.

        - Per-run overhead: every timing pays the runtime's per-run cost (``session.run`` and what a
          standalone graph adds), which a whole model pays once. With ``calibrate`` > 0 it is fitted
          (:func:`cmpnas.models.cost.fit_overhead`) on that many whole models of fixed random archs
          (:meth:`query_net`) timed in the same rounds as the blocks; with ``calibrate=0`` it is the time of
          a probe, the smallest graph with one real kernel (a 1x1 conv on a 1x1x1x1 input). It is
          subtracted from every block and both fixed parts (floored at 0) and counted once in ``fixed_ms``.
        - Noise: every module is timed in ``rounds`` interleaved passes of ``repeats`` runs, the first pass
          during the exports (:func:`cmpnas.models.timing.measure_rounds`); ``statistic`` "min" (fastest
          run) or "p50" (best round's median) is what the entries hold.
        - ``embed_dim``: the fixed part also holds the embedding head (what :meth:`query_net` runs).
        - Layers with the same shapes share their timings.

        Measured on the project's 2-core VM with a 2-core job beside it (default space, ``embed_dim=128``,
        8 other random whole query models, ORT, 1 thread): the defaults predicted them within 0.7-4.6 %
        on average per build (max 6.7 %, 8 builds); the probe instead of the fit, 4.5 % (max 7.2 %); one
        build made while the machine ran 1.7x slower throughout was 1.7x high, which no estimator inside
        a build can see (``meta["probe_ms"]`` was 15 us instead of the usual 10 us): rebuild such a table.
        Cost with ORT: one export + session per distinct block (256 of 320 for the default 28x28 space)
        plus the timing passes, 13-18 s on that machine. ``meta`` records how the table was measured and
        ``meta["calibration"]`` the fit's own residuals.
        """
        if statistic not in STATISTICS:
            raise CmpnasError(
                f"Unknown latency statistic {statistic!r}.", f"use one of: {', '.join(STATISTICS)}"
            )
        if calibrate < 0:
            raise CmpnasError(f"calibrate must be >= 0 (got {calibrate}).", "pass e.g. calibrate=3")
        check_timing_args(warmup, repeats, threads, rounds)  # before minutes of exports, not after
        prepare = latency_runtime(runtime)
        started = time.perf_counter()
        image = (1, self.in_chans, self.input_size, self.input_size)
        final = self.layers[-1]
        tail: nn.Module = Head(self, affine=True)
        if embed_dim is not None:
            tail = nn.Sequential(tail, embedding_head(self.cfg.last_channels, embed_dim))
        calib_archs = [self.sample(random.Random(seed)) for seed in range(calibrate)]
        jobs: list[Callable[[], Timer]] = [
            lambda: prepare(nn.Conv2d(1, 1, 1, bias=False), (1, 1, 1, 1), threads),
            lambda: prepare(Stem(self, affine=True), image, threads),
            lambda: prepare(tail, (1, final.out_channels, final.out_size, final.out_size), threads),
        ]
        jobs += [lambda a=a: prepare(self.query_net(a, embed_dim), image, threads) for a in calib_archs]
        shape_of = [replace(spec, index=0, stage=0) for spec in self.layers]  # position left out
        cells: list[tuple[LayerSpec, str, str]] = []  # (shapes, choice, scale key) of each block job
        for spec, key in zip(self.layers, shape_of, strict=True):
            if any(cell[0] == key for cell in cells):
                continue
            shape = (1, spec.in_channels, spec.in_size, spec.in_size)
            for c, choice in enumerate(self.choices):
                for scale in self.scales:
                    jobs.append(
                        lambda i=spec.index, c=c, s=scale, x=shape: prepare(self.block(i, c, s), x, threads)
                    )
                    cells.append((key, choice, LatencyTable.scale_key(scale)))
        times = [t[statistic] for t in measure_rounds(jobs, warmup=warmup, repeats=repeats, rounds=rounds)]
        probe, stem_ms, tail_ms = times[:3]
        whole_ms = times[3 : 3 + calibrate]
        raw: dict[LayerSpec, dict[str, dict[str, float]]] = {}
        for (key, choice, scale_key), ms in zip(cells, times[3 + calibrate :], strict=True):
            raw.setdefault(key, {}).setdefault(choice, {})[scale_key] = ms

        def raw_sum(arch: Arch) -> float:
            blocks = zip(shape_of, arch["blocks"], arch["scales"], strict=True)
            return (
                stem_ms
                + tail_ms
                + sum(raw[k][self.choices[c]][LatencyTable.scale_key(s)] for k, c, s in blocks)
            )

        overhead = probe
        if calib_archs:
            overhead = fit_overhead([raw_sum(a) for a in calib_archs], whole_ms, self.num_layers + 2)
        entries = [
            {
                choice: {s: max(ms - overhead, 0.0) for s, ms in row.items()}
                for choice, row in raw[key].items()
            }
            for key in shape_of
        ]
        fixed_ms = overhead + max(stem_ms - overhead, 0.0) + max(tail_ms - overhead, 0.0)
        table = LatencyTable(entries=entries, fixed_ms=fixed_ms, choices=list(self.choices))
        table.meta = {
            "runtime": runtime,
            "threads": threads,
            "repeats": repeats,
            "warmup": warmup,
            "rounds": rounds,
            "statistic": statistic,
            "overhead_ms": overhead,
            "overhead_from": "calibration" if calib_archs else "probe",
            "probe_ms": probe,
            "calibration": [
                {
                    "arch": a,
                    "measured_ms": m,
                    "predicted_ms": table.latency_ms(a),
                    "error_pct": 100.0 * (table.latency_ms(a) - m) / m,
                }
                for a, m in zip(calib_archs, whole_ms, strict=True)
            ],
            "embed_dim": embed_dim,
            "input_shape": list(image),
            "versions": onnx_runtime.versions(),
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        return table


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
