"""HTTP search service: FastAPI app over a gallery index and one or more compatible query models.

The models and the index are loaded once in :func:`create_app`; every model's compatibility is checked there
(and again on every index swap), so a server never starts with a query model that cannot search its index.
Several query models (a family: one per device budget) share one index; a client picks one with
``/search?model=NAME``, the first is the default. Untrusted uploads are bounded
before anything expensive happens: the request body size (ASGI middleware, before parsing), the image
format (a short allow-list; PIL never sees e.g. EPS), and the pixel count (read from the header, before
decoding). Every bad input gets a 4xx with a message; only a bug can produce a 500.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from cmpnas import __version__
from cmpnas.errors import CmpnasError
from cmpnas.serving.export import Encoder, load_encoder
from cmpnas.serving.family import expand_query_models
from cmpnas.serving.index import GalleryIndex, check_compatible

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # ~6300x6300; well below PIL's own bomb threshold (89M warns, 179M fails)
MULTIPART_OVERHEAD = 16 * 1024  # boundary lines and part headers around the file
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
THUMB_SIZE = 112
# Small uploads are decoded, embedded and searched on the event loop itself when the query model is fast
# (about a millisecond for the compact models this tool makes): handing each one to a worker thread cost
# several times the work on 2 cores. Big uploads (slow to decode) and slow models (measured at start-up) go
# to the thread pool, so they never stall other requests.
INLINE_MAX_BYTES = 256 * 1024
INLINE_MAX_MS = 5.0
LATENCY_WINDOW = 10_000  # recent latencies kept per worker (and per query model) for the percentiles
log = logging.getLogger("cmpnas.serving")


class Hit(BaseModel):
    id: str
    score: float
    label: str
    thumb: str = Field(description="URL of the gallery item's PNG thumbnail")


class SearchResponse(BaseModel):
    results: list[Hit]
    k: int
    latency_ms: float = Field(description="server time: decode + embed + search")
    mode: str = Field(description="homogeneous | heterogeneous | lineage (compatible with an older generation of the index's chain) | incompatible-override")
    model: str | None = Field(
        None, description="name of the query model that embedded the image (only when the server has several)"
    )


class UploadRejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------------------------- upload guards
class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Reject request bodies over ``max_bytes`` with 413 before they are parsed or spooled to disk.

    Declared Content-Length is checked up front; chunked bodies are counted as they stream in.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await _send_json(send, 400, "Invalid Content-Length header.")
                return
            if too_big:
                await _send_json(send, 413, self._message())
                return
        state = {"received": 0, "too_large": False, "started": False}

        async def limited_receive() -> dict:
            message = await receive()
            if message.get("type") == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["too_large"] = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: dict) -> None:
            if state["too_large"]:
                return  # whatever the app answers after we cut the body off, the answer is 413
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if state["too_large"] and not state["started"]:
            await _send_json(send, 413, self._message())

    def _message(self) -> str:
        return f"Request body is larger than {self.max_bytes} bytes."


class RawSearch:
    """``POST /search`` with the image bytes as the body, answered without FastAPI's request parsing.

    Taken here only when everything is plainly valid: ``Content-Type: image/*`` (or octet-stream), a declared
    Content-Length within the upload limit, and no query parameter but an in-range integer ``k`` and the name
    of one of the server's query models ``model``, each at most once. FastAPI's
    parameter machinery cost about a third of a worker's CPU per search (profiled under load); the search
    itself, its errors (``UploadRejected`` -> ``{"detail"}``), its counters and its answer are the service's,
    shared with the endpoint. Anything else — multipart, a bad ``k``, a missing length — goes to the app,
    which gives the canonical responses (an unknown model's 422 included).
    """

    def __init__(self, app: Any, service: SearchService, max_k: int, default_k: int, max_bytes: int) -> None:
        self.app, self.service = app, service
        self.max_k, self.default_k, self.max_bytes = max_k, default_k, max_bytes

    def _params(self, query: bytes) -> tuple[int, Member] | None:
        """(k, query model) of a plainly valid query string, else None (the route answers it)."""
        k, member = self.default_k, self.service.default
        if not query:
            return k, member
        seen: set[bytes] = set()
        for part in query.split(b"&"):
            name, sep, value = part.partition(b"=")
            if not sep or name in seen:
                return None
            seen.add(name)
            if name == b"k":
                if not value.isdigit() or len(value) > 6:
                    return None
                k = int(value)
                if not 1 <= k <= self.max_k:
                    return None
            elif name == b"model":
                found = self.service.members.get(unquote_plus(value.decode("latin-1")))
                if found is None:
                    return None
                member = found
            else:
                return None
        return k, member

    def _takes(self, scope: dict) -> tuple[str, int, Member] | None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != "/search":
            return None
        params = self._params(scope.get("query_string", b""))
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        length = headers.get(b"content-length", b"")
        if (
            params is None
            or not content_type.lower().startswith(RAW_CONTENT_TYPES)
            or not length.isdigit()
            or int(length) > self.max_bytes
        ):
            return None
        return content_type, *params

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        taken = self._takes(scope)
        if taken is None:
            await self.app(scope, receive, send)
            return
        content_type, want, member = taken
        t0 = time.perf_counter()
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            hits = await self.service.answer_async(bytes(body), content_type, want, member)
        except UploadRejected as exc:
            self.service.record(None, member)
            await _send_json(send, exc.status, exc.message)
            return
        latency = (time.perf_counter() - t0) * 1000
        self.service.record(latency, member)
        payload = self.service.response_body(hits, want, latency, member)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _send_json(send: Any, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}, status_code=status).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def decode_upload(data: bytes, content_type: str | None, max_pixels: int) -> Image.Image:
    """Bytes -> decoded PIL image, or UploadRejected (415 not an image, 413 too many pixels, 400 corrupt)."""
    if not data:
        raise UploadRejected(400, "The uploaded file is empty.")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise UploadRejected(413, f"Image has more than {max_pixels} pixels.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        claims_image = bool(content_type) and content_type.lower().startswith("image/")
        if claims_image:
            raise UploadRejected(
                400,
                "The file is labelled as an image but could not be read (corrupt or "
                f"unsupported format; accepted: {', '.join(ALLOWED_FORMATS)}).",
            ) from None
        raise UploadRejected(
            415,
            f"Not a supported image (content type {content_type or 'unknown'}); "
            f"send one of {', '.join(ALLOWED_FORMATS)}.",
        ) from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise UploadRejected(400, "Image has zero width or height.")
    if width * height > max_pixels:
        raise UploadRejected(
            413, f"Image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}."
        )
    try:
        img.load()
    except Image.DecompressionBombError:
        raise UploadRejected(413, f"Image has more than {max_pixels} pixels.") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise UploadRejected(400, f"The image data is corrupt or truncated ({type(exc).__name__}).") from None
    return img


def validation_detail(errors: Sequence[Any], max_k: int) -> str:
    """FastAPI's list of field errors as one sentence naming the field and the fix, like every other 4xx
    ``detail`` of this service (a missing upload, a k that is not a number)."""
    if not errors:
        return "The request is malformed."
    err = errors[0]
    loc = [str(part) for part in err.get("loc", ())]
    name = loc[-1] if loc else "request"
    if name == "file":
        return (
            f"Field 'file': {err.get('msg', 'invalid')}. Send the query image as the multipart/form-data "
            "field 'file'."
        )
    if name == "k":
        return f"k must be an integer between 1 and {max_k} (got {err.get('input')!r})."
    return f"Field '{name}' ({' '.join(loc[:-1]) or 'request'}): {err.get('msg', 'invalid')}."


# --------------------------------------------------------------------------------------------- service state
@dataclass(eq=False)
class Member:
    """One query model of the server: its encoder, how it relates to the current index, its own counters."""

    name: str
    encoder: Encoder
    mode: str
    search_ms: float = float("inf")  # best warm-up embed + search; decides inline vs thread pool
    queries: int = 0
    rejected: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


@contextmanager
def _naming(name: str, path: str | Path, named: bool) -> Iterator[None]:
    """Put the query model's name in front of an error about it when the server has several (with one model
    the message stays exactly the one ``cmpnas query`` gives)."""
    try:
        yield
    except CmpnasError as exc:
        if not named:
            raise
        raise CmpnasError(f"Query model '{name}' ({path}): {exc.problem}", exc.fix) from None


def check_member(
    index: GalleryIndex, name: str, encoder: Encoder, allow_incompatible: bool, named: bool
) -> str:
    """The compatibility check of one query model against ``index`` (its mode), at start and on every swap."""
    with _naming(name, encoder.path, named):
        return check_compatible(index, encoder, allow_incompatible)


def load_member(
    index: GalleryIndex,
    name: str,
    path: str | Path,
    *,
    threads: int | None,
    allow_incompatible: bool,
    named: bool,
) -> Member:
    """Load one query model and check it against ``index``: a model that cannot search it stops the start."""
    with _naming(name, path, named):
        encoder = load_encoder(path, threads=threads)
    return Member(name, encoder, check_member(index, name, encoder, allow_incompatible, named))


def _latency_summary(latencies: Sequence[float]) -> dict[str, float | int | None]:
    lat = np.asarray(latencies, dtype=np.float64)
    if not len(lat):
        return {"p50": None, "p99": None, "mean": None, "window": 0}
    return {
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "mean": float(lat.mean()),
        "window": len(lat),
    }


class SearchService:
    """Index + query models loaded once, plus query counters and windows of recent latencies (in total and
    per query model). The first model is the default; ``encoder``, ``mode`` and ``search_ms`` are its."""

    def __init__(
        self,
        index: GalleryIndex,
        members: Sequence[Member],
        limits: dict[str, int],
        stats_dir: str | Path | None = None,
    ) -> None:
        self.index, self.limits = index, limits
        self.members = {m.name: m for m in members}
        self.default = members[0]
        self.swaps = 0
        # With several worker processes each one shares its counters through a file in ``stats_dir`` so
        # that /stats, answered by any one worker, reports all of them.
        self.stats_dir = Path(stats_dir) if stats_dir else None
        self._dirty = False
        self.started = time.time()
        self.lock = (
            threading.Lock()
        )  # one embed+search at a time: 2 cores, torch/faiss threads already parallel
        self.stats_lock = threading.Lock()
        self.queries = 0
        self.rejected = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.thumbnail = lru_cache(maxsize=2048)(self._thumbnail)
        for member in members:
            member.search_ms = self._warm_up(member)
        if self.stats_dir is not None:  # share counters off the request path, twice a second
            threading.Thread(target=self._share_loop, name="cmpnas-stats-share", daemon=True).start()

    @property
    def encoder(self) -> Encoder:
        return self.default.encoder

    @property
    def mode(self) -> str:
        return self.default.mode

    @property
    def search_ms(self) -> float:
        return self.default.search_ms

    @property
    def several(self) -> bool:
        return len(self.members) > 1

    def member(self, name: str | None) -> Member:
        """The query model called ``name`` (None = the default), or UploadRejected (422) listing them."""
        if name is None:
            return self.default
        found = self.members.get(name)
        if found is None:
            raise UploadRejected(
                422,
                f"Unknown query model '{name}'; available: {', '.join(self.members)} (default "
                f"'{self.default.name}', also when ?model= is left out).",
            )
        return found

    def _warm_up(self, member: Member, calls: int = 3) -> float:
        """Embed + search a blank image a few times (first-call set-up out of the way); best time in ms."""
        spec = member.encoder.spec
        blank = Image.new("L" if spec.in_chans == 1 else "RGB", (spec.input_size, spec.input_size))
        best = float("inf")
        for _ in range(calls):
            t0 = time.perf_counter()
            try:
                self.search(blank, 1, member)
            except CmpnasError:  # e.g. an empty index: no timing, so requests take the safe (thread) path
                return float("inf")
            best = min(best, (time.perf_counter() - t0) * 1000)
        return best

    def swap_index(self, index: GalleryIndex, allow_incompatible: bool = False) -> None:
        """Serve ``index`` from the next search on: checked against every query model first (one refusal
        leaves the old index serving all of them), swapped under the search lock, so a search in flight
        finishes on the index it started with and none sees half of each."""
        modes = {
            m.name: check_member(index, m.name, m.encoder, allow_incompatible, self.several)
            for m in self.members.values()
        }
        with self.lock:
            self.index = index
            for name, mode in modes.items():
                self.members[name].mode = mode
            self.swaps += 1
        self.thumbnail.cache_clear()

    def watch_index(self, reload: Any, every_s: float, allow_incompatible: bool = False) -> None:
        """Poll the index folder's manifest; when it changes (a rebuild, an append, a backfill or a transform
        swapped a new folder into place), ``reload()`` the index and swap it in. A new index that cannot be
        loaded or is refused keeps the old one serving (reported once per change)."""

        def stamp() -> tuple[int, int, int] | None:
            try:
                st = (self.index.path / "manifest.json").stat()
            except OSError:
                return None  # mid-swap: the folder is being renamed into place
            return (st.st_ino, st.st_mtime_ns, st.st_size)

        def loop() -> None:
            seen = stamp()
            while True:
                time.sleep(every_s)
                now = stamp()
                if now is None or now == seen:
                    continue
                seen = now
                try:
                    self.swap_index(reload(), allow_incompatible)
                    log.info("index %s reloaded (%d items)", self.index.path, len(self.index))
                except Exception as exc:  # noqa: BLE001 - whatever a bad new folder raises, the old index serves on
                    log.warning("index %s changed but was not swapped in: %s", self.index.path, exc)

        threading.Thread(target=loop, name="cmpnas-index-watch", daemon=True).start()

    def runs_inline(self, upload_bytes: int, member: Member) -> bool:
        return upload_bytes <= INLINE_MAX_BYTES and member.search_ms <= INLINE_MAX_MS

    def search(self, img: Image.Image, k: int, member: Member | None = None) -> list[dict[str, Any]]:
        encoder = (member or self.default).encoder
        with self.lock:
            vec = encoder.embed_images([img])
            return self.index.search(vec, k)[0]

    def answer(self, data: bytes, content_type: str | None, k: int, member: Member) -> list[dict[str, Any]]:
        """Upload bytes -> top-k hits, or UploadRejected (a bad image, or a model/index error)."""
        img = decode_upload(data, content_type, self.limits["max_pixels"])
        try:
            return self.search(img, k, member)
        except CmpnasError as exc:
            raise UploadRejected(400, str(exc)) from None

    async def answer_async(
        self, data: bytes, content_type: str | None, k: int, member: Member
    ) -> list[dict[str, Any]]:
        """``answer`` on the event loop for small uploads and fast models, else in the thread pool."""
        if self.runs_inline(len(data), member):
            return self.answer(data, content_type, k, member)
        return await run_in_threadpool(self.answer, data, content_type, k, member)

    def response_body(self, hits: list[dict[str, Any]], k: int, latency_ms: float, member: Member) -> bytes:
        """The JSON of a ``SearchResponse`` (built and validated once, serialised once); it names the query
        model only when the server has several, so a one-model server answers as it always has."""
        results = [Hit(**h, thumb=f"/thumb/{quote(h['id'])}") for h in hits]
        answer = SearchResponse(
            results=results,
            k=k,
            latency_ms=round(latency_ms, 3),
            mode=member.mode,
            model=member.name if self.several else None,
        )
        return answer.model_dump_json(exclude_none=True).encode()

    def record(self, latency_ms: float | None, member: Member | None = None) -> None:
        """Count a search (its latency) or a rejection (None), in total and for ``member`` when known."""
        with self.stats_lock:
            if latency_ms is None:
                self.rejected += 1
                if member is not None:
                    member.rejected += 1
            else:
                self.queries += 1
                self.latencies.append(latency_ms)
                if member is not None:
                    member.queries += 1
                    member.latencies.append(latency_ms)
            self._dirty = True

    def _share_loop(self, every_s: float = 0.5) -> None:
        while True:
            time.sleep(every_s)
            if self._dirty:
                self.share()

    def _snapshot(self) -> dict[str, Any]:
        """This worker's counters as plain data (copied under the stats lock: requests wait on it)."""
        with self.stats_lock:
            self._dirty = False
            return {
                "pid": os.getpid(),
                "queries": self.queries,
                "rejected": self.rejected,
                "latencies": list(self.latencies),
                "models": {
                    m.name: {"queries": m.queries, "rejected": m.rejected, "latencies": list(m.latencies)}
                    for m in self.members.values()
                },
            }

    def share(self) -> None:
        """Write this worker's counters for the others (atomic: a reader never sees half a file)."""
        if self.stats_dir is None:
            return
        snapshot = self._snapshot()  # serialised outside the lock
        path = self.stats_dir / f"worker-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot))
        os.replace(tmp, path)

    def _counters(self) -> dict[str, Any]:
        """Counters over every worker process of this server: in total, per worker, per query model."""
        if self.stats_dir is None:
            snapshots = [self._snapshot()]
        else:
            self.share()
            snapshots = []
            for path in sorted(self.stats_dir.glob("worker-*.json")):
                try:
                    snapshots.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    continue  # a worker that is writing or gone
        empty = lambda: {"queries": 0, "rejected": 0, "latencies": []}  # noqa: E731
        total, models = empty(), {name: empty() for name in self.members}
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

    def _thumbnail(self, item_id: str) -> bytes | None:
        img = self.index.thumbnail_image(item_id)
        if img is None:
            return None
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        if max(img.size) < THUMB_SIZE // 2:  # tiny images (28 px) get an integer nearest-neighbour upscale
            f = THUMB_SIZE // max(img.size)
            img = img.resize((img.width * f, img.height * f), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def stats(self) -> dict[str, Any]:
        """Index, models and counters. The top-level ``query_model`` and ``mode`` are the default model's,
        the counters add up every model; ``models`` has each one's description, mode and counters."""
        counters = self._counters()
        manifest = self.index.manifest
        return {
            "index": {
                "path": str(self.index.path),
                "count": len(self.index),
                "backend": self.index.backend,
                "dim": self.index.dim,
                "type": manifest["index"]["type"],
                "params": manifest["index"]["params"],
                "gallery_fingerprint": self.index.gallery_fingerprint,
                "lineage": self.index.lineage,
                "items_by_model": self.index.model_counts(),
                "updated_at": manifest.get("updated_at"),
                "swaps": self.swaps,
            },
            "query_model": self.encoder.describe(),
            "mode": self.mode,
            "default_model": self.default.name,
            "models": {
                name: {
                    **m.encoder.describe(),
                    "mode": m.mode,
                    "queries": counters["models"][name]["queries"],
                    "rejected": counters["models"][name]["rejected"],
                    "latency_ms": _latency_summary(counters["models"][name]["latencies"]),
                }
                for name, m in self.members.items()
            },
            "queries": counters["queries"],
            "rejected": counters["rejected"],
            "latency_ms": _latency_summary(counters["latencies"]),
            "workers": counters["workers"],
            "limits": self.limits,
            "uptime_s": round(time.time() - self.started, 1),
            "version": __version__,
        }


def _page() -> str:
    return resources.files("cmpnas.serving").joinpath("static/index.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------- app
def create_app(
    index_dir: str | Path,
    *query_models: str | Path,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_k: int = 100,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    default_k: int = 10,
    allow_incompatible: bool = False,
    nprobe: int | None = None,
    ef_search: int | None = None,
    threads: int | None = None,
    stats_dir: str | None = None,
    milvus_uri: str | None = None,
    watch_index_s: float = 2.0,
) -> FastAPI:
    """Load the index and every query model once (refusing any that cannot search the index) and return the
    FastAPI app.

    ``query_models`` are model files or family folders (:func:`cmpnas.serving.family.expand_query_models`); the
    first is the default of ``/search``, the others are picked with ``/search?model=NAME``.

    ``threads`` sets the intra-op threads of torch, ONNX Runtime and FAISS (None = their defaults). One
    query is embedded and searched at a time, so 1 thread loses little, and it avoids OpenMP barrier stalls
    when the machine is busy (measured here under load: FAISS flat 10k single query 20-30 ms with 2 threads,
    1 ms with 1). ``milvus_uri`` overrides where a Milvus index's collection is served from. Every
    ``watch_index_s`` seconds (0 = never) the index folder is checked and a rewritten index swapped in.
    """
    if max_k < 1 or max_upload_bytes < 1 or max_pixels < 1:
        raise CmpnasError("max_k, max_upload_bytes and max_pixels must be positive.", "pass positive limits")
    named = expand_query_models(query_models)  # a bad name or family file fails before anything loads
    index = GalleryIndex.load(index_dir, milvus_uri=milvus_uri)
    index.set_search_params(nprobe, ef_search)
    if threads is not None:  # process-wide (torch, faiss OpenMP): the server owns its process
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    members = [
        load_member(
            index, name, path, threads=threads, allow_incompatible=allow_incompatible, named=len(named) > 1
        )
        for name, path in named
    ]
    default_k = max(1, min(default_k, max_k))
    limits = {
        "max_k": max_k,
        "default_k": default_k,
        "max_upload_bytes": max_upload_bytes,
        "max_pixels": max_pixels,
        "threads": threads,
    }
    service = SearchService(index, members, limits, stats_dir)
    if watch_index_s > 0:

        def reload() -> GalleryIndex:
            fresh = GalleryIndex.load(index_dir, milvus_uri=milvus_uri)
            fresh.set_search_params(nprobe, ef_search)
            return fresh

        service.watch_index(reload, watch_index_s, allow_incompatible)
    page = _page()
    # The model, the index and the imported libraries live as long as the process: move them out of the
    # collector's generations, so a full collection during a search does not walk them (a p99 spike).
    gc.collect()
    gc.freeze()

    app = FastAPI(
        title="cmpnas visual search",
        version=__version__,
        description="Search a gallery indexed by the gallery model with images embedded by a compatible "
        "query model.",
    )
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(RawSearch, service=service, max_k=max_k, default_k=default_k, max_bytes=max_upload_bytes)

    @app.exception_handler(CmpnasError)
    async def _cmpnas_error(_: Request, exc: CmpnasError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(exc.errors(), max_k)}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", summary="Liveness: the index and the query models are loaded (their names, when several)")
    def healthz() -> dict[str, Any]:
        health = {"status": "ok", "count": len(service.index), "mode": service.mode}
        return {**health, "models": list(service.members)} if service.several else health

    @app.get(
        "/stats",
        summary="Index size, model fingerprints, query count, latency percentiles (in total and per query model)",
    )
    def stats() -> dict[str, Any]:
        return service.stats()

    @app.get(
        "/thumb/{item_id:path}",
        summary="PNG thumbnail of a gallery item",
        responses={200: {"content": {"image/png": {}}}, 404: {"description": "unknown or unreadable item"}},
    )
    def thumb(item_id: str) -> Response:
        png = service.thumbnail(item_id) if service.index.has(item_id) else None
        if png is None:
            raise HTTPException(404, f"No readable gallery item with id '{item_id}'.")
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=86400"})

    @app.post(
        "/search",
        response_model=SearchResponse,
        summary="Top-k gallery items for an uploaded image (multipart 'file' field, or the raw image bytes "
        "with Content-Type: image/*)",
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {"$ref": "#/components/schemas/Body_search_search_post"}
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                }
            }
        },
        responses={
            400: {"description": "corrupt image"},
            413: {"description": "upload or image too large"},
            415: {"description": "not an image"},
            422: {"description": "bad k, unknown query model or missing file"},
        },
    )
    async def search(
        request: Request,
        file: UploadFile | None = File(None, description="query image (PNG, JPEG, WebP, GIF, BMP or TIFF)"),
        k: int | None = Query(None, description=f"number of results, 1..{max_k} (default {default_k})"),
        k_form: int | None = Form(
            None, alias="k", description="k as a form field (the query parameter wins)"
        ),
        model: str | None = Query(
            None,
            description=f"query model that embeds the image: {', '.join(service.members)} (default "
            f"{service.default.name}; /stats describes each)",
        ),
    ) -> Response:
        t0 = time.perf_counter()
        want = k if k is not None else (k_form if k_form is not None else default_k)
        member = None
        try:
            if not 1 <= want <= max_k:
                raise UploadRejected(422, f"k must be between 1 and {max_k} (got {want}).")
            member = service.member(model)
            data, content_type = await _upload(request, file, max_upload_bytes)
            hits = await service.answer_async(data, content_type, want, member)
        except UploadRejected as exc:
            service.record(None, member)
            raise HTTPException(exc.status, exc.message) from None
        latency = (time.perf_counter() - t0) * 1000
        service.record(latency, member)
        # validated by construction: serialised once instead of FastAPI's second validation pass
        return Response(service.response_body(hits, want, latency, member), media_type="application/json")

    return app


RAW_CONTENT_TYPES = ("image/", "application/octet-stream")


async def _upload(request: Request, file: UploadFile | None, max_bytes: int) -> tuple[bytes, str | None]:
    """The query image's bytes and content type: a multipart ``file`` field, or the raw request body
    (``Content-Type: image/*``) for clients that send bytes."""
    if file is not None:
        data = await file.read(max_bytes + 1)
        content_type = file.content_type
    else:
        content_type = request.headers.get("content-type")
        if not content_type or not content_type.lower().startswith(RAW_CONTENT_TYPES):
            raise UploadRejected(
                422,
                "Field 'file' is missing: send multipart/form-data with a 'file' field, or the image bytes as "
                "the body with "
                "Content-Type: image/png (or another image/* type).",
            )
        data = await request.body()
    if len(data) > max_bytes:
        raise UploadRejected(413, f"Upload is larger than {max_bytes} bytes.")
    return data, content_type


SERVE_CONFIG_ENV = "CMPNAS_SERVE_CONFIG"


def app_from_env() -> FastAPI:
    """App factory for uvicorn's worker processes: ``create_app`` with the JSON arguments in the env."""
    kwargs = json.loads(os.environ[SERVE_CONFIG_ENV])
    return create_app(kwargs.pop("index_dir"), *kwargs.pop("query_models"), **kwargs)


def _shared_milvus_uri(index: GalleryIndex) -> str | None:
    """A Milvus Lite file opens in one process only: the parent (which opened it to check the index) serves
    it over gRPC and the worker processes connect to that address. None for FAISS and Milvus clusters."""
    if index.backend != "milvus":
        return None
    from cmpnas.serving.milvus_store import is_lite

    if not is_lite(index.store.uri):
        return None
    from milvus_lite.server_manager import server_manager_instance

    return server_manager_instance.start_and_get_uri(index.store.uri)


def run_server(
    index_dir: str | Path,
    *query_models: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    workers: int = 1,
    **limits: Any,
) -> None:
    """Build the app (fails fast on a bad index/model pair) and serve it with uvicorn.

    ``workers > 1`` runs that many server processes on one port (:mod:`cmpnas.serving.balancer`), each with its own
    copy of the model and index: the Python HTTP stack holds the GIL for most of a request, so one process
    uses about one core whatever its thread count. The workers share their counters through files in a
    temporary folder, so ``/stats`` reports all of them whichever worker answers.
    """
    import uvicorn

    if workers < 1:
        raise CmpnasError(f"workers must be >= 1, got {workers}.", "pass --workers 1 or more")
    if workers == 1:
        app = create_app(index_dir, *query_models, **limits)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    app = create_app(index_dir, *query_models, **{**limits, "watch_index_s": 0})  # the check; workers watch
    shared_uri = _shared_milvus_uri(app.state.service.index)
    del app  # checked; each worker loads its own copy
    from cmpnas.serving.balancer import serve_balanced

    stats_dir = tempfile.mkdtemp(prefix="cmpnas-serve-stats-")
    config: dict[str, Any] = {
        "index_dir": str(index_dir),
        "query_models": [str(p) for p in query_models],
        "stats_dir": stats_dir,
    }
    if shared_uri is not None:
        config["milvus_uri"] = shared_uri
    serve_balanced(
        "cmpnas.serving.app:app_from_env",
        {SERVE_CONFIG_ENV: json.dumps({**config, **limits})},
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
    )
