"""BCT's synthesised classifier: class means of gallery embeddings, used when the gallery's does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cmpnas.compat.targets as targets
import cmpnas.stages.query as stages
from cmpnas.compat.losses import InfluenceLoss
from cmpnas.compat.synthesize import class_mean_weights, synthesize_classifier
from cmpnas.config import CompatConfig, build_config
from cmpnas.errors import CmpnasError
from cmpnas.models.classifiers import CosineClassifier
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, save_model
from cmpnas.models.inference import embed, labels_of

pytestmark = pytest.mark.usefixtures("one_thread")


def test_class_means_hand_example() -> None:
    emb = torch.tensor([[3.0, 4.0], [10.0, 0.0], [0.0, 2.0], [0.0, -5.0]])
    labels = torch.tensor([0, 0, 1, 2])
    # L2-normalised rows: [.6, .8], [1, 0] | [0, 1] | [0, -1]
    expected = torch.tensor([[0.8, 0.4], [0.0, 1.0], [0.0, -1.0]])
    assert torch.allclose(class_mean_weights(emb, labels, 3), expected)


def test_synthesized_classifier_is_a_cosine_classifier_with_class_mean_rows() -> None:
    emb = torch.tensor([[3.0, 4.0], [10.0, 0.0], [0.0, 2.0]])
    clf = synthesize_classifier(emb, torch.tensor([0, 0, 1]), 2, scale=5.0)
    assert isinstance(clf, CosineClassifier)
    assert clf.scale == 5.0
    assert torch.allclose(clf.weight, torch.tensor([[0.8, 0.4], [0.0, 1.0]]))
    # an embedding along class 1's mean gets logit = scale * cos = 5 for class 1
    logits = clf(torch.tensor([[0.0, 3.0]]))
    assert torch.allclose(logits, torch.tensor([[5.0 * 0.4 / (0.8**2 + 0.4**2) ** 0.5, 5.0]]))


def test_a_class_without_images_is_a_clear_error() -> None:
    with pytest.raises(CmpnasError, match=r"Classes \[1\]"):
        class_mean_weights(torch.ones(2, 3), torch.tensor([0, 2]), 3)


def _gallery_with_classes(num_classes: int, seed: int = 0) -> EmbeddingModel:
    torch.manual_seed(seed)
    spec = ModelSpec(
        backbone="resnet_small",
        backbone_kwargs={"widths": [8, 16], "depths": [1, 1], "strides": [1, 2]},
        embed_dim=16,
        num_classes=num_classes,
    )
    return EmbeddingModel(spec).eval()


@pytest.mark.parametrize(
    ("gallery_classes", "choice", "expect"),
    [
        (10, "auto", "trained"),
        (4, "auto", "synthesized"),
        (10, "synthesized", "synthesized"),
        (10, "trained", "trained"),
    ],
)
def test_gallery_classifier_choice(tiny_data, gallery_classes: int, choice: str, expect: str) -> None:
    gallery = _gallery_with_classes(gallery_classes)
    train_emb = embed(gallery, tiny_data.train)
    clf = targets.gallery_classifier_for(
        gallery, tiny_data, CompatConfig(gallery_classifier=choice), train_emb
    )
    if expect == "trained":
        assert clf is gallery.classifier
        return
    assert isinstance(clf, CosineClassifier)
    assert clf.out_features == tiny_data.num_classes == 10
    labels = labels_of(tiny_data.train)
    unit = F.normalize(train_emb, dim=1)
    for c in range(10):  # each row is the mean of that class's unit-length gallery embeddings
        assert torch.allclose(clf.weight[c], unit[labels == c].mean(0), atol=1e-5)


def test_trained_classifier_with_wrong_class_count_is_a_clear_error(tiny_data) -> None:
    with pytest.raises(CmpnasError, match="4 classes but the data has 10") as exc:
        targets.gallery_classifier_for(
            _gallery_with_classes(4), tiny_data, CompatConfig(gallery_classifier="trained"), None
        )
    assert "synthesized" in str(exc.value)


def test_query_training_uses_the_synthesized_classifier_when_class_counts_differ(
    tmp_path: Path, tiny_raw: dict, tiny_data, monkeypatch
) -> None:
    gallery = _gallery_with_classes(4, seed=1)
    gallery_path = tmp_path / "gallery" / "model.safetensors"
    save_model(gallery, gallery_path)
    tasks = []
    real_train = stages.train
    monkeypatch.setattr(
        stages, "train", lambda task, *a, **kw: tasks.append(task) or real_train(task, *a, **kw)
    )
    tiny_raw["query_train"]["epochs"] = 0.5

    stages.train_query(build_config(tiny_raw), gallery_path, tmp_path / "query", data=tiny_data)

    (task,) = tasks
    (influence,) = task.compat.terms
    assert isinstance(influence, InfluenceLoss)
    clf = influence.gallery_classifier
    assert isinstance(clf, CosineClassifier) and clf.out_features == 10
    expected = F.normalize(embed(gallery, tiny_data.train), dim=1)
    labels = labels_of(tiny_data.train)
    means = torch.stack([expected[labels == c].mean(0) for c in range(10)])
    assert torch.allclose(clf.weight, means, atol=1e-5)
    assert not any(p.requires_grad for p in clf.parameters())
    cached = list((gallery_path.parent / "cache").glob("train_embeddings_*.pt"))
    assert len(cached) == 1  # the gallery pass over the training set is cached for the next stage
