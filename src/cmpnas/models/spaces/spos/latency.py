"""The SPOS space's latency table: every (layer, choice, scale) block timed alone at batch 1.

An efficiency predictor is a separate object from the space (as in OFA and NNI): the space says what an
architecture is and what it costs in MACs; this module times its blocks on a deployment runtime and fits the
per-run overhead so that their sum predicts a whole query model.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace

from torch import nn

from cmpnas.errors import CmpnasError
from cmpnas.models import onnx_runtime
from cmpnas.models.cost import LatencyTable, fit_overhead, latency_runtime
from cmpnas.models.heads import embedding_head
from cmpnas.models.spaces.spos.blocks import Arch, LayerSpec
from cmpnas.models.spaces.spos.networks import Head, Stem
from cmpnas.models.spaces.spos.space import SposSpace
from cmpnas.models.timing import STATISTICS, Timer, check_timing_args, measure_rounds


def query_net(space: SposSpace, arch: Arch, embed_dim: int | None = None) -> nn.Module:
    """The standalone net of ``arch`` + the embedding head: the ops an exported query model runs, so the model
    to check a latency table built with the same ``embed_dim`` against (None: the backbone)."""
    net = space.build(arch)
    if embed_dim is None:
        return net
    return nn.Sequential(net, embedding_head(space.cfg.last_channels, embed_dim))


def measure_latency_table(
    space: SposSpace,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    runtime: str = "onnxruntime",
    embed_dim: int | None = None,
    rounds: int = 10,
    statistic: str = "min",
    calibrate: int = 3,
) -> LatencyTable:
    """Measure every (layer, choice, scale) block of ``space`` alone at batch 1 (eval) in ``runtime``.

    ONNX Runtime by default: query models are deployed with it, and torch eager runs these small nets far slower,
    so a torch table says little about a deployed model.

    - Per-run overhead: every timing pays the runtime's per-run cost (``session.run`` and what a standalone graph
      adds), which a whole model pays once. With ``calibrate`` > 0 it is fitted
      (:func:`cmpnas.models.cost.fit_overhead`) on that many whole models of fixed random archs
      (:func:`query_net`) timed in the same rounds as the blocks; with ``calibrate=0`` it is the time of a probe,
      the smallest graph with one real kernel (a 1x1 conv on a 1x1x1x1 input). It is subtracted from every block
      and both fixed parts (floored at 0) and counted once in ``fixed_ms``.
    - Noise: every module is timed in ``rounds`` interleaved passes of ``repeats`` runs, the first pass during
      the exports (:func:`cmpnas.models.timing.measure_rounds`); ``statistic`` "min" (fastest run) or "p50"
      (best round's median) is what the entries hold.
    - ``embed_dim``: the fixed part also holds the embedding head (what :func:`query_net` runs).
    - Layers with the same shapes share their timings.

    A loaded machine inflates every entry, and no estimator inside one build can see that: build on an idle
    machine, and rebuild a table whose ``meta["probe_ms"]`` is unusually high. ``meta`` records how the table
    was measured and ``meta["calibration"]`` the fit's own residuals; benchmarks/latency_table.py measures how
    well tables predict whole models.
    """
    if statistic not in STATISTICS:
        raise CmpnasError(f"Unknown latency statistic {statistic!r}.", f"use one of: {', '.join(STATISTICS)}")
    if calibrate < 0:
        raise CmpnasError(f"calibrate must be >= 0 (got {calibrate}).", "pass e.g. calibrate=3")
    check_timing_args(warmup, repeats, threads, rounds)  # before minutes of exports, not after
    prepare = latency_runtime(runtime)
    started = time.perf_counter()
    image = (1, space.in_chans, space.input_size, space.input_size)
    final = space.layers[-1]
    tail: nn.Module = Head(space, affine=True)
    if embed_dim is not None:
        tail = nn.Sequential(tail, embedding_head(space.cfg.last_channels, embed_dim))
    calib_archs = [space.sample(random.Random(seed)) for seed in range(calibrate)]
    jobs: list[Callable[[], Timer]] = [
        lambda: prepare(nn.Conv2d(1, 1, 1, bias=False), (1, 1, 1, 1), threads),
        lambda: prepare(Stem(space, affine=True), image, threads),
        lambda: prepare(tail, (1, final.out_channels, final.out_size, final.out_size), threads),
    ]
    jobs += [lambda a=a: prepare(query_net(space, a, embed_dim), image, threads) for a in calib_archs]
    shape_of = [replace(spec, index=0, stage=0) for spec in space.layers]  # position left out
    cells: list[tuple[LayerSpec, str, str]] = []  # (shapes, choice, scale key) of each block job
    for spec, key in zip(space.layers, shape_of, strict=True):
        if any(cell[0] == key for cell in cells):
            continue
        shape = (1, spec.in_channels, spec.in_size, spec.in_size)
        for c, choice in enumerate(space.choices):
            for scale in space.scales:
                jobs.append(lambda i=spec.index, c=c, s=scale, x=shape: prepare(space.block(i, c, s), x, threads))
                cells.append((key, choice, LatencyTable.scale_key(scale)))
    times = [t[statistic] for t in measure_rounds(jobs, warmup=warmup, repeats=repeats, rounds=rounds)]
    probe, stem_ms, tail_ms = times[:3]
    whole_ms = times[3 : 3 + calibrate]
    raw: dict[LayerSpec, dict[str, dict[str, float]]] = {}
    for (key, choice, scale_key), ms in zip(cells, times[3 + calibrate :], strict=True):
        raw.setdefault(key, {}).setdefault(choice, {})[scale_key] = ms

    def raw_sum(arch: Arch) -> float:
        blocks = zip(shape_of, arch["blocks"], arch["scales"], strict=True)
        return stem_ms + tail_ms + sum(raw[k][space.choices[c]][LatencyTable.scale_key(s)] for k, c, s in blocks)

    overhead = probe
    if calib_archs:
        overhead = fit_overhead([raw_sum(a) for a in calib_archs], whole_ms, space.num_layers + 2)
    entries = [
        {choice: {s: max(ms - overhead, 0.0) for s, ms in row.items()} for choice, row in raw[key].items()}
        for key in shape_of
    ]
    fixed_ms = overhead + max(stem_ms - overhead, 0.0) + max(tail_ms - overhead, 0.0)
    table = LatencyTable(entries=entries, fixed_ms=fixed_ms, choices=list(space.choices))
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
