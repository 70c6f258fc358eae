"""Search by an embedding the client computed (``POST /search/vector``): reading and checking its body.

Why: a device that runs the query model itself (the web page with ONNX Runtime Web, an app) sends its
D numbers instead of the image, so the server only searches. What the server cannot vouch for by embedding
the image itself it checks on the vector: the model that computed it is one it serves (named by fingerprint;
each served model's compatibility with the index was checked at load), the dimension is the index's, every
value is finite and the vector is not all zeros. It then L2-normalises it, as the image path normalises the
model's output, so a client may send the raw or the normalised embedding.

Two body formats: JSON ``{"vector": [...], "model": "<fingerprint>", "k": 10}``, or the raw little-endian
values (``Content-Type: application/octet-stream``, ``?dtype=float32|float16&model=<fingerprint>&k=10``);
float16 is half the bytes but rounds each value to 11 significant bits, which can swap gallery items whose
scores nearly tie; the web page sends float32.
Every bad body is an :class:`~cmpnas.serving.uploads.UploadRejected` whose message names the problem and the fix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request

from cmpnas.serving.state import Member
from cmpnas.serving.uploads import UploadRejected

DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
DEFAULT_DTYPE = "float32"
JSON_TYPE = "application/json"
RAW_TYPE = "application/octet-stream"
_FORMATS = (
    f'JSON (Content-Type: {JSON_TYPE}, {{"vector": [...], "model": "<fingerprint>", "k": 10}}) or the raw '
    f"little-endian values (Content-Type: {RAW_TYPE} with ?dtype=float32|float16&model=<fingerprint>)"
)


def max_vector_bytes(dim: int) -> int:
    """Body limit of a vector search: ``dim`` floats written out in JSON at full precision, with room for
    spacing and the other fields. Far below the image upload limit: a body bigger than this is no vector."""
    return 1024 + 64 * dim


@dataclass
class VectorBody:
    """A parsed body: the values as sent (float64, unchecked), and ``k``/``model`` from the body or query."""

    values: np.ndarray
    k: int | None
    model: str | None
    source: str  # "JSON" | "float32 body" | "float16 body": how the messages name what was sent


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to be over ``limit`` bytes (declared length first,
    then while it streams in), so an oversized body is never held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadRejected(413, _too_big(int(declared), limit))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise UploadRejected(413, _too_big(None, limit))
    return bytes(body)


def _too_big(size: int | None, limit: int) -> str:
    got = f"is {size} bytes" if size is not None else "is larger than that"
    return (
        f"The vector body {got}; the limit here is {limit} bytes. Send one query vector: a 128-d vector is "
        "256 bytes as float16 (?dtype=float16), 512 as float32, about 3 KB as JSON."
    )


def parse_body(body: bytes, content_type: str | None, params: Mapping[str, str], *, max_k: int) -> VectorBody:
    """Body + query parameters -> :class:`VectorBody`, or UploadRejected: 415 for a content type that is
    neither JSON nor raw bytes, 400 for a body that cannot be read as one, 422 for well-formed but wrong fields.
    ``k`` and ``model`` come from the JSON body or else the query string (raw bodies: the query string)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == JSON_TYPE or media.endswith("+json"):
        return _parse_json(body, params, max_k)
    if media == RAW_TYPE:
        return _parse_raw(body, params, max_k)
    hint = " To search with an image, POST it to /search instead." if media.startswith("image/") else ""
    raise UploadRejected(
        415,
        f"Content-Type '{media or 'missing'}' is not accepted by /search/vector: send {_FORMATS}.{hint}",
    )


def _query_k(params: Mapping[str, str], max_k: int) -> int | None:
    raw = params.get("k")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UploadRejected(422, f"k must be an integer between 1 and {max_k} (got {raw!r}).") from None


def _parse_json(body: bytes, params: Mapping[str, str], max_k: int) -> VectorBody:
    if not body:
        raise UploadRejected(400, f"The body is empty: send {_FORMATS}.")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        where = (
            f" ({exc.msg} at line {exc.lineno} column {exc.colno})"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise UploadRejected(
            400,
            f'The body is not valid JSON{where}. Send {{"vector": [...], "model": "<fingerprint>", '
            f'"k": 10}}, or the raw floats with Content-Type: {RAW_TYPE}.',
        ) from None
    if not isinstance(doc, dict):
        raise UploadRejected(
            422,
            f'The JSON body is a {_json_type(doc)}; send an object: {{"vector": [...], "model": "<fingerprint>"}}.',
        )
    if "vector" not in doc:
        raise UploadRejected(
            422,
            f'The JSON body has no "vector" (fields: {", ".join(map(str, doc)) or "none"}): put the embedding '
            'in "vector" as a list of numbers.',
        )
    values = _json_numbers(doc["vector"])
    k = doc.get("k")
    if k is None:
        k = _query_k(params, max_k)
    elif isinstance(k, bool) or not isinstance(k, int):
        raise UploadRejected(422, f"k must be an integer between 1 and {max_k} (got {k!r}).")
    model = doc.get("model", params.get("model"))
    if model is not None and not isinstance(model, str):
        raise UploadRejected(
            422, f'"model" must be the query model\'s fingerprint as a string (got {model!r}).'
        )
    return VectorBody(values, k, model, "JSON")


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _json_numbers(vector: Any) -> np.ndarray:
    if not isinstance(vector, list):
        raise UploadRejected(422, f'"vector" is a {_json_type(vector)}; send a list of numbers (one query).')
    for i, v in enumerate(vector):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            what = "a nested list: send one query vector, not a batch" if isinstance(v, list) else repr(v)
            raise UploadRejected(422, f'"vector"[{i}] is not a number ({what}).')
    try:
        return np.asarray(vector, dtype=np.float64)
    except OverflowError:  # an integer literal beyond float64
        return np.asarray([float("inf") if abs(v) > 1e308 else float(v) for v in vector], dtype=np.float64)


def _parse_raw(body: bytes, params: Mapping[str, str], max_k: int) -> VectorBody:
    name = params.get("dtype", DEFAULT_DTYPE)
    dtype = DTYPES.get(name)
    if dtype is None:
        raise UploadRejected(422, f"dtype must be float32 or float16 (got {name!r}): the body's value type.")
    if not body:
        raise UploadRejected(400, f"The body is empty: send the vector's values as little-endian {name}.")
    if len(body) % dtype.itemsize:
        raise UploadRejected(
            400,
            f"A {name} body must be a whole number of {dtype.itemsize}-byte values; got {len(body)} bytes. "
            "Send the vector's values as little-endian "
            f"{name}{' (or pass the dtype the body really has)' if name == 'float32' else ''}.",
        )
    values = np.frombuffer(body, dtype=dtype).astype(np.float64)
    return VectorBody(values, _query_k(params, max_k), params.get("model"), f"{name} body")


def check_vector(parsed: VectorBody, dim: int, member: Member) -> np.ndarray:
    """The sent values as the L2-normalised float32 query the index expects, or UploadRejected (422): wrong
    dimension, a NaN/Inf, all zeros. Normalised in float64 after scaling by the largest value, so neither
    huge nor tiny (subnormal) values overflow or vanish on the way."""
    values = parsed.values
    if values.ndim != 1 or values.size != dim:
        extra = ""
        if parsed.source == "float32 body" and values.size == dim // 2:
            extra = " If the body is float16, pass ?dtype=float16."
        elif parsed.source == "float16 body" and values.size == 2 * dim:
            extra = " If the body is float32, pass ?dtype=float32."
        raise UploadRejected(
            422,
            f"The vector has {values.size} values ({parsed.source}); the index and query model "
            f"'{member.name}' ({member.fingerprint}) use {dim}.{extra}",
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        shown = ", ".join(str(int(i)) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise UploadRejected(
            422,
            f"The vector has {bad.size} non-finite value(s) (NaN or infinity) at position(s) {shown}: send finite "
            "numbers (a NaN usually means the model ran on a broken input).",
        )
    peak = float(np.abs(values).max())
    if peak == 0.0:
        raise UploadRejected(
            422,
            "The vector is all zeros: it has no direction, so it matches nothing. Send the query model's "
            "embedding of the image.",
        )
    scaled = values / peak
    return (scaled / math.sqrt(float(scaled @ scaled))).astype(np.float32)
