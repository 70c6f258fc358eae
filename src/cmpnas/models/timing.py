"""Timing primitives shared by the latency runtimes (torch eager in :mod:`cmpnas.models.cost`, ONNX Runtime in
:mod:`cmpnas.models.onnx_runtime`).

Why a module of its own: ``cost`` keeps the registry of runtimes and so imports the ONNX Runtime measurement,
which needs the same seeded input, argument checks and percentiles; both import them from here, no cycle.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cmpnas.errors import CmpnasError


def _sample_param(model: nn.Module) -> torch.Tensor | None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def dummy_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """A seeded random input of ``input_shape`` on the model's dtype/device: every measurement of a model
    sees the same numbers, whichever runtime times it."""
    if not input_shape or any(int(s) < 1 for s in input_shape):
        raise CmpnasError(
            f"Input shape {tuple(input_shape)} is not a valid tensor shape.",
            "pass the batch-1 shape including the batch dimension, e.g. (1, 1, 28, 28)",
        )
    ref = _sample_param(model)
    kwargs = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}
    gen = torch.Generator().manual_seed(0)
    return torch.randn(tuple(int(s) for s in input_shape), generator=gen).to(**kwargs)


def check_timing_args(warmup: int, repeats: int, threads: int | None, rounds: int = 1) -> None:
    if rounds < 1:
        raise CmpnasError(f"Latency measurement needs rounds >= 1 (got {rounds}).", "pass e.g. rounds=5")
    if repeats < 1 or warmup < 0:
        raise CmpnasError(
            f"Latency measurement needs repeats >= 1 and warmup >= 0 (got {repeats=}, {warmup=}).",
            "pass e.g. warmup=5, repeats=30",
        )
    if threads is not None and threads < 1:
        raise CmpnasError(
            f"threads must be >= 1 (got {threads}).", "pass threads=1 or None for the runtime's default"
        )


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Pin torch's intra-op threads (None: leave them) and restore them afterwards.

    Why: tiny tensors on a shared machine make OpenMP threads spin-wait in barriers; one thread is both
    faster and more reproducible (an ONNX export, for one, traces much faster with it on a 2-core box).
    """
    old = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(old)


def sample_times(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Sorted wall ms of ``repeats`` timed calls of ``fn()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return sorted(times)


def summarize(sorted_times: Sequence[float]) -> dict[str, float]:
    return {
        "p50": float(np.percentile(sorted_times, 50)),
        "p90": float(np.percentile(sorted_times, 90)),
        "mean": statistics.fmean(sorted_times),
    }


@dataclass
class Timer:
    """A prepared measurement: ``run()`` is one forward pass, ``context()`` what it must run inside (threads,
    eval mode, no_grad). Preparing (building, exporting, opening a session) is apart from timing so that
    :func:`measure_rounds` can interleave many modules."""

    run: Callable[[], object]
    context: Callable[[], AbstractContextManager[object]] = nullcontext

    def sample(self, warmup: int, repeats: int) -> list[float]:
        with self.context():
            return sample_times(self.run, warmup, repeats)

    def measure(self, warmup: int, repeats: int) -> dict[str, float]:
        return summarize(self.sample(warmup, repeats))


STATISTICS = ("min", "p50")


def measure_rounds(
    timers: Sequence[Timer | Callable[[], Timer]], *, warmup: int, repeats: int, rounds: int
) -> list[dict[str, float]]:
    """Time every timer in ``rounds`` interleaved passes of ``repeats`` runs each.

    Per timer: ``p50``/``p90``/``mean`` of its quietest round (the lowest median: best-of-``rounds``
    medians) and ``min``, its fastest run over all rounds. An item may be a factory (e.g. one ONNX export +
    session): it is prepared in the first pass and timed right away, so that pass spreads over the whole
    preparation time instead of adding a pass of its own.

    Why: on a shared machine other processes only ever add time, in bursts lasting seconds (the sum of the
    default space's block timings can nearly double between passes); a
    module timed in one go can land in a burst, so a lookup table built that way mixes quiet and loaded
    numbers. Interleaving spreads each module's rounds over the whole run, and ``min`` is the estimate least
    touched by the others.
    """
    check_timing_args(warmup, repeats, None, rounds)
    ready: list[Timer | None] = [None] * len(timers)
    quietest: list[list[float]] = [[] for _ in timers]
    fastest = [math.inf] * len(timers)
    for _ in range(rounds):
        for i, item in enumerate(timers):
            timer = ready[i]
            if timer is None:
                timer = ready[i] = item if isinstance(item, Timer) else item()
            times = timer.sample(warmup, repeats)
            fastest[i] = min(fastest[i], times[0])
            if not quietest[i] or np.percentile(times, 50) < np.percentile(quietest[i], 50):
                quietest[i] = times
    return [{**summarize(q), "min": f} for q, f in zip(quietest, fastest, strict=True)]
