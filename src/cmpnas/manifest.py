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
