"""What a server process holds: the index and its query models, loaded once, and how a search is answered.

Every query model's compatibility is checked at load and again on every index swap, so a server never
searches an index with a model that cannot search it. A rewritten index folder is swapped in while serving
(:func:`watch_index`); a search in flight finishes on the index it started with.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from cmpnas import __version__
from cmpnas.errors import CmpnasError
from cmpnas.serving.compat_policy import check_compatible, space_of
from cmpnas.serving.encoder import Encoder, load_encoder
from cmpnas.serving.family import expand_query_models
from cmpnas.serving.index import GalleryIndex
from cmpnas.serving.stats import WorkerStats
from cmpnas.serving.uploads import UploadRejected, decode_upload

THUMB_SIZE = 112
# Small uploads are decoded, embedded and searched on the event loop itself when the query model is fast (the
# compact models this tool makes): handing each one to a worker thread costs more than the work on a small
# machine. Big uploads (slow to decode) and slow models (timed at start-up) go to the thread pool, so they never
# stall other requests.
INLINE_MAX_BYTES = 256 * 1024
INLINE_MAX_MS = 5.0
log = logging.getLogger("cmpnas.serving")


class Hit(BaseModel):
    id: str
    score: float
    label: str
    thumb: str = Field(description="URL of the gallery item's PNG thumbnail")


class SearchResponse(BaseModel):
    results: list[Hit]
    k: int
    latency_ms: float = Field(
        description="server time: decode + embed + search (for /search/vector: parse + search)"
    )
    mode: str = Field(description="homogeneous | heterogeneous | lineage (compatible with an older generation of the index's chain) | incompatible-override")
    model: str | None = Field(
        None, description="name of the query model that embedded the image (only when the server has several)"
    )


# --------------------------------------------------------------------------------------------- query models
@dataclass(eq=False)
class Member:
    """One query model of the server: its encoder and how it relates to the current index."""

    name: str
    encoder: Encoder
    mode: str
    search_ms: float = float("inf")  # best warm-up embed + search; decides inline vs thread pool
    # the dual query policy (NEW~OLD): an older generation's query model that searches the rows not yet
    # re-embedded into this model's space (cmpnas.compat.transition)
    partner: Member | None = None

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint


DUAL_SEPARATOR = "~"  # unreserved in URLs: /search?model=v2~v1 needs no escaping


def dual_members(members: Sequence[Member], pairs: Sequence[str]) -> list[Member]:
    """One member per ``NEW~OLD`` pair (names of served query models): NEW's embedding searches the rows in its
    space, OLD's every other row, merged by score."""
    by_name = {m.name: m for m in members}
    out: list[Member] = []
    for pair in pairs:
        new, sep, old = pair.partition(DUAL_SEPARATOR)
        if not sep or new not in by_name or old not in by_name:
            raise CmpnasError(
                f"--dual-query '{pair}' is not NEW{DUAL_SEPARATOR}OLD with both names among the served query "
                f"models ({', '.join(by_name)}).",
                f"pass e.g. --dual-query {next(iter(by_name))}{DUAL_SEPARATOR}OLD_NAME, serving both models",
            )
        if space_of(by_name[new].encoder) == space_of(by_name[old].encoder):
            raise CmpnasError(
                f"--dual-query '{pair}': both models search gallery model {space_of(by_name[new].encoder)}'s "
                "vectors, so there is nothing to merge.",
                "pair the upgraded model with a query model of the older generation",
            )
        if pair in by_name:
            raise CmpnasError(
                f"--dual-query '{pair}' is also the name of a served query model.", "rename that model's file"
            )
        if any(m.name == pair for m in out):
            raise CmpnasError(f"--dual-query '{pair}' is given twice.", "pass each pair once")
        main = by_name[new]
        out.append(Member(pair, main.encoder, main.mode, partner=by_name[old]))
    return out


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


# --------------------------------------------------------------------------------------------- the service
class SearchService:
    """Index + query models loaded once, and this process's counters. The first model is the default;
    ``encoder``, ``mode`` and ``search_ms`` are its."""

    def __init__(
        self,
        index: GalleryIndex,
        members: Sequence[Member],
        limits: dict[str, int],
        stats_dir: str | Path | None = None,
    ) -> None:
        self.index, self.limits = index, limits
        self.members = {m.name: m for m in members}
        # how /search/vector names a model: the same weights served twice (e.g. under two names) share one
        # embedding space, so the first of them answers
        self.by_fingerprint: dict[str, Member] = {}
        for member in members:
            self.by_fingerprint.setdefault(member.fingerprint, member)
        self.default = members[0]
        self.swaps = 0
        self.started = time.time()
        self.lock = threading.Lock()  # one embed+search at a time: torch/faiss threads already run in parallel
        self.thumbnail = lru_cache(maxsize=2048)(self._thumbnail)
        for member in members:
            member.search_ms = self._warm_up(member)
        self.counters = WorkerStats(list(self.members), stats_dir)

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
            for m in self.members.values()  # a dual member's partner is served, so checked, on its own too
        }
        with self.lock:
            self.index = index
            for name, mode in modes.items():
                self.members[name].mode = mode
            self.swaps += 1
        self.thumbnail.cache_clear()

    # ----------------------------------------------------------------------------------- answering
    def runs_inline(self, upload_bytes: int, member: Member) -> bool:
        return upload_bytes <= INLINE_MAX_BYTES and member.search_ms <= INLINE_MAX_MS

    def search(self, img: Image.Image, k: int, member: Member | None = None) -> list[dict[str, Any]]:
        member = member or self.default
        with self.lock:
            vec = member.encoder.embed_images([img])
            if member.partner is None:
                return self.index.search(vec, k)[0]
            old = member.partner.encoder.embed_images([img])
            return self.index.search_dual(vec, old, k, space_of(member.encoder))[0]

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

    def search_vector(self, unit: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Top-k hits of one L2-normalised float32 embedding [D] computed by the client."""
        with self.lock:
            return self.index.search(unit[None], k)[0]

    def answer_vector(self, unit: np.ndarray, k: int) -> list[dict[str, Any]]:
        try:
            return self.search_vector(unit, k)
        except CmpnasError as exc:
            raise UploadRejected(400, str(exc)) from None

    async def answer_vector_async(self, unit: np.ndarray, k: int, member: Member) -> list[dict[str, Any]]:
        """``answer_vector`` on the event loop when the index is fast (the warm-up embed + search time bounds
        the search alone), else in the thread pool, like image searches."""
        if member.search_ms <= INLINE_MAX_MS:
            return self.answer_vector(unit, k)
        return await run_in_threadpool(self.answer_vector, unit, k)

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

    def record(
        self, latency_ms: float | None, member: Member | None = None, endpoint: str = "/search"
    ) -> None:
        """Count a search (its latency) or a rejection (None), for ``member`` when known and the endpoint
        (``/search`` or ``/search/vector``) that took it."""
        self.counters.record(latency_ms, None if member is None else member.name, endpoint)

    def _thumbnail(self, item_id: str) -> bytes | None:
        img = self.index.thumbnail_image(item_id)
        return None if img is None else render_thumbnail(img)

    # ----------------------------------------------------------------------------------- /stats
    def stats(self) -> dict[str, Any]:
        """Index, models and counters. The top-level ``query_model`` and ``mode`` are the default model's,
        the counters add up every model; ``models`` has each one's description, mode and counters. The
        latency percentiles are histogram estimates (:mod:`cmpnas.serving.stats`)."""
        counters = self.counters.combined()
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
                    **counters["models"][name],
                }
                for name, m in self.members.items()
            },
            "queries": counters["queries"],
            "rejected": counters["rejected"],
            "latency_ms": counters["latency_ms"],
            "workers": counters["workers"],
            "limits": self.limits,
            "uptime_s": round(time.time() - self.started, 1),
            "version": __version__,
        }


def render_thumbnail(img: Image.Image) -> bytes:
    """A gallery image as a PNG of at most THUMB_SIZE px; tiny images get an integer nearest-neighbour
    upscale so they stay legible."""
    img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
    img.thumbnail((THUMB_SIZE, THUMB_SIZE))
    if max(img.size) < THUMB_SIZE // 2:
        f = THUMB_SIZE // max(img.size)
        img = img.resize((img.width * f, img.height * f), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- hot swap
def watch_index(
    service: SearchService,
    reload: Callable[[], GalleryIndex],
    every_s: float,
    allow_incompatible: bool = False,
) -> threading.Thread:
    """Poll the index folder's manifest; when it changes (a rebuild, an append, a backfill or a transform
    swapped a new folder into place), ``reload()`` the index and swap it in. A new index that cannot be
    loaded or is refused keeps the old one serving (reported once per change)."""

    def stamp() -> tuple[int, int, int] | None:
        try:
            st = (service.index.path / "manifest.json").stat()
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
                service.swap_index(reload(), allow_incompatible)
                log.info("index %s reloaded (%d items)", service.index.path, len(service.index))
            except Exception as exc:  # noqa: BLE001 - whatever a bad new folder raises, the old index serves on
                log.warning("index %s changed but was not swapped in: %s", service.index.path, exc)

    thread = threading.Thread(target=loop, name="cmpnas-index-watch", daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------------------------- loading
def load_service(
    index_dir: str | Path,
    query_models: Sequence[str | Path],
    *,
    max_upload_bytes: int,
    max_k: int,
    max_pixels: int,
    default_k: int,
    allow_incompatible: bool,
    nprobe: int | None,
    ef_search: int | None,
    threads: int | None,
    stats_dir: str | None,
    milvus_uri: str | None,
    watch_index_s: float,
    dual_query: Sequence[str] = (),
) -> SearchService:
    """Load the index and every query model (refusing any that cannot search the index) and, unless
    ``watch_index_s`` is 0, start watching the index folder. The arguments are :func:`create_app`'s."""
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
    members += dual_members(members, dual_query)
    limits = {
        "max_k": max_k,
        "default_k": max(1, min(default_k, max_k)),
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

        watch_index(service, reload, watch_index_s, allow_incompatible)
    return service
