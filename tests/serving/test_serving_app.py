"""HTTP API through the test client: good and bad uploads, limits, k range, stats, thumbnails, the page."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fixtures_serving import png_bytes as encode
from fixtures_serving import png_header_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from stats_support import record_in_another_process

from cmpnas.errors import CmpnasError
from cmpnas.serving.app import create_app
from cmpnas.serving.index import GalleryIndex

MAX_UPLOAD = 50_000
MAX_K = 20


@pytest.fixture(scope="module")
def client(flat_index: Path, models: Any) -> TestClient:
    app = create_app(flat_index, models.query, max_upload_bytes=MAX_UPLOAD, max_k=MAX_K, max_pixels=1_000_000)
    return TestClient(app)


def post(
    client: TestClient,
    data: bytes,
    content_type: str = "image/png",
    params: dict | None = None,
    form: dict | None = None,
) -> Any:
    return client.post(
        "/search", files={"file": ("q", data, content_type)}, params=params or {}, data=form or {}
    )


def test_good_png_returns_topk_with_thumbnails(client: TestClient, flat_index: Path, pattern: Any) -> None:
    r = post(client, encode(pattern("stripes", 7)), params={"k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 5 and body["mode"] == "heterogeneous" and body["latency_ms"] > 0
    items = {it.id: it for it in GalleryIndex.load(flat_index).items}
    assert len(body["results"]) == 5
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    for hit in body["results"]:
        assert hit["label"] == items[hit["id"]].label
        thumb = client.get(hit["thumb"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(thumb.content)).size == (80, 80)  # 40 px gallery, x(112 // 40)


def test_jpeg_default_k_and_form_k(client: TestClient, pattern: Any) -> None:
    jpeg = encode(pattern("blobs", 3).convert("RGB"), "JPEG")
    assert len(post(client, jpeg, "image/jpeg").json()["results"]) == 10  # default k
    assert len(post(client, jpeg, "image/jpeg", form={"k": "3"}).json()["results"]) == 3
    assert len(post(client, jpeg, "image/jpeg", params={"k": 2}, form={"k": "3"}).json()["results"]) == 2


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1, 10**9])
def test_k_out_of_range_is_422(client: TestClient, pattern: Any, k: int) -> None:
    r = post(client, encode(pattern("blobs", 3)), params={"k": k})
    assert r.status_code == 422 and str(MAX_K) in r.json()["detail"]


def test_k_not_a_number_and_missing_file_are_422(client: TestClient) -> None:
    assert post(client, b"x", params={"k": "ten"}).status_code == 422
    assert client.post("/search").status_code == 422


def test_wrong_type_is_415(client: TestClient) -> None:
    r = post(client, b"hello, I am a text file\n" * 10, "text/plain")
    assert r.status_code == 415 and "image" in r.json()["detail"]
    eps = (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # PIL could read it via Ghostscript
    )
    assert post(client, eps, "application/postscript").status_code == 415


def test_corrupt_image_is_400(client: TestClient, pattern: Any) -> None:
    good = encode(pattern("checks", 1))
    r = post(client, good[: len(good) // 2], "image/png")  # truncated
    assert r.status_code == 400 and "corrupt" in r.json()["detail"]
    assert post(client, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png").status_code == 400
    assert post(client, b"", "image/png").status_code == 400


def test_oversized_upload_is_413(client: TestClient) -> None:
    just_over = b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_UPLOAD  # within multipart slack: rejected by the handler
    r = post(client, just_over)
    assert r.status_code == 413 and str(MAX_UPLOAD) in r.json()["detail"]
    huge = b"\0" * (MAX_UPLOAD * 4)  # rejected from Content-Length before the body is parsed
    assert post(client, huge).status_code == 413


def test_chunked_oversized_body_is_413(client: TestClient) -> None:
    boundary = "cmpnasboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body():  # type: ignore[no-untyped-def]  # a generator: sent chunked, without Content-Length
        yield head
        for _ in range(20):
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post(
        "/search", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert r.status_code == 413


def test_huge_pixel_count_is_rejected_before_decoding(client: TestClient) -> None:
    r = post(client, png_header_only(100_000, 100_000))  # 10^10 pixels declared, 100 bytes sent
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    big = encode(Image.new("L", (1200, 1000)))  # 1.2 M pixels > this app's 1 M limit, a few kB of PNG
    assert len(big) < MAX_UPLOAD
    r = post(client, big)
    assert r.status_code == 413 and "1200x1000" in r.json()["detail"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=3000),
    ctype=st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain", "image/gif"]),
)
def test_random_bytes_never_500(client: TestClient, data: bytes, ctype: str) -> None:
    assert post(client, data, ctype).status_code in (400, 413, 415)


def test_healthz_stats_and_counts(flat_index: Path, models: Any, pattern: Any) -> None:
    client = TestClient(create_app(flat_index, models.query, max_k=MAX_K))
    assert client.get("/healthz").json() == {"status": "ok", "count": 36, "mode": "heterogeneous"}
    empty = client.get("/stats").json()
    assert empty["queries"] == 0 and empty["latency_ms"]["p50"] is None
    for i in range(3):
        assert post(client, encode(pattern("stripes", i))).status_code == 200
    assert post(client, b"nope", "text/plain").status_code == 415
    stats = client.get("/stats").json()
    assert stats["queries"] == 3 and stats["rejected"] == 1
    assert stats["index"]["count"] == 36 and stats["index"]["gallery_fingerprint"] == models.gallery_fp
    assert stats["query_model"]["fingerprint"] == models.query_fp
    assert stats["query_model"]["compatible_with"] == models.gallery_fp
    assert 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"] and stats["latency_ms"]["window"] == 3
    assert stats["limits"]["max_k"] == MAX_K


def test_page_thumbs_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: everything inline
    assert client.get("/thumb/no/such/item.png").status_code == 404
    assert client.get("/thumb/checks/003.png").status_code == 200  # ids with slashes
    assert "/search" in client.get("/openapi.json").json()["paths"]


def test_incompatible_model_refused_unless_allowed(
    flat_index: Path, models: Any, onnx_query: Path, pattern: Any
) -> None:
    with pytest.raises(CmpnasError, match="allow-incompatible"):
        create_app(flat_index, models.stranger)
    app = create_app(flat_index, models.stranger, allow_incompatible=True)
    assert TestClient(app).get("/healthz").json()["mode"] == "incompatible-override"
    onnx_client = TestClient(
        create_app(flat_index, onnx_query)
    )  # ONNX query model, checked from its metadata
    r = post(onnx_client, encode(pattern("blobs", 1)), params={"k": 3})
    assert r.status_code == 200 and r.json()["mode"] == "heterogeneous"


def test_big_upload_goes_through_the_thread_pool_with_the_same_answer(
    flat_index: Path, models: Any, pattern: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads above INLINE_MAX_BYTES, or any upload when the model is slower than INLINE_MAX_MS, are answered
    off the event loop; the answer must not change."""
    import cmpnas.serving.state as app_mod

    client = TestClient(create_app(flat_index, models.query))
    png = encode(pattern("blobs", 5))
    small = post(client, png, params={"k": 5}).json()["results"]
    calls: list[int] = []
    real = app_mod.run_in_threadpool

    async def counting(fn: Any, *args: Any) -> Any:
        calls.append(len(args[0]))
        return await real(fn, *args)

    monkeypatch.setattr(app_mod, "run_in_threadpool", counting)
    monkeypatch.setattr(app_mod, "INLINE_MAX_BYTES", len(png) - 1)
    big = post(client, png, params={"k": 5}).json()["results"]
    assert calls == [len(png)]
    assert [h["id"] for h in big] == [h["id"] for h in small]
    monkeypatch.setattr(app_mod, "INLINE_MAX_BYTES", len(png))
    monkeypatch.setattr(app_mod, "INLINE_MAX_MS", 0.0)  # as if the model were slow
    slow = post(client, png, params={"k": 5}).json()["results"]
    assert calls == [len(png), len(png)]
    assert [h["id"] for h in slow] == [h["id"] for h in small]
    assert client.app.state.service.search_ms > 0


def test_stats_add_up_the_counters_every_worker_shares(
    tmp_path: Path, flat_index: Path, models: Any, pattern: Any
) -> None:
    searches = [(1.0, "query"), (2.0, "query"), (3.0, "query"), (4.0, "query"), (100.0, "query")]
    record_in_another_process(tmp_path, ["query"], [*searches, (None, None), (None, None)])
    client = TestClient(create_app(flat_index, models.query, stats_dir=str(tmp_path)))
    r = post(client, encode(pattern("stripes", 1)))
    assert r.status_code == 200
    stats = client.get("/stats").json()
    assert stats["queries"] == 6 and stats["rejected"] == 2 and stats["latency_ms"]["window"] == 6
    assert sorted(w["queries"] for w in stats["workers"]) == [1, 5]
    assert stats["latency_ms"]["p99"] > 4.0  # the other worker's slow request is in the distribution


def test_raw_image_body_gives_the_same_answer_as_multipart(client: TestClient, pattern: Any) -> None:
    data = encode(pattern("checks", 5))
    multipart = post(client, data, params={"k": 5})
    raw = client.post("/search", params={"k": 5}, content=data, headers={"Content-Type": "image/png"})
    assert multipart.status_code == raw.status_code == 200, raw.text
    assert [h["id"] for h in raw.json()["results"]] == [h["id"] for h in multipart.json()["results"]]
    not_image = client.post("/search", content=b"hello", headers={"Content-Type": "image/png"})
    assert not_image.status_code == 400 and "could not be read" in not_image.json()["detail"]
    wrong_type = client.post("/search", content=data, headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 422 and "Content-Type: image/png" in wrong_type.json()["detail"]


def test_the_raw_fast_path_and_the_endpoint_give_the_same_answers(client: TestClient, pattern: Any) -> None:
    """``RawSearch`` answers plain raw uploads itself; any other query string goes through FastAPI's route
    (an unknown parameter is ignored there): same JSON apart from the latency, same counters, same errors."""
    data, png = encode(pattern("stripes", 3)), {"Content-Type": "image/png"}
    before = client.get("/stats").json()["queries"]
    fast = client.post("/search?k=4", content=data, headers=png)
    routed = client.post("/search?k=4&via=route", content=data, headers=png)
    assert fast.status_code == routed.status_code == 200
    strip = lambda r: {k: v for k, v in r.json().items() if k != "latency_ms"}  # noqa: E731
    assert strip(fast) == strip(routed) and len(fast.json()["results"]) == 4
    assert fast.headers["content-type"] == routed.headers["content-type"] == "application/json"
    assert client.get("/stats").json()["queries"] == before + 2
    for query in ("k=0", "k=abc", "k=%C2%B2"):  # not plainly valid: the route's canonical 422
        r = client.post(f"/search?{query}", content=data, headers=png)
        assert r.status_code == 422, (query, r.text)
    repeated = client.post("/search?k=5&k=6", content=data, headers=png)  # the route's rule: the last wins
    assert repeated.status_code == 200 and len(repeated.json()["results"]) == 6
    bad = client.post("/search", content=b"not an image", headers=png)  # taken, rejected by the service
    assert bad.status_code == 400 and bad.json()["detail"] == routed_detail(client, b"not an image")


def routed_detail(client: TestClient, body: bytes) -> str:
    return client.post("/search?via=route", content=body, headers={"Content-Type": "image/png"}).json()["detail"]
