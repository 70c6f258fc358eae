"""What the hardware computes natively: decides ``precision: auto`` for training and cached embeddings."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (else autocast emulates it, slower than fp32: ~10x in
    training on an AVX2 CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on hardware with native bf16, else ``fp32``; explicit settings stay as they are."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision
