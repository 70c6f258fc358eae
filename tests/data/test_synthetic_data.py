"""The synthetic test set: right shapes, deterministic, and actually learnable."""

from __future__ import annotations

import pytest
import torch

from cmpnas.data.synthetic import make_synthetic_bundle, make_synthetic_splits


def test_shapes_counts_and_balance():
    bundle = make_synthetic_bundle(
        n_train=60, n_test=30, num_classes=3, image_size=12, in_chans=3, seed=1, n_val=9
    )
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (60, 9, 30)
    img, label = bundle.train[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 12, 12) and 0 <= label < 3
    assert torch.bincount(bundle.train.labels).tolist() == [20, 20, 20]
    assert bundle.num_classes == 3 and bundle.in_chans == 3 and len(bundle.mean) == 3
    assert all(0 < m < 1 for m in bundle.mean) and all(0 < s < 1 for s in bundle.std)


def test_deterministic_per_seed_and_consistent_with_splits():
    a = make_synthetic_bundle(40, 10, 4, seed=5)
    b = make_synthetic_bundle(40, 10, 4, seed=5)
    c = make_synthetic_bundle(40, 10, 4, seed=6)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.train.images, c.train.images)
    splits = make_synthetic_splits(40, 10, 4, seed=5)
    assert torch.equal(splits.train.images, a.train.images) and torch.equal(splits.test.labels, a.test.labels)


def test_learnable_by_nearest_centroid_but_not_copies():
    bundle = make_synthetic_bundle(n_train=200, n_test=100, num_classes=5, seed=0)
    x_train = bundle.train.images.float().flatten(1)
    x_test = bundle.test.images.float().flatten(1)
    centroids = torch.stack([x_train[bundle.train.labels == k].mean(0) for k in range(5)])
    predicted = torch.cdist(x_test, centroids).argmin(1)
    accuracy = (predicted == bundle.test.labels).float().mean().item()
    assert accuracy > 0.8  # chance is 0.2
    same_class = bundle.train.images[bundle.train.labels == 0].float()
    assert same_class.std(0).mean() > 5  # images of a class differ (shift, contrast, noise)


def test_rejects_nonsense():
    with pytest.raises(ValueError):
        make_synthetic_bundle(10, 5, num_classes=1)
