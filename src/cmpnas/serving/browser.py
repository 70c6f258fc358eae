"""What the web page needs to embed a query in the browser, served as static files by ``cmpnas serve``:
ONNX Runtime Web's WebAssembly build, each served query model's ``.onnx``, and their description
(``GET /models``).

Why from this server: the page must run exactly the model whose fingerprint ``/search/vector`` accepts, so
the model file comes from the process that checked it against the index. The runtime is pinned in
``web/package-lock.json`` and installed by ``scripts/setup.sh`` (``npm ci``); only its WebAssembly build is
served (no WebGPU/WebGL code). Where it is missing the page uploads the image instead, and ``/models`` says
why. The runtime's URL holds its version, so browsers may cache it for good.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi.responses import FileResponse, Response
from PIL import Image

from cmpnas.serving.state import Member, SearchService

ORT_DIR_ENV = "CMPNAS_ORT_WEB_DIR"  # a folder holding ORT_FILES (default: the checkout's web/node_modules)
ORT_ENTRY = "ort.wasm.min.mjs"
ORT_FILES = {
    ORT_ENTRY: "text/javascript",
    "ort-wasm-simd-threaded.mjs": "text/javascript",  # the Emscripten loader ORT_ENTRY imports
    "ort-wasm-simd-threaded.wasm": "application/wasm",
}
IMMUTABLE = "public, max-age=31536000, immutable"


def checkout_runtime_dir() -> Path:
    """Where ``scripts/setup.sh`` installs ONNX Runtime Web in a source checkout (editable install)."""
    return Path(__file__).resolve().parents[3] / "web" / "node_modules" / "onnxruntime-web" / "dist"


class BrowserRuntime:
    """ONNX Runtime Web's files in one folder (or why they are unavailable), served gzip-compressed to
    clients that accept it (most of its bytes are the WebAssembly binary, which compresses well)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        chosen = folder or os.environ.get(ORT_DIR_ENV) or checkout_runtime_dir()
        self.folder = Path(chosen)
        missing = [name for name in ORT_FILES if not (self.folder / name).is_file()]
        self.problem = (
            f"ONNX Runtime Web is not installed ({', '.join(missing)} missing in {self.folder}): run "
            "scripts/setup.sh on a machine with node and npm (it runs npm ci in web/), or point "
            f"{ORT_DIR_ENV} at a folder holding those files"
            if missing
            else None
        )
        self.version = self._version()
        self._gzipped: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.problem is None

    def _version(self) -> str:
        try:
            return str(json.loads((self.folder.parent / "package.json").read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return "local"

    def describe(self) -> dict[str, Any]:
        """The page's instructions: the module to import and the prefix of its WebAssembly files (URLs
        relative to the server root), or the problem."""
        base = f"ort/{quote(self.version)}/"
        return {
            "available": self.available,
            "name": "onnxruntime-web",
            "version": self.version,
            "build": "wasm",
            "module": base + ORT_ENTRY if self.available else None,
            "wasm_paths": base if self.available else None,
            "problem": self.problem,
        }

    def response(self, version: str, name: str, accept_encoding: str) -> Response | None:
        """One runtime file (None: not served here, a 404)."""
        media = ORT_FILES.get(name)
        if media is None or not self.available or version != self.version:
            return None
        path = self.folder / name
        # a versioned URL may be cached for good; files of unknown version are revalidated
        cache = IMMUTABLE if self.version != "local" else "no-cache"
        headers = {"Cache-Control": cache, "Vary": "Accept-Encoding"}
        if "gzip" not in accept_encoding.lower():
            return FileResponse(path, media_type=media, headers=headers)
        return Response(self._gzip(path), media_type=media, headers={**headers, "Content-Encoding": "gzip"})

    def _gzip(self, path: Path) -> bytes:
        """The file gzip-compressed: ``NAME.gz`` beside it when as new (scripts/setup.sh writes those), else
        compressed here, once per process."""
        with self._lock:  # one read or compression per file and process, however many first requests race
            data = self._gzipped.get(path.name)
            if data is None:
                packed = path.with_name(path.name + ".gz")
                if packed.is_file() and packed.stat().st_mtime >= path.stat().st_mtime:
                    data = packed.read_bytes()
                else:
                    data = gzip.compress(path.read_bytes(), compresslevel=6, mtime=0)
                self._gzipped[path.name] = data
            return data


@lru_cache(maxsize=1)
def resize_pass_order() -> str:
    """Which order this Pillow runs the two passes of a BILINEAR resize in, found by trying it: the page's
    port must do the same to get the same pixels (orders differ by rounding between the passes).

    "pillow13": vertical first when the height shrinks by more than twice as many pixels as the width
    (Pillow 13's Resample.c); "horizontal-first": always horizontal first (older Pillow)."""
    w, h, nw, nh = 33, 100, 28, 85  # the rule picks vertical first here
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8), "L")
    both = np.asarray(img.resize((nw, nh), Image.BILINEAR))
    vertical_first = np.asarray(img.resize((w, nh), Image.BILINEAR).resize((nw, nh), Image.BILINEAR))
    return "pillow13" if np.array_equal(both, vertical_first) else "horizontal-first"


def model_url(member: Member) -> str | None:
    """URL (relative to the server root) of a served model's ``.onnx``; None for a torch checkpoint."""
    if member.encoder.path.suffix.lower() != ".onnx" or member.partner is not None:
        return None  # a torch checkpoint, or the dual policy (two embeddings: the server makes them)
    return f"models/{quote(member.name, safe='')}.onnx"


def _browser_problem(member: Member) -> str:
    if member.partner is not None:
        return (
            f"the dual query policy embeds each image with two models ({member.name}): upload the image to "
            "/search"
        )
    return (
        "served as a .safetensors (torch) checkpoint: export it with cmpnas export and serve the .onnx to embed "
        "in the browser"
    )


def describe_models(service: SearchService, runtime: BrowserRuntime) -> dict[str, Any]:
    """``GET /models``: per served query model what a client needs to embed a query itself (the input it
    expects, the ``.onnx``) and to send it (the fingerprint ``/search/vector`` wants), plus the runtime."""
    models = []
    for name, member in service.members.items():
        spec, url = member.encoder.spec, model_url(member)
        models.append(
            {
                "name": name,
                "default": member is service.default,
                "fingerprint": member.fingerprint,
                "compatible_with": member.encoder.compatible_with,
                "kind": member.encoder.kind,
                "mode": member.mode,
                "dim": member.encoder.dim,
                "in_chans": spec.in_chans,
                "input_size": spec.input_size,
                "mean": list(spec.mean),
                "std": list(spec.std),
                "preprocess": "decode; convert to L (1 channel) or RGB; resize the shorter side to input_size "
                "(PIL bilinear, Python rounding of the longer side); centre crop; x/255; (x-mean)/std; NCHW "
                "float32",
                "resize_pass_order": resize_pass_order(),
                "onnx_url": url,
                "onnx_bytes": member.encoder.path.stat().st_size if url else None,
                "dual_query_with": member.partner.name if member.partner is not None else None,
                "browser_problem": None if url else _browser_problem(member),
            }
        )
    return {
        "default": service.default.name,
        "dim": service.index.dim,
        "gallery_fingerprint": service.index.gallery_fingerprint,
        "search_vector": "search/vector",
        "runtime": runtime.describe(),
        "models": models,
    }


def model_file(service: SearchService, file_name: str) -> Response | None:
    """``GET /models/NAME.onnx``: the served model's file itself (None: no such ONNX model, a 404).
    Revalidated on every load (ETag), as a restarted server may serve another model under the same name."""
    name = file_name.removesuffix(".onnx")
    member = service.members.get(name)
    if member is None or not file_name.endswith(".onnx") or model_url(member) is None:
        return None
    return FileResponse(
        member.encoder.path, media_type="application/octet-stream", headers={"Cache-Control": "no-cache"}
    )
