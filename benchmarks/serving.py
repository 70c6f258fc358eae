"""Serving benchmark (not a test): gallery index, ONNX vs torch agreement, HTTP load test, search-only speed.

    PYTHONPATH=src .venv/bin/python benchmarks/serving.py [--out benchmarks/results/serving.json]
        [--gallery-model G.safetensors --query-model Q.safetensors] [--requests 2000 --concurrency 8]
        [--backend faiss|milvus] [--workers 2] [--kill-worker-at 0.3]

Without models it makes small random ones (the numbers measure the machinery, not retrieval quality).
Steps, all on this machine and bounded in count and time:
1. index the Fashion-MNIST test set (10k; synthetic images if the data is missing) with the gallery model,
   into FAISS or (``--backend milvus``) a Milvus Lite collection;
2. export the query model to ONNX and check that ONNX and torch give the same top-10 for held-out queries;
3. start ``cmpnas serve --workers W`` on 127.0.0.1 (a subprocess) and send N requests at concurrency C
   (stop after N requests or the time cap): throughput, client-side p50/p99, error count, the answering
   worker's /stats (with each worker's search count: how the kernel spread the connections); then the same at
   the ``--sweep`` concurrencies (latency grows with queueing);
   with ``--kill-worker-at F``, one more load test SIGKILLs the worker holding most of the client's connections
   after F of the requests were sent: failures by kind, requests outstanding on that worker's connections at
   the kill, whether a replacement worker appeared and answered searches (``kill_worker``);
4. search only: FAISS IndexFlatIP vs numpy brute force at 10k and 100k random unit vectors (dim 128);
5. ONNX Runtime batch-1 latency of the query model.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
import torch
from common import stop_server, wait_healthy
from PIL import Image

from cmpnas import __version__
from cmpnas.data.sources import GallerySource, Item, dataset_source, load_dataset_split
from cmpnas.errors import CmpnasError
from cmpnas.io import write_json_atomic
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, save_model
from cmpnas.serving.encoder import load_encoder, onnx_session
from cmpnas.serving.export import export_onnx, percentiles_ms
from cmpnas.serving.index import GalleryIndex, build_index
from cmpnas.serving.reuseport import queued_connections_migrate

SMALL_GALLERY = {"widths": [16, 32], "depths": [1, 1], "strides": [1, 2]}
SMALL_QUERY = {"widths": [8, 16], "depths": [1, 1], "strides": [2, 1]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_models(work: Path, dim: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    gallery = EmbeddingModel(
        ModelSpec(backbone="resnet_small", backbone_kwargs=SMALL_GALLERY, embed_dim=dim, name="bench-gallery")
    ).eval()
    gfp = save_model(gallery, work / "gallery.safetensors")
    query = EmbeddingModel(
        ModelSpec(
            backbone="resnet_small",
            backbone_kwargs=SMALL_QUERY,
            embed_dim=dim,
            compatible_with=gfp,
            name="bench-query",
        )
    ).eval()
    save_model(query, work / "query.safetensors")
    return work / "gallery.safetensors", work / "query.safetensors"


def synthetic_images(n: int, seed: int) -> np.ndarray:
    """28x28 uint8 pictures: a random bright bar over noise (stand-in when Fashion-MNIST is missing)."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
    rows = rng.integers(0, 24, n)
    for i, r in enumerate(rows):
        imgs[i, r : r + 4] = 220
    return imgs


def gallery_source(size: int) -> tuple[GallerySource, np.ndarray, str]:
    """(source to index, held-out query images, dataset name)."""
    try:
        src = dataset_source("fashion_mnist", "test", limit=size)
        train_x, _ = load_dataset_split("fashion_mnist", "train", None, True)
        return src, train_x[:200], "fashion_mnist/test"
    except CmpnasError as exc:
        log(f"Fashion-MNIST unavailable ({exc.problem}); using synthetic images")
    imgs = synthetic_images(size, 0)
    items = [Item(f"synthetic/{i:06d}", "", str(i % 10)) for i in range(size)]
    src = GallerySource({"kind": "synthetic"}, items, lambda i: Image.fromarray(imgs[i], mode="L"))
    return src, synthetic_images(200, 1), "synthetic"


def top10_agreement(
    index_dir: Path, query_model: Path, onnx_path: Path, queries: np.ndarray
) -> dict[str, Any]:
    index = GalleryIndex.load(index_dir)
    pil = [Image.fromarray(q, mode="L") for q in queries]
    a = index.search(load_encoder(query_model).embed_images(pil), 10)
    b = index.search(load_encoder(onnx_path).embed_images(pil), 10)
    if hasattr(index.store, "close"):  # a Milvus Lite file: let the server process open it
        index.store.close()
    same = sum([h["id"] for h in x] == [h["id"] for h in y] for x, y in zip(a, b, strict=True))
    diff = max(
        abs(h["score"] - g["score"]) for x, y in zip(a, b, strict=True) for h, g in zip(x, y, strict=True)
    )
    return {"queries": len(pil), "identical_top10_lists": same, "max_score_diff": diff}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(index_dir: Path, model: Path, port: int, workers: int) -> subprocess.Popen:
    code = (
        "import sys; from cmpnas.serving.app import run_server; "
        "run_server(sys.argv[1], sys.argv[2], port=int(sys.argv[3]), log_level='warning', threads=1, "
        "workers=int(sys.argv[4]))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(index_dir), str(model), str(port), str(workers)], env=env
    )
    wait_healthy(proc, f"http://127.0.0.1:{port}", 120)
    return proc


def _multipart(payload: bytes, boundary: str) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )


def load_test(
    url: str, payloads: list[bytes], requests: int, concurrency: int, time_cap: float, body: str = "raw"
) -> dict:
    """``requests`` POST /search?k=10 calls over ``concurrency`` keep-alive connections, bounded by ``time_cap``.

    The client is asyncio over raw HTTP/1.1 with the request bytes built up front: on a 2-core machine the
    load generator shares the CPU with the server, and a thread-per-client HTTP library spent about as much
    CPU per request as the server did (that is what the first version of this benchmark measured).
    Every answer is still checked: status 200 and a JSON body with k results.
    """
    return asyncio.run(_load_test(url, payloads, requests, concurrency, time_cap, body))


async def _load_test(
    url: str, payloads: list[bytes], requests: int, concurrency: int, time_cap: float, body_kind: str
) -> dict:
    prebuilt = build_requests(url, payloads, body_kind)
    return {"body": body_kind, **await replay(url, prebuilt, requests, concurrency, time_cap)}


def build_requests(url: str, payloads: list[bytes], body_kind: str = "raw") -> list[bytes]:
    """Whole POST /search?k=10 HTTP/1.1 requests, one per image."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "cmpnasbench7d1f"
    prebuilt = []
    for payload in payloads:
        if body_kind == "raw":  # the image bytes as the body (POST /search, Content-Type: image/png)
            body, content_type = payload, "image/png"
        else:
            body, content_type = _multipart(payload, boundary), f"multipart/form-data; boundary={boundary}"
        head = (
            f"POST /search?k=10 HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        prebuilt.append(head + body)
    return prebuilt


def error_kind(exc: BaseException) -> str:
    """How a request failed, as counted in ``errors_by_kind``."""
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "connection_reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection_closed"  # EOF before the whole answer (the server side closed)
    return "connection_error" if isinstance(exc, OSError) else "bad_response"


async def replay(
    url: str,
    prebuilt: list[bytes],
    requests: int,
    concurrency: int,
    time_cap: float,
    kill: Callable[[dict[int, dict]], dict] | None = None,
    kill_at: int = -1,
    timeout: float = 30.0,
) -> dict:
    """Send ``requests`` of the ``prebuilt`` HTTP/1.1 requests (in turn) over ``concurrency`` keep-alive
    connections until done or ``time_cap``; every answer must be 200 with 10 results. The one load generator of
    the serving benchmarks. A connection that fails is replaced by a new one (as a real client would) and every
    failed request is counted. ``kill(connections)`` is called once, just before request ``kill_at`` is sent,
    with each open connection's client port and whether it has a request outstanding; what it returns is
    reported under ``kill`` with the failures that followed."""
    host, port = url.removeprefix("http://").split(":")
    state: dict[str, Any] = {"next": 0, "sent": 0, "errors": 0, "error_examples": [], "kill": None}
    latencies: list[float] = []
    answered_at: list[float] = []
    failures: list[tuple[int | None, str, float]] = []  # (client port, kind, time)
    conns: dict[int, dict] = {}  # generator slot -> {"port": client port, "busy": request outstanding}
    deadline = time.monotonic() + time_cap

    async def exchange(reader: asyncio.StreamReader) -> tuple[bool, str]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length"
        )
        body = await reader.readexactly(length)
        if status != 200:
            return False, f"http_status: HTTP {status}: {body[:200]!r}"
        return len(json.loads(body)["results"]) == 10, f"bad_response: {body[:200]!r}"

    async def worker(slot: int) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while time.monotonic() < deadline and state["next"] < requests:
                i = state["next"]
                state["next"] += 1
                if i == kill_at and kill is not None:
                    state["kill"] = kill(conns)  # synchronous: no request moves while it runs
                t0 = time.perf_counter()
                cport = None
                try:
                    if writer is None:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(host, int(port)), timeout
                        )
                        conns[slot] = {"port": writer.get_extra_info("sockname")[1], "busy": False}
                    cport = conns[slot]["port"]
                    conns[slot]["busy"] = True
                    writer.write(prebuilt[i % len(prebuilt)])
                    ok, why = await asyncio.wait_for(exchange(reader), timeout)
                except (OSError, asyncio.IncompleteReadError, ValueError, KeyError, StopIteration) as exc:
                    ok, why = False, f"{error_kind(exc)}: {type(exc).__name__}: {exc}"
                    if writer is not None:  # the connection is broken: the next request opens a new one
                        writer.close()
                    reader = writer = None
                    conns.pop(slot, None)
                finally:
                    if slot in conns:
                        conns[slot]["busy"] = False
                state["sent"] += 1
                if ok:  # only answered searches count in the latency distribution and the throughput
                    latencies.append((time.perf_counter() - t0) * 1000)
                    answered_at.append(time.perf_counter())
                else:
                    state["errors"] += 1
                    failures.append((cport, why.split(":", 1)[0], time.perf_counter()))
                    if len(state["error_examples"]) < 5:
                        state["error_examples"].append(why)
        finally:
            if writer is not None:
                writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
    t_end = time.perf_counter()
    wall = t_end - t0
    lat = np.asarray(latencies if latencies else [float("nan")])
    out = {
        "client": "asyncio raw HTTP/1.1 keep-alive (reconnects after a failed connection)",
        "requests_planned": requests,
        "requests_sent": state["sent"],
        "requests_ok": len(latencies),
        "concurrency": concurrency,
        "time_cap_s": time_cap,
        "stopped_by_time_cap": state["sent"] < requests,
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 2),  # successful searches per second
        "latency_ms": {
            "p50": float(np.percentile(lat, 50)),
            "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)),
            "max": float(np.max(lat)),
        },
        "errors": state["errors"],
        "errors_by_kind": dict(Counter(kind for _, kind, _ in failures)),
        "error_examples": state["error_examples"],
        "request_bytes_mean": round(float(np.mean([len(r) for r in prebuilt])), 1),
    }
    if state["kill"] is not None:
        k = state["kill"]
        t_kill = k.pop("t")
        on_killed = set(k["client_ports_on_worker"])
        on_others = set(k.pop("client_ports_elsewhere"))
        ok_before = sum(t <= t_kill for t in answered_at)
        out["kill"] = {
            **k,
            "at_request": kill_at,
            "at_s": round(t_kill - t0, 3),
            "failed_on_killed_worker_connections": sum(p in on_killed for p, _, _ in failures),
            "failed_on_surviving_workers_connections": sum(p in on_others for p, _, _ in failures),
            "failed_on_connections_opened_after_kill": [  # reconnects (the client port was not open at the kill)
                {"kind": kind, "s_after_kill": round(t - t_kill, 3)}
                for p, kind, t in failures
                if p not in on_killed | on_others
            ],
            "throughput_before_rps": round(ok_before / (t_kill - t0), 2),
            "throughput_after_rps": round((len(answered_at) - ok_before) / (t_end - t_kill), 2),
        }
    return out


def search_only(sizes: tuple[int, ...], dim: int = 128, n_queries: int = 1000, single: int = 200) -> dict:
    """Exact top-10 by FAISS IndexFlatIP vs numpy (matmul + argpartition): batched and one query at a time."""
    rng = np.random.default_rng(0)

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def numpy_topk(g: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
        sims = q @ g.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        return np.take_along_axis(part, order, 1)

    out: dict[str, Any] = {
        "dim": dim,
        "k": 10,
        "queries_batch": n_queries,
        "queries_single": single,
        "faiss_threads_batch": faiss.omp_get_max_threads(),
    }
    queries = unit(n_queries)
    for n in sizes:
        gallery = unit(n)
        index = faiss.IndexFlatIP(dim)
        index.add(gallery)
        row: dict[str, Any] = {}
        t0 = time.perf_counter()
        _, f_ids = index.search(queries, 10)
        row["faiss_flat_batch_qps"] = n_queries / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_ids = numpy_topk(gallery, queries)
        row["numpy_batch_qps"] = n_queries / (time.perf_counter() - t0)
        row["same_top10_lists"] = int(sum(set(a) == set(b) for a, b in zip(f_ids, n_ids, strict=True)))
        default_threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # as in the server: one thread (OpenMP stalls when the machine is busy)
        t0 = time.perf_counter()
        index.search(queries, 10)
        row["faiss_flat_batch_qps_1thread"] = n_queries / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for q in queries[:single]:
            index.search(q[None], 10)
        row["faiss_flat_single_qps_1thread"] = single / (time.perf_counter() - t0)
        faiss.omp_set_num_threads(default_threads)
        t0 = time.perf_counter()
        for q in queries[:single]:
            numpy_topk(gallery, q[None])
        row["numpy_single_qps"] = single / (time.perf_counter() - t0)
        out[f"gallery_{n}"] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}
    return out


def onnx_batch1(onnx_path: Path, runs: int = 200) -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28), dtype=np.float32)
    return {
        name: percentiles_ms(lambda s=onnx_session(onnx_path, threads): s.run(None, {"images": x}), runs)
        for name, threads in (("onnxruntime_1thread", 1), ("onnxruntime_default", None))
    }


def children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the server's parent process and its workers), MB."""
    total = 0
    for p in {pid} | children(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def worker_pids(server_pid: int) -> set[int]:
    """The server's worker processes (multiprocessing spawn children, not its resource tracker)."""
    out = set()
    for pid in children(server_pid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.add(pid)
        except OSError:
            continue
    return out


def connection_owners(server_port: int, pids: set[int]) -> dict[int, int]:
    """Client port -> pid of the worker holding that accepted connection (/proc/net/tcp and the workers' fds)."""
    inode_port = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = [line.split() for line in Path(table).read_text().splitlines()[1:]]
        except OSError:
            continue
        for f in rows:  # local address, remote address, state (01 established), ..., inode
            if int(f[1].rsplit(":", 1)[1], 16) == server_port and f[3] == "01":
                inode_port[f[9]] = int(f[2].rsplit(":", 1)[1], 16)
    owners = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inode_port:
                owners[inode_port[link[8:-1]]] = pid
    return owners


def kill_test(url: str, server_pid: int, payloads: list[bytes], args: Any) -> dict:
    """One load test in which a worker is SIGKILLed after ``--kill-worker-at`` of the requests were sent: what
    failed, how many requests were outstanding on that worker's connections then, whether it was replaced and the
    replacement answered searches."""
    port = int(url.rsplit(":", 1)[1])
    requests = build_requests(url, payloads, args.body)
    before = worker_pids(server_pid)
    watch: dict[str, Any] = {}

    def kill(conns: dict[int, dict]) -> dict:
        owners = connection_owners(port, before)
        per_worker = Counter(owners.get(c["port"]) for c in conns.values())
        # the worker holding the most of our connections
        victim = max(sorted(before), key=lambda p: per_worker[p])
        on_victim = [c for c in conns.values() if owners.get(c["port"]) == victim]
        t = time.perf_counter()
        os.kill(victim, signal.SIGKILL)

        def look() -> None:  # a new worker pid under the server process
            while time.perf_counter() - t < args.replacement_wait_s:
                new = worker_pids(server_pid) - before
                if new:
                    watch.update(pid=min(new), appeared_s=round(time.perf_counter() - t, 3))
                    return
                time.sleep(0.05)

        watch["thread"] = threading.Thread(target=look, daemon=True)
        watch["thread"].start()
        return {
            "t": t,
            "killed_pid": victim,
            "workers_before": sorted(before),
            "connections_open": len(conns),
            "connections_per_worker": {str(p): n for p, n in per_worker.items()},
            "client_ports_on_worker": [c["port"] for c in on_victim],
            "client_ports_elsewhere": [c["port"] for c in conns.values() if c not in on_victim],
            "connections_on_killed_worker": len(on_victim),
            "in_flight_on_killed_worker": sum(c["busy"] for c in on_victim),
        }

    kill_at = int(args.kill_worker_at * args.requests)
    log(
        f"kill test: {args.requests} requests at concurrency {args.concurrency}, SIGKILL a worker at {kill_at}"
    )
    stats_before = httpx.get(f"{url}/stats", timeout=10).json()["workers"]
    res = asyncio.run(
        replay(url, requests, args.requests, args.concurrency, args.time_cap, kill=kill, kill_at=kill_at)
    )
    if "kill" not in res:
        raise RuntimeError("the kill test ended before the kill point")
    watch["thread"].join()
    k = res.pop("kill")
    k.pop("client_ports_on_worker")
    stats_after = httpx.get(f"{url}/stats", timeout=10).json()["workers"]
    new_pid = watch.get("pid")

    def answered(workers: list[dict]) -> int:
        return next((w["queries"] for w in workers if w["pid"] == new_pid), 0)

    probes = 0  # fresh connections hash anew: a few short runs until one lands on the replacement
    while new_pid is not None and answered(httpx.get(f"{url}/stats", timeout=10).json()["workers"]) == 0:
        if probes == 10:
            break
        replay_res = asyncio.run(replay(url, requests, 200, args.concurrency, 30))
        probes += 1
        k.setdefault("probe_errors", 0)
        k["probe_errors"] += replay_res["errors"]
    stats_probe = httpx.get(f"{url}/stats", timeout=10).json()["workers"]
    replacement = {
        "pid": new_pid,
        "appeared_within_s": watch.get("appeared_s"),
        "wait_limit_s": args.replacement_wait_s,
        "searches_during_kill_run": answered(stats_after),
        "probe_runs_of_200": probes,
        "searches_after_probes": answered(stats_probe),
    }
    replacement["answered"] = replacement["searches_after_probes"] > 0
    held = res["errors"] <= k["in_flight_on_killed_worker"] and replacement["answered"]
    log(
        f"  sent {res['requests_sent']}, ok {res['requests_ok']}, failed {res['errors']} {res['errors_by_kind']}, "
        f"in flight on the killed worker {k['in_flight_on_killed_worker']}, replacement {replacement}"
    )
    return {
        "target": "a worker killed with SIGKILL under load is restarted and the run loses no request other than "
        "those in flight on that worker",
        "target_held": held,
        "target_check": {
            "failed": res["errors"],
            "in_flight_on_killed_worker": k["in_flight_on_killed_worker"],
            "replacement_answered": replacement["answered"],
        },
        "kill_worker_at": args.kill_worker_at,
        "load_test": res,
        "kill": k,
        "replacement": replacement,
        "per_worker_searches": {
            "before": stats_before,
            "after_run": stats_after,
            "after_probes": stats_probe,
        },
    }


def soak(url: str, pid: int, payloads: list[bytes], args: Any) -> dict:
    """Steady load for ``args.soak_s`` seconds; the server's RSS at the start and the end (memory flat?)."""
    log(f"soak: {args.soak_s:.0f} s at concurrency {args.concurrency}")
    rss_start = process_tree_rss_mb(pid)
    res = load_test(url, payloads, 10**9, args.concurrency, args.soak_s, args.body)
    rss_end = process_tree_rss_mb(pid)
    return {
        "seconds": args.soak_s,
        "requests_ok": res["requests_ok"],
        "errors": res["errors"],
        "throughput_rps": res["throughput_rps"],
        "latency_ms": res["latency_ms"],
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_end,
    }


def png_payloads(images: np.ndarray) -> list[bytes]:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/serving.json"), help="JSON results file"
    )
    ap.add_argument("--gallery-model", type=Path, help="gallery .safetensors (default: a small random model)")
    ap.add_argument("--query-model", type=Path, help="query .safetensors compatible with the gallery model")
    ap.add_argument("--gallery-size", type=int, default=10_000, help="gallery images to index")
    ap.add_argument("--dim", type=int, default=128, help="embedding dim of the generated models")
    ap.add_argument("--requests", type=int, default=2000, help="HTTP requests in the load test")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent HTTP clients")
    ap.add_argument(
        "--sweep", type=int, nargs="*", default=[1, 2, 4], help="also load-test at these concurrencies"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="server processes (cmpnas serve --workers; default: up to 2, one per core here)",
    )
    ap.add_argument("--time-cap", type=float, default=180.0, help="load test stops after this many seconds")
    ap.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default="auto", help="ONNX exporter")
    ap.add_argument(
        "--search-sizes", type=int, nargs="+", default=[10_000, 100_000], help="search-only sizes"
    )
    ap.add_argument("--body", choices=["raw", "multipart"], default="raw", help="request body format")
    ap.add_argument(
        "--backend",
        choices=["faiss", "milvus"],
        default="faiss",
        help="index backend (milvus: Milvus Lite file)",
    )
    ap.add_argument("--runs", type=int, default=3, help="repeat the main load test (targets: every run)")
    ap.add_argument(
        "--p99-target-ms", type=float, default=30.0, help="p99 target each run is checked against"
    )
    ap.add_argument(
        "--rps-target", type=float, default=600.0, help="throughput target each run is checked against"
    )
    ap.add_argument(
        "--soak-s", type=float, default=0.0, help="then a soak of this many seconds, RSS at start/end"
    )
    ap.add_argument(
        "--kill-worker-at",
        type=float,
        help="then a load test that SIGKILLs one worker after this fraction of --requests was sent",
    )
    ap.add_argument(
        "--replacement-wait-s", type=float, default=30.0, help="kill test: wait this long for a new worker"
    )
    args = ap.parse_args()
    if (args.gallery_model is None) != (args.query_model is None):
        ap.error("pass both --gallery-model and --query-model, or neither")

    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "serving",
        "cmpnas_version": __version__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
            "tcp_migrate_req": queued_connections_migrate(),
        },
    }
    with tempfile.TemporaryDirectory(prefix="cmpnas-bench-") as tmp:
        work = Path(tmp)
        if args.gallery_model is None:
            gallery_model, query_model = make_models(work, args.dim)
            result["models"] = {
                "generated": True,
                "gallery": SMALL_GALLERY,
                "query": SMALL_QUERY,
                "dim": args.dim,
            }
        else:
            gallery_model, query_model = args.gallery_model, args.query_model
            result["models"] = {"generated": False, "gallery": str(gallery_model), "query": str(query_model)}

        source, held_out, name = gallery_source(args.gallery_size)
        log(f"indexing {len(source.items)} {name} images with the gallery model")
        t0 = time.perf_counter()
        manifest = build_index(gallery_model, source, work / "index", backend=args.backend)
        result["index"] = {
            "backend": args.backend,
            "dataset": name,
            "count": manifest["count"],
            "dim": manifest["dim"],
            "type": "flat",
            "build_s": round(time.perf_counter() - t0, 2),
        }

        log(f"exporting the query model to ONNX ({args.exporter} exporter)")
        onnx_path = work / "query.onnx"
        report = export_onnx(query_model, onnx_path, exporter=args.exporter, latency_runs=30)
        result["export"] = {
            k: report[k]
            for k in ("exporter", "exporter_fallback_reason", "export_seconds", "parity", "latency_ms")
        }
        result["onnx_vs_torch_top10"] = top10_agreement(work / "index", query_model, onnx_path, held_out)
        result["onnx_batch1_ms"] = onnx_batch1(onnx_path)
        log(f"ONNX vs torch top-10: {result['onnx_vs_torch_top10']}")

        port = free_port()
        log(f"starting the server on 127.0.0.1:{port} (ONNX query model, {args.workers} workers)")
        server = start_server(work / "index", onnx_path, port, args.workers)
        try:
            url = f"http://127.0.0.1:{port}"
            load_test(url, png_payloads(held_out[:20]), 40, 2, 30)  # warm-up, not reported
            runs = []
            for run in range(args.runs):
                log(
                    f"load test {run + 1}/{args.runs}: {args.requests} requests at concurrency {args.concurrency}"
                )
                runs.append(
                    load_test(
                        url, png_payloads(held_out), args.requests, args.concurrency, args.time_cap, args.body
                    )
                )
                log(
                    f"  {runs[-1]['throughput_rps']} req/s, p99 {runs[-1]['latency_ms']['p99']:.1f} ms, "
                    f"{runs[-1]['errors']} errors"
                )
            result["load_test"] = dict(runs[0])
            result["load_test_runs"] = runs
            result["targets"] = {
                "p99_ms": args.p99_target_ms,
                "throughput_rps": args.rps_target,
                "runs_meeting_both": sum(
                    r["latency_ms"]["p99"] <= args.p99_target_ms
                    and r["throughput_rps"] >= args.rps_target
                    and r["errors"] == 0
                    for r in runs
                ),
                "runs": len(runs),
            }
            stats = httpx.get(f"{url}/stats", timeout=10).json()
            result["load_test"]["server_workers"] = args.workers
            result["load_test"]["server_threads_per_worker"] = 1
            result["load_test_sweep"] = {}
            for c in args.sweep:
                sweep = load_test(url, png_payloads(held_out), min(args.requests, 1000), c, args.time_cap)
                result["load_test_sweep"][str(c)] = {
                    k: sweep[k]
                    for k in ("concurrency", "requests_sent", "throughput_rps", "latency_ms", "errors")
                }
                log(
                    f"concurrency {c}: {sweep['throughput_rps']} req/s, p99 {sweep['latency_ms']['p99']:.1f} ms"
                )
            result["load_test"]["server_stats"] = {
                k: stats[k] for k in ("queries", "rejected", "latency_ms", "mode", "workers")
            }
            if args.kill_worker_at is not None:
                result["kill_worker"] = kill_test(url, server.pid, png_payloads(held_out), args)
            if args.soak_s > 0:
                result["soak"] = soak(url, server.pid, png_payloads(held_out), args)
        finally:
            stop_server(server, 20)
        summary = {k: result["load_test"][k] for k in ("throughput_rps", "latency_ms", "errors")}
        log(f"load test: {json.dumps(summary)}")

    log("search only: FAISS flat vs numpy brute force")
    result["search_only"] = search_only(tuple(args.search_sizes))
    result["total_s"] = round(time.time() - started, 1)
    write_json_atomic(args.out, result)
    log(f"wrote {args.out} in {result['total_s']} s")


if __name__ == "__main__":
    main()
