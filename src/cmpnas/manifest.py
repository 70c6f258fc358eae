"""Stage manifests: what was run, on what inputs, with which software, and what came out."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from cmpnas import __version__
from cmpnas.io import write_json_atomic

MANIFEST = "manifest.json"


def environment() -> dict[str, Any]:
    import numpy
    import torch

    env = {
        "cmpnas": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_bf16": _cpu_bf16(),
        "threads": torch.get_num_threads(),
    }
    for mod in ("torchvision", "timm", "faiss", "onnxruntime"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            env[mod] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_bf16() -> bool | None:
    """Whether the CPU has native bf16 (AVX512-BF16 or AMX): training times differ by about 2x between the two
    kinds of machine, so a time is only comparable with one measured on the same kind. None where unknown."""
    try:
        flags = next(
            (line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("flags")),
            None,
        )
    except OSError:
        return None
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


def write_manifest(
    out_dir: str | Path,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    manifest = {
        "stage": stage,
        "config": config,
        "inputs": inputs,
        "outputs": outputs,
        "environment": environment(),
        "started": started,
        "finished": time.time(),
        "seconds": round(time.time() - started, 2),
    }
    write_json_atomic(Path(out_dir) / MANIFEST, manifest)
    return manifest
