"""Model cost: a MAC counter and measured CPU latency.

MACs are counted the way SPOS and fvcore count them: convolutions and linear layers only (BN, ReLU,
pooling, shuffles and concatenations are free). One multiply-accumulate = 1 MAC = 2 FLOPs; the unit is
MACs everywhere in cmpnas. The counter uses forward hooks on ``nn.Conv*``/``nn.Linear`` modules, so a
convolution called as ``F.conv2d`` directly (e.g. the supernet's sliced weights) is not seen: count a
standalone model from :func:`cmpnas.models.spaces.spos.build` instead.

Latency is measured, not predicted: on CPU, MACs are a poor predictor of time for depthwise/shuffle nets
(docs/platform.md §3), so a latency cap needs real timings.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from cmpnas.errors import CmpnasError


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


def _sample_param(model: nn.Module) -> torch.Tensor | None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def _dummy_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    if not input_shape or any(int(s) < 1 for s in input_shape):
        raise CmpnasError(
            f"Input shape {tuple(input_shape)} is not a valid tensor shape.",
            "pass the batch-1 shape including the batch dimension, e.g. (1, 1, 28, 28)",
        )
    ref = _sample_param(model)
    kwargs = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}
    gen = torch.Generator().manual_seed(0)
    return torch.randn(tuple(int(s) for s in input_shape), generator=gen).to(**kwargs)


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
            _run_forward(model, _dummy_input(model, input_shape), forward_kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (same convention as numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q / 100.0 * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


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
    if repeats < 1 or warmup < 0:
        raise CmpnasError(
            f"Latency measurement needs repeats >= 1 and warmup >= 0 (got {repeats=}, {warmup=}).",
            "pass e.g. warmup=5, repeats=30",
        )
    if threads is not None and threads < 1:
        raise CmpnasError(
            f"threads must be >= 1 (got {threads}).", "pass threads=1 or None for torch's default"
        )
    old_threads = torch.get_num_threads()
    was_training = model.training
    x = _dummy_input(model, input_shape)
    times: list[float] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        with torch.no_grad():
            for _ in range(warmup):
                _run_forward(model, x, forward_kwargs)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x, **(forward_kwargs or {}))
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
    times.sort()
    return {"p50": _percentile(times, 50), "p90": _percentile(times, 90), "mean": statistics.fmean(times)}


@dataclass
class LatencyTable:
    """Measured batch-1 latency per (layer, choice, scale) of a layer-wise search space.

    ``entries[layer][choice][scale_key]`` is the p50 ms of that block alone at that layer's input
    resolution; ``fixed_ms`` is the always-present part (stem + last conv + pooling). Summing blocks
    measured one by one over-counts per-call framework overhead a little, but ranks architectures the
    way real timings do (the OFA / nn-Meter lookup-table approach) at a tiny fraction of the cost.
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
                f"Latency table is malformed ({exc!r}).", "rebuild it with SposSpace.latency_table()"
            ) from None
