"""The gallery side of the compatibility terms: the cached gallery embeddings and the classifier plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cmpnas.compat.targets import classifier_plan, gallery_classifier_for, gallery_train_embeddings
from cmpnas.config import CompatConfig
from cmpnas.data.synthetic import make_synthetic_bundle
from cmpnas.errors import CmpnasError
from cmpnas.models.classifiers import CosineClassifier, LinearClassifier
from cmpnas.models.embedding import EmbeddingModel, ModelSpec
from cmpnas.models.inference import embed, labels_of

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"widths": [8, 16], "depths": [1, 1], "strides": [1, 2]}


def _gallery(class_names: list[str] | None, classifier: str = "linear", seed: int = 0) -> EmbeddingModel:
    torch.manual_seed(seed)
    n = len(class_names) if class_names else 10
    spec = ModelSpec("resnet_small", 16, n, classifier, backbone_kwargs=SMALL, class_names=class_names)
    return EmbeddingModel(spec).eval()


def test_cache_is_keyed_on_the_training_images_not_their_count(tmp_path: Path) -> None:
    gallery = _gallery(None)
    first = make_synthetic_bundle(60, 20, 10, seed=1)
    second = make_synthetic_bundle(60, 20, 10, seed=2)  # same size and classes, other images
    assert len(first.train) == len(second.train)
    gallery_train_embeddings(gallery, first, tmp_path)
    got = gallery_train_embeddings(gallery, second, tmp_path)
    assert torch.allclose(got, embed(gallery, second.train))
    assert len(list(tmp_path.glob("train_embeddings_*.pt"))) == 2
    again = gallery_train_embeddings(gallery, first, tmp_path)  # the first split still finds its own
    assert torch.allclose(again, embed(gallery, first.train))


def test_known_classes_keep_their_rows_and_new_classes_get_class_means(tiny_data) -> None:
    names = [str(c) for c in tiny_data.class_names]
    old_names = [names[3], names[0], names[7], names[5]]  # 4 known classes, in another order
    gallery = _gallery(old_names, "linear", seed=3)
    assert classifier_plan(gallery, tiny_data, CompatConfig()) == "extended"
    emb = embed(gallery, tiny_data.train)
    clf = gallery_classifier_for(gallery, tiny_data, CompatConfig(), emb)
    assert isinstance(clf, LinearClassifier) and clf.out_features == 10
    old_w, old_b = gallery.classifier.weight.detach(), gallery.classifier.bias.detach()
    for i, name in enumerate(old_names):  # BCT keeps the old rows (and biases), moved to the data's order
        j = names.index(name)
        assert torch.equal(clf.weight[j], old_w[i]) and clf.bias[j] == old_b[i]
    labels = labels_of(tiny_data.train)
    unit = F.normalize(emb, dim=1)
    for j in set(range(10)) - {names.index(n) for n in old_names}:
        direction = F.normalize(unit[labels == j].mean(0), dim=0)
        assert torch.allclose(F.normalize(clf.weight[j], dim=0), direction, atol=1e-5)
        assert torch.allclose(clf.weight[j].norm(), old_w.norm(dim=1).mean(), atol=1e-5)
        assert torch.allclose(clf.bias[j], old_b.mean())


def test_cosine_classifier_is_extended_in_cosine_form(tiny_data) -> None:
    names = [str(c) for c in tiny_data.class_names]
    gallery = _gallery(names[:6], "cosine", seed=4)
    clf = gallery_classifier_for(gallery, tiny_data, CompatConfig(), None)
    assert isinstance(clf, CosineClassifier) and clf.out_features == 10
    assert torch.allclose(clf.weight[:6], F.normalize(gallery.classifier.weight.detach(), dim=1))


def test_same_size_other_label_set_is_an_error_naming_both(tiny_data) -> None:
    other = [f"brand_{k}" for k in range(10)]
    gallery = _gallery(other)
    with pytest.raises(CmpnasError) as exc:
        gallery_classifier_for(gallery, tiny_data, CompatConfig(), None)
    message = str(exc.value)
    assert "brand_0" in message and str(tiny_data.class_names[0]) in message
    assert "synthesized" in message  # the fix names the way out
    # explicitly synthesised: the gallery's classifier is not used, so its labels do not matter
    assert isinstance(gallery_classifier_for(gallery, tiny_data, CompatConfig(gallery_classifier="synthesized"), None), CosineClassifier)


def test_same_classes_same_order_use_the_trained_classifier(tiny_data) -> None:
    gallery = _gallery([str(c) for c in tiny_data.class_names])
    assert gallery_classifier_for(gallery, tiny_data, CompatConfig(), None) is gallery.classifier


def test_stages_record_the_class_names(tiny_gallery: Path, tiny_data) -> None:
    from cmpnas.models.embedding import load_model

    assert load_model(tiny_gallery).spec.class_names == [str(c) for c in tiny_data.class_names]
