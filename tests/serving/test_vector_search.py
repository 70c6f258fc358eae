"""POST /search/vector through the test client: answers exactly like the image /search for the same embedding,
refuses every bad body with a 4xx JSON ``detail`` (and keeps answering), counts like image searches; plus what
the page needs for in-browser embedding: /models, the .onnx files, the runtime files, static/embed.js."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from fixtures_serving import png_bytes as encode

from cmpnas.serving.app import create_app
from cmpnas.serving.browser import ORT_ENTRY, ORT_FILES
from cmpnas.serving.vector import max_vector_bytes

MAX_K = 20
DIM = 16  # the fixtures' index
RAW = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def fake_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like web/node_modules/onnxruntime-web/dist (contents are not run here)."""
    root = tmp_path_factory.mktemp("ort") / "onnxruntime-web"
    (root / "dist").mkdir(parents=True)
    (root / "package.json").write_text(json.dumps({"name": "onnxruntime-web", "version": "9.9.9"}))
    for i, name in enumerate(ORT_FILES):
        (root / "dist" / name).write_bytes(b"runtime file %d " % i * 500)
        # a pre-compressed copy, as scripts/setup.sh writes it; the second one is stale (older than its file)
        packed = root / "dist" / f"{name}.gz"
        packed.write_bytes(gzip.compress((root / "dist" / name).read_bytes(), compresslevel=1))
        if i == 1:
            os.utime(packed, (1_000_000, 1_000_000))
    return root / "dist"


@pytest.fixture(scope="module")
def client(flat_index: Path, onnx_query: Path, small_query: Path, fake_runtime: Path) -> TestClient:
    """'query' (ONNX, the default) and 'small' (torch checkpoint), both compatible with the index."""
    app = create_app(
        flat_index, onnx_query, small_query, max_k=MAX_K, watch_index_s=0, ort_web_dir=fake_runtime
    )
    return TestClient(app)


def service(client: TestClient) -> Any:
    return client.app.state.service  # type: ignore[attr-defined]


def embedding(client: TestClient, img: Any, name: str = "query") -> np.ndarray:
    """The served model's own (normalised float32) embedding of ``img``, as the image path computes it."""
    return service(client).members[name].encoder.embed_images([img])[0]


def fp(client: TestClient, name: str = "query") -> str:
    return service(client).members[name].fingerprint


def ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [h["id"] for h in response.json()["results"]]


def good(client: TestClient, pattern: Any) -> None:
    """A plain valid vector search still answers (after any bad request)."""
    vec = embedding(client, pattern("checks", 3))
    r = client.post("/search/vector", json={"vector": vec.tolist(), "model": fp(client), "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text


# --------------------------------------------------------------------------------------------- good requests
def test_json_float32_and_float16_answer_like_the_image_path(client: TestClient, pattern: Any) -> None:
    img = pattern("stripes", 11)
    by_image = client.post("/search", params={"k": 7}, files={"file": ("q.png", encode(img), "image/png")})
    want = by_image.json()
    vec = embedding(client, img)

    as_json = client.post("/search/vector", json={"vector": vec.tolist(), "model": fp(client), "k": 7})
    f32 = client.post(
        "/search/vector",
        content=vec.astype("<f4").tobytes(),
        params={"model": fp(client), "k": 7},
        headers=RAW,
    )
    f16 = client.post(
        "/search/vector",
        content=vec.astype("<f2").tobytes(),
        params={"model": fp(client), "k": 7, "dtype": "float16"},
        headers=RAW,
    )
    for r in (as_json, f32):
        body = r.json()
        assert set(body) == set(want) and body["k"] == 7 and body["mode"] == want["mode"] == "heterogeneous"
        assert body["model"] == want["model"] == "query"
        assert [(h["id"], h["label"], h["thumb"]) for h in body["results"]] == [
            (h["id"], h["label"], h["thumb"]) for h in want["results"]
        ]
        np.testing.assert_allclose(
            [h["score"] for h in body["results"]], [h["score"] for h in want["results"]], atol=1e-5
        )
    assert ids(f16) == ids(as_json)  # float16 keeps the ranking here
    assert len(vec.astype("<f2").tobytes()) == 2 * DIM


def test_the_vector_is_normalised_and_k_defaults_like_search(client: TestClient, pattern: Any) -> None:
    vec = embedding(client, pattern("blobs", 4))
    unit = client.post("/search/vector", json={"vector": vec.tolist(), "model": fp(client)})
    scaled = client.post("/search/vector", json={"vector": (vec * 37.5).tolist(), "model": fp(client)})
    tiny = client.post(
        "/search/vector", json={"vector": (vec.astype(np.float64) * 1e-310).tolist(), "model": fp(client)}
    )
    assert ids(unit) == ids(scaled) == ids(tiny) and len(ids(unit)) == 10  # the server's default_k
    np.testing.assert_allclose(
        [h["score"] for h in unit.json()["results"]],
        [h["score"] for h in scaled.json()["results"]],
        atol=1e-6,
    )
    huge = client.post(
        "/search/vector", json={"vector": (vec.astype(np.float64) * 1e300).tolist(), "model": fp(client)}
    )
    assert ids(huge) == ids(unit)  # no overflow on the way to unit length


def test_model_and_k_in_the_query_string_for_json(client: TestClient, pattern: Any) -> None:
    vec = embedding(client, pattern("checks", 8))
    r = client.post("/search/vector", json={"vector": vec.tolist()}, params={"model": fp(client), "k": 4})
    assert len(ids(r)) == 4


def test_each_family_member_by_its_fingerprint_and_stats_count_vectors(
    flat_index: Path, onnx_query: Path, small_query: Path, pattern: Any
) -> None:
    client = TestClient(create_app(flat_index, onnx_query, small_query, watch_index_s=0))
    img = pattern("stripes", 2)
    for name in ("query", "small"):
        by_image = client.post(
            "/search", params={"model": name, "k": 5}, files={"file": ("q.png", encode(img), "image/png")}
        )
        r = client.post(
            "/search/vector",
            json={"vector": embedding(client, img, name).tolist(), "model": fp(client, name), "k": 5},
        )
        assert ids(r) == ids(by_image) and r.json()["model"] == name
    client.post("/search/vector", json={"vector": [0.0] * DIM, "model": fp(client, "small")})  # rejected
    client.post(
        "/search/vector", content=b"{", headers={"Content-Type": "application/json"}
    )  # rejected, no model
    stats = client.get("/stats").json()
    assert stats["queries"] == 4 and stats["rejected"] == 2
    for name in ("query", "small"):
        assert stats["models"][name]["queries"] == 2
        assert stats["models"][name]["latency_ms"]["window"] == 2
    assert stats["models"]["small"]["rejected"] == 1 and stats["models"]["query"]["rejected"] == 0


# --------------------------------------------------------------------------------------------- bad requests
def _bad_requests(client: TestClient) -> list[tuple[str, dict[str, Any], int, tuple[str, ...]]]:
    """(case, request kwargs, status, words the detail must contain)."""
    q = fp(client)
    ok = [0.25] * DIM
    f16 = {"model": q, "dtype": "float16"}
    over = max_vector_bytes(DIM) + 1
    return [
        (
            "unknown fingerprint",
            {"json": {"vector": ok, "model": "0123456789abcdef"}},
            422,
            ("0123456789abcdef", q, fp(client, "small")),
        ),
        (
            "a name, not a fingerprint",
            {"json": {"vector": ok, "model": "small"}},
            422,
            ("model name", fp(client, "small")),
        ),
        ("no model", {"json": {"vector": ok}}, 422, ("fingerprint", "missing", q)),
        ("model not a string", {"json": {"vector": ok, "model": 7}}, 422, ("string",)),
        ("too few values", {"json": {"vector": ok[:-1], "model": q}}, 422, ("15 values", str(DIM))),
        ("too many values", {"json": {"vector": ok * 2, "model": q}}, 422, ("32 values", str(DIM))),
        ("a batch", {"json": {"vector": [ok, ok], "model": q}}, 422, ("nested list", "one query")),
        (
            "NaN",
            {
                "content": json.dumps({"vector": [float("nan")] + ok[1:], "model": q}),
                "headers": {"Content-Type": "application/json"},
            },
            422,
            ("NaN", "position(s) 0"),
        ),
        (
            "infinity",
            {
                "content": b'{"vector": [1e999'
                + b", 0.5" * (DIM - 1)
                + b'], "model": "'
                + q.encode()
                + b'"}',
                "headers": {"Content-Type": "application/json"},
            },
            422,
            ("non-finite",),
        ),
        ("all zeros", {"json": {"vector": [0] * DIM, "model": q}}, 422, ("all zeros",)),
        (
            "a string value",
            {"json": {"vector": ["0.1"] * DIM, "model": q}},
            422,
            ('"vector"[0]', "not a number"),
        ),
        ("a boolean value", {"json": {"vector": [True] * DIM, "model": q}}, 422, ("not a number",)),
        ("vector not a list", {"json": {"vector": "0.1,0.2", "model": q}}, 422, ("list of numbers",)),
        ("no vector field", {"json": {"embedding": ok, "model": q}}, 422, ('no "vector"', "embedding")),
        ("a JSON array body", {"json": ok}, 422, ("object",)),
        (
            "not JSON",
            {"content": b"vector=1,2,3", "headers": {"Content-Type": "application/json"}},
            400,
            ("not valid JSON",),
        ),
        (
            "empty JSON body",
            {"content": b"", "headers": {"Content-Type": "application/json"}},
            400,
            ("empty",),
        ),
        ("k zero", {"json": {"vector": ok, "model": q, "k": 0}}, 422, (f"between 1 and {MAX_K}",)),
        ("k too big", {"json": {"vector": ok, "model": q, "k": MAX_K + 1}}, 422, (f"between 1 and {MAX_K}",)),
        ("k not an integer", {"json": {"vector": ok, "model": q, "k": "ten"}}, 422, ("integer",)),
        (
            "k query not an integer",
            {"json": {"vector": ok, "model": q}, "params": {"k": "x"}},
            422,
            ("integer",),
        ),
        (
            "float16 odd bytes",
            {"content": b"\x00\x3c" * DIM + b"\x00", "headers": RAW, "params": f16},
            400,
            ("float16", "2-byte", str(2 * DIM + 1)),
        ),
        (
            "float32 not whole",
            {"content": b"\x00" * (4 * DIM + 2), "headers": RAW, "params": {"model": q}},
            400,
            ("float32", "4-byte"),
        ),
        (
            "float32 sent as float16",
            {"content": np.full(DIM, 0.5, "<f4").tobytes(), "headers": RAW, "params": f16},
            422,
            ("32 values", "dtype=float32"),
        ),
        (
            "float16 sent as float32",
            {"content": np.full(DIM, 0.5, "<f2").tobytes(), "headers": RAW, "params": {"model": q}},
            422,
            ("8 values", "dtype=float16"),
        ),
        (
            "raw NaN",
            {"content": np.full(DIM, np.nan, "<f4").tobytes(), "headers": RAW, "params": {"model": q}},
            422,
            ("non-finite",),
        ),
        (
            "raw zeros",
            {"content": np.zeros(DIM, "<f2").tobytes(), "headers": RAW, "params": f16},
            422,
            ("all zeros",),
        ),
        ("raw empty", {"content": b"", "headers": RAW, "params": {"model": q}}, 400, ("empty",)),
        (
            "bad dtype",
            {"content": b"\x00" * 64, "headers": RAW, "params": {"model": q, "dtype": "float64"}},
            422,
            ("float32 or float16",),
        ),
        (
            "text body",
            {"content": b"0.1 0.2", "headers": {"Content-Type": "text/plain"}},
            415,
            ("text/plain", "application/json", "application/octet-stream"),
        ),
        (
            "an image",
            {"content": b"\x89PNG....", "headers": {"Content-Type": "image/png"}},
            415,
            ("/search instead",),
        ),
        ("no content type", {"content": b"[1, 2]"}, 415, ("missing",)),
        (
            "multipart",
            {"files": {"file": ("v.bin", b"\x00" * 64, "application/octet-stream")}},
            415,
            ("multipart/form-data",),
        ),
        (
            "body too big (JSON)",
            {"content": b" " * over, "headers": {"Content-Type": "application/json"}},
            413,
            (str(over - 1),),
        ),
        (
            "body too big (raw)",
            {"content": b"\x00" * over, "headers": RAW, "params": {"model": q}},
            413,
            ("limit",),
        ),
    ]


def test_every_bad_body_is_a_4xx_with_a_json_detail_and_the_service_keeps_answering(
    client: TestClient, pattern: Any
) -> None:
    before = client.get("/stats").json()
    cases = _bad_requests(client)
    for case, kwargs, status, words in cases:
        r = client.post("/search/vector", **kwargs)
        assert r.status_code == status, (case, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json", case
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail.endswith((".", ")")), (case, detail)
        for word in words:
            assert word in detail, (case, word, detail)
        good(client, pattern)
    after = client.get("/stats").json()
    assert after["rejected"] - before["rejected"] == len(cases)
    assert after["queries"] - before["queries"] == len(cases)


def test_a_chunked_oversized_body_is_413(client: TestClient) -> None:
    def chunks() -> Any:
        for _ in range(64):
            yield b" " * 1024

    r = client.post("/search/vector", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]


# --------------------------------------------------------------------------------------------- browser assets
def test_models_describe_each_served_model_for_in_browser_embedding(
    client: TestClient, onnx_query: Path, small_query: Path
) -> None:
    desc = client.get("/models").json()
    assert desc["default"] == "query" and desc["dim"] == DIM and desc["search_vector"] == "search/vector"
    by_name = {m["name"]: m for m in desc["models"]}
    assert list(by_name) == ["query", "small"]
    onnx, torch_model = by_name["query"], by_name["small"]
    spec = service(client).members["query"].encoder.spec
    assert onnx["fingerprint"] == fp(client) and onnx["default"] and not torch_model["default"]
    assert (onnx["in_chans"], onnx["input_size"], onnx["mean"], onnx["std"]) == (
        spec.in_chans,
        spec.input_size,
        spec.mean,
        spec.std,
    )
    assert onnx["onnx_url"] == "models/query.onnx" and onnx["onnx_bytes"] == onnx_query.stat().st_size
    file = client.get("/" + onnx["onnx_url"])
    assert file.status_code == 200 and file.content == onnx_query.read_bytes()
    assert torch_model["onnx_url"] is None and "cmpnas export" in torch_model["browser_problem"]
    assert torch_model["fingerprint"] == fp(client, "small")
    for missing in ("/models/small.onnx", "/models/nobody.onnx", "/models/query.safetensors"):
        r = client.get(missing)
        assert r.status_code == 404 and "query.onnx" in r.json()["detail"]


def test_runtime_files_are_served_versioned_and_gzipped(client: TestClient, fake_runtime: Path) -> None:
    rt = client.get("/models").json()["runtime"]
    assert rt["available"] and rt["version"] == "9.9.9" and rt["build"] == "wasm"
    assert rt["module"] == f"ort/9.9.9/{ORT_ENTRY}" and rt["wasm_paths"] == "ort/9.9.9/"
    for name, media in ORT_FILES.items():
        plain = client.get(f"/ort/9.9.9/{name}", headers={"Accept-Encoding": "identity"})
        assert plain.status_code == 200 and plain.content == (fake_runtime / name).read_bytes()
        assert (
            plain.headers["content-type"].startswith(media) and "immutable" in plain.headers["cache-control"]
        )
        zipped = client.get(f"/ort/9.9.9/{name}", headers={"Accept-Encoding": "gzip, br"})
        assert zipped.headers["content-encoding"] == "gzip" and zipped.content == plain.content  # decoded
        assert int(zipped.headers["content-length"]) < len(plain.content)
        assert gzip.decompress(gzip.compress(plain.content)) == plain.content
    for bad in ("/ort/1.0.0/" + ORT_ENTRY, "/ort/9.9.9/ort.webgpu.min.mjs", "/ort/9.9.9/package.json"):
        assert client.get(bad).status_code == 404


def test_without_the_runtime_models_say_why(flat_index: Path, onnx_query: Path, tmp_path: Path) -> None:
    client = TestClient(create_app(flat_index, onnx_query, watch_index_s=0, ort_web_dir=tmp_path / "none"))
    rt = client.get("/models").json()["runtime"]
    assert not rt["available"] and rt["module"] is None
    assert "scripts/setup.sh" in rt["problem"] and "npm" in rt["problem"]
    assert client.get(f"/ort/{rt['version']}/{ORT_ENTRY}").status_code == 404
    assert client.get("/models/query.onnx").status_code == 200  # the model itself is still served


def test_page_scripts_and_openapi(client: TestClient) -> None:
    page = client.get("/").text
    assert 'src="static/embed.js"' in page and "search/vector" in page
    js = client.get("/static/embed.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "CmpnasEmbed" in js.text
    assert client.get("/static/index.html").status_code == 404  # the page is at /, not a static file
    assert client.get("/static/../routes.py").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert "/search/vector" in paths and "/models" in paths
    body = paths["/search/vector"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/octet-stream"}
