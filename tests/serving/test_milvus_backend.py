"""The Milvus backend on Milvus Lite (embedded, from PyPI): the same answers as FAISS on the Fashion-MNIST test
split, the compatibility guard stored in the collection, idempotent resumable writes, torchrun-sharded
embedding (1 rank and 2 ranks give the same index on both backends)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmpnas.data.sources import dataset_source, load_dataset_split
from cmpnas.errors import CmpnasError
from cmpnas.serving.encoder import load_encoder
from cmpnas.serving.index import GalleryIndex, build_index, query_images

pytest.importorskip("pymilvus")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
CLI = [sys.executable, "-m", "cmpnas.cli"]
TOL = 1e-5  # the two engines sum inner products in other orders: scores agree to ~1e-6


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**_env(), "TMPDIR": str(cwd)}  # torchrun's log folders (torchelastic_*) stay in the test's folder
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def fm_indexes(models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The whole Fashion-MNIST test split (10k) in FAISS (flat) and in Milvus Lite (FLAT), same gallery model."""
    root = tmp_path_factory.mktemp("fm")
    source = dataset_source("fashion_mnist", "test")
    build_index(models.gallery, source, root / "faiss")
    build_index(models.gallery, source, root / "milvus", backend="milvus", batch_size=1000)
    return root / "faiss", root / "milvus"


def exact_topk_agree(a: list[dict], b: list[dict], tol: float = TOL) -> bool:
    """Both lists are a correct exact top-k of the same scores: scores agree rank by rank, and every id clearly
    above the k-th score (beyond float noise) is in both lists; ids tied with the k-th score may differ, and
    engines order ties differently."""
    if len(a) != len(b) or any(abs(x["score"] - y["score"]) > tol for x, y in zip(a, b, strict=True)):
        return False
    ids_a, ids_b = {h["id"] for h in a}, {h["id"] for h in b}
    clear_a = {h["id"] for h in a if h["score"] > a[-1]["score"] + 2 * tol}  # no tie with anything left out
    clear_b = {h["id"] for h in b if h["score"] > b[-1]["score"] + 2 * tol}
    return clear_a <= ids_b and clear_b <= ids_a


def test_exact_topk_agree_on_hand_examples() -> None:
    hit = lambda i, s: {"id": i, "score": s}  # noqa: E731
    assert exact_topk_agree([hit("a", 0.9), hit("b", 0.5)], [hit("a", 0.9), hit("b", 0.5)])
    assert exact_topk_agree([hit("a", 0.9), hit("b", 0.5)], [hit("a", 0.9), hit("c", 0.5)])  # tie at k
    assert not exact_topk_agree([hit("a", 0.9), hit("b", 0.5)], [hit("c", 0.9), hit("b", 0.5)])  # other top-1
    assert not exact_topk_agree([hit("a", 0.9), hit("b", 0.5)], [hit("a", 0.9), hit("b", 0.4)])  # a worse 2nd


def test_milvus_and_faiss_give_the_same_top10_for_200_queries(models, fm_indexes) -> None:
    faiss_dir, milvus_dir = fm_indexes
    a, b = GalleryIndex.load(faiss_dir), GalleryIndex.load(milvus_dir)
    assert (a.backend, b.backend) == ("faiss", "milvus") and len(a) == len(b) == 10_000
    ids = [it.id for it in a.items]
    assert sorted(b.store.all_ids()) == sorted(ids)  # every item once
    sample = ids[::50]
    assert np.abs(a.store.vectors(sample) - b.store.vectors(sample)).max() <= 1e-6
    images, _ = load_dataset_split("fashion_mnist", "train", None)  # 200 queries the gallery does not hold
    from cmpnas.data.sources import array_to_pil

    queries = load_encoder(models.gallery).embed_images([array_to_pil(images[i]) for i in range(200)])
    ra, rb = a.search(queries, 10), b.search(queries, 10)
    assert all(len(x) == 10 for x in ra + rb)
    assert all(exact_topk_agree(x, y) for x, y in zip(ra, rb, strict=True))
    assert [h["label"] for h in ra[0]] == [a.store.item(h["id"]).label for h in ra[0]]
    assert [h["label"] for h in rb[0]] == [b.store.item(h["id"]).label for h in rb[0]]


def test_milvus_searches_among_one_models_rows_like_faiss(models, fm_indexes) -> None:
    """The dual query policy's row filter (by the gallery model that embedded each row) on both engines: every
    row here is the gallery model's, so its rows are everything and the others nothing."""
    from cmpnas.serving.store import ModelRows

    a, b = (GalleryIndex.load(p) for p in fm_indexes)
    images, _ = load_dataset_split("fashion_mnist", "train", None)
    from cmpnas.data.sources import array_to_pil

    queries = load_encoder(models.gallery).embed_images([array_to_pil(images[i]) for i in range(20)])
    head = b.gallery_fingerprint
    for index in (a, b):
        everything = index.search(queries, 10)
        assert index.store.search(queries, 10, ModelRows(head)) == everything
        assert index.store.search(queries, 10, ModelRows("0" * 16, other=True)) == everything
        assert index.store.search(queries, 10, ModelRows(head, other=True)) == [[] for _ in range(20)]
        merged = index.search_dual(queries, queries, 10, head)  # nothing on the old side: the new side alone
        assert [[h["id"] for h in x] for x in merged] == [[h["id"] for h in x] for x in everything]


def test_the_guard_lives_in_the_collection_and_refuses_an_incompatible_query_model(
    models, milvus_index
) -> None:
    from cmpnas.serving.milvus_store import GUARD_PROPERTY

    index = GalleryIndex.load(milvus_index)
    props = index.store.client.describe_collection(index.store.collection)["properties"]
    guard = json.loads(props[GUARD_PROPERTY])
    assert guard["gallery_fingerprint"] == models.gallery_fp and guard["dim"] == 16
    assert guard["lineage"][0] == models.gallery_fp and guard["gallery_spec"]["embed_dim"] == 16
    with pytest.raises(CmpnasError, match="not comparable") as err:
        query_images(milvus_index, models.stranger, [])
    assert "--allow-incompatible" in str(err.value)
    assert query_images(milvus_index, models.query, [])["mode"] == "heterogeneous"
    assert (
        query_images(milvus_index, models.stranger, [], allow_incompatible=True)["mode"]
        == "incompatible-override"
    )


def test_a_folder_that_disagrees_with_its_collection_is_refused(milvus_index: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(milvus_index, copy, ignore=shutil.ignore_patterns("milvus.db"))
    manifest = json.loads((milvus_index / "manifest.json").read_text())
    manifest["gallery_fingerprint"] = "0" * 16
    manifest["milvus"]["uri"] = str((milvus_index / "milvus.db").resolve())  # the same collection
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CmpnasError, match="disagree"):
        GalleryIndex.load(copy)


def test_another_gallery_model_cannot_write_into_the_collection(models, tmp_path: Path, gallery_dir) -> None:
    from fixtures_serving import GALLERY_KW, _model

    from cmpnas.data.sources import folder_source
    from cmpnas.models.embedding import save_model

    other = tmp_path / "other.safetensors"
    save_model(_model(7, GALLERY_KW), other)
    out = tmp_path / "idx"
    build_index(models.gallery, folder_source(gallery_dir), out, backend="milvus")
    with pytest.raises(CmpnasError, match="holds embeddings of gallery model"):
        build_index(other, folder_source(gallery_dir), out, backend="milvus")
    assert len(GalleryIndex.load(out)) == 36  # untouched


def test_append_is_idempotent(models, tmp_path: Path, gallery_dir) -> None:
    from cmpnas.data.sources import folder_source

    out = tmp_path / "idx"
    first = build_index(
        models.gallery, dataset_source("fashion_mnist", "test", None, 300), out, backend="milvus"
    )
    assert first["count"] == 300 and first["status"] == "complete"
    more = build_index(
        models.gallery, folder_source(gallery_dir), out, append=True
    )  # backend from the folder
    assert more["count"] == 336 and more["sources"][-1]["added"] == 36 and len(more["sources"]) == 2
    again = build_index(models.gallery, folder_source(gallery_dir), out, append=True)
    assert again["count"] == 336 and again["sources"][-1]["added"] == 0


def test_a_killed_build_resumes_without_duplicates_or_gaps(models, tmp_path: Path) -> None:
    """SIGKILL after some batches are stored; the folder says 'building' (refused by query/serve); the same
    command again finishes: every id once, vectors equal to an uninterrupted FAISS build."""
    out, n = tmp_path / "idx", 3000
    cmd = [
        *CLI, "index", "--gallery-model", str(models.gallery), "--dataset", "fashion_mnist", "--limit", str(n),
        "--out", str(out), "--backend", "milvus", "--batch-size", "250", "--json-logs",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stored_at_kill = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "index" and event.get("done", 0) >= 1000:
            stored_at_kill = event["done"]
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and 1000 <= stored_at_kill < n
    with pytest.raises(CmpnasError, match="still being built"):
        GalleryIndex.load(out)

    _run(cmd, tmp_path)
    index = GalleryIndex.load(out)
    ids = index.store.all_ids()
    expected = [it.id for it in dataset_source("fashion_mnist", "test", None, n).items]
    assert len(ids) == len(set(ids)) == n and set(ids) == set(expected)
    reference = build_index(
        models.gallery, dataset_source("fashion_mnist", "test", None, n), tmp_path / "ref"
    )
    assert reference["count"] == n
    ref = GalleryIndex.load(tmp_path / "ref")
    assert np.abs(index.store.vectors(expected) - ref.store.vectors(expected)).max() <= 1e-6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["sources"]) == 1


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_torchrun_two_ranks_build_the_same_index_as_one_process(models, tmp_path: Path, backend: str) -> None:
    """Each rank embeds its own slice; FAISS: rank 0 merges the slices in source order; Milvus Lite (one
    process per file): rank 0 stores the other ranks' slices. Same ids, same vectors (1e-6), same order."""
    args = [
        "index", "--gallery-model", str(models.gallery), "--dataset", "fashion_mnist", "--limit", "1000",
        "--backend", backend, "--batch-size", "200",
    ]  # fmt: skip
    _run([*CLI, *args, "--out", str(tmp_path / "one")], tmp_path)
    _run([*TORCHRUN, "-m", "cmpnas.cli", *args, "--out", str(tmp_path / "two")], tmp_path)
    one, two = GalleryIndex.load(tmp_path / "one"), GalleryIndex.load(tmp_path / "two")
    ids_one = [it.id for it in one.items] if backend == "faiss" else sorted(one.store.all_ids())
    ids_two = [it.id for it in two.items] if backend == "faiss" else sorted(two.store.all_ids())
    assert ids_one == ids_two and len(ids_one) == 1000
    assert np.abs(one.store.vectors(ids_one) - two.store.vectors(ids_one)).max() <= 1e-6
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["ranks"] == 2 and manifest["count"] == 1000
    assert not list(tmp_path.glob(".two.shards*"))  # the shard files are gone


def test_ranked_label_metrics_hand_example() -> None:
    from cmpnas.evaluation.retrieval import ranked_label_metrics

    m = ranked_label_metrics(["a", "b"], [["a", "x", "a"], ["x", "x", "b"]], ks=(1, 3))
    assert m == {"top1": 50.0, "precision@1": 50.0, "top3": 100.0, "precision@3": pytest.approx(50.0)}


def test_evaluate_from_an_index_gives_the_same_numbers_on_both_backends(
    models, flat_index: Path, milvus_index: Path, gallery_dir: Path
) -> None:
    """Leave-one-out over the indexed folder itself; FAISS checked against numpy brute force."""
    from cmpnas.data.sources import folder_source
    from cmpnas.stages import evaluate_index

    source = folder_source(gallery_dir)
    a = evaluate_index(flat_index, models.query, source, k=5)
    b = evaluate_index(milvus_index, models.query, source, k=5)
    assert (a["backend"], b["backend"], a["mode"]) == ("faiss", "milvus", "heterogeneous")
    assert a["queries"] == b["queries"] == 36 and a["skipped_unreadable"] == 1
    assert a["metrics"] == pytest.approx(b["metrics"])
    index = GalleryIndex.load(flat_index)
    ids = [it.id for it in index.items]
    gallery = index.store.vectors(ids)
    from PIL import Image

    kept = [it for it in source.items if it.id in set(ids)]
    q = load_encoder(models.query).embed_images([Image.open(gallery_dir / it.id) for it in kept])
    scores = q @ gallery.T
    for i, it in enumerate(kept):
        scores[i, ids.index(it.id)] = -np.inf  # leave one out
    top1 = [index.items[j].label for j in scores.argmax(1)]
    assert a["metrics"]["top1"] == pytest.approx(100 * np.mean([t == it.label for t, it in zip(top1, kept, strict=True)]))
