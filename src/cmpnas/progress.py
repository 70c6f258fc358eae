"""Progress reporting: a line per stage (elapsed, ETA), a bar inside long loops when on a TTY,
``quiet`` for silence and ``json`` for machine-readable lines on stdout (scripts)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class _Settings:
    mode: str = "auto"  # auto | quiet | json


_SETTINGS = _Settings()


def configure(quiet: bool = False, json_logs: bool = False) -> None:
    _SETTINGS.mode = "json" if json_logs else ("quiet" if quiet else "auto")


def human() -> bool:
    """Whether commands print human-readable results (not with --quiet or --json-logs)."""
    return _SETTINGS.mode == "auto"


def _is_rank0() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def event(kind: str, **fields: Any) -> None:
    """Emit one event: a JSON line in json mode, a human line otherwise (stderr), nothing when quiet."""
    if not _is_rank0() or _SETTINGS.mode == "quiet":
        return
    if _SETTINGS.mode == "json":
        print(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}, default=str), flush=True)
        return
    msg = fields.pop("message", None)
    if msg is None:
        msg = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
    print(f"[cmpnas] {kind}: {msg}", file=sys.stderr, flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60:d}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Bar:
    """A progress bar with rate and ETA, only when stderr is a TTY and mode is auto."""

    def __init__(self, total: int, desc: str, unit: str = "img") -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = _SETTINGS.mode == "auto" and sys.stderr.isatty() and _is_rank0()
        self.n = 0
        self.start = time.perf_counter()
        self._progress = None
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(desc, total=total, rate="")

    def update(self, n: int, units: int = 0, extra: str = "") -> None:
        self.n += n
        if self._progress is not None:
            el = time.perf_counter() - self.start
            rate = f"{units / el:,.0f} {self.unit}/s {extra}" if el > 0 and units else extra
            self._progress.update(self._task, advance=n, rate=rate)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


class Stage:
    """Context manager printing `stage START` / `stage done in Xs` (with an ETA for the whole run if given)."""

    def __init__(self, name: str, index: int | None = None, total: int | None = None) -> None:
        self.name, self.index, self.total = name, index, total

    def __enter__(self) -> Stage:
        self.t0 = time.perf_counter()
        pos = f" ({self.index}/{self.total})" if self.index else ""
        event("stage", stage=self.name, status="start", message=f"{self.name}{pos} started")
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
        status = "failed" if exc[0] else "done"
        event(
            "stage",
            stage=self.name,
            status=status,
            seconds=round(self.elapsed, 2),
            message=f"{self.name} {status} in {format_seconds(self.elapsed)}",
        )
