"""Gallery index: build, search, append, atomicity, index types, compatibility checks."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmpnas.data.sources import csv_source, dataset_source, folder_source, load_dataset_split
from cmpnas.errors import CmpnasError
from cmpnas.serving.encoder import load_encoder
from cmpnas.serving.faiss_store import new_faiss_index
from cmpnas.serving.index import (
    GalleryIndex,
    IndexParams,
    build_index,
    check_compatible,
    query_images,
)

CLASSES = ("stripes", "checks", "blobs")  # the conftest gallery: 12 images per class folder
PER_CLASS = 12


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------- build + search
def test_folder_index_has_items_labels_and_manifest(flat_index: Path, models: Any) -> None:
    index = GalleryIndex.load(flat_index)
    assert len(index) == len(CLASSES) * PER_CLASS  # the corrupt file is skipped, not indexed
    assert index.store.index.ntotal == len(index)
    assert {it.label for it in index.items} == set(CLASSES)
    assert "stripes/000.png" in index.store.row_of
    manifest = json.loads((flat_index / "manifest.json").read_text())
    assert manifest["gallery_fingerprint"] == models.gallery_fp
    assert manifest["dim"] == 16 and manifest["normalisation"] == "l2" and manifest["count"] == 36
    assert manifest["index"]["type"] == "flat" and manifest["index"]["faiss_class"] == "IndexFlatIP"
    assert manifest["sources"][0]["skipped_unreadable"] == 1
    assert manifest["sources"][0]["skipped_examples"] == ["blobs/broken.png"]
    assert manifest["cmpnas_version"] and manifest["created_at"] and manifest["build_seconds"] >= 0


def test_gallery_image_finds_itself_first_with_cosine_one(
    flat_index: Path, models: Any, pattern: Any
) -> None:
    index = GalleryIndex.load(flat_index)
    enc = load_encoder(models.gallery)
    img = pattern("checks", 100 * 1 + 5)  # = checks/005.png of the gallery
    hits = index.search(enc.embed_images([img]), 5)[0]
    assert hits[0]["id"] == "checks/005.png"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["label"] == "checks"
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[1] < 1.0 - 1e-6


def test_flat_search_matches_numpy_brute_force(
    flat_index: Path, models: Any, gallery_dir: Path, pattern: Any
) -> None:
    index = GalleryIndex.load(flat_index)
    enc = load_encoder(models.query)
    gal_enc = load_encoder(models.gallery)
    gallery = gal_enc.embed_images(
        [pattern(k, 100 * c + i) for c, k in enumerate(CLASSES) for i in range(PER_CLASS)]
    )
    ids = [f"{k}/{i:03d}.png" for k in CLASSES for i in range(PER_CLASS)]
    queries = enc.embed_images([pattern("blobs", 999), pattern("stripes", 998)])
    for q, hits in zip(queries, index.search(queries, 7), strict=True):
        sims = gallery @ q
        expected = [ids[j] for j in np.argsort(-sims)[:7]]
        assert [h["id"] for h in hits] == expected
        np.testing.assert_allclose([h["score"] for h in hits], np.sort(sims)[::-1][:7], atol=1e-5)


def test_k_larger_than_gallery_returns_everything(flat_index: Path, models: Any, pattern: Any) -> None:
    index = GalleryIndex.load(flat_index)
    hits = index.search(load_encoder(models.query).embed_images([pattern("blobs", 5)]), 1000)[0]
    assert len(hits) == len(index) and len({h["id"] for h in hits}) == len(index)


def test_csv_source_index_keeps_ids_and_labels(tmp_path: Path, models: Any, pattern: Any) -> None:
    # the source's own reading is tested in tests/data/test_sources.py
    for i in range(4):
        pattern("stripes", i).save(tmp_path / f"s{i}.png")
    (tmp_path / "list.csv").write_text("path,label\ns0.png,shirt\ns1.png,shirt\n\ns2.png,dress\n")
    manifest = build_index(models.gallery, csv_source(tmp_path / "list.csv"), tmp_path / "idx")
    assert manifest["count"] == 3
    assert {it.label for it in GalleryIndex.load(tmp_path / "idx").items} == {"shirt", "dress"}


def test_loading_a_folder_that_is_not_an_index_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CmpnasError, match="not a gallery index"):
        GalleryIndex.load(tmp_path)


# ------------------------------------------------------------------------------------ append + atomicity
def _csv(path: Path, names: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([[n, n.split("/")[0]] for n in names])
    return path


def test_append_adds_skips_duplicates_and_checks_model(
    tmp_path: Path, gallery_dir: Path, models: Any, pattern: Any
) -> None:
    first = _csv(gallery_dir / "first.csv", [f"stripes/{i:03d}.png" for i in range(5)])
    second = _csv(gallery_dir / "second.csv", [f"checks/{i:03d}.png" for i in range(3)] + ["stripes/000.png"])
    out = tmp_path / "idx"
    build_index(models.gallery, csv_source(first), out)
    m = build_index(models.gallery, csv_source(second), out, append=True)
    assert m["count"] == 8 and len(m["sources"]) == 2
    assert m["sources"][1]["added"] == 3 and m["sources"][1]["skipped_duplicate_ids"] == 1
    index = GalleryIndex.load(out)
    assert [it.id for it in index.items[-3:]] == ["checks/000.png", "checks/001.png", "checks/002.png"]
    enc = load_encoder(models.gallery)
    assert index.search(enc.embed_images([pattern("checks", 102)]), 1)[0][0]["id"] == "checks/002.png"
    again = build_index(models.gallery, csv_source(second), out, append=True)
    assert again["count"] == 8  # re-running an append is harmless
    with pytest.raises(CmpnasError, match="same gallery model"):
        build_index(models.query, csv_source(second), out, append=True)
    with pytest.raises(CmpnasError, match="existing index"):
        build_index(models.gallery, csv_source(second), tmp_path / "missing", append=True)
    assert _leftovers(tmp_path) == []


class _Boom(RuntimeError):
    pass


def _explode_after_first_batch(done: int, total: int) -> None:
    raise _Boom(f"killed at {done}/{total}")


def test_failed_build_leaves_no_index(tmp_path: Path, gallery_dir: Path, models: Any) -> None:
    out = tmp_path / "idx"
    with pytest.raises(_Boom):
        build_index(
            models.gallery, folder_source(gallery_dir), out, batch_size=8, progress=_explode_after_first_batch
        )
    assert not out.exists() and _leftovers(tmp_path) == []


def test_failed_append_or_rebuild_keeps_old_index(
    tmp_path: Path, gallery_dir: Path, models: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    build_index(
        models.gallery, csv_source(_csv(tmp_path / "a.csv", [str(gallery_dir / "blobs/000.png")])), out
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(_Boom):
        build_index(
            models.gallery, folder_source(gallery_dir), out, append=True, progress=_explode_after_first_batch
        )
    import cmpnas.serving.faiss_store as index_mod

    def failing_write(*_: object) -> None:  # fails after the tmp folder exists: the tmp folder must go
        raise _Boom("disk full")

    monkeypatch.setattr(index_mod, "write_items", failing_write)
    with pytest.raises(_Boom):
        build_index(models.gallery, folder_source(gallery_dir), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_refuses_to_replace_a_folder_that_is_not_an_index(
    tmp_path: Path, gallery_dir: Path, models: Any
) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(CmpnasError, match="not a gallery index"):
        build_index(models.gallery, folder_source(gallery_dir), tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_rebuild_replaces_existing_index(tmp_path: Path, gallery_dir: Path, models: Any) -> None:
    out = tmp_path / "idx"
    build_index(
        models.gallery, csv_source(_csv(tmp_path / "a.csv", [str(gallery_dir / "blobs/000.png")])), out
    )
    m = build_index(models.gallery, folder_source(gallery_dir), out, IndexParams(kind="ivf"))
    assert m["count"] == 36 and m["index"]["type"] == "ivf" and len(m["sources"]) == 1
    assert m["index"]["params"]["nlist"] == 1 and m["index"]["params"]["nprobe"] == 1  # clamped to 36 items
    assert _leftovers(tmp_path) == []


def test_gallery_model_must_be_a_checkpoint(tmp_path: Path, gallery_dir: Path, onnx_query: Path) -> None:
    with pytest.raises(CmpnasError, match="safetensors"):
        build_index(onnx_query, folder_source(gallery_dir), tmp_path / "idx")


# --------------------------------------------------------------------------------------------- index types
@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 2_000_000),
    dim=st.sampled_from([8, 16, 64, 96, 128, 512]),
    kind=st.sampled_from(["flat", "ivf", "hnsw", "ivfpq"]),
    nlist=st.one_of(st.none(), st.integers(1, 10**5)),
)
def test_resolved_params_fit_the_gallery(count: int, dim: int, kind: str, nlist: int | None) -> None:
    if kind == "ivfpq" and count < 16:
        with pytest.raises(CmpnasError, match="ivfpq"):
            IndexParams(kind=kind, nlist=nlist).resolved(count, dim)
        return
    p = IndexParams(kind=kind, nlist=nlist, nprobe=50).resolved(count, dim)
    if kind in ("ivf", "ivfpq"):
        assert 1 <= p.nlist <= max(1, count // 39)
        assert 1 <= p.nprobe <= p.nlist
    if kind == "ivfpq":
        assert dim % p.pq_m == 0 and 4 <= p.pq_bits <= 8
        assert count < 16 * 39 or 2**p.pq_bits * 39 <= count


def test_resolved_params_hand_examples() -> None:
    assert (
        IndexParams(kind="ivf").resolved(100_000, 128).nlist == 1265
    )  # round(4*sqrt(100k)) = 1265 < 100k/39
    assert IndexParams(kind="ivf").resolved(10_000, 128).nlist == 256  # 4*sqrt(10k)=400, capped at 10k//39
    assert IndexParams(kind="ivf").resolved(1_000, 128).nlist == 25  # 4*sqrt(1k)=126, capped at 1000//39
    pq = IndexParams(kind="ivfpq").resolved(9_000, 128)
    assert (pq.pq_m, pq.pq_bits) == (32, 7)  # 128/4 sub-codes; 2**8*39 = 9984 > 9000 >= 2**7*39
    assert IndexParams(kind="ivfpq").resolved(10_000, 128).pq_bits == 8
    with pytest.raises(CmpnasError, match="Unknown index type"):
        IndexParams(kind="lsh").resolved(10, 8)
    with pytest.raises(CmpnasError, match="divide"):
        IndexParams(kind="ivfpq", pq_m=5).resolved(1000, 16)


@pytest.fixture
def one_faiss_thread():  # type: ignore[no-untyped-def]
    """FAISS' OpenMP threads stall when the 2 cores are shared; 1 thread keeps the test fast and steady."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.mark.usefixtures("one_faiss_thread")
def test_approximate_indexes_agree_with_flat_on_clustered_vectors() -> None:
    rng = np.random.default_rng(0)
    centres = _unit(rng, 20, 32)
    data = centres[rng.integers(0, 20, 1500)] + 0.15 * rng.normal(size=(1500, 32)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = data[:50] + 0.01 * rng.normal(size=(50, 32)).astype(np.float32)
    flat = new_faiss_index(IndexParams().resolved(1500, 32), 32, data)
    flat.add(data)
    _, truth = flat.search(queries, 10)
    for kind, min_recall in (("ivf", 0.85), ("hnsw", 0.9), ("ivfpq", 0.4)):
        params = IndexParams(kind=kind).resolved(1500, 32)
        idx = new_faiss_index(params, 32, data)
        idx.add(data)
        _, got = idx.search(queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got, strict=True)])
        assert recall >= min_recall, (kind, recall)
    exhaustive = new_faiss_index(IndexParams(kind="ivf", nprobe=10**6).resolved(1500, 32), 32, data)
    exhaustive.add(data)
    assert np.array_equal(np.sort(exhaustive.search(queries, 10)[1], 1), np.sort(truth, 1))


# --------------------------------------------------------------------------------------------- compatibility
def test_compatibility_modes(flat_index: Path, models: Any) -> None:
    index = GalleryIndex.load(flat_index)
    assert check_compatible(index, load_encoder(models.gallery)) == "homogeneous"
    assert check_compatible(index, load_encoder(models.query)) == "heterogeneous"
    stranger = load_encoder(models.stranger)
    with pytest.raises(CmpnasError) as err:
        check_compatible(index, stranger)
    msg = str(err.value)
    assert models.gallery_fp in msg and models.stranger_fp in msg and "--allow-incompatible" in msg
    assert check_compatible(index, stranger, allow_incompatible=True) == "incompatible-override"
    with pytest.raises(CmpnasError, match="32 dims"):
        check_compatible(index, load_encoder(models.wide), allow_incompatible=True)


def test_query_images_refuses_then_allows(
    flat_index: Path, models: Any, tmp_path: Path, pattern: Any
) -> None:
    pattern("stripes", 3).save(tmp_path / "q.png")
    with pytest.raises(CmpnasError, match="allow-incompatible"):
        query_images(flat_index, models.stranger, [tmp_path / "q.png"])
    out = query_images(flat_index, models.stranger, [tmp_path / "q.png"], 4, allow_incompatible=True)
    assert out["mode"] == "incompatible-override" and len(out["queries"][0]["results"]) == 4
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(CmpnasError, match="bad.png"):
        query_images(flat_index, models.query, [tmp_path / "bad.png"])


# --------------------------------------------------------------------------------------------- dataset source
def test_fashion_mnist_index_thumbnails(tmp_path: Path, models: Any, tiny_idx_dir: Path) -> None:
    # the source's ids and labels are tested in tests/data/test_sources.py
    images, _ = load_dataset_split("fashion_mnist", "test", str(tiny_idx_dir))
    src = dataset_source("fashion_mnist", "test", str(tiny_idx_dir), limit=20)
    build_index(models.gallery, src, tmp_path / "idx")
    index = GalleryIndex.load(tmp_path / "idx")
    assert len(index) == 20
    thumb = index.thumbnail_image("fashion_mnist/test/000013")
    assert thumb is not None and np.array_equal(np.asarray(thumb), images[13])
    assert index.thumbnail_image("fashion_mnist/test/000999") is None  # not in this index


# --------------------------------------------------------------------------------------------- pipeline entry
def test_interrupted_swap_points_at_the_previous_index(tmp_path: Path) -> None:
    (tmp_path / ".idx.old-1234abcd").mkdir()  # the state a crash between the two renames leaves
    with pytest.raises(CmpnasError, match=r"rename '.*\.idx\.old-1234abcd' back"):
        GalleryIndex.load(tmp_path / "idx")


def test_a_rebuild_replaces_a_corrupt_index(models: Any, gallery_dir: Path, tmp_path: Path) -> None:
    """Without --append the folder is replaced whatever it holds: a corrupt manifest is no reason to refuse."""
    from cmpnas.data.sources import folder_source

    out = tmp_path / "idx"
    build_index(models.gallery, folder_source(gallery_dir), out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(CmpnasError, match="rebuild the index"):
        GalleryIndex.load(out)
    assert build_index(models.gallery, folder_source(gallery_dir), out)["count"] == 36
    assert len(GalleryIndex.load(out)) == 36
    (out / "manifest.json").write_text("{")
    with pytest.raises(CmpnasError, match="rebuild the index"):  # an append needs the manifest
        build_index(models.gallery, folder_source(gallery_dir), out, append=True)


@pytest.mark.usefixtures("one_faiss_thread")
@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "PCA16,Flat"])
def test_search_among_one_models_rows_matches_numpy_on_those_rows(factory: str) -> None:
    """A dual-query search reads the rows of one gallery model (or all the others) only: as exact as the index
    type is, whatever the mix, including a model with fewer rows than k."""
    from cmpnas.data.sources import Item
    from cmpnas.serving.faiss_store import FaissStore, set_faiss_parameters
    from cmpnas.serving.store import ModelRows

    rng = np.random.default_rng(3)
    data, queries = _unit(rng, 400, 32), _unit(rng, 20, 32)
    tags = np.where(rng.random(400) < 0.1, "v2", "v1")
    tags[:3] = "v3"  # three rows only: fewer than k
    import faiss

    index = faiss.index_factory(32, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(data)
    set_faiss_parameters(index, nprobe=8)  # every cell: exact, so numpy is the oracle
    index.add(data)
    store = FaissStore(index, [Item(f"i{r}", "", str(r % 5)) for r in range(400)], tags.tolist())
    projected = data if factory != "PCA16,Flat" else None
    for rows in (ModelRows("v2"), ModelRows("v2", other=True), ModelRows("v3"), ModelRows("absent")):
        keep = np.flatnonzero(np.array([rows.holds(t) for t in tags]))
        got = store.search(queries, 10, rows)
        assert all({h["id"] for h in hits} <= {f"i{r}" for r in keep} for hits in got)
        assert all(len(hits) == min(10, len(keep)) for hits in got)
        if projected is not None and len(keep):
            scores = queries @ projected[keep].T
            for q, hits in enumerate(got):
                np.testing.assert_allclose([h["score"] for h in hits], -np.sort(-scores[q])[:10], atol=1e-5)
        else:  # a PCA wrapper scores in its projection: the order must be the index's own, filtered
            full = store.search(queries, 400)
            for hits, everything in zip(got, full, strict=True):
                kept = [h["id"] for h in everything if h["id"] in {f"i{r}" for r in keep}]
                assert [h["id"] for h in hits] == kept[:10]
