"""Several query models (a family) served against one index: each answers as itself, is checked against the
index at start and on every swap, is counted on its own; names come from files or from family.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from fixtures_serving import GALLERY_KW, QUERY_KW, _model
from fixtures_serving import png_bytes as encode
from stats_support import record_in_another_process

from cmpnas.errors import CmpnasError
from cmpnas.serving.app import RawSearch, create_app
from cmpnas.serving.encoder import load_encoder
from cmpnas.serving.family import FAMILY_FORMAT, expand_query_models, family_members
from cmpnas.serving.index import GalleryIndex

PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def client(flat_index: Path, models: Any, small_query: Path) -> TestClient:
    """Two compatible query models: 'query' (the default, first) and 'small'."""
    return TestClient(create_app(flat_index, models.query, small_query, watch_index_s=0))


def brute_force(index_dir: Path, model: Path, img: Any, k: int) -> list[tuple[str, float]]:
    """The model's own embedding of ``img`` against every vector of the index, in numpy."""
    index = GalleryIndex.load(index_dir)
    ids = [item.id for item in index.items]
    scores = index.store.vectors(ids) @ load_encoder(model).embed_images([img])[0]
    top = np.argsort(-scores, kind="stable")[:k]
    return [(ids[i], float(scores[i])) for i in top]


def hits(response: Any) -> list[tuple[str, float]]:
    assert response.status_code == 200, response.text
    return [(h["id"], h["score"]) for h in response.json()["results"]]


def same_hits(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> bool:
    return [i for i, _ in got] == [i for i, _ in want] and np.allclose(
        [s for _, s in got], [s for _, s in want], atol=1e-4
    )


def test_each_model_answers_with_its_own_embedding(
    client: TestClient, flat_index: Path, models: Any, small_query: Path, pattern: Any
) -> None:
    img = pattern("checks", 7)
    want = {
        "query": brute_force(flat_index, models.query, img, 5),
        "small": brute_force(flat_index, small_query, img, 5),
    }
    assert not same_hits(want["query"], want["small"])  # else the test could not tell the models apart
    for name in ("query", "small"):
        multipart = client.post(
            "/search", params={"k": 5, "model": name}, files={"file": ("q", encode(img), "image/png")}
        )
        raw = client.post(f"/search?model={name}&k=5", content=encode(img), headers=PNG)  # the fast path
        for r in (multipart, raw):
            assert same_hits(hits(r), want[name]), (name, r.json())
            assert r.json()["model"] == name and r.json()["mode"] == "heterogeneous"
    default = client.post("/search?k=5", content=encode(img), headers=PNG)  # no model=: the first one
    assert same_hits(hits(default), want["query"]) and default.json()["model"] == "query"


def test_the_fast_path_takes_a_known_model_and_leaves_the_rest_to_the_route(client: TestClient) -> None:
    service = client.app.state.service
    raw = RawSearch(None, service, max_k=20, default_k=10, max_bytes=1000)
    small, query = service.members["small"], service.members["query"]
    assert raw._params(b"") == (10, query)
    assert raw._params(b"k=4") == (4, query)
    assert raw._params(b"model=small&k=4") == (4, small) and raw._params(b"k=3&model=small") == (3, small)
    for query_string in (b"model=nope", b"model=small&model=query", b"model=small&via=route", b"model"):
        assert raw._params(query_string) is None, query_string


@pytest.mark.parametrize("how", ["multipart", "raw"])
def test_unknown_model_is_a_422_naming_the_available_ones(client: TestClient, pattern: Any, how: str) -> None:
    data = encode(pattern("blobs", 2))
    if how == "raw":
        r = client.post("/search?model=nope", content=data, headers=PNG)
    else:
        r = client.post("/search", params={"model": "nope"}, files={"file": ("q", data, "image/png")})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert "Unknown query model 'nope'" in detail and "available: query, small" in detail


def test_stats_count_each_model(flat_index: Path, models: Any, small_query: Path, pattern: Any) -> None:
    client = TestClient(create_app(flat_index, models.query, small_query, watch_index_s=0))
    data = encode(pattern("stripes", 4))
    for params in (
        {},
        {"model": "query"},
        {"model": "query", "k": 3},
        {"model": "small"},
        {"model": "small"},
    ):
        assert client.post("/search", params=params, content=data, headers=PNG).status_code == 200
    assert (
        client.post(
            "/search", params={"model": "small"}, files={"file": ("q", data, "image/png")}
        ).status_code
        == 200
    )
    assert client.post("/search?model=small", content=b"not an image", headers=PNG).status_code == 400
    assert client.post("/search?model=nope", content=data, headers=PNG).status_code == 422
    stats = client.get("/stats").json()
    assert stats["queries"] == 6 and stats["rejected"] == 2 and stats["latency_ms"]["window"] == 6
    assert stats["query_model"]["fingerprint"] == models.query_fp and stats["default_model"] == "query"
    assert list(stats["models"]) == ["query", "small"]
    query, small = stats["models"]["query"], stats["models"]["small"]
    assert (query["queries"], query["rejected"], small["queries"], small["rejected"]) == (3, 0, 3, 1)
    assert query["latency_ms"]["window"] == 3 and 0 < small["latency_ms"]["p50"] <= small["latency_ms"]["p99"]
    assert query["fingerprint"] == models.query_fp and small["fingerprint"] != models.query_fp
    assert small["path"] == str(small_query) and small["kind"] == "torch"
    assert query["compatible_with"] == small["compatible_with"] == models.gallery_fp
    assert client.get("/healthz").json()["models"] == ["query", "small"]


def test_stats_add_up_each_models_counters_over_the_workers(
    tmp_path: Path, flat_index: Path, models: Any, small_query: Path, pattern: Any
) -> None:
    other = [(1.0, "query"), (2.0, "small"), (50.0, "small"), (None, "small")]
    record_in_another_process(tmp_path, ["query", "small"], other)  # another worker process's searches
    client = TestClient(
        create_app(flat_index, models.query, small_query, stats_dir=str(tmp_path), watch_index_s=0)
    )
    assert (
        client.post("/search?model=small", content=encode(pattern("checks", 1)), headers=PNG).status_code
        == 200
    )
    stats = client.get("/stats").json()
    assert stats["queries"] == 4 and stats["rejected"] == 1
    assert stats["models"]["query"]["queries"] == 1 and stats["models"]["small"]["queries"] == 3
    assert stats["models"]["small"]["rejected"] == 1 and stats["models"]["small"]["latency_ms"]["window"] == 3
    assert stats["models"]["small"]["latency_ms"]["p99"] > 2.0  # the other worker's slow search counts
    assert sorted(w["queries"] for w in stats["workers"]) == [1, 3]


def test_one_model_answers_as_before(flat_index: Path, models: Any, pattern: Any) -> None:
    client = TestClient(create_app(flat_index, models.query, watch_index_s=0))
    r = client.post("/search?k=3", content=encode(pattern("blobs", 1)), headers=PNG)
    assert r.status_code == 200 and set(r.json()) == {"results", "k", "latency_ms", "mode"}  # no "model"
    assert (
        client.post("/search?model=query&k=3", content=encode(pattern("blobs", 1)), headers=PNG).status_code
        == 200
    )
    assert set(client.get("/healthz").json()) == {"status", "count", "mode"}
    stats = client.get("/stats").json()
    assert list(stats["models"]) == ["query"] and stats["models"]["query"]["queries"] == stats["queries"] == 2


def test_an_incompatible_member_refuses_start(flat_index: Path, models: Any, small_query: Path) -> None:
    with pytest.raises(CmpnasError, match="allow-incompatible") as refused:
        create_app(flat_index, models.query, models.stranger, watch_index_s=0)
    assert str(refused.value).startswith(
        f"Query model 'stranger' ({models.stranger}): Query model {models.stranger_fp}"
    )
    with pytest.raises(CmpnasError, match="Query model 'wide'.*embeds into 32 dims"):
        create_app(flat_index, small_query, models.wide, watch_index_s=0)  # even with the override
    app = create_app(flat_index, models.query, models.stranger, allow_incompatible=True, watch_index_s=0)
    modes = {name: m["mode"] for name, m in TestClient(app).get("/stats").json()["models"].items()}
    assert modes == {"query": "heterogeneous", "stranger": "incompatible-override"}


def test_a_swap_checks_every_member(
    tmp_path: Path, flat_index: Path, gallery_dir: Path, models: Any, pattern: Any
) -> None:
    """Served: an index upgraded to gallery model v2 (chain v2 <- v1), with v1's query model and v2's. Swapping
    back to the v1 index fits v1's query model but not v2's: the swap is refused as a whole, the upgraded
    index serves both models on, and an index that fits both is swapped in."""
    from cmpnas.data.sources import folder_source
    from cmpnas.models.embedding import save_model
    from cmpnas.serving.index import build_index

    v2_fp = save_model(_model(5, GALLERY_KW, compatible_with=models.gallery_fp), tmp_path / "v2.safetensors")
    save_model(_model(6, QUERY_KW, compatible_with=v2_fp), tmp_path / "q2.safetensors")
    build_index(tmp_path / "v2.safetensors", folder_source(gallery_dir), tmp_path / "v2-index")
    client = TestClient(
        create_app(tmp_path / "v2-index", models.query, tmp_path / "q2.safetensors", watch_index_s=0)
    )
    service = client.app.state.service
    modes = {"query": "lineage", "q2": "heterogeneous"}
    assert {n: m["mode"] for n, m in client.get("/stats").json()["models"].items()} == modes
    with pytest.raises(
        CmpnasError, match=f"Query model 'q2' .*trained compatible with gallery model {v2_fp}"
    ):
        service.swap_index(GalleryIndex.load(flat_index))
    stats = client.get("/stats").json()
    assert stats["index"]["path"] == str(tmp_path / "v2-index") and stats["index"]["swaps"] == 0
    assert {n: m["mode"] for n, m in stats["models"].items()} == modes
    assert (
        client.post("/search?model=q2", content=encode(pattern("blobs", 3)), headers=PNG).status_code == 200
    )
    service.swap_index(GalleryIndex.load(tmp_path / "v2-index"))  # every member fits: swapped
    assert client.get("/stats").json()["index"]["swaps"] == 1


def test_a_family_folder_expands_to_its_members(
    tmp_path: Path, flat_index: Path, models: Any, small_query: Path, onnx_query: Path, pattern: Any
) -> None:
    family = tmp_path / "family"
    (family / "80x").mkdir(parents=True)
    (family / "ckpt").mkdir()
    shutil.copy(onnx_query, family / "80x" / "query.onnx")
    shutil.copy(small_query, family / "ckpt" / "small.safetensors")
    members = [
        {"name": "80x", "onnx": "80x/query.onnx", "model": "elsewhere.safetensors", "budget": {"macs": 1}, "macs": 123},
        {"name": "40x", "model": "ckpt/small.safetensors", "extra": [1, 2]},  # no export: served from the checkpoint
    ]  # fmt: skip
    (family / "family.json").write_text(
        json.dumps({"format": FAMILY_FORMAT, "members": members, "note": "x"})
    )
    assert family_members(family) == [
        ("80x", family / "80x/query.onnx"),
        ("40x", family / "ckpt/small.safetensors"),
    ]
    assert family_members(family / "family.json") == family_members(family)
    assert expand_query_models([models.gallery, family]) == [
        ("gallery", models.gallery),
        *family_members(family),
    ]

    client = TestClient(create_app(flat_index, family, watch_index_s=0))
    stats = client.get("/stats").json()
    assert stats["default_model"] == "80x" and stats["query_model"]["kind"] == "onnx"
    assert {n: m["kind"] for n, m in stats["models"].items()} == {"80x": "onnx", "40x": "torch"}
    img = pattern("stripes", 2)
    for name, model in (("80x", models.query), ("40x", small_query)):  # the ONNX export = its checkpoint
        r = client.post("/search", params={"model": name, "k": 4}, content=encode(img), headers=PNG)
        assert same_hits(hits(r), brute_force(flat_index, model, img, 4)), name


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (None, "is not a query-model family"),
        ("{not json", "not readable JSON"),
        (json.dumps({"format": "cmpnas.family.v9", "members": [{"name": "a", "onnx": "a.onnx"}]}), "not a cmpnas.family.v1"),
        (json.dumps({"format": FAMILY_FORMAT, "members": []}), "non-empty 'members'"),
        (json.dumps({"members": [{"onnx": "a.onnx"}]}), "Member 0 of family file"),
        (json.dumps({"members": [{"name": "a", "budget": {}}]}), "Member 'a' of family file .*neither 'onnx' nor 'model'"),
        (json.dumps({"members": [{"name": "a", "onnx": "missing.onnx"}]}), "Member 'a' .*/missing.onnx' does not exist"),
    ],
)  # fmt: skip
def test_a_bad_family_file_is_a_clear_error(tmp_path: Path, content: str | None, expect: str) -> None:
    if content is not None:
        (tmp_path / "family.json").write_text(content)
    with pytest.raises(CmpnasError, match=expect) as err:
        family_members(tmp_path)
    assert "Fix:" in str(err.value) and "\n" not in str(err.value)


def test_two_models_with_one_name_are_refused(
    tmp_path: Path, flat_index: Path, models: Any, onnx_query: Path
) -> None:
    with pytest.raises(CmpnasError, match="both named 'query'.*Fix: rename one file"):
        expand_query_models([onnx_query, models.query])  # query.onnx and query.safetensors
    family = tmp_path / "fam"
    family.mkdir()
    shutil.copy(onnx_query, family / "q.onnx")
    (family / "family.json").write_text(json.dumps({"members": [{"name": "small", "onnx": "q.onnx"}]}))
    with pytest.raises(CmpnasError, match="both named 'small'"):
        create_app(flat_index, family, tmp_path / "small.safetensors")  # refused before anything loads


def test_the_page_has_the_model_select(client: TestClient) -> None:
    page = client.get("/").text
    assert '<select id="model"' in page and "&model=" in page
