"""Query counters of one server process, added up over every worker process of the same server.

With ``serve --workers N`` whichever process takes a ``/stats`` request answers it, so each one writes its
counters to a file in a folder all of them share (off the request path) and reads the others' back.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LATENCY_WINDOW = 10_000  # recent latencies kept per worker (and per query model) for the percentiles
SHARE_EVERY_S = 0.5


def latency_summary(latencies: Sequence[float]) -> dict[str, float | int | None]:
    """p50, p99 and mean of a window of latencies (None when it is empty), and the window's size."""
    lat = np.asarray(latencies, dtype=np.float64)
    if not len(lat):
        return {"p50": None, "p99": None, "mean": None, "window": 0}
    return {
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "mean": float(lat.mean()),
        "window": len(lat),
    }


@dataclass
class Counter:
    """Searches answered, requests rejected, and the latencies of the most recent searches."""

    queries: int = 0
    rejected: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def count(self, latency_ms: float | None) -> None:
        if latency_ms is None:
            self.rejected += 1
        else:
            self.queries += 1
            self.latencies.append(latency_ms)

    def snapshot(self) -> dict[str, Any]:
        return {"queries": self.queries, "rejected": self.rejected, "latencies": list(self.latencies)}


class WorkerStats:
    """This process's counters, in total and per query model; shared through ``share_dir`` when given."""

    def __init__(self, models: Sequence[str], share_dir: str | Path | None = None) -> None:
        self.total = Counter()
        self.models = {name: Counter() for name in models}
        self.share_dir = Path(share_dir) if share_dir else None
        self.lock = threading.Lock()
        self._dirty = False
        if self.share_dir is not None:  # share counters off the request path, twice a second
            threading.Thread(target=self._share_loop, name="cmpnas-stats-share", daemon=True).start()

    def record(self, latency_ms: float | None, model: str | None = None) -> None:
        """Count a search (its latency) or a rejection (None), in total and for ``model`` when known."""
        with self.lock:
            self.total.count(latency_ms)
            if model is not None:
                self.models[model].count(latency_ms)
            self._dirty = True

    def snapshot(self) -> dict[str, Any]:
        """This worker's counters as plain data (copied under the lock: requests wait on it)."""
        with self.lock:
            self._dirty = False
            return {
                "pid": os.getpid(),
                **self.total.snapshot(),
                "models": {name: counter.snapshot() for name, counter in self.models.items()},
            }

    def share(self) -> None:
        """Write this worker's counters for the others (atomic: a reader never sees half a file)."""
        if self.share_dir is None:
            return
        snapshot = self.snapshot()  # serialised outside the lock
        path = self.share_dir / f"worker-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot))
        os.replace(tmp, path)

    def _share_loop(self) -> None:
        while True:
            time.sleep(SHARE_EVERY_S)
            if self._dirty:
                self.share()

    def combined(self) -> dict[str, Any]:
        """Counters over every worker process of this server: in total, per worker, per query model."""
        if self.share_dir is None:
            snapshots = [self.snapshot()]
        else:
            self.share()
            snapshots = []
            for path in sorted(self.share_dir.glob("worker-*.json")):
                try:
                    snapshots.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    continue  # a worker that is writing or gone
        empty = lambda: {"queries": 0, "rejected": 0, "latencies": []}  # noqa: E731
        total, models = empty(), {name: empty() for name in self.models}
        workers = []
        for snap in snapshots:
            parts = [(total, snap)] + [
                (models[name], counts) for name, counts in snap.get("models", {}).items() if name in models
            ]
            for into, counts in parts:
                into["queries"] += int(counts["queries"])
                into["rejected"] += int(counts["rejected"])
                into["latencies"].extend(counts["latencies"])
            workers.append({"pid": int(snap["pid"]), "queries": int(snap["queries"])})
        return {**total, "workers": workers, "models": models}
