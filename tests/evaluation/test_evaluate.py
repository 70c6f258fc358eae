"""evaluate / three_way on constructed model pairs with known answers; the evaluate stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import cmpnas.stages as stages
from cmpnas.config import build_config
from cmpnas.data.base import TensorImageDataset
from cmpnas.data.synthetic import make_synthetic_bundle
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.evaluate import LeaveOneOut, QueryGallery, evaluate, three_way
from cmpnas.models.cost import count_macs
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint, load_model, save_model
from cmpnas.models.inference import embed

pytestmark = pytest.mark.usefixtures("one_thread")


class PixelModel(nn.Module):
    """Embedding = the normalised pixels, optionally times a fixed matrix (a 'model' whose answer we know)."""

    def __init__(self, matrix: torch.Tensor | None = None, mean=(0.0,), std=(1.0,)) -> None:
        super().__init__()
        self.spec = SimpleNamespace(mean=list(mean), std=list(std))
        self.matrix = matrix
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        flat = x.flatten(1)
        return flat if self.matrix is None else flat @ self.matrix


@pytest.fixture(scope="module")
def bundle():
    return make_synthetic_bundle(20, 300, num_classes=10, seed=4)


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q.float()


def brute_force_top1(q: torch.Tensor, q_labels, g: torch.Tensor, g_labels, exclude_self: bool) -> float:
    """Nearest neighbour by cosine, in numpy float64, independent of cmpnas.evaluation."""
    qn = q.double().numpy()
    gn = g.double().numpy()
    qn /= np.linalg.norm(qn, axis=1, keepdims=True)
    gn /= np.linalg.norm(gn, axis=1, keepdims=True)
    sims = qn @ gn.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(1)
    return 100.0 * float(np.mean(np.asarray(g_labels)[nearest] == np.asarray(q_labels)))


# ---------------------------------------------------------------------------------------------- known answers
def test_query_model_equal_to_gallery_model_gives_three_equal_rows(bundle) -> None:
    model = PixelModel(mean=bundle.mean, std=bundle.std)
    twin = copy.deepcopy(model)  # a different object computing the same function
    for query in (model, twin):
        res = three_way(query, model, LeaveOneOut(bundle.test))
        assert res["paragon"] == res["homogeneous"] == res["heterogeneous"]
    assert res["paragon"]["top1"] > 60  # pixels separate the synthetic classes well


def test_rotated_embedding_space_is_incompatible(bundle) -> None:
    """An orthogonal rotation keeps every cosine inside the query model (homogeneous = paragon) but makes
    query and gallery embeddings unrelated: heterogeneous falls to about chance (10 classes: ~10%)."""
    gallery = PixelModel(mean=bundle.mean, std=bundle.std)
    rotated = PixelModel(random_orthogonal(28 * 28, seed=0), mean=bundle.mean, std=bundle.std)
    res = three_way(rotated, gallery, LeaveOneOut(bundle.test))
    assert res["homogeneous"]["top1"] == pytest.approx(res["paragon"]["top1"], abs=0.5)
    assert res["homogeneous"]["map"] == pytest.approx(res["paragon"]["map"], abs=0.1)
    assert res["paragon"]["top1"] > 60
    assert res["heterogeneous"]["top1"] < 30
    # flipping the sign retrieves the *least* similar image: far below chance
    flipped = PixelModel(-torch.eye(28 * 28), mean=bundle.mean, std=bundle.std)
    assert three_way(flipped, gallery, LeaveOneOut(bundle.test))["heterogeneous"]["top1"] < 5


def test_leave_one_out_excludes_the_query_image_even_across_models() -> None:
    # Each image's nearest *other* image has the other label; its nearest image overall is itself.
    images = torch.tensor([[255, 0], [230, 25], [0, 255], [25, 230]], dtype=torch.uint8).view(4, 1, 1, 2)
    ds = TensorImageDataset(images, [0, 1, 0, 1])
    query, gallery = PixelModel(), PixelModel(2.0 * torch.eye(2))  # different objects, different scale
    res = three_way(query, gallery, LeaveOneOut(ds))
    for row in ("paragon", "homogeneous", "heterogeneous"):
        assert res[row]["top1"] == 0.0, row
        # image 0 ranks 1, 3, 2 (class-mate last): AP 1/3; image 1 ranks 0, 3, 2: AP 1/2; 2 and 3 mirror them
        assert res[row]["map"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2, abs=1e-3), row
        assert res[row]["n_queries"] == 4
    # the same pair as separate query/gallery sets does match every image with itself
    assert evaluate(query, gallery, QueryGallery(ds, ds))["top1"] == 100.0


def test_leave_one_out_matches_brute_force_with_different_models(bundle) -> None:
    gen = torch.Generator().manual_seed(1)
    qm = PixelModel(torch.randn(784, 32, generator=gen), mean=bundle.mean, std=bundle.std)
    gm = PixelModel(torch.randn(784, 32, generator=gen), mean=bundle.mean, std=bundle.std)
    labels = bundle.test.labels
    q, g = embed(qm, bundle.test), embed(gm, bundle.test)
    expected = brute_force_top1(q, labels, g, labels, exclude_self=True)
    assert evaluate(qm, gm, LeaveOneOut(bundle.test))["top1"] == pytest.approx(expected)
    swapped = brute_force_top1(g, labels, q, labels, exclude_self=True)
    assert evaluate(gm, qm, LeaveOneOut(bundle.test))["top1"] == pytest.approx(swapped)


def test_query_gallery_protocol_embeds_each_set_with_its_model(bundle) -> None:
    qset, gset = bundle.test.subset(range(0, 100)), bundle.test.subset(range(100, 300))
    gen = torch.Generator().manual_seed(2)
    qm = PixelModel(torch.randn(784, 24, generator=gen), mean=bundle.mean, std=bundle.std)
    gm = PixelModel(torch.randn(784, 24, generator=gen), mean=bundle.mean, std=bundle.std)
    expected = brute_force_top1(
        embed(qm, qset), qset.labels, embed(gm, gset), gset.labels, exclude_self=False
    )
    res = three_way(qm, gm, QueryGallery(qset, gset))
    assert res["heterogeneous"]["top1"] == pytest.approx(expected)
    assert res["heterogeneous"]["n_queries"] == 100
    hom = brute_force_top1(embed(qm, qset), qset.labels, embed(qm, gset), gset.labels, exclude_self=False)
    assert res["homogeneous"]["top1"] == pytest.approx(hom)


# ---------------------------------------------------------------------------------------------- mechanics
def test_gallery_cache_embeds_the_gallery_once(bundle) -> None:
    gallery = PixelModel(mean=bundle.mean, std=bundle.std)
    protocol = LeaveOneOut(bundle.test)
    cache: dict = {}
    q1 = PixelModel(random_orthogonal(784, 1), mean=bundle.mean, std=bundle.std)
    q2 = PixelModel(-torch.eye(784), mean=bundle.mean, std=bundle.std)
    three_way(q1, gallery, protocol, batch_size=100, gallery_cache=cache)
    calls = gallery.calls
    assert calls == 3  # 300 images in batches of 100, one pass
    cached = three_way(q2, gallery, protocol, batch_size=100, gallery_cache=cache)
    assert gallery.calls == calls
    assert cached == three_way(q2, PixelModel(mean=bundle.mean, std=bundle.std), protocol)


def test_embed_is_batch_size_invariant_and_restores_train_mode(bundle) -> None:
    torch.manual_seed(0)
    model = EmbeddingModel(
        ModelSpec(backbone="resnet_small", backbone_kwargs={"widths": [4, 8], "depths": [1, 1],
                  "strides": [2, 2]}, embed_dim=8, mean=list(bundle.mean), std=list(bundle.std))
    )  # fmt: skip
    model.train()
    a = embed(model, bundle.test.subset(range(50)), batch_size=7)
    assert model.training
    b = embed(model, bundle.test.subset(range(50)), batch_size=50)
    assert a.shape == (50, 8) and a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-5)  # eval-mode BN: a row does not depend on its batch


# ---------------------------------------------------------------------------------------------- compare
def test_evaluate_models_writes_results(
    tmp_path: Path, tiny_raw: dict, tiny_data, tiny_gallery: Path
) -> None:
    torch.manual_seed(0)
    qspec = ModelSpec(**{**tiny_raw["query"], "mean": list(tiny_data.mean), "std": list(tiny_data.std)})
    query_path = tmp_path / "query.safetensors"
    save_model(EmbeddingModel(qspec).eval(), query_path)
    out = tmp_path / "eval"
    res = stages.evaluate_models(build_config(tiny_raw), tiny_gallery, query_path, out, data=tiny_data)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    for row in ("paragon", "homogeneous", "heterogeneous"):
        assert {"top1", "top5", "map"} <= saved[row].keys()
    gallery, query = load_model(tiny_gallery), load_model(query_path)
    g_macs, q_macs = count_macs(gallery, (1, 1, 28, 28)), count_macs(query, (1, 1, 28, 28))
    assert saved["gallery"]["macs"] == g_macs and saved["query"]["macs"] == q_macs
    assert saved["gallery"]["fingerprint"] == fingerprint(gallery)
    assert saved["query"]["fingerprint"] == fingerprint(query)
    assert saved["cost_reduction"] == pytest.approx(g_macs / q_macs, abs=0.01)
    for k, v in saved["gap_to_paragon"].items():
        assert v == pytest.approx(saved["paragon"][k] - saved["heterogeneous"][k], abs=1e-3)
    assert saved["compatible"] == (saved["heterogeneous"]["top1"] > saved["homogeneous"]["top1"])
    assert saved["protocol"] == {"name": "leave_one_out", "split": "test", "n_images": len(tiny_data.test)}
    paragon = evaluate(gallery, gallery, LeaveOneOut(tiny_data.test))
    assert saved["paragon"]["top1"] == pytest.approx(paragon["top1"], abs=1e-3)
    assert f"| resnet_small | {q_macs / 1e6:.2f} M |" in (out / "results.md").read_text()  # unnamed: backbone


def test_evaluate_models_refuses_a_dim_mismatch(
    tmp_path: Path, tiny_raw: dict, tiny_data, tiny_gallery
) -> None:
    qspec = ModelSpec(**{**tiny_raw["query"], "embed_dim": 24})
    query_path = tmp_path / "query.safetensors"
    save_model(EmbeddingModel(qspec), query_path)
    with pytest.raises(CmpnasError, match="embed_dim"):
        stages.evaluate_models(
            build_config(tiny_raw), tiny_gallery, query_path, tmp_path / "e", data=tiny_data
        )
    assert not (tmp_path / "e").exists()
