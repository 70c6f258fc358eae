"""The HTTP API: the FastAPI app over a loaded :class:`~cmpnas.serving.state.SearchService`.

Several query models (a family: one per device budget) share one index; a client picks one with
``/search?model=NAME``, the first is the default. A client that runs the query model itself (the web page,
with ONNX Runtime Web) sends the embedding to ``/search/vector`` instead (:mod:`cmpnas.serving.vector`); the
runtime and the models' ``.onnx`` files are served here too (:mod:`cmpnas.serving.browser`). Every bad input
gets a 4xx with a one-sentence ``detail``; only a bug can produce a 500.
"""

from __future__ import annotations

import gc
import time
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from cmpnas import __version__
from cmpnas.errors import CmpnasError
from cmpnas.serving.browser import BrowserRuntime, describe_models, model_file
from cmpnas.serving.raw_search import RawSearch
from cmpnas.serving.state import SearchResponse, SearchService, load_service
from cmpnas.serving.uploads import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    MULTIPART_OVERHEAD,
    BodySizeLimit,
    UploadRejected,
    read_upload,
)
from cmpnas.serving.validation import search_params, validation_detail, vector_params
from cmpnas.serving.vector import DTYPES, check_vector, max_vector_bytes, parse_body, read_body

STATIC_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css"}


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
    ort_web_dir: str | Path | None = None,
    dual_query: list[str] | tuple[str, ...] = (),
) -> FastAPI:
    """Load the index and every query model once (refusing any that cannot search the index) and return the
    FastAPI app.

    ``query_models`` are model files or family folders (:func:`cmpnas.serving.family.expand_query_models`); the
    first is the default of ``/search``, the others are picked with ``/search?model=NAME``.

    ``threads`` sets the intra-op threads of torch, ONNX Runtime and FAISS (None = their defaults). One
    query is embedded and searched at a time, so 1 thread loses little, and it avoids OpenMP barrier stalls
    when the machine is busy. ``stats_dir`` is the folder the worker processes of one server share their
    metrics through (prometheus_client's multiprocess mode; default ``$PROMETHEUS_MULTIPROC_DIR``, neither: this
    app counts on its own). ``milvus_uri`` overrides where a Milvus index's collection is served from. Every
    ``watch_index_s`` seconds (0 = never) the index folder is checked and a rewritten index swapped in.
    ``ort_web_dir`` holds ONNX Runtime Web's files for in-browser embedding (default: ``$CMPNAS_ORT_WEB_DIR``,
    else the checkout's ``web/node_modules``); without them the page uploads images. Each ``dual_query`` pair
    ``NEW~OLD`` of served model names is one more query model of that name, answering by the dual query policy
    of a backfill (:mod:`cmpnas.compat.transition`): NEW's embedding searches the re-embedded rows, OLD's the
    rest.
    """
    service = load_service(
        index_dir,
        query_models,
        max_upload_bytes=max_upload_bytes,
        max_k=max_k,
        max_pixels=max_pixels,
        default_k=default_k,
        allow_incompatible=allow_incompatible,
        nprobe=nprobe,
        ef_search=ef_search,
        threads=threads,
        stats_dir=stats_dir,
        milvus_uri=milvus_uri,
        watch_index_s=watch_index_s,
        dual_query=dual_query,
    )
    page, assets = _page(), _static_assets()
    runtime = BrowserRuntime(ort_web_dir)
    # The model, the index and the imported libraries live as long as the process: move them out of the
    # collector's generations, so a full collection during a search does not walk them (a p99 spike).
    gc.collect()
    gc.freeze()
    return _app(service, page, assets, runtime)


def _page() -> str:
    return resources.files("cmpnas.serving").joinpath("static/index.html").read_text(encoding="utf-8")


def _static_assets() -> dict[str, tuple[bytes, str]]:
    """The page's scripts (static/*.js, ...), read once: name -> (bytes, media type)."""
    folder = resources.files("cmpnas.serving").joinpath("static")
    return {
        f.name: (f.read_bytes(), STATIC_TYPES[Path(f.name).suffix])
        for f in folder.iterdir()
        if Path(f.name).suffix in STATIC_TYPES
    }


def _app(
    service: SearchService, page: str, assets: dict[str, tuple[bytes, str]], runtime: BrowserRuntime
) -> FastAPI:
    max_k, default_k = service.limits["max_k"], service.limits["default_k"]
    max_upload_bytes = service.limits["max_upload_bytes"]
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

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, f"No static file '{name}'.")
        data, media = assets[name]
        return Response(data, media_type=media, headers={"Cache-Control": "no-cache"})

    @app.get(
        "/models",
        summary="The query models served (fingerprint, input size, channels, mean/std, .onnx URL) and the "
        "in-browser runtime: what a client needs to embed a query itself and send it to /search/vector",
    )
    def models() -> dict[str, Any]:
        return describe_models(service, runtime)

    @app.get(
        "/models/{file_name}",
        summary="A served query model's .onnx file (NAME.onnx), for in-browser embedding",
        responses={200: {"content": {"application/octet-stream": {}}}, 404: {"description": "no such model"}},
    )
    def model_onnx(file_name: str) -> Response:
        found = model_file(service, file_name)
        if found is None:
            onnx = [f"{n}.onnx" for n, m in service.members.items() if m.encoder.path.suffix == ".onnx"]
            raise HTTPException(
                404, f"No ONNX query model '{file_name}' here; served: {', '.join(onnx) or 'none'}."
            )
        return found

    @app.get("/ort/{version}/{name}", include_in_schema=False)
    def ort_file(version: str, name: str, request: Request) -> Response:
        found = runtime.response(version, name, request.headers.get("accept-encoding", ""))
        if found is None:
            raise HTTPException(404, f"No ONNX Runtime Web file '{version}/{name}' here.")
        return found

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
        "/metrics",
        summary="Search counters and latency histograms of every worker process, by query model and endpoint, "
        "in the Prometheus text format (what a Prometheus server scrapes)",
        responses={200: {"content": {"text/plain": {}}}},
    )
    def metrics(request: Request) -> Response:
        body, content_type = service.counters.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

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

    def answered(t0: float, hits: Any, want: int, member: Any, endpoint: str) -> Response:
        """Record the search's latency and answer it; validated by construction, so serialised once instead of
        FastAPI's second validation pass."""
        latency = (time.perf_counter() - t0) * 1000
        service.record(latency, member, endpoint)
        return Response(service.response_body(hits, want, latency, member), media_type="application/json")

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
        member = None
        try:
            want, member = search_params(
                service, k if k is not None else k_form, model, max_k=max_k, default_k=default_k
            )
            data, content_type = await read_upload(request, file, max_upload_bytes)
            hits = await service.answer_async(data, content_type, want, member)
        except UploadRejected as exc:
            service.record(None, member, "/search")
            raise HTTPException(exc.status, exc.message) from None
        return answered(t0, hits, want, member, "/search")

    vector_limit = max_vector_bytes(service.index.dim)
    fingerprints = ", ".join(service.by_fingerprint)

    @app.post(
        "/search/vector",
        response_model=SearchResponse,
        summary="Top-k gallery items for a query embedding computed by the client with one of the served query "
        "models (GET /models): JSON {vector, model, k}, or the raw little-endian floats",
        openapi_extra={
            "parameters": [
                {
                    "name": "model",
                    "in": "query",
                    "required": False,
                    "description": f"fingerprint of the query model that computed the vector: {fingerprints} "
                    "(in the JSON body or here)",
                    "schema": {"type": "string"},
                },
                {
                    "name": "k",
                    "in": "query",
                    "required": False,
                    "description": f"number of results, 1..{max_k} (default {default_k})",
                    "schema": {"type": "integer"},
                },
                {
                    "name": "dtype",
                    "in": "query",
                    "required": False,
                    "description": "value type of a raw body (little-endian)",
                    "schema": {"type": "string", "enum": list(DTYPES), "default": "float32"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["vector"],
                            "properties": {
                                "vector": {"type": "array", "items": {"type": "number"}},
                                "model": {"type": "string"},
                                "k": {"type": "integer"},
                            },
                        }
                    },
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
        },
        responses={
            400: {"description": "body not readable as JSON or as whole float values"},
            413: {"description": f"body over {vector_limit} bytes"},
            415: {"description": "neither application/json nor application/octet-stream"},
            422: {"description": "bad k, unknown fingerprint, wrong dimension, NaN/Inf or all-zero vector"},
        },
    )
    async def search_vector(request: Request) -> Response:
        t0 = time.perf_counter()
        member = None
        try:
            body = await read_body(request, vector_limit)
            parsed = parse_body(body, request.headers.get("content-type"), request.query_params, max_k=max_k)
            want, member = vector_params(service, parsed.k, parsed.model, max_k=max_k, default_k=default_k)
            unit = check_vector(parsed, service.index.dim, member)
            hits = await service.answer_vector_async(unit, want, member)
        except UploadRejected as exc:
            service.record(None, member, "/search/vector")
            raise HTTPException(exc.status, exc.message) from None
        return answered(t0, hits, want, member, "/search/vector")

    return app
