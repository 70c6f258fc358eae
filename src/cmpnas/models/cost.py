"""Model cost: a MAC counter and measured CPU latency.

MACs are counted the way SPOS and fvcore count them: convolutions and linear layers only (BN, ReLU,
pooling, shuffles and concatenations are free). One multiply-accumulate = 1 MAC = 2 FLOPs; the unit is
MACs everywhere in cmpnas. The counter uses forward hooks on ``nn.Conv*``/``nn.Linear`` modules, so a
convolution called as ``F.conv2d`` directly (e.g. the supernet's sliced weights) is not seen: count a
standalone model from :func:`cmpnas.models.spaces.spos.build` instead.

Latency is measured, not predicted: on CPU, MACs are a poor predictor of time for depthwise/shuffle nets
(the latency table's measurements show it), so a latency cap needs real timings. A measurement runs in one of
:data:`LATENCY_RUNTIMES`: torch eager, or ONNX Runtime (how query models are deployed, ~20x
faster on these nets, so the number a latency budget should be about). A :class:`LatencyTable` sums
per-block timings; :func:`check_prediction` compares its prediction with a whole model's measured time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from cmpnas.errors import CmpnasError
from cmpnas.io import read_json, write_json_atomic
from cmpnas.models.onnx_runtime import prepare_onnx
from cmpnas.models.timing import Timer, check_timing_args, dummy_input, measure_rounds, torch_threads
from cmpnas.registry import Registry


def _prod(values: Any) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _conv_macs(module: _ConvNd, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    kernel = _prod(module.kernel_size)
    if isinstance(module, _ConvTransposeNd):
        # Every input element is scattered into out_channels/groups outputs over the kernel window.
        return inputs[0].numel() * (module.out_channels // module.groups) * kernel
    return output.numel() * (module.in_channels // module.groups) * kernel


def _linear_macs(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    # output.numel() = batch (x any extra leading dims) * out_features.
    return output.numel() * module.in_features


def _run_forward(model: nn.Module, x: torch.Tensor, forward_kwargs: dict | None) -> None:
    try:
        model(x, **(forward_kwargs or {}))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CmpnasError(
            f"The model's forward pass failed on an input of shape {tuple(x.shape)}: {str(exc)[:200]}.",
            "pass the input shape the model was built for (batch 1, channels, height, width)",
        ) from None


def count_macs(model: nn.Module, input_shape: tuple[int, ...], forward_kwargs: dict | None = None) -> int:
    """MACs of one forward pass on a tensor of ``input_shape`` (batch included, normally 1).

    Counts Conv (output elements x in_channels/groups x kernel area) and Linear (batch x in x out) only.
    The model's train/eval mode is restored afterwards; the forward runs in eval mode without grad so
    BN running statistics are not touched.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, _ConvNd):
            total += _conv_macs(module, inputs, output)
        elif isinstance(module, nn.Linear):
            total += _linear_macs(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _run_forward(model, dummy_input(model, input_shape), forward_kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


def prepare_torch(
    model: nn.Module, input_shape: Sequence[int], threads: int | None = 1, forward_kwargs: dict | None = None
) -> Timer:
    """A timer of one torch eager forward on the seeded input, run in eval mode without grad on ``threads``
    intra-op threads (mode and threads restored after each measurement)."""
    check_timing_args(0, 1, threads)
    x = dummy_input(model, input_shape)

    @contextmanager
    def context() -> Iterator[None]:
        was_training = model.training
        try:
            model.eval()
            with torch_threads(threads), torch.no_grad():
                yield
        finally:
            model.train(was_training)

    return Timer(lambda: _run_forward(model, x, forward_kwargs), context)


def measure_latency_ms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = 1,
    forward_kwargs: dict | None = None,
) -> dict[str, float]:
    """Wall-clock time of one forward pass (torch eager, eval, no_grad) in milliseconds.

    Returns ``{"p50", "p90", "mean"}`` over ``repeats`` timed runs after ``warmup`` untimed ones.
    ``threads`` pins torch's intra-op threads for the measurement (restored afterwards); 1 thread is the
    default because it is the most reproducible number on a shared machine.
    """
    check_timing_args(warmup, repeats, threads)
    return prepare_torch(model, input_shape, threads, forward_kwargs).measure(warmup, repeats)


@dataclass
class LatencyTable:
    """Measured batch-1 latency per (layer, choice, scale) of a layer-wise search space.

    ``entries[layer][choice][scale_key]`` is the p50 ms of that block alone at that layer's input
    resolution, minus the runtime's per-call overhead (``meta["overhead_ms"]``): a whole model pays that
    overhead once, not once per block. ``fixed_ms`` is the always-present part (stem + last conv + pooling,
    + the embedding head if ``meta["embed_dim"]``) with the overhead counted once. ``meta`` records how
    the table was measured (runtime, threads, repeats, versions); see :func:`check_prediction` for its
    error against whole-model timings (the OFA / nn-Meter lookup-table approach).
    """

    entries: list[dict[str, dict[str, float]]]
    fixed_ms: float
    choices: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def scale_key(scale: float) -> str:
        return repr(float(scale))

    def latency_ms(self, arch: dict) -> float:
        """Predicted batch-1 latency of ``arch`` = fixed part + the chosen block of every layer."""
        blocks, scales = arch.get("blocks"), arch.get("scales")
        if not isinstance(blocks, list | tuple) or not isinstance(scales, list | tuple):
            raise CmpnasError(
                "Architecture needs 'blocks' and 'scales' lists.", "validate it with SposSpace first"
            )
        if len(blocks) != len(self.entries) or len(scales) != len(self.entries):
            raise CmpnasError(
                f"Architecture has {len(blocks)} blocks / {len(scales)} scales but the latency table has "
                f"{len(self.entries)} layers.",
                "build the latency table from the same search space as the architecture",
            )
        total = self.fixed_ms
        for layer, (choice, scale) in enumerate(zip(blocks, scales, strict=True)):
            try:
                total += self.entries[layer][self.choices[int(choice)]][self.scale_key(scale)]
            except (KeyError, IndexError):
                raise CmpnasError(
                    f"Layer {layer}: (choice {choice}, scale {scale}) is not in the latency table.",
                    "build the latency table from the same search space as the architecture",
                ) from None
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "fixed_ms": self.fixed_ms,
            "choices": self.choices,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        try:
            return cls(
                entries=[
                    {c: {s: float(v) for s, v in row.items()} for c, row in e.items()}
                    for e in data["entries"]
                ],
                fixed_ms=float(data["fixed_ms"]),
                choices=[str(c) for c in data["choices"]],
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CmpnasError(
                f"Latency table is malformed ({exc!r}).", "rebuild it with spos.latency.measure_latency_table()"
            ) from None

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        if not Path(path).is_file():
            raise CmpnasError(
                f"Latency table '{path}' does not exist.",
                "build it with spos.latency.measure_latency_table() and save it",
            )
        return cls.from_dict(read_json(path, "rebuild it with spos.latency.measure_latency_table() and save it again"))


def fit_overhead(raw_sums: Sequence[float], measured: Sequence[float], parts: int) -> float:
    """The per-run overhead that makes summed standalone timings match whole models (median fit).

    A model of ``parts`` separately timed parts with raw timings summing to S, measured whole at M, pays
    the overhead once instead of ``parts`` times: M = S - (parts - 1) x overhead. The overhead absorbs
    whatever a standalone run costs beyond its share of a whole run, so it can be negative (in torch eager
    a whole model can run slower than the sum of its blocks: the table then adds time per block).
    """
    if not raw_sums or len(raw_sums) != len(measured) or parts < 2:
        raise CmpnasError(
            f"Cannot fit the overhead from {len(raw_sums)} sums, {len(measured)} measurements, {parts} parts.",
            "pass one raw sum per measured whole model, each of at least 2 parts",
        )
    return statistics.median((s - m) / (parts - 1) for s, m in zip(raw_sums, measured, strict=True))


# A runtime prepares a module for timing: (module, input_shape, threads) -> Timer. Preparing apart from timing
# lets a latency table interleave its blocks over several rounds (timing.measure_rounds).
LatencyRuntime = Callable[[nn.Module, Sequence[int], int | None], Timer]
LATENCY_RUNTIMES: Registry[LatencyRuntime] = Registry(
    "latency runtime", {"torch": prepare_torch, "onnxruntime": prepare_onnx}
)


def latency_runtime(name: str) -> LatencyRuntime:
    """The prepare function of runtime ``name`` (a key of :data:`LATENCY_RUNTIMES`)."""
    try:
        return LATENCY_RUNTIMES[name]
    except (KeyError, TypeError):
        raise CmpnasError(
            f"Unknown latency runtime {name!r}.", f"use one of: {', '.join(sorted(LATENCY_RUNTIMES))}"
        ) from None


def measure_like(
    table: LatencyTable,
    models: Sequence[nn.Module],
    input_shape: Sequence[int],
    *,
    runtime: str | None = None,
    threads: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    rounds: int | None = None,
) -> list[float]:
    """Whole models timed the way ``table``'s blocks were (runtime, threads, interleaved rounds, runs and
    statistic from its ``meta``; a setting given here overrides it): numbers comparable with its predictions,
    also for models that are not in its space (hand-designed ones on one latency axis)."""
    meta = table.meta

    def setting(value: Any, key: str, default: Any) -> Any:
        return value if value is not None else meta.get(key, default)

    prepare = latency_runtime(str(setting(runtime, "runtime", "torch")))
    statistic = str(meta.get("statistic", "p50"))
    timers = [prepare(model, input_shape, setting(threads, "threads", 1)) for model in models]
    stats = measure_rounds(
        timers,
        warmup=int(setting(warmup, "warmup", 5)),
        repeats=int(setting(repeats, "repeats", 30)),
        rounds=int(setting(rounds, "rounds", 5)),
    )
    return [m[statistic] for m in stats]


def check_predictions(
    table: LatencyTable,
    models: Sequence[tuple[nn.Module, dict]],
    input_shape: Sequence[int],
    **settings: Any,
) -> list[dict[str, float]]:
    """The table's prediction against whole models measured as one, for ``(model, arch)`` pairs.

    ``model`` is the whole network of ``arch`` (e.g. ``spos.latency.query_net(space, arch, embed_dim)`` for a
    table built with that ``embed_dim``), timed by :func:`measure_like` (``settings``: its overrides), so both
    sides are estimated the same way; a ``min`` over more runs would be lower by itself. ``error_pct`` is signed,
    100 x (predicted - measured) / measured: positive means the table over-estimates.
    """
    predicted = [table.latency_ms(arch) for _, arch in models]
    measured = measure_like(table, [model for model, _ in models], input_shape, **settings)
    return [
        {"predicted_ms": p, "measured_ms": m, "error_pct": 100.0 * (p - m) / m}
        for p, m in zip(predicted, measured, strict=True)
    ]


def check_prediction(
    table: LatencyTable, model: nn.Module, arch: dict, input_shape: Sequence[int], **settings: Any
) -> dict[str, float]:
    """:func:`check_predictions` for one model (its rounds run back to back: prefer the batch form)."""
    return check_predictions(table, [(model, arch)], input_shape, **settings)[0]
