"""Consumer-to-shop top-k (GT boxes), cosine ranking, official export and scoring of .npz embeddings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_protocols import GREY, DeepFashion2Fixture, make_deepfashion2_fixture  # noqa: E402

from cmpnas.data.deepfashion2 import DeepFashion2Crops, Item, read_deepfashion2  # noqa: E402
from cmpnas.errors import CmpnasError  # noqa: E402
from cmpnas.evaluation.deepfashion2 import (  # noqa: E402
    consumer_to_shop_topk,
    export_official_results,
    rank_deepfashion2,
    retrieval_gallery,
    retrieval_queries,
)
from cmpnas.evaluation.embeddings_io import load_embeddings_npz, score_deepfashion2_embeddings  # noqa: E402


def _item(name: str, image_id: int, source: str, pair_id: int, style: int) -> Item:
    return Item(name, image_id, Path(f"{image_id}.jpg"), source, pair_id, style, 1, (0, 0, 10, 10))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- a toy by hand
TOY_GALLERY = [
    _item("G0", 10, "shop", 1, 1),
    _item("G1", 11, "shop", 1, 2),
    _item("G2", 12, "shop", 2, 1),
    _item("G3", 13, "shop", 2, 0),
    _item("G4", 14, "shop", 3, 1),
    _item("G5", 15, "shop", 1, 1),
]
TOY_QUERIES = [
    _item("Q0", 1, "user", 1, 1),
    _item("Q1", 2, "user", 1, 2),
    _item("Q2", 3, "user", 2, 0),
    _item("Q3", 4, "user", 2, 1),
    _item("Q4", 5, "user", 3, 1),
]
TOY_RANKING = {
    "Q0": ["G1", "G0", "G2", "G3", "G4", "G5"],
    "Q1": ["G1", "G0", "G2", "G3", "G4", "G5"],
    "Q3": ["G3", "G4", "G0", "G1", "G5", "G2"],
}


def test_toy_1_5_exactly() -> None:
    result = consumer_to_shop_topk(TOY_QUERIES, TOY_GALLERY, TOY_RANKING)
    assert result["top1"] == 0.25
    assert result["top5"] == 0.5
    assert result["top10"] == 0.75
    assert result["top15"] == 0.75
    assert result["top20"] == 0.75
    assert result["n_queries"] == 4  # Q2 (style 0) is not a query
    assert result["n_gallery"] == 6
    assert result["n_missed"] == 1  # Q4 has no ranking
    assert result["n_without_positive"] == 0


def test_query_without_positive_counts_as_a_miss() -> None:
    queries = [*TOY_QUERIES, _item("Q5", 6, "user", 7, 1)]
    ranking = {**TOY_RANKING, "Q5": ["G0", "G1"]}
    result = consumer_to_shop_topk(queries, TOY_GALLERY, ranking, ks=(1, 20))
    assert result["n_queries"] == 5 and result["n_without_positive"] == 1
    assert result["top1"] == pytest.approx(1 / 5) and result["top20"] == pytest.approx(3 / 5)
    assert set(result) == {"top1", "top20", "n_queries", "n_gallery", "n_missed", "n_without_positive"}


def test_full_item_lists_can_be_passed_on_both_sides() -> None:
    everything = TOY_QUERIES + TOY_GALLERY
    assert consumer_to_shop_topk(everything, everything, TOY_RANKING) == consumer_to_shop_topk(
        TOY_QUERIES, TOY_GALLERY, TOY_RANKING
    )


def test_ranking_errors() -> None:
    with pytest.raises(CmpnasError, match="not a shop item"):
        consumer_to_shop_topk(TOY_QUERIES, TOY_GALLERY, {"Q0": ["Q1"]})
    with pytest.raises(CmpnasError, match="no DeepFashion2 queries"):
        consumer_to_shop_topk(TOY_GALLERY, TOY_GALLERY, {})
    with pytest.raises(CmpnasError, match="top-k"):
        consumer_to_shop_topk(TOY_QUERIES, TOY_GALLERY, TOY_RANKING, ks=(0, 5))


# ------------------------------------------------------------------------------------------ ranking
def test_rank_by_cosine_by_hand() -> None:
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    queries = np.array([[10.0, 1.0], [0.0, 0.5]])  # the norm must not matter
    ranking = rank_deepfashion2(["a", "b"], queries, ["g0", "g1", "g2", "g3"], gallery, k=3)
    assert ranking == {"a": ["g0", "g2", "g1"], "b": ["g1", "g2", "g0"]}
    assert len(rank_deepfashion2(["a"], queries[:1], ["g0", "g1", "g2", "g3"], gallery, k=20)["a"]) == 4


def test_rank_input_errors() -> None:
    with pytest.raises(CmpnasError, match="dimension"):
        rank_deepfashion2(["a"], np.ones((1, 3)), ["g"], np.ones((1, 2)))
    with pytest.raises(CmpnasError, match="ids"):
        rank_deepfashion2(["a", "b"], np.ones((1, 2)), ["g"], np.ones((1, 2)))
    with pytest.raises(CmpnasError, match="duplicates"):
        rank_deepfashion2(["a"], np.ones((1, 2)), ["g", "g"], np.ones((2, 2)))
    with pytest.raises(CmpnasError, match="NaN"):
        rank_deepfashion2(["a"], np.full((1, 2), np.nan), ["g"], np.ones((1, 2)))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 9), st.integers(1, 7))
def test_rank_matches_brute_force_similarities(seed: int, k: int, chunk: int) -> None:
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(7, 4)).astype(np.float32)
    gallery = rng.normal(size=(9, 4)).astype(np.float32)
    ranking = rank_deepfashion2(
        [f"q{i}" for i in range(7)], queries, [f"g{j}" for j in range(9)], gallery, k=k, chunk_size=chunk
    )
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q @ g.T
    for i in range(7):
        ranked = [int(name[1:]) for name in ranking[f"q{i}"]]
        assert len(ranked) == k
        values = sims[i, ranked]
        assert np.all(np.diff(values) <= 1e-5)  # non-increasing
        assert values[-1] >= np.sort(sims[i])[::-1][k - 1] - 1e-5  # nothing better was left out


# ---------------------------------------------------------------------------- fixture, end to end
@pytest.fixture(scope="module")
def df2(tmp_path_factory: pytest.TempPathFactory) -> DeepFashion2Fixture:
    return make_deepfashion2_fixture(tmp_path_factory.mktemp("df2"))


@pytest.fixture(scope="module")
def colour_embeddings(df2: DeepFashion2Fixture) -> tuple[list[Item], dict[str, np.ndarray]]:
    """A trivial embedding: each crop's mean colour, centred on the grey background."""
    items = read_deepfashion2(df2.root, "validation")
    crops = DeepFashion2Crops(items, image_size=16, label="category")  # every item, style 0 included
    embedding = {
        item.item_id: crops[i][0].float().mean(dim=(1, 2)).numpy() - GREY
        for i, item in enumerate(crops.items)
    }
    return items, embedding


def test_end_to_end_colour_embeddings_retrieve_every_answerable_query(colour_embeddings) -> None:
    items, embedding = colour_embeddings
    queries, gallery = retrieval_queries(items), retrieval_gallery(items)
    ranking = rank_deepfashion2(
        [q.item_id for q in queries],
        np.stack([embedding[q.item_id] for q in queries]),
        [g.item_id for g in gallery],
        torch.tensor(np.stack([embedding[g.item_id] for g in gallery])),
    )
    result = consumer_to_shop_topk(items, items, ranking)
    # 13 queries; pair 9 has no shop image, every other query finds its product first
    assert result["n_queries"] == 13 and result["n_gallery"] == 24
    assert result["n_without_positive"] == 1 and result["n_missed"] == 0
    for k in (1, 5, 10, 15, 20):
        assert result[f"top{k}"] == pytest.approx(12 / 13)
    # a ranking that puts the positives last gets them only once k reaches them
    reversed_ranking = {q: list(reversed(r)) for q, r in ranking.items()}
    assert consumer_to_shop_topk(items, items, reversed_ranking)["top1"] == 0.0


def test_export_official_results(colour_embeddings, tmp_path: Path) -> None:
    items, embedding = colour_embeddings
    queries, gallery = retrieval_queries(items), retrieval_gallery(items)
    ranking = rank_deepfashion2(
        [q.item_id for q in queries],
        np.stack([embedding[q.item_id] for q in queries]),
        [g.item_id for g in gallery],
        np.stack([embedding[g.item_id] for g in gallery]),
    )
    path = tmp_path / "out" / "retrieval_results.json"
    count = export_official_results(path, queries, gallery, ranking)
    entries = json.loads(path.read_text())
    assert count == len(entries) == 13
    first = entries[0]
    assert set(first) == {
        "query_image_id",
        "query_bbox",
        "query_cls",
        "query_score",
        "gallery_image_id",
        "gallery_bbox",
    }
    query = queries[0]
    assert first["query_image_id"] == query.image_id == 1
    assert first["query_bbox"] == list(query.bbox) and first["query_cls"] == query.category_id
    assert first["query_score"] == 1.0
    assert len(first["gallery_image_id"]) == 20 and len(first["gallery_bbox"]) == 20
    by_id = {g.item_id: g for g in gallery}
    top = by_id[ranking[query.item_id][0]]
    assert first["gallery_image_id"][0] == top.image_id and first["gallery_bbox"][0] == list(top.bbox)
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temporary file
    short = {query.item_id: ranking[query.item_id][:5]}
    with pytest.raises(CmpnasError, match="20"):
        export_official_results(tmp_path / "short.json", queries, gallery, short)


# ----------------------------------------------------------------------------------- .npz scoring
def _save(path: Path, embedding: dict[str, np.ndarray], ids=None, **extra) -> Path:
    ids = list(embedding) if ids is None else ids
    np.savez(path, ids=np.array(ids, dtype=str), embeddings=np.stack([embedding[i] for i in ids]), **extra)
    return path


def test_score_npz_homogeneous_and_heterogeneous(df2, colour_embeddings, tmp_path: Path) -> None:
    items, embedding = colour_embeddings
    result = score_deepfashion2_embeddings(df2.root, _save(tmp_path / "e.npz", embedding))
    assert result["top1"] == pytest.approx(100 * 12 / 13) and result["top20"] == pytest.approx(100 * 12 / 13)
    assert result["n_queries"] == 13 and result["n_gallery"] == 24 and result["n_without_positive"] == 1
    # an incompatible gallery model (colour channels permuted) breaks retrieval
    permuted = {k: v[[1, 2, 0]] for k, v in embedding.items()}
    hetero = score_deepfashion2_embeddings(
        df2.root, tmp_path / "e.npz", gallery_npz=_save(tmp_path / "g.npz", permuted)
    )
    assert hetero["top1"] < result["top1"] - 30
    # only queries and shop items are required: drop the consumer style-0 item
    needed = [i.item_id for i in retrieval_queries(items) + retrieval_gallery(items)]
    assert score_deepfashion2_embeddings(df2.root, _save(tmp_path / "n.npz", embedding, needed)) == result


def test_score_npz_missing_and_unknown_ids(df2, colour_embeddings, tmp_path: Path) -> None:
    _, embedding = colour_embeddings
    missing = [i for i in embedding if i != "000010_item1"]
    with pytest.raises(CmpnasError, match="000010_item1"):
        score_deepfashion2_embeddings(df2.root, _save(tmp_path / "m.npz", embedding, missing))
    extra = {**embedding, "999999_item1": np.ones(3)}
    with pytest.raises(CmpnasError, match="999999_item1"):
        score_deepfashion2_embeddings(df2.root, _save(tmp_path / "u.npz", extra))


def test_embeddings_flip_is_added(df2, colour_embeddings, tmp_path: Path) -> None:
    _, embedding = colour_embeddings
    ids = list(embedding)
    # the plain embeddings are noise; adding the flip ones cancels the noise exactly
    noise = np.random.default_rng(0).normal(size=(len(ids), 3)).astype(np.float32) * 100
    clean = np.stack([embedding[i] for i in ids])
    path = tmp_path / "f.npz"
    np.savez(path, ids=np.array(ids), embeddings=noise, embeddings_flip=clean - noise)
    assert score_deepfashion2_embeddings(df2.root, path)["top1"] == pytest.approx(100 * 12 / 13)
    assert score_deepfashion2_embeddings(df2.root, path, use_flip=False)["top1"] < 50


def test_load_embeddings_npz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ok.npz"
    np.savez(path, ids=np.array([b"a", b"b"]), embeddings=np.eye(2, dtype=np.float64))
    loaded = load_embeddings_npz(path)
    assert loaded["ids"] == ["a", "b"]
    assert loaded["embeddings"].dtype == np.float32 and loaded["embeddings"].shape == (2, 2)
    assert loaded["embeddings_flip"] is None


BAD_NPZ = {
    "no ids": dict(embeddings=np.eye(2)),
    "no embeddings": dict(ids=np.array(["a", "b"])),
    "length mismatch": dict(ids=np.array(["a", "b", "c"]), embeddings=np.eye(2)),
    "NaN": dict(ids=np.array(["a", "b"]), embeddings=np.array([[0.0, np.nan], [1.0, 0.0]])),
    "integer embeddings": dict(ids=np.array(["a", "b"]), embeddings=np.eye(2, dtype=np.int64)),
    "1-D embeddings": dict(ids=np.array(["a", "b"]), embeddings=np.ones(2)),
    "numeric ids": dict(ids=np.array([1, 2]), embeddings=np.eye(2)),
    "object ids": dict(ids=np.array(["a", "b"], dtype=object), embeddings=np.eye(2)),
    "duplicate ids": dict(ids=np.array(["a", "a"]), embeddings=np.eye(2)),
    "flip shape": dict(ids=np.array(["a", "b"]), embeddings=np.eye(2), embeddings_flip=np.ones((2, 3))),
    "empty": dict(ids=np.array([], dtype=str), embeddings=np.zeros((0, 2))),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_files_are_user_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **BAD_NPZ[case])
    with pytest.raises(CmpnasError) as info:
        load_embeddings_npz(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", ["missing", "npy", "garbage"])
def test_unreadable_npz_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "x.npz"
    if content == "npy":
        with open(path, "wb") as handle:
            np.save(handle, np.eye(2))
    elif content == "garbage":
        path.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(CmpnasError) as info:
        load_embeddings_npz(path)
    assert str(path) in str(info.value)
