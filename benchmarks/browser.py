"""In-browser embedding benchmark (not a test): the page's ONNX Runtime Web path in headless Chromium, and the
server's /search/vector beside the image /search in the same run.

    .venv/bin/python benchmarks/browser.py [--out benchmarks/results/browser.json]
        [--gallery-model G.safetensors --query-model Q.safetensors] [--requests 3000 --concurrency 8]

Without models it makes the same small random ones as benchmarks/serving.py (dim 128; the numbers measure the
machinery, not retrieval quality) and indexes the Fashion-MNIST test set (10k; synthetic images if missing).
Needs Debian's chromium + chromium-driver and ONNX Runtime Web (scripts/setup.sh --browser). Steps:
1. index, export the query model to ONNX, start ``cmpnas serve --workers W`` (a subprocess, as serving.py);
2. Chromium, cache disabled: page load until the runtime and the model are ready (first load: time, bytes);
   then once more with the cache (a returning visitor);
3. in-page embedding (decode + preprocess + ONNX Runtime Web) of Fashion-MNIST queries at 28 px and of
   photo-sized 640x480 RGB renderings: p50/p99 per query; the request bytes a search sends each way;
4. the browser's vectors against Python ONNX Runtime's: cosine, and identical top-10 (float32 and float16);
5. the server at ``--concurrency`` keep-alive clients: POST /search/vector (raw float32 bodies, and JSON) and
   POST /search (raw PNG bodies), interleaved, ``--runs`` times each.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import stop_server, write_result  # noqa: E402
from serving import free_port, gallery_source, log, make_models, png_payloads, replay, start_server  # noqa: E402

from cmpnas.data.sources import load_dataset_split  # noqa: E402
from cmpnas.errors import CmpnasError  # noqa: E402
from cmpnas.serving.browser import checkout_runtime_dir  # noqa: E402
from cmpnas.serving.encoder import load_encoder
from cmpnas.serving.export import export_onnx  # noqa: E402
from cmpnas.serving.index import GalleryIndex, build_index  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

EMBED_TIMED = """
const [items, type, done] = arguments;
(async () => {
  const out = [];
  for (const b64 of items) {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    const r = await window.cmpnasPage.embed(new Blob([bytes], {type}));
    out.push({raw: Array.from(r.raw), ms: r.ms});
  }
  return out;
})().then(done, (err) => done({error: String(err && err.stack || err)}));
"""

SEARCH_ONE = """
const [b64, dtype, done] = arguments;
(async () => {
  const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
  const r = await window.cmpnasPage.search(new Blob([bytes], {type: "image/png"}), 10, window.cmpnasPage.models().default, dtype);
  return {path: r.path, status: r.resp.status, bytes: r.requestBytes, reason: r.reason || null};
})().then(done, (err) => done({error: String(err && err.stack || err)}));
"""


def pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "n": int(a.size),
    }


# --------------------------------------------------------------------------------------------- the browser
def chromium(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(600)
    return driver


def open_page(driver: Any, url: str) -> dict[str, Any]:
    """Load the page; wait for its in-browser embedding to be ready. Its engine state (first-load time and
    bytes as the page measures them: Resource Timing of the runtime and model files)."""
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.perf_counter()
    driver.get(url)
    WebDriverWait(driver, 120).until(
        lambda d: d.execute_script("return window.cmpnasPage && window.cmpnasPage.engine.state !== 'loading'")
    )
    engine = driver.execute_script("return window.cmpnasPage.engine")
    if engine["state"] != "ready":
        raise RuntimeError(f"in-browser embedding did not start: {engine['reason']}")
    files = driver.execute_script(
        """return performance.getEntriesByType('resource')
             .filter((r) => /\\/(ort\\/|models\\/.*\\.onnx$)/.test(new URL(r.name).pathname))
             .map((r) => ({file: new URL(r.name).pathname, transfer: r.transferSize, encoded: r.encodedBodySize,
                           decoded: r.decodedBodySize, ms: Math.round(r.duration * 10) / 10}))"""
    )
    return {
        "ready_ms_page": round(engine["firstLoad"]["ms"], 1),
        "navigation_to_ready_ms": round((time.perf_counter() - t0) * 1000, 1),
        "bytes": engine["firstLoad"]["bytes"],
        "files": files,
    }


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def photo_payloads(images: np.ndarray, n: int) -> list[bytes]:
    """Photo-sized queries: 640x480 RGB renderings of the 28 px images (bilinear, tinted, a little noise),
    PNG-encoded, so the page decodes and downscales what a phone camera would hand it."""
    rng = np.random.default_rng(0)
    out = []
    for img in images[:n]:
        big = np.asarray(Image.fromarray(img, "L").resize((640, 480), Image.BILINEAR), dtype=np.float32)
        rgb = np.stack([big, big * 0.9, big * 0.8], -1) + rng.normal(0, 4, (480, 640, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def browser_part(
    url: str, queries: list[bytes], photos: list[bytes], args: Any, work: Path
) -> dict[str, Any]:
    driver = chromium(work / "chromium-profile")
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
        cold = [open_page(driver, url) for _ in range(args.loads)]
        driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": False})
        open_page(driver, url)  # fills the cache
        warm = open_page(driver, url)
        log(f"first load: {[c['ready_ms_page'] for c in cold]} ms; with the cache {warm['ready_ms_page']} ms")

        def embed(payloads: list[bytes], kind: str) -> list[dict]:
            out: list[dict] = []
            for start in range(0, len(payloads), 50):
                got = driver.execute_async_script(
                    EMBED_TIMED, [b64(p) for p in payloads[start : start + 50]], kind
                )
                if not isinstance(got, list):
                    raise RuntimeError(got)
                out.extend(got)
            return out

        embed(queries[:20], "image/png")  # warm-up (first runs of the session), not reported
        small = embed(queries, "image/png")
        log(f"embedded {len(small)} 28 px queries in the page")
        photo = embed(photos, "image/png")
        log(f"embedded {len(photo)} 640x480 queries in the page")
        sent = {
            dtype: driver.execute_async_script(SEARCH_ONE, b64(queries[0]), dtype)
            for dtype in ("float32", "float16")
        }
        ua = driver.execute_script("return navigator.userAgent")
    finally:
        driver.quit()
    summary = lambda rows, key: pct([r["ms"][key] for r in rows])  # noqa: E731
    return {
        "user_agent": ua,
        "first_load_cold_cache": {
            "runs": len(cold),
            "ready_ms": pct([c["ready_ms_page"] for c in cold]),
            "navigation_to_ready_ms": pct([c["navigation_to_ready_ms"] for c in cold]),
            "bytes": cold[0]["bytes"],
            "files": cold[0]["files"],
            "what": "import of ort.wasm.min.mjs + fetch and compile of its .wasm + fetch of the .onnx + session "
            "creation, from the page's start of it; navigation_to_ready adds the page, /stats and /models",
        },
        "load_with_cache": {"ready_ms": warm["ready_ms_page"], "bytes": warm["bytes"]},
        "embed_ms_28px": {k: summary(small, k) for k in ("total", "decode", "preprocess", "run")},
        "embed_ms_640x480": {k: summary(photo, k) for k in ("total", "decode", "preprocess", "run")},
        "page_search": sent,
        "_vectors": np.asarray([r["raw"] for r in small], dtype=np.float32),
    }


# --------------------------------------------------------------------------------------------- load test
def load_test(url: str, requests: list[bytes], n: int, concurrency: int, time_cap: float) -> dict[str, Any]:
    """``n`` prebuilt HTTP/1.1 requests over ``concurrency`` keep-alive connections, with benchmarks/serving.py's
    load generator; every answer must be 200 with 10 results."""
    return asyncio.run(replay(url, requests, n, concurrency, time_cap))


def http_request(host: str, path: str, content_type: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON results file (default benchmarks/results/browser.json)")
    ap.add_argument("--gallery-model", type=Path, help="gallery .safetensors (default: a small random model)")
    ap.add_argument("--query-model", type=Path, help="query .safetensors compatible with the gallery model")
    ap.add_argument("--gallery-size", type=int, default=10_000, help="gallery images to index")
    ap.add_argument("--dim", type=int, default=128, help="embedding dim of the generated models")
    ap.add_argument("--queries", type=int, default=500, help="28 px queries embedded in the page")
    ap.add_argument("--photos", type=int, default=40, help="640x480 queries embedded in the page")
    ap.add_argument("--loads", type=int, default=5, help="cold-cache page loads")
    ap.add_argument("--requests", type=int, default=3000, help="HTTP requests per load test")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent HTTP clients")
    ap.add_argument("--runs", type=int, default=3, help="load tests per endpoint (interleaved)")
    ap.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="server processes (cmpnas serve)"
    )
    ap.add_argument(
        "--time-cap", type=float, default=60.0, help="each load test stops after this many seconds"
    )
    args = ap.parse_args()
    if (args.gallery_model is None) != (args.query_model is None):
        ap.error("pass both --gallery-model and --query-model, or neither")
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        sys.exit("needs Debian's chromium and chromium-driver: bash scripts/setup.sh --browser")
    if not (checkout_runtime_dir() / "ort.wasm.min.mjs").exists():
        sys.exit("needs ONNX Runtime Web: bash scripts/setup.sh (npm ci in web/)")

    started = time.time()
    result: dict[str, Any] = {"load_avg_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="cmpnas-bench-browser-") as tmp:
        work = Path(tmp)
        if args.gallery_model is None:
            gallery_model, query_model = make_models(work, args.dim)
            result["models"] = {"generated": True, "dim": args.dim, "as": "benchmarks/serving.py make_models"}
        else:
            gallery_model, query_model = args.gallery_model, args.query_model
            result["models"] = {"generated": False, "gallery": str(gallery_model), "query": str(query_model)}
        source, held_out, name = gallery_source(args.gallery_size)
        log(f"indexing {len(source.items)} {name} images")
        manifest = build_index(gallery_model, source, work / "index")
        result["index"] = {
            "dataset": name,
            "count": manifest["count"],
            "dim": manifest["dim"],
            "type": "flat",
        }
        onnx_path = work / "query.onnx"
        export_onnx(query_model, onnx_path, exporter="legacy", measure=False)
        encoder = load_encoder(onnx_path, threads=1)
        result["query_model"] = {"onnx_bytes": onnx_path.stat().st_size, "fingerprint": encoder.fingerprint}
        try:
            train_x, _ = load_dataset_split("fashion_mnist", "train", None, False)
            query_images = train_x[: args.queries]
        except CmpnasError:
            query_images = np.concatenate([held_out] * (args.queries // len(held_out) + 1))[: args.queries]
        queries = png_payloads(query_images)
        photos = photo_payloads(query_images, args.photos)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log(f"starting the server on {url} ({args.workers} workers, ONNX query model)")
        server = start_server(work / "index", onnx_path, port, args.workers)
        try:
            browser = browser_part(url + "/", queries, photos, args, work)
            vectors = browser.pop("_vectors")
            result["browser"] = browser

            # 4. the browser's vectors against Python's, on the 10k index
            python = encoder.embed_images([Image.fromarray(q, "L") for q in query_images])
            unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
            half = unit.astype(np.float16).astype(np.float32)
            index = GalleryIndex.load(work / "index")

            def top10(q: np.ndarray) -> list[list[str]]:
                return [[h["id"] for h in hits] for hits in index.search(q, 10)]

            want = top10(python)
            result["agreement_with_python"] = {
                "queries": len(want),
                "cosine_min": float((unit * python).sum(1).min()),
                "identical_top10_float32": sum(a == b for a, b in zip(top10(unit), want, strict=True)),
                "identical_top10_float16": sum(a == b for a, b in zip(top10(half), want, strict=True)),
            }
            log(f"agreement: {result['agreement_with_python']}")

            # 5. the server: /search/vector beside /search
            host = url.removeprefix("http://")
            fp = encoder.fingerprint
            vec_raw = [
                http_request(
                    host,
                    f"/search/vector?k=10&dtype=float32&model={fp}",
                    "application/octet-stream",
                    v.astype("<f4").tobytes(),
                )
                for v in python[:200]
            ]
            vec_json = [
                http_request(
                    host,
                    "/search/vector",
                    "application/json",
                    json.dumps({"vector": v.tolist(), "model": fp, "k": 10}).encode(),
                )
                for v in python[:200]
            ]
            images = [http_request(host, "/search?k=10", "image/png", p) for p in queries[:200]]
            kinds = {"vector_float32": vec_raw, "vector_json": vec_json, "image_png": images}
            for reqs in kinds.values():
                load_test(url, reqs, 200, 2, 30)  # warm-up, not reported
            runs: dict[str, list[dict]] = {k: [] for k in kinds}
            for run in range(args.runs):
                for kind, reqs in kinds.items():
                    res = load_test(url, reqs, args.requests, args.concurrency, args.time_cap)
                    runs[kind].append(res)
                    log(
                        f"run {run + 1} {kind}: {res['throughput_rps']}/s, p99 {res['latency_ms']['p99']} ms, {res['errors']} errors"
                    )
            result["load_test"] = {
                "concurrency": args.concurrency,
                "server_workers": args.workers,
                "server_threads_per_worker": 1,
                "requests_per_run": args.requests,
                "client": "asyncio raw HTTP/1.1 keep-alive, one process, same machine",
                "runs": runs,
                "load_avg_after": os.getloadavg(),
            }
            stats = httpx.get(f"{url}/stats", timeout=10).json()
            result["load_test"]["server_stats"] = {k: stats[k] for k in ("queries", "rejected", "workers")}
        finally:
            stop_server(server, 20)
        result["request_bytes"] = {
            "vector_float32_body": 4 * manifest["dim"],
            "vector_float16_body": 2 * manifest["dim"],
            "vector_float32_http_request": len(vec_raw[0]),
            "page_search_body": {k: v["bytes"] for k, v in result["browser"]["page_search"].items()},
            "image_png_28px_body_mean": round(float(np.mean([len(q) for q in queries])), 1),
            "image_png_640x480_body_mean": round(float(np.mean([len(p) for p in photos])), 1),
        }
    result["total_s"] = round(time.time() - started, 1)
    write_result("browser", result, args.out)


if __name__ == "__main__":
    main()
