"""GET /metrics (Prometheus text format) and the counters behind /stats: exact counts after a known sequence of
requests, one app's counters apart from another's, every worker process's files added up, percentiles
estimated from the latency histogram."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from fixtures_serving import png_bytes as encode
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families
from stats_support import record_in_another_process

from cmpnas.serving.app import create_app
from cmpnas.serving.stats import LATENCY_BUCKETS_S, MULTIPROC_ENV, WorkerStats

PNG = {"Content-Type": "image/png"}
REQUESTS = "cmpnas_search_requests_total"
LATENCY = "cmpnas_search_latency_seconds"


def scrape(client: TestClient) -> dict[str, list[Any]]:
    """GET /metrics, parsed as a Prometheus server parses it: sample name -> samples."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    """The one sample ``name`` with exactly ``labels`` (besides ``le`` / ``pid``)."""
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_metrics_count_a_known_sequence_of_requests(
    flat_index: Path, models: Any, small_query: Path, pattern: Any
) -> None:
    client = TestClient(create_app(flat_index, models.query, small_query, watch_index_s=0))
    service = client.app.state.service  # type: ignore[attr-defined]
    img = pattern("stripes", 4)
    data = encode(img)
    vector = service.members["small"].encoder.embed_images([img])[0].tolist()
    small_fp = service.members["small"].fingerprint
    latencies: dict[tuple[str, str], list[float]] = {}
    requests = [  # (model, endpoint, request kwargs, status)
        ("query", "/search", {"content": data, "headers": PNG}, 200),  # the default model, raw body
        (
            "query",
            "/search",
            {"params": {"model": "query"}, "files": {"file": ("q", data, "image/png")}},
            200,
        ),
        ("small", "/search", {"params": {"model": "small"}, "content": data, "headers": PNG}, 200),
        ("small", "/search", {"params": {"model": "small"}, "content": b"not an image", "headers": PNG}, 400),
        ("", "/search", {"params": {"model": "nope"}, "content": data, "headers": PNG}, 422),
        ("small", "/search/vector", {"json": {"vector": vector, "model": small_fp}}, 200),
        ("small", "/search/vector", {"json": {"vector": [0.0] * len(vector), "model": small_fp}}, 422),
        ("", "/search/vector", {"content": b"{", "headers": {"Content-Type": "application/json"}}, 400),
    ]
    for model, endpoint, kwargs, status in requests:
        r = client.post(endpoint, **kwargs)
        assert r.status_code == status, (model, endpoint, r.text)
        if status == 200:
            latencies.setdefault((model, endpoint), []).append(r.json()["latency_ms"] / 1000)
    assert client.get("/healthz").status_code == 200  # other endpoints are not counted

    samples = scrape(client)
    expected = {  # (model, endpoint): (answered, rejected)
        ("query", "/search"): (2, 0),
        ("small", "/search"): (1, 1),
        ("query", "/search/vector"): (0, 0),
        ("small", "/search/vector"): (1, 1),
    }
    for (model, endpoint), (answered, rejected) in expected.items():
        where = {"model": model, "endpoint": endpoint}
        assert value(samples, REQUESTS, **where, outcome="answered") == answered, where
        assert value(samples, REQUESTS, **where, outcome="rejected") == rejected, where
        assert value(samples, f"{LATENCY}_count", **where) == answered, where
        assert value(samples, f"{LATENCY}_sum", **where) == pytest.approx(
            sum(latencies.get((model, endpoint), [])), abs=1e-5
        )
        buckets = [s for s in samples[f"{LATENCY}_bucket"] if all(s.labels[k] == v for k, v in where.items())]
        assert [float(s.labels["le"]) for s in buckets] == [*LATENCY_BUCKETS_S, float("inf")]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and counts[-1] == answered  # cumulative, up to every search
    for endpoint in ("/search", "/search/vector"):  # rejected before a query model was known
        assert value(samples, REQUESTS, model="", endpoint=endpoint, outcome="rejected") == 1
    assert value(samples, "cmpnas_worker_searches") == 4

    stats = client.get("/stats").json()  # the same counters, summarised
    assert (stats["queries"], stats["rejected"], stats["latency_ms"]["window"]) == (4, 4, 4)
    mean_ms = sum(sum(v) for v in latencies.values()) / 4 * 1000
    assert stats["latency_ms"]["mean"] == pytest.approx(mean_ms, abs=0.01)
    assert stats["workers"] == [{"pid": os.getpid(), "queries": 4}]
    by_model = {
        n: (m["queries"], m["rejected"], m["latency_ms"]["window"]) for n, m in stats["models"].items()
    }
    assert by_model == {"query": (2, 0, 2), "small": (2, 2, 2)}


def test_each_app_counts_on_its_own(
    flat_index: Path, models: Any, pattern: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a shared folder an app keeps its metrics in a registry of its own: two apps in one process
    (no environment variable set) do not see each other's searches."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    first = TestClient(create_app(flat_index, models.query, watch_index_s=0))
    assert first.post("/search", content=encode(pattern("blobs", 2)), headers=PNG).status_code == 200
    second = TestClient(create_app(flat_index, models.query, watch_index_s=0))
    assert second.get("/stats").json()["queries"] == 0
    assert value(scrape(second), REQUESTS, model="query", endpoint="/search", outcome="answered") == 0
    assert first.get("/stats").json()["queries"] == 1


def test_metrics_add_up_every_worker_process(
    tmp_path: Path, flat_index: Path, models: Any, pattern: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process writing into the same folder (as a second worker does) is added up in /metrics and
    /stats; the process's own value store and environment are left as they were."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    store = values.ValueClass
    other = record_in_another_process(tmp_path, ["query"], [(5.0, "query"), (7.0, "query"), (None, "query")])
    client = TestClient(create_app(flat_index, models.query, stats_dir=str(tmp_path), watch_index_s=0))
    assert client.post("/search", content=encode(pattern("checks", 3)), headers=PNG).status_code == 200
    samples = scrape(client)
    where = {"model": "query", "endpoint": "/search"}
    assert value(samples, REQUESTS, **where, outcome="answered") == 3
    assert value(samples, REQUESTS, **where, outcome="rejected") == 1
    assert value(samples, f"{LATENCY}_count", **where) == 3
    assert value(samples, f"{LATENCY}_sum", **where) > 0.012  # the other worker's 5 + 7 ms are in it
    per_worker = {int(s.labels["pid"]): s.value for s in samples["cmpnas_worker_searches"]}
    assert per_worker == {other: 2, os.getpid(): 1}
    stats = client.get("/stats").json()
    assert stats["workers"] == sorted(
        [{"pid": other, "queries": 2}, {"pid": os.getpid(), "queries": 1}], key=lambda w: w["pid"]
    )
    assert values.ValueClass is store and MULTIPROC_ENV not in os.environ
    private = WorkerStats(["query"])  # made after a shared one: still private
    private.record(1.0, "query")
    assert private.combined()["queries"] == 1 and client.get("/stats").json()["queries"] == 3


def test_percentiles_are_bucket_estimates_and_mean_and_window_exact() -> None:
    stats = WorkerStats(["m"])
    assert stats.combined()["latency_ms"] == {"p50": None, "p99": None, "mean": None, "window": 0}
    latencies = np.linspace(0.2, 40.0, 200)  # ms
    for ms in latencies:
        stats.record(float(ms), "m", "/search/vector")
    stats.record(None, "m")
    summary = stats.combined()["models"]["m"]["latency_ms"]
    assert summary["window"] == 200 and summary["mean"] == pytest.approx(latencies.mean())
    for q in (50, 99):  # within the 19 % width of a bucket
        assert summary[f"p{q}"] == pytest.approx(np.percentile(latencies, q), rel=0.19)
    assert summary["p50"] <= summary["p99"]
    slow = WorkerStats(["m"])
    slow.record(60_000.0, "m")  # above the last finite bucket: reported as that bound, as Prometheus does
    assert slow.combined()["latency_ms"]["p99"] == LATENCY_BUCKETS_S[-1] * 1000
