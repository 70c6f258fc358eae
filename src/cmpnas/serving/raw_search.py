"""A second way into ``POST /search``: the image bytes as the body, answered without FastAPI's request parsing.

FastAPI's parameter machinery costs a large share of a worker's CPU per search; a client that sends plainly
valid raw bytes does not need it. Measured with ``benchmarks/serving.py`` (10k gallery, 8 clients, 2 workers, same
machine and models): 1,061-1,371 searches/s through the route (multipart bodies, ``serving_multipart.json``)
against 1,868-1,978 on this path (``serving_reuseport.json``). Only the parsing is skipped: the parameter rules
(:mod:`cmpnas.serving.validation`), the search, its errors, counters and answer are the service's, shared
with the route, and anything not plainly valid is left to the route, which gives the canonical responses.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

from cmpnas.serving.state import Member, SearchService
from cmpnas.serving.uploads import UploadRejected, is_raw_image, send_json
from cmpnas.serving.validation import search_params

MAX_K_DIGITS = 6


class RawSearch:
    """ASGI middleware that answers ``POST /search`` itself when everything is plainly valid:
    ``Content-Type: image/*`` (or octet-stream), a declared Content-Length within the upload limit, and no
    query parameter but an in-range integer ``k`` and the name of one of the server's query models ``model``,
    each at most once. Anything else — multipart, a bad ``k``, a missing length — goes to the app (an unknown
    model's 422 included)."""

    def __init__(self, app: Any, service: SearchService, max_k: int, default_k: int, max_bytes: int) -> None:
        self.app, self.service = app, service
        self.max_k, self.default_k, self.max_bytes = max_k, default_k, max_bytes

    def _params(self, query: bytes) -> tuple[int, Member] | None:
        """(k, query model) of a plainly valid query string, else None (the route answers it)."""
        try:  # at most k and model; a part without "=" is not plain
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, strict_parsing=True, max_num_fields=2)
        except ValueError:
            return None
        params = dict(pairs)
        if len(params) < len(pairs) or not params.keys() <= {"k", "model"}:
            return None  # a name twice, or one the route must judge
        k_text = params.get("k")
        if k_text is not None and not (k_text.isascii() and k_text.isdigit() and len(k_text) <= MAX_K_DIGITS):
            return None
        k = None if k_text is None else int(k_text)
        model = params.get("model")
        try:
            return search_params(self.service, k, model, max_k=self.max_k, default_k=self.default_k)
        except UploadRejected:
            return None

    def _takes(self, scope: dict) -> tuple[str, int, Member] | None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != "/search":
            return None
        params = self._params(scope.get("query_string", b""))
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        length = headers.get(b"content-length", b"")
        if params is None or not is_raw_image(content_type) or not length.isdigit() or int(length) > self.max_bytes:
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
            await send_json(send, exc.status, exc.message)
            return
        latency = (time.perf_counter() - t0) * 1000
        self.service.record(latency, member)
        payload = self.service.response_body(hits, want, latency, member)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
