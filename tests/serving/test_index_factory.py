"""FAISS indexes built from index_factory descriptions and tuned through ParameterSpace: the same bytes and
results as the hand-built indexes they replace, old manifests still read, raw ``--factory`` descriptions."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from fixtures_serving import Models

from cmpnas.cli import main
from cmpnas.data.sources import csv_source, folder_source
from cmpnas.errors import CmpnasError
from cmpnas.serving.backfill import backfill
from cmpnas.serving.encoder import load_encoder
from cmpnas.serving.faiss_store import (
    TRAIN_SAMPLE,
    apply_search_params,
    empty_faiss_index,
    factory_string,
    new_faiss_index,
)
from cmpnas.serving.index import GalleryIndex, IndexParams, build_index


@pytest.fixture
def one_faiss_thread() -> Iterator[None]:
    """HNSW inserts in parallel in an order that varies run to run: one thread makes the graph reproducible."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _hand_built(params: IndexParams, dim: int, train: np.ndarray) -> faiss.Index:
    """The index as cmpnas built it before index_factory: classes and parameters set by hand (the reference)."""
    ip = faiss.METRIC_INNER_PRODUCT
    if params.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, ip)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if params.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, ip)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, params.pq_bits, ip)
    index.own_fields = True
    quantizer.this.disown()
    if len(train) > TRAIN_SAMPLE:
        train = train[np.random.default_rng(0).choice(len(train), TRAIN_SAMPLE, replace=False)]
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    index.nprobe = params.nprobe
    return index


def _hand_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    """The old query-time setter, for the reference."""
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    x = (centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------ old path == new path
@pytest.mark.usefixtures("one_faiss_thread")
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
@pytest.mark.parametrize(
    "given",
    [
        {},  # the defaults (sized from the gallery)
        {
            "nlist": 16,
            "nprobe": 3,
            "hnsw_m": 12,
            "ef_construction": 80,
            "ef_search": 24,
            "pq_m": 8,
            "pq_bits": 6,
        },
    ],
    ids=["defaults", "custom"],
)
def test_factory_index_is_the_hand_built_index(kind: str, given: dict[str, int]) -> None:
    data = _clustered(1500, 32)
    queries = data[:40] + 0.05 * _clustered(40, 32, seed=1)
    params = IndexParams(kind=kind, **given).resolved(len(data), 32)
    old, new = _hand_built(params, 32, data), new_faiss_index(params, 32, data)
    old.add(data)
    new.add(data)
    # same bytes on disk (so also the same training, graph and stored search parameters) ...
    assert faiss.serialize_index(new).tobytes() == faiss.serialize_index(old).tobytes()
    # ... and the same answers, also after query-time overrides
    for _ in range(2):
        d_old, i_old = old.search(queries, 10)
        d_new, i_new = new.search(queries, 10)
        np.testing.assert_array_equal(i_new, i_old)
        np.testing.assert_array_equal(d_new, d_old)
        _hand_search_params(old, 2, 16)
        apply_search_params(new, nprobe=2, ef_search=16)


def test_factory_strings_of_the_kinds_by_hand() -> None:
    assert factory_string(IndexParams().resolved(1000, 128)) == "Flat"
    assert factory_string(IndexParams(kind="ivf").resolved(1000, 128)) == "IVF25,Flat"  # 1000//39 cells
    assert factory_string(IndexParams(kind="hnsw", hnsw_m=16).resolved(1000, 128)) == "HNSW16,Flat"
    # 4*sqrt(9000)=379 capped at 9000//39=230 cells; 128/4 = 32 sub-codes of 7 bits (2**8*39 > 9000)
    assert factory_string(IndexParams(kind="ivfpq").resolved(9000, 128)) == "IVF230,PQ32x7np"
    raw = IndexParams(kind="hnsw", factory="OPQ16,IVF64,PQ16").resolved(5000, 128, factory_ok=True)
    assert raw.kind == "factory" and factory_string(raw) == "OPQ16,IVF64,PQ16"


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_hand_checkable_search(kind: str) -> None:
    """Four unit vectors: the scores are their dot products with the query, by hand."""
    gallery = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    index = new_faiss_index(IndexParams(kind=kind, hnsw_m=4).resolved(4, 4), 4, gallery)
    index.add(gallery)
    scores, rows = index.search(np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32), 2)
    assert rows.tolist() == [[0, 2], [1, 2]]
    np.testing.assert_allclose(scores, [[1.0, 0.6], [1.0, 0.8]], atol=1e-6)


def test_search_parameters_go_through_parameter_space() -> None:
    data = _clustered(800, 16)
    ivf = new_faiss_index(IndexParams(kind="ivf", nlist=8, nprobe=3).resolved(800, 16), 16, data)
    hnsw = new_faiss_index(IndexParams(kind="hnsw", ef_search=50, ef_construction=70), 16, data)
    flat = new_faiss_index(IndexParams(), 16, data)
    wrapped = new_faiss_index(IndexParams(factory="OPQ4,IVF8,PQ4", nprobe=5), 16, data)
    assert ivf.nprobe == 3 and (hnsw.hnsw.efSearch, hnsw.hnsw.efConstruction) == (50, 70)
    assert faiss.extract_index_ivf(wrapped).nprobe == 5  # set inside the OPQ wrapper
    for index in (ivf, hnsw, flat, wrapped):
        apply_search_params(index, nprobe=6, ef_search=33)  # what a type does not use is skipped, as before
    assert ivf.nprobe == 6 and hnsw.hnsw.efSearch == 33 and faiss.extract_index_ivf(wrapped).nprobe == 6
    apply_search_params(ivf)  # None keeps the value
    assert ivf.nprobe == 6


# ------------------------------------------------------------------------------------ manifests
def _csv(path: Path, gallery_dir: Path, names: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([[str(gallery_dir / n), n.split("/")[0]] for n in names])
    return path


def test_manifest_records_the_factory_and_keeps_its_fields(flat_index: Path) -> None:
    section = json.loads((flat_index / "manifest.json").read_text())["index"]
    assert (
        section["type"] == "flat" and section["faiss_class"] == "IndexFlatIP" and section["factory"] == "Flat"
    )
    assert "factory" not in section["params"]  # params stay readable by cmpnas versions without the field
    assert type(faiss.read_index(str(flat_index / "index.faiss"))).__name__ == "IndexFlatIP"


def test_index_written_before_factories_still_loads_and_appends(
    models: Models, gallery_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "idx"
    first = [f"stripes/{i:03d}.png" for i in range(12)] + [f"checks/{i:03d}.png" for i in range(12)]
    build_index(models.gallery, csv_source(_csv(tmp_path / "a.csv", gallery_dir, first)), out,
                IndexParams(kind="ivf", nprobe=1))  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["index"]["factory"]  # what an older cmpnas wrote: the kind and its params only
    (out / "manifest.json").write_text(json.dumps(manifest))
    old = GalleryIndex.load(out)
    assert old.store.index.nprobe == 1 and len(old) == 24
    every = [*first, *(f"blobs/{i:03d}.png" for i in range(12))]
    m = build_index(
        models.gallery, csv_source(_csv(tmp_path / "b.csv", gallery_dir, every)), out, append=True
    )
    assert m["count"] == 36 and m["index"]["type"] == "ivf" and m["index"]["factory"] == "IVF1,Flat"
    enc = load_encoder(models.gallery)
    index = GalleryIndex.load(out)
    blob = str(gallery_dir / "blobs/003.png")  # a CSV row's id is its path as written
    vectors = index.store.vectors([blob])
    assert index.search(vectors, 1)[0][0]["id"] == blob
    np.testing.assert_allclose(
        vectors[0], enc.embed_images([_open(gallery_dir / "blobs/003.png")])[0], atol=1e-5
    )


def _open(path: Path) -> Any:
    from cmpnas.data.sources import open_image

    return open_image(path)


# ------------------------------------------------------------------------------------ raw descriptions
def test_raw_factory_equals_the_kind_it_spells(models: Models, gallery_dir: Path, tmp_path: Path) -> None:
    by_kind = build_index(models.gallery, folder_source(gallery_dir), tmp_path / "a",
                          IndexParams(kind="ivf", nlist=1, nprobe=1))  # fmt: skip
    raw = build_index(models.gallery, folder_source(gallery_dir), tmp_path / "b",
                      IndexParams(factory="IVF1,Flat", nprobe=1))  # fmt: skip
    assert raw["index"]["type"] == "factory" and raw["index"]["params"]["factory"] == "IVF1,Flat"
    assert raw["index"]["factory"] == by_kind["index"]["factory"] == "IVF1,Flat"
    assert raw["index"]["faiss_class"] == "IndexIVFFlat"
    a, b = (faiss.read_index(str(tmp_path / n / "index.faiss")) for n in ("a", "b"))
    assert faiss.serialize_index(a).tobytes() == faiss.serialize_index(b).tobytes()


def test_raw_factory_with_a_wrapper_searches_and_backfills(
    models: Models, gallery_dir: Path, tmp_path: Path
) -> None:
    """A randomly rotated IVF index (the IVF inside a wrapper) takes a backfill like a plain IVF index."""
    from fixtures_serving import GALLERY_KW, _model

    from cmpnas.models.embedding import save_model

    out = tmp_path / "idx"
    build_index(models.gallery, folder_source(gallery_dir), out, IndexParams(factory="RR16,IVF1,Flat"))
    index = GalleryIndex.load(out)
    assert type(index.store.index).__name__ == "IndexPreTransform"
    vectors = index.store.vectors(["checks/004.png"])
    assert index.search(vectors, 1)[0][0]["id"] == "checks/004.png"
    upgraded = tmp_path / "gallery_v2.safetensors"
    model = _model(7, GALLERY_KW, compatible_with=models.gallery_fp)
    model.spec.name = "gallery"
    save_model(model, upgraded)
    assert backfill(out, upgraded, 0.5, "random", seed=0)["reembedded"] == 18
    after = GalleryIndex.load(out)
    assert len(after) == 36 and after.manifest["index"]["factory"] == "RR16,IVF1,Flat"


@pytest.mark.parametrize(
    ("factory", "expect"),
    [
        ("IVF4,Fla", "could not parse"),
        ("PQ5", "multiple of the number of subquantizers"),
        ("IDMap2,Flat", "numbers the rows itself"),
    ],
)
def test_a_description_faiss_rejects_is_one_line_exit_2(
    models: Models, gallery_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], factory: str,
    expect: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import cmpnas.serving.faiss_store as faiss_store

    def no_embedding(*_: object) -> None:
        raise AssertionError("embedded before checking the description")

    monkeypatch.setattr(faiss_store, "embed_all_ranks", no_embedding)
    args = ["index", "--gallery-model", models.gallery, "--images", gallery_dir, "--out", tmp_path / "idx",
            "--factory", factory]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmpnas: error: "), lines
    assert factory in lines[0] and expect in lines[0] and " Fix: " in lines[0], lines[0]
    assert not (tmp_path / "idx").exists()


def test_raw_factory_refusals(models: Models, gallery_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CmpnasError, match="cannot train 'IVF64,Flat' on 36 vectors"):
        build_index(
            models.gallery, folder_source(gallery_dir), tmp_path / "a", IndexParams(factory="IVF64,Flat")
        )
    assert not (tmp_path / "a").exists()
    with pytest.raises(CmpnasError, match="needs the faiss backend"):
        IndexParams(factory="Flat").resolved(10, 16)  # what the Milvus backend calls
    with pytest.raises(CmpnasError, match="for 16-dim vectors"):
        empty_faiss_index(IndexParams(factory="IVF4,PQ3"), 16)


def test_cli_factory_option(models: Models, gallery_dir: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "idx"
    main(["index", "--gallery-model", str(models.gallery), "--images", str(gallery_dir), "--out", str(out),
          "--factory", "HNSW8,Flat", "--ef-search", "20"])  # fmt: skip
    index = GalleryIndex.load(out)
    assert index.manifest["index"]["factory"] == "HNSW8,Flat" and index.store.index.hnsw.efSearch == 20
    for extra in (["--index", "ivf"], ["--backend", "milvus"], ["--append"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["index", "--gallery-model", str(models.gallery), "--images", str(gallery_dir), "--out",
                  str(out), "--factory", "Flat", *extra])  # fmt: skip
        assert exc.value.code == 2 and "--factory" in capsys.readouterr().err
