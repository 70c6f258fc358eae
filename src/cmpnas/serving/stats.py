"""Query counters and latency histograms of one server, added up over every worker process of the server.

They are prometheus_client metrics: ``GET /metrics`` exposes them as they are (what Prometheus scrapes),
``GET /stats`` summarises them. With ``serve --workers N`` whichever process takes a request answers it, so
the workers keep their metrics in prometheus_client's multiprocess mode: each one writes memory-mapped files
in a folder all of them share and a reader adds the files up (``MultiProcessCollector``). A server without
such a folder keeps its metrics in a registry of its own, so several apps in one process (the tests) count
apart and no environment variable is needed.

A histogram cannot give exact percentiles: the p50/p99 of ``/stats`` are estimated from its buckets (linear
inside a bucket, as Prometheus' ``histogram_quantile``), which are 19 % wide, over every search since the
server started; ``mean`` and ``window`` (the number of searches they cover) are exact.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
ENDPOINTS = ("/search", "/search/vector")
# 2^(1/4) apart (each 19 % wider than the last), from 50 us to 11 s: fine enough for /stats' percentiles
LATENCY_BUCKETS_S = tuple(float(f"{5e-5 * 2 ** (i / 4):.3g}") for i in range(72))
REQUESTS = "cmpnas_search_requests"
LATENCY = "cmpnas_search_latency_seconds"
WORKER = "cmpnas_worker_searches"
UNNAMED = ""  # the model label of a request rejected before its query model was known

_values_lock = threading.RLock()
_shared: dict[str, _Series] = {}  # multiprocess series by folder: one set of files per process and folder


class _Series:
    """The metrics of one server in one process, with the labelled series of every (query model, endpoint)
    made up front: nothing is created on the request path."""

    def __init__(self, value_class: type, directory: str | None, registry: CollectorRegistry | None) -> None:
        self.value_class, self.directory = value_class, directory
        self.answered: dict[tuple[str, str], Any] = {}
        self.rejected: dict[tuple[str, str], Any] = {}
        self.latency: dict[tuple[str, str], Any] = {}
        with self._values():
            self.requests = Counter(
                REQUESTS,
                "Search requests by query model, endpoint and outcome (answered, or rejected with a 4xx)",
                ["model", "endpoint", "outcome"],
                registry=registry,
            )
            self.latencies = Histogram(
                LATENCY,
                "Server time of an answered search: decode + embed + search (for /search/vector: parse + search)",
                ["model", "endpoint"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            )
            # "all": a worker that exited stays listed, as its searches stay in the counters' totals
            self.worker = Gauge(
                WORKER,
                "Searches answered by each worker process (the pid label in multiprocess mode)",
                registry=registry,
                multiprocess_mode="all",
            )
            for endpoint in ENDPOINTS:
                self.rejected[UNNAMED, endpoint] = self.requests.labels(UNNAMED, endpoint, "rejected")

    @contextmanager
    def _values(self) -> Iterator[None]:
        """Make metrics with this server's value store. prometheus_client picks one store for the whole
        process when it is imported (from ``$PROMETHEUS_MULTIPROC_DIR``); a worker gets its folder later, and a
        test process holds private and shared servers side by side."""
        with _values_lock:
            saved_class, saved_dir = values.ValueClass, os.environ.get(MULTIPROC_ENV)
            values.ValueClass = self.value_class
            if self.directory is not None:
                os.environ[MULTIPROC_ENV] = self.directory  # where a multiprocess value opens its file
            try:
                yield
            finally:
                values.ValueClass = saved_class
                if saved_dir is None:
                    os.environ.pop(MULTIPROC_ENV, None)
                else:
                    os.environ[MULTIPROC_ENV] = saved_dir

    def add_models(self, models: Iterable[str]) -> None:
        with self._values():
            for model in models:
                for endpoint in ENDPOINTS:
                    if (model, endpoint) not in self.answered:
                        self.answered[model, endpoint] = self.requests.labels(model, endpoint, "answered")
                        self.rejected[model, endpoint] = self.requests.labels(model, endpoint, "rejected")
                        self.latency[model, endpoint] = self.latencies.labels(model, endpoint)


def _shared_series(directory: str, models: Sequence[str]) -> _Series:
    """The multiprocess series of ``directory`` in this process (made once: prometheus_client keeps one file per
    process and metric type, which two sets of series would both write)."""
    with _values_lock:
        series = _shared.get(directory)
        if series is None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            series = _shared[directory] = _Series(values.MultiProcessValue(), directory, None)
        series.add_models(models)
        return series


@dataclass
class _Tally:
    """Counters and latency histogram of one query model, or of all of them, added up over the workers."""

    queries: int = 0
    rejected: int = 0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound (s) -> cumulative count
    sum_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"queries": self.queries, "rejected": self.rejected, "latency_ms": self.latency_ms()}

    def latency_ms(self) -> dict[str, float | int | None]:
        """p50 and p99 (bucket estimates) and mean of the latencies in ms (None when there are none), and how
        many searches they cover."""
        cumulative = sorted(self.buckets.items())
        count = int(cumulative[-1][1]) if cumulative else 0
        if not count:
            return {"p50": None, "p99": None, "mean": None, "window": 0}
        return {
            "p50": round(_quantile(0.50, cumulative) * 1000, 4),
            "p99": round(_quantile(0.99, cumulative) * 1000, 4),
            "mean": self.sum_s / count * 1000,
            "window": count,
        }


def _quantile(q: float, cumulative: Sequence[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: the bucket holding the q-th rank, linear inside it (from 0 for the
    first); in the +Inf bucket, the largest finite bound."""
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, seen in cumulative:
        if seen >= rank and seen > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (seen - below)
        lower, below = bound, seen
    return lower


class WorkerStats:
    """This process's search counters and latencies, by query model and endpoint; shared with the other worker
    processes of the server through ``share_dir`` (default ``$PROMETHEUS_MULTIPROC_DIR``) when there is one.
    That folder belongs to one server run: it starts empty (prometheus_client adds up every file in it)."""

    def __init__(self, models: Sequence[str], share_dir: str | Path | None = None) -> None:
        self.models = list(models)
        directory = share_dir or os.environ.get(MULTIPROC_ENV)
        self.share_dir = Path(directory) if directory else None
        if self.share_dir is None:
            self.registry = CollectorRegistry()
            self.series = _Series(values.MutexValue, None, self.registry)
            self.series.add_models(self.models)
        else:
            self.series = _shared_series(os.path.realpath(self.share_dir), self.models)
            self.registry = CollectorRegistry()  # what /metrics and /stats read: every worker's files
            MultiProcessCollector(self.registry, path=str(self.share_dir))

    def record(self, latency_ms: float | None, model: str | None = None, endpoint: str = "/search") -> None:
        """Count a search answered by ``model`` (its latency) or a rejection (None; ``model`` when known)."""
        if latency_ms is None:
            self.series.rejected[model or UNNAMED, endpoint].inc()
            return
        key = (model or UNNAMED, endpoint)
        self.series.answered[key].inc()
        self.series.latency[key].observe(latency_ms / 1000)
        self.series.worker.inc()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """Every worker's metrics in the Prometheus text format (OpenMetrics when ``accept`` asks for it), and
        its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    def combined(self) -> dict[str, Any]:
        """Counters over every worker process of this server: in total, per worker, per query model."""
        total = _Tally()
        models = {name: _Tally() for name in self.models}
        workers = []
        for family in self.registry.collect():
            for sample in family.samples:
                labels = sample.labels
                tallies = [total] + ([models[labels["model"]]] if labels.get("model") in models else [])
                if sample.name == f"{REQUESTS}_total":
                    for tally in tallies:
                        if labels["outcome"] == "answered":
                            tally.queries += int(sample.value)
                        else:
                            tally.rejected += int(sample.value)
                elif sample.name == f"{LATENCY}_bucket":
                    bound = float(labels["le"])
                    for tally in tallies:
                        tally.buckets[bound] = tally.buckets.get(bound, 0.0) + sample.value
                elif sample.name == f"{LATENCY}_sum":
                    for tally in tallies:
                        tally.sum_s += sample.value
                elif sample.name == WORKER:
                    workers.append({"pid": int(labels.get("pid", os.getpid())), "queries": int(sample.value)})
        return {
            **total.summary(),
            "workers": sorted(workers, key=lambda w: w["pid"]),
            "models": {name: tally.summary() for name, tally in models.items()},
        }
