"""Benchmark (not a test): hot refresh in the service. An index served by ``cmpnas serve --watch-index`` is moved
from gallery model v1 to v2 by ``cmpnas backfill`` a step at a time; after every index swap a probe replays a
fixed query set over HTTP and records top-1 and the negative / positive flips against the deployed system,
M(v1, v1) at step 0.

  v1, v2      as in ``benchmarks/upgrade.py`` (same recipes and the same ``--work`` layout, so its models are
              reused): v1 the profile's gallery model (seed 0), v2 the same backbone, ``--v2-epochs`` epochs,
              trained with the profile's compat objective against v1 (seed ``--seed``); ``--v1/--v2`` reuse any
  index       the test split as ``cmpnas run`` indexes it (``data.subset_test`` rows), embedded by v1
  server      ``cmpnas serve --watch-index`` as a subprocess on a free port, serving v1 and v2 (and ``--small``)
              as named query models of one family: v1 queries are the deployed system, v2 queries the curve
              of ``benchmarks/upgrade.py``; and ``--dual-query v2~v1``, the dual query policy (v2's embedding
              on the rows v2 re-embedded, v1's on the rest, merged by score)
  probe       ``--queries`` test images (seeded sample of the index's items) posted as PNG to ``/search?k=2``
              for every query model; the query's own item is dropped from the answer (leave-one-out, the
              protocol of ``evaluate-upgrade``), a query is right when the first other hit has its class. A
              failed request (non-200 or no answer) counts as wrong and is counted as an error
  steps       ``cmpnas backfill --order random`` (the order chosen on validation) to each of ``--fractions``;
              after each, wait until ``/stats`` serves the new index (its manifest's ``updated_at`` and the
              count embedded by v2), then probe. While a backfill runs and the swap happens, ``--load-clients``
              clients send the same queries without pause; every non-200 there is counted too
  check       per step, the top-1 the probe saw is recomputed offline from the index's stored vectors and the
              query models' embeddings (``offline_agreement``: the share of queries judged the same)

Flips are :func:`cmpnas.evaluation.flips.flip_rates` of each step's per-query correctness against v1's at step
0; the trace stores those vectors (``hits``: one 0/1 character per query) so they can be checked.

Usage: python benchmarks/upgrade_service.py [--v1 G --v2 G2] [--work DIR] [--set KEY=VALUE ...]
       [--fractions 0.1 0.2 ...] [--queries 2000] [--out benchmarks/results/upgrade_service.json]
Writes the JSON trace and a PNG of the same name beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, stop_server, wait_healthy, write_result  # noqa: E402
from upgrade import V1_SEED, _trained  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FRACTIONS = tuple(round(0.1 * i, 2) for i in range(1, 11))
REFERENCE = "v1"  # the deployed system: v1 queries on the v1 index
DUAL = "v2~v1"  # the dual query policy: v2's embedding on the rows v2 re-embedded, v1's on the rest
SWAP_TIMEOUT_S = 600.0  # how long a step waits for the server to serve the backfilled index
START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Query:
    """One probe query: the index item it is (dropped from its own answer), its class, its PNG bytes."""

    id: str
    label: str
    png: bytes


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu() -> str:
    """lscpu's model name (the machine the trace was taken on)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.strip().startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    from cmpnas.manifest import environment

    return str(environment()["cpu"])


def _training(model: Path) -> dict[str, Any] | None:
    """How a model was trained, from the manifest beside it (the scale of the trace: images, epochs, time; a
    model reused from an earlier run keeps its own numbers)."""
    path = model.parent / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    train = manifest.get("outputs", {}).get("train", {})
    cfg = manifest.get("config", {})
    section = (
        "gallery_train" if manifest.get("stage") in ("train-gallery", "upgrade-gallery") else "query_train"
    )
    return {
        "stage": manifest.get("stage"),
        "images": manifest.get("inputs", {}).get("data", {}).get("counts"),
        "seed": cfg.get(section, {}).get("seed"),
        **{k: train.get(k) for k in ("epochs", "steps", "seconds", "images_per_second", "precision")},
    }


def _probe_set(index_dir: Path, n: int, seed: int) -> list[Query]:
    """A seeded sample of the index's items whose class has another item (so leave-one-out can be right)."""
    import io

    from cmpnas.data.sources import load_item_image
    from cmpnas.serving.index import GalleryIndex

    index = GalleryIndex.load(index_dir)
    items = index.items
    counts = Counter(it.label for it in items)
    answerable = [it for it in items if counts[it.label] > 1]
    chosen = sorted(random.Random(seed).sample(range(len(answerable)), min(n, len(answerable))))
    sources = index.manifest.get("sources", [])
    queries = []
    for i in chosen:
        it = answerable[i]
        img = load_item_image(it.id, it.path, sources)
        if img is None:
            raise SystemExit(f"probe image {it.id} is not readable")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        queries.append(Query(it.id, it.label, buf.getvalue()))
    return queries


def _search(client: Any, url: str, query: Query, model: str) -> tuple[str, bool | None, float | None]:
    """(status, right?, server latency) of one leave-one-out search; status is the HTTP code or the client
    error's name, right? is None when the request failed."""
    import httpx

    try:
        r = client.post(
            f"{url}/search",
            params={"k": 2, "model": model},
            content=query.png,
            headers={"Content-Type": "image/png"},
        )
    except httpx.HTTPError as exc:
        return type(exc).__name__, None, None
    if r.status_code != 200:
        return str(r.status_code), None, None
    body = r.json()
    other = next((h for h in body["results"] if h["id"] != query.id), None)
    return "200", other is not None and other["label"] == query.label, float(body["latency_ms"])


def probe(url: str, queries: list[Query], model: str) -> dict[str, Any]:
    """Replay every query with one query model: the per-query correctness, statuses and server latency."""
    import httpx

    statuses: Counter[str] = Counter()
    hits, latencies = [], []
    t0 = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        for q in queries:
            status, right, latency = _search(client, url, q, model)
            statuses[status] += 1
            hits.append(bool(right))
            if latency is not None:
                latencies.append(latency)
    return {
        "hits": "".join("1" if h else "0" for h in hits),
        "requests": len(queries),
        "errors": len(queries) - statuses["200"],
        "statuses": dict(statuses),
        "latency_ms_p50": round(statistics.median(latencies), 3) if latencies else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


class SwapLoad:
    """Clients that search without pause while a backfill runs and its index is swapped in, counting every
    answer's status: a request that fails during a swap is a failure of the hot refresh."""

    def __init__(self, url: str, queries: list[Query], models: list[str], clients: int) -> None:
        self.url, self.queries, self.models = url, queries, models
        self.statuses: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(clients)]

    def _run(self, offset: int) -> None:
        import httpx

        i = offset
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                q = self.queries[i % len(self.queries)]
                status, _, _ = _search(client, self.url, q, self.models[i % len(self.models)])
                with self.lock:
                    self.statuses[status] += 1
                i += 1

    def __enter__(self) -> SwapLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)

    def summary(self) -> dict[str, Any]:
        n = sum(self.statuses.values())
        return {"requests": n, "errors": n - self.statuses["200"], "statuses": dict(self.statuses)}


def _served(url: str) -> dict[str, Any]:
    """The index version the server answers from (``/stats``)."""
    import httpx

    index = httpx.get(f"{url}/stats", timeout=60).json()["index"]
    keys = ("updated_at", "gallery_fingerprint", "lineage", "items_by_model", "count", "swaps")
    return {k: index.get(k) for k in keys}


def wait_for_version(
    url: str, manifest: dict[str, Any], new_fp: str, done: int
) -> tuple[dict[str, Any], float]:
    """Poll ``/stats`` until the server answers from the index the backfill wrote; (its version, seconds)."""
    t0 = time.monotonic()
    while True:
        version = _served(url)
        if (
            version["updated_at"] == manifest.get("updated_at")
            and (version["items_by_model"] or {}).get(new_fp) == done
        ):
            return version, round(time.monotonic() - t0, 2)
        if time.monotonic() - t0 > SWAP_TIMEOUT_S:
            raise SystemExit(
                f"the server did not swap in the backfilled index in {SWAP_TIMEOUT_S:.0f} s: {version}"
            )
        time.sleep(0.1)


def offline_hits(
    index_dir: Path, queries: list[Query], query_emb: dict[str, np.ndarray], v2_fingerprint: str
) -> dict[str, np.ndarray]:
    """Per query model, [Q] bool: leave-one-out top-1 of the queries against the vectors stored in the index now
    (cosine; the query's own item excluded) — what the server should answer for this index version. The dual
    policy's scores are v2's cosines on the rows v2 embedded and v1's on the others."""
    from cmpnas.serving.index import GalleryIndex

    index = GalleryIndex.load(index_dir)
    items = index.items
    gallery = index.store.vectors([it.id for it in items]).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True).clip(min=1e-12)
    own = [{it.id: i for i, it in enumerate(items)}[q.id] for q in queries]
    labels = np.asarray([it.label for it in items])
    truth = np.asarray([q.label for q in queries])
    import torch

    from cmpnas.compat.transition import dual_vectors

    by_v2 = np.asarray(index.store.model_of([it.id for it in items])) == v2_fingerprint
    sims = {model: emb @ gallery.T for model, emb in query_emb.items()}
    stored = torch.from_numpy(gallery)  # each row in its own model's space: it is both halves' source
    q, g = dual_vectors(torch.from_numpy(query_emb["v1"]), torch.from_numpy(query_emb["v2"]), stored, stored, by_v2)
    sims[DUAL] = (q @ g.T).numpy()
    out = {}
    for model, s in sims.items():
        s[np.arange(len(queries)), own] = -np.inf
        out[model] = labels[s.argmax(axis=1)] == truth
    return out


def embed_queries(model: Path, queries: list[Query], batch: int = 256) -> np.ndarray:
    """The query model's L2-normalised embeddings of the probe images, computed in this process."""
    import io

    from PIL import Image

    from cmpnas.serving.encoder import load_encoder

    encoder = load_encoder(model)
    parts = []
    for start in range(0, len(queries), batch):
        imgs = [Image.open(io.BytesIO(q.png)) for q in queries[start : start + batch]]
        parts.append(np.asarray(encoder.embed_images(imgs), dtype=np.float32))
    emb = np.concatenate(parts)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)


def _bits(hits: str) -> np.ndarray:
    return np.frombuffer(hits.encode(), dtype=np.uint8) == ord("1")


def score_step(step: dict[str, Any], reference: str) -> None:
    """Top-1 and the flips against the reference correctness, for every query model of a step (in place)."""
    import torch

    from cmpnas.evaluation.flips import flip_rates

    ref = torch.from_numpy(_bits(reference))
    for p in step["probe"].values():
        hits = torch.from_numpy(_bits(p["hits"]))
        p["top1"] = round(100.0 * float(hits.float().mean()), 3)
        p.update({k: round(v, 3) for k, v in flip_rates(ref, hits).items()})


def summarise(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per query model the lowest top-1 and the most flips over the trace; every failed request."""
    models = list(steps[0]["probe"])
    by_model = {
        m: {
            "first_top1": steps[0]["probe"][m]["top1"],
            "last_top1": steps[-1]["probe"][m]["top1"],
            "min_top1": min(s["probe"][m]["top1"] for s in steps),
            "max_negative_flips": max(s["probe"][m]["negative_flips"] for s in steps),
            "max_positive_flips": max(s["probe"][m]["positive_flips"] for s in steps),
        }
        for m in models
    }
    probe_errors = sum(p["errors"] for s in steps for p in s["probe"].values())
    swap_errors = sum(s["during_swap"]["errors"] for s in steps if s.get("during_swap"))
    return {
        "reference": f"M({REFERENCE}, v1): {REFERENCE} queries at step 0, top-1 {steps[0]['probe'][REFERENCE]['top1']}",
        "by_model": by_model,
        "probe_requests": sum(p["requests"] for s in steps for p in s["probe"].values()),
        "probe_errors": probe_errors,
        "swap_load_requests": sum(s["during_swap"]["requests"] for s in steps if s.get("during_swap")),
        "swap_load_errors": swap_errors,
        "any_request_failed": probe_errors + swap_errors > 0,
        "min_offline_agreement": min(p["offline_agreement"] for s in steps for p in s["probe"].values()),
        "fractions": [s["fraction"] for s in steps],
    }


def figure(trace: dict[str, Any]) -> Any:
    """Top-1 and negative flips of every query model against the served fraction, one point per swap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = trace["steps"]
    x = [100 * s["fraction"] for s in steps]
    fig, (top, flips) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    for m in steps[0]["probe"]:
        top.plot(x, [s["probe"][m]["top1"] for s in steps], "o-", label=f"{m} queries")
        flips.plot(x, [s["probe"][m]["negative_flips"] for s in steps], "o-", label=f"{m} queries")
    old = steps[0]["probe"][REFERENCE]["top1"]
    top.axhline(old, color="grey", lw=1, ls=":", label=f"M(v1, v1) {old:.1f}")
    top.set_ylabel("top-1 (%) served")
    s = trace["summary"]
    top.set_title(
        f"Backfill under `cmpnas serve --watch-index`: {len(steps) - 1} swaps, "
        f"{s['probe_errors'] + s['swap_load_errors']} failed requests",
        fontsize=10,
    )
    flips.set_ylabel("negative flips vs M(v1, v1) (%)")
    flips.set_xlabel("index re-embedded by v2 when probed (%)")
    for ax in (top, flips):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _backfill(index: Path, v2: Path, fraction: float, seed: int) -> float:
    """Run ``cmpnas backfill`` (the operator's command) to ``fraction``; its wall time."""
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "cmpnas.cli", "backfill", "--index", str(index), "--gallery-model", str(v2)]
    cmd += ["--fraction", str(fraction), "--order", "random", "--seed", str(seed), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"backfill to {fraction} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return round(time.monotonic() - t0, 1)


def _start_server(index: Path, family: Path, port: int, watch_s: float, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cmpnas.cli", "serve", "--index", str(index), "--query-model", str(family)]
    cmd += ["--port", str(port), "--watch-index", str(watch_s), "--threads", "1", "--dual-query", DUAL]
    proc = subprocess.Popen(cmd, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", START_TIMEOUT_S)
    except RuntimeError as exc:
        raise SystemExit(f"{exc}: {log.read_text()[-2000:]}") from None
    return proc


def run_trace(
    index: Path,
    models: dict[str, Path],
    queries: list[Query],
    fractions: list[float],
    *,
    work: Path,
    watch_s: float,
    load_clients: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Serve ``index``, probe it, backfill it by v2 to every fraction, probing after each swap: the steps."""
    from cmpnas.serving.encoder import load_encoder

    v2_fp = load_encoder(models["v2"]).fingerprint
    family = work / "query-models"
    family.mkdir(parents=True, exist_ok=True)
    members = [{"name": n, "model": str(p.resolve())} for n, p in models.items()]
    (family / "family.json").write_text(
        json.dumps({"format": "cmpnas.family.v1", "members": members}, indent=2)
    )
    emb = {m: embed_queries(p, queries) for m, p in models.items()}
    served = [*models, DUAL]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    server = _start_server(index, family, port, watch_s, log)
    steps: list[dict[str, Any]] = []

    def probed(step: dict[str, Any]) -> dict[str, Any]:
        step["probe"] = {m: probe(url, queries, m) for m in served}
        offline = offline_hits(index, queries, emb, v2_fp)
        for m, p in step["probe"].items():
            p["offline_agreement"] = round(float((_bits(p["hits"]) == offline[m]).mean()), 4)
        total = step["version"]["count"] or 1
        step["fraction"] = round((step["version"]["items_by_model"] or {}).get(v2_fp, 0) / total, 4)
        steps.append(step)
        probes = ", ".join(f"{m} {100 * _bits(p['hits']).mean():.1f}" for m, p in step["probe"].items())
        print(f"step {len(steps) - 1}: {step['fraction']:.0%} by v2; top-1 {probes}", flush=True)
        return step

    try:
        probed({"step": 0, "target": 0.0, "version": _served(url)})
        for i, f in enumerate(fractions, start=1):
            with SwapLoad(url, queries, served, load_clients) as load:
                backfill_s = _backfill(index, models["v2"], f, seed)
                manifest = json.loads((index / "manifest.json").read_text())
                record = manifest["backfills"][-1]
                version, wait_s = wait_for_version(url, manifest, v2_fp, record["embedded_by_model_after"])
            step = {"step": i, "target": f, "version": version, "backfill": record}
            step |= {"backfill_s": backfill_s, "swap_wait_s": wait_s, "during_swap": load.summary()}
            probed(step)
    finally:
        stop_server(server, 60)
    refused = [line for line in log.read_text().splitlines() if "not swapped in" in line]
    for s in steps:
        score_step(s, steps[0]["probe"][REFERENCE]["hits"])
    if refused:
        steps[-1]["server_refused_swaps"] = refused
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v1", type=Path, default=None, help="trained v1 gallery model (else trained in --work)")
    ap.add_argument("--v2", type=Path, default=None, help="v2 trained against v1 (else trained in --work)")
    ap.add_argument(
        "--small", type=Path, default=None, help="also probe this query model (trained against v1)"
    )
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "upgrade-benchmark")
    ap.add_argument("--seed", type=int, default=1, help="v2's seed (not v1's)")
    ap.add_argument("--v2-epochs", type=float, default=2.0)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every model"
    )
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS), help="backfill steps")
    ap.add_argument("--queries", type=int, default=2000, help="probe queries (a seeded sample of the index)")
    ap.add_argument("--watch-index", type=float, default=0.5, help="the server's --watch-index seconds")
    ap.add_argument(
        "--load-clients", type=int, default=1, help="clients searching during each backfill + swap"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "upgrade_service.json")
    args = ap.parse_args()
    fractions = [round(f, 6) for f in args.fractions]
    if fractions != sorted(set(fractions)) or not 0 < fractions[0] or fractions[-1] != 1.0:
        raise SystemExit("--fractions must increase strictly, be above 0 and end at 1.0")
    if args.seed == V1_SEED and args.v2 is None:
        raise SystemExit(f"--seed must differ from v1's seed {V1_SEED}")

    from cmpnas.config import load_config
    from cmpnas.stages import train_gallery, upgrade_gallery
    from cmpnas.stages.common import load_data
    from cmpnas.stages.index import index_dataset

    started = time.time()
    cfg = load_config(args.config, args.set)
    work = args.work
    seconds: dict[str, float] = {}
    data = None

    def bundle() -> Any:
        nonlocal data
        data = data or load_data(cfg)
        return data

    v1 = args.v1 or _trained(
        work / "v1", lambda resume: train_gallery(cfg, work / "v1", resume=resume, data=bundle())
    )
    ucfg = load_config(
        args.config, [*args.set, f"gallery_train.epochs={args.v2_epochs}", f"gallery_train.seed={args.seed}"]
    )
    name = f"v2@{args.seed}"
    v2 = args.v2 or _trained(
        work / name, lambda resume: upgrade_gallery(ucfg, v1, work / name, resume=resume, data=bundle())
    )
    models = {"v1": v1, "v2": v2} | ({"small": args.small} if args.small else {})

    trace_dir = work / "service-trace"
    shutil.rmtree(trace_dir, ignore_errors=True)
    index = trace_dir / "index"
    t0 = time.time()
    built = index_dataset(v1, cfg.data, "test", index, batch_size=cfg.eval_batch_size)
    seconds["index"] = round(time.time() - t0, 1)
    queries = _probe_set(index, args.queries, seed=0)
    t0 = time.time()
    steps = run_trace(
        index, models, queries, fractions, work=trace_dir, watch_s=args.watch_index,
        load_clients=args.load_clients, seed=0,
    )  # fmt: skip
    seconds["trace"] = round(time.time() - t0, 1)

    from cmpnas.serving.encoder import load_encoder

    trace: dict[str, Any] = {
        "protocol": (
            "index = the test split embedded by v1, served by `cmpnas serve --watch-index`; `cmpnas backfill "
            "--order random` re-embeds it by v2 step by step; after each swap every query model (and the dual "
            "policy v2~v1) answers the same "
            "probe queries over HTTP (leave-one-out: the query's own item dropped); flips per query against v1 "
            "queries at step 0, M(v1, v1); a failed request counts as wrong and as an error"
        ),
        "scale": {
            "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
            "set": args.set,
            "data": cfg.data.model_dump(mode="json"),
            "index_items": built["count"],
            "probe_queries": len(queries),
            "v2_epochs": args.v2_epochs,
            "fractions": fractions,
        },
        "command": " ".join(["python", *sys.argv]),
        "cpu": _cpu(),
        "models": {
            m: {
                **{k: load_encoder(p).describe()[k] for k in ("path", "fingerprint", "compatible_with")},
                "training": _training(p),
            }
            for m, p in models.items()
        },
        "server": {
            "watch_index_s": args.watch_index,
            "threads": 1,
            "workers": 1,
            "load_clients": args.load_clients,
        },
        "query_ids": [q.id for q in queries],
        "steps": steps,
    }
    trace["summary"] = summarise(steps)
    png = args.out.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure(trace).savefig(png, dpi=120)
    trace |= {"plot": png.name, "seconds": seconds, "wall_time_s": round(time.time() - started, 1)}
    write_result("upgrade_service", trace, out=str(args.out))


if __name__ == "__main__":
    main()
