"""Helpers shared by the benchmark scripts (JSON output, matmul peak)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Measured dense matmul throughput (GFLOP/s) on this machine, now, with torch's threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def write_result(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    from cmpnas.io import write_json_atomic
    from cmpnas.manifest import environment

    path = Path(out) if out else RESULTS / f"{name}.json"
    write_json_atomic(
        path,
        {
            "benchmark": name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "environment": environment(),
            **payload,
        },
    )
    print(json.dumps(payload, indent=2, default=str)[:4000])
    print(f"wrote {path}")
    return path


def ranking_schedule(path: Path, epochs: float) -> dict[str, Any] | None:
    """The ``epochs`` schedule of a ``ranking_schedule.json`` (its per-architecture rows), None if it has none;
    a corrupt file or one of another benchmark is a one-line ``SystemExit(2)`` naming it."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        schedules = doc["schedules"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(
            f"{path} is not a ranking_schedule.json ({exc}): pass one written by benchmarks/ranking_schedule.py",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return next((x for x in schedules if isinstance(x, dict) and x.get("epochs") == epochs), None)


def wait_healthy(proc: subprocess.Popen, base_url: str, timeout_s: float) -> None:
    """Poll ``base_url``/healthz until a started server answers 200; RuntimeError if it exits or never does."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the server did not answer /healthz in {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM a started server (it finishes in-flight requests), SIGKILL it if it outlives ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
