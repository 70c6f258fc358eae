"""Backfill and transform-index on built indexes (FAISS flat / IVF / HNSW, Milvus Lite): which rows change,
to what (checked against the new model's own embeddings of the images), the lineage, and the guard."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_serving import GALLERY_KW, Models, _model

from cmpnas.compat.transformation import TransformationSpec, fit_transformation, save_transformation
from cmpnas.data.sources import folder_source, open_image
from cmpnas.errors import CmpnasError
from cmpnas.models.embedding import save_model
from cmpnas.serving.backfill import backfill, transform_index, work_dir
from cmpnas.serving.encoder import load_encoder
from cmpnas.serving.index import GalleryIndex, IndexParams, build_index, check_compatible


@pytest.fixture(scope="module")
def upgraded(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'new gallery model' that records the fixtures' gallery model as the one it is compatible with."""
    path = tmp_path_factory.mktemp("v2") / "gallery_v2.safetensors"
    model = _model(7, GALLERY_KW, compatible_with=models.gallery_fp)
    model.spec.name = "gallery"  # what upgrade-gallery names it: a gallery model, not a query model
    save_model(model, path)
    return path


def _index(models: Models, gallery_dir: Path, out: Path, kind: str = "flat", backend: str = "faiss") -> Path:
    build_index(models.gallery, folder_source(gallery_dir), out, IndexParams(kind=kind, nlist=2), backend=backend)
    return out


def _models_by_id(index: GalleryIndex) -> dict[str, str]:
    ids = [it.id for it in index.items]
    return dict(zip(ids, index.store.model_of(ids), strict=True))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_backfill_replaces_exactly_the_planned_rows(
    models: Models, gallery_dir: Path, upgraded: Path, tmp_path: Path, kind: str
) -> None:
    out = _index(models, gallery_dir, tmp_path / "idx", kind)
    before = GalleryIndex.load(out)
    ids = [it.id for it in before.items]
    old_vectors = before.store.vectors(ids)
    rec = backfill(out, upgraded, 0.5, "uncertainty", chunk_size=5)
    after = GalleryIndex.load(out)
    new_fp = load_encoder(upgraded).fingerprint
    by_model = _models_by_id(after)
    moved = [i for i in ids if by_model[i] == new_fp]
    assert rec["reembedded"] == len(moved) == round(0.5 * len(ids))
    assert after.gallery_fingerprint == new_fp and after.lineage == [new_fp, models.gallery_fp]
    assert [it.id for it in after.items] == ids and len(after) == len(before)
    # the oracle: the new model's own embeddings of the moved items' images; the others kept their vectors
    enc = load_encoder(upgraded)
    paths = {it.id: it.path for it in after.items}
    expect = enc.embed_images([open_image(paths[i]) for i in moved])
    np.testing.assert_allclose(after.store.vectors(moved), expect, atol=1e-5)
    kept = [i for i in ids if i not in set(moved)]
    np.testing.assert_allclose(after.store.vectors(kept), old_vectors[[ids.index(i) for i in kept]], atol=1e-6)
    hits = after.search(expect[:1], 1)[0]
    assert hits[0]["id"] == moved[0]  # the search sees the new vectors
    assert not work_dir(out).exists()


def test_backfill_fraction_is_cumulative_and_uncertainty_differs_from_random(
    models: Models, gallery_dir: Path, upgraded: Path, tmp_path: Path
) -> None:
    a = _index(models, gallery_dir, tmp_path / "a")
    shutil.copytree(a, tmp_path / "b")
    assert backfill(a, upgraded, 0.25, "uncertainty")["reembedded"] == 9
    assert backfill(a, upgraded, 0.25, "uncertainty")["reembedded"] == 0  # already there
    assert backfill(a, upgraded, 0.5, "uncertainty")["reembedded"] == 9
    backfill(tmp_path / "b", upgraded, 0.25, "random", seed=3)
    new_fp = load_encoder(upgraded).fingerprint
    first = {i for i, m in _models_by_id(GalleryIndex.load(tmp_path / "b")).items() if m == new_fp}
    assert len(first) == 9
    assert backfill(tmp_path / "b", upgraded, 1.0, "random")["embedded_by_model_after"] == 36


def test_query_models_along_the_lineage(models: Models, gallery_dir: Path, upgraded: Path, tmp_path: Path) -> None:
    out = _index(models, gallery_dir, tmp_path / "idx")
    backfill(out, upgraded, 0.5)
    index = GalleryIndex.load(out)
    assert check_compatible(index, load_encoder(upgraded)) == "homogeneous"
    assert check_compatible(index, load_encoder(models.query)) == "lineage"  # compatible with the old gallery
    assert check_compatible(index, load_encoder(models.gallery)) == "lineage"
    with pytest.raises(CmpnasError, match=r"compatible chain: .* <- "):
        check_compatible(index, load_encoder(models.stranger))


def test_backfill_refuses_an_unrelated_gallery_model(models: Models, gallery_dir: Path, tmp_path: Path) -> None:
    out = _index(models, gallery_dir, tmp_path / "idx")
    stranger = tmp_path / "other.safetensors"
    save_model(_model(9, GALLERY_KW), stranger)
    manifest_before = (out / "manifest.json").read_text()
    with pytest.raises(CmpnasError, match="cannot write into"):
        backfill(out, stranger, 1.0)
    assert (out / "manifest.json").read_text() == manifest_before


def test_append_with_the_upgraded_model_extends_the_lineage(
    models: Models, gallery_dir: Path, upgraded: Path, tmp_path: Path, pattern
) -> None:  # type: ignore[no-untyped-def]
    out = _index(models, gallery_dir, tmp_path / "idx")
    extra = tmp_path / "extra" / "stripes"
    extra.mkdir(parents=True)
    for i in range(3):
        pattern("stripes", 900 + i).save(extra / f"new{i}.png")
    build_index(upgraded, folder_source(tmp_path / "extra"), out, append=True)
    index = GalleryIndex.load(out)
    new_fp = load_encoder(upgraded).fingerprint
    assert index.lineage == [new_fp, models.gallery_fp]
    assert index.model_counts() == {models.gallery_fp: 36, new_fp: 3}
    # the old gallery model can no longer write into it (its newest generation is v2)
    with pytest.raises(CmpnasError, match="cannot write into"):
        build_index(models.gallery, folder_source(tmp_path / "extra"), out, append=True)
    # nor can a query model trained against the new head: comparable, but not a gallery model
    query_v2 = tmp_path / "query_v2.safetensors"
    save_model(_model(8, GALLERY_KW, compatible_with=new_fp), query_v2)
    with pytest.raises(CmpnasError, match="a query model trained against it"):
        build_index(query_v2, folder_source(tmp_path / "extra"), out, append=True)


def test_transform_index_moves_every_vector_into_the_new_space(
    models: Models, gallery_dir: Path, tmp_path: Path
) -> None:
    out = _index(models, gallery_dir, tmp_path / "idx")
    new_path = tmp_path / "independent.safetensors"
    new_fp = save_model(_model(11, GALLERY_KW), new_path)  # not trained compatible: needs the transformation
    index = GalleryIndex.load(out)
    ids = [it.id for it in index.items]
    old = torch.from_numpy(index.store.vectors(ids))
    new = torch.from_numpy(load_encoder(new_path).embed_images([open_image(it.path) for it in index.items]))
    fct, _ = fit_transformation(old, new, TransformationSpec(models.gallery_fp, new_fp, 16, 32), epochs=2)
    save_transformation(fct, tmp_path / "t.safetensors")
    rec = transform_index(out, tmp_path / "t.safetensors", new_path)
    after = GalleryIndex.load(out)
    assert rec["transformed"] == 36 and after.lineage == [new_fp]
    np.testing.assert_allclose(after.store.vectors(ids), fct.apply_numpy(old.numpy()), atol=1e-5)
    assert set(_models_by_id(after).values()) == {f"fct:{models.gallery_fp}->{new_fp}"}
    with pytest.raises(CmpnasError, match="not comparable"):
        check_compatible(after, load_encoder(models.query))  # the old chain's query model no longer fits
    with pytest.raises(CmpnasError, match="does not fit index"):
        transform_index(out, tmp_path / "t.safetensors", new_path)  # nothing of the old model is left


def test_backfill_on_milvus_lite(models: Models, gallery_dir: Path, upgraded: Path, tmp_path: Path) -> None:
    out = _index(models, gallery_dir, tmp_path / "idx", backend="milvus")
    rec = backfill(out, upgraded, 0.5, "random", seed=1)
    index = GalleryIndex.load(out)
    new_fp = load_encoder(upgraded).fingerprint
    assert index.gallery_fingerprint == new_fp and index.lineage == [new_fp, models.gallery_fp]
    by_model = _models_by_id(index)
    moved = [i for i, m in by_model.items() if m == new_fp]
    assert len(moved) == rec["reembedded"] == 18
    paths = {it.id: it.path for it in index.items}
    expect = load_encoder(upgraded).embed_images([open_image(paths[i]) for i in moved])
    np.testing.assert_allclose(index.store.vectors(moved), expect, atol=1e-5)
    index.store.close()


@pytest.mark.parametrize("order", ["uncertainty", "confident"])
def test_margin_orders_backfill_the_items_their_margins_put_first(
    models: Models, gallery_dir: Path, upgraded: Path, tmp_path: Path, order: str
) -> None:
    from cmpnas.compat.backfill_order import backfill_order, label_rows
    from cmpnas.models.embedding import load_model

    out = _index(models, gallery_dir, tmp_path / "idx")
    before = GalleryIndex.load(out)
    ids = [it.id for it in before.items]
    new_model = load_model(upgraded)
    expected_order = backfill_order(
        before.store.vectors(ids),
        order,
        class_rows=new_model.classifier.weight.detach().float().numpy(),
        labels=label_rows([it.label for it in before.items], new_model.spec.class_names),
    )
    n = round(0.25 * len(ids))
    backfill(out, upgraded, 0.25, order)
    by_model = _models_by_id(GalleryIndex.load(out))
    moved = {i for i in ids if by_model[i] == load_encoder(upgraded).fingerprint}
    assert moved == {ids[j] for j in expected_order[:n]}
