"""Untrusted uploads, bounded before anything expensive happens.

The request body size is checked by ASGI middleware before parsing; the image format against a short
allow-list (PIL never sees e.g. EPS); the pixel count from the header, before decoding. Every bad upload
becomes an :class:`UploadRejected` with a 4xx status and a message, on both request paths.
"""

from __future__ import annotations

import io
from typing import Any

from fastapi import Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # ~6300x6300; well below PIL's own bomb threshold
MULTIPART_OVERHEAD = 16 * 1024  # boundary lines and part headers around the file
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
RAW_CONTENT_TYPES = ("image/", "application/octet-stream")


class UploadRejected(Exception):
    """A request the service refuses, with its HTTP status and the one-sentence ``detail``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def is_raw_image(content_type: str | None) -> bool:
    """Whether a request body with this Content-Type is the image itself (not multipart)."""
    return content_type is not None and content_type.lower().startswith(RAW_CONTENT_TYPES)


async def send_json(send: Any, status: int, detail: str) -> None:
    """A ``{"detail"}`` JSON answer straight on the ASGI channel, as FastAPI would give it."""
    body = JSONResponse({"detail": detail}, status_code=status).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
                await send_json(send, 400, "Invalid Content-Length header.")
                return
            if too_big:
                await send_json(send, 413, self._message())
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
            await send_json(send, 413, self._message())

    def _message(self) -> str:
        return f"Request body is larger than {self.max_bytes} bytes."


async def read_upload(request: Request, file: UploadFile | None, max_bytes: int) -> tuple[bytes, str | None]:
    """The query image's bytes and content type: a multipart ``file`` field, or the raw request body
    (``Content-Type: image/*``) for clients that send bytes."""
    if file is not None:
        data = await file.read(max_bytes + 1)
        content_type = file.content_type
    else:
        content_type = request.headers.get("content-type")
        if not is_raw_image(content_type):
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
