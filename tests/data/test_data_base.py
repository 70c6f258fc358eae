"""Dataset types, collation, mean/std and the stratified splitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmpnas.data.base import (
    DataBundle,
    ImageDataset,
    StackedBatch,
    TensorImageDataset,
    allocate_stratified,
    collate_uint8,
    compute_mean_std,
    split_train_val,
    stratified_subset,
)
from cmpnas.data.fashion_mnist import split_train_val as split_from_fashion_module


def _toy(n: int = 12, chans: int = 1) -> TensorImageDataset:
    images = torch.arange(n * chans * 2 * 2, dtype=torch.int64).reshape(n, chans, 2, 2).to(torch.uint8)
    return TensorImageDataset(images, torch.arange(n) % 3)


class _LazyToy(ImageDataset):
    """A non-tensor dataset: exercises the generic subset and sampled mean/std paths."""

    def __init__(self, n: int) -> None:
        self.labels = torch.arange(n) % 2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 2, 2), int(self.labels[index]) * 255, dtype=torch.uint8), int(
            self.labels[index]
        )


# ---------------------------------------------------------------------------------- datasets


def test_tensor_dataset_item_and_subset():
    ds = _toy()
    img, label = ds[4]
    assert img.dtype == torch.uint8 and img.shape == (1, 2, 2) and label == 1
    assert img.flatten().tolist() == [16, 17, 18, 19]
    sub = ds.subset([5, 0])
    assert isinstance(sub, TensorImageDataset) and len(sub) == 2
    assert sub.labels.tolist() == [2, 0]
    assert sub[0][0].flatten().tolist() == [20, 21, 22, 23]
    with pytest.raises(IndexError):
        ds.subset([12])


def test_tensor_dataset_validates_inputs():
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(torch.zeros(2, 1, 2, 2), [0, 1])
    with pytest.raises(ValueError, match="labels"):
        TensorImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), [0, 1, 2])


def test_getitems_and_collate_fast_path():
    ds = _toy()
    batch = ds.__getitems__([3, 1, 7])
    assert isinstance(batch, StackedBatch) and len(batch) == 3
    assert batch[1][1] == 1 and batch[-1][1] == 1
    images, labels = collate_uint8(batch)
    assert images.shape == (3, 1, 2, 2) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 1]
    assert images[0].flatten().tolist() == [12, 13, 14, 15]


def test_collate_list_of_pairs():
    pairs = [(torch.full((1, 2, 2), v, dtype=torch.uint8), v) for v in (5, 9)]
    images, labels = collate_uint8(pairs)
    assert images[:, 0, 0, 0].tolist() == [5, 9] and labels.tolist() == [5, 9]


def test_dataloader_uses_batched_path_and_default_collate_still_works():
    ds = _toy(10)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_uint8)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.cat([b[1] for b in batches]).tolist() == (torch.arange(10) % 3).tolist()
    default = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert torch.equal(default[0], batches[0][0]) and torch.equal(default[1], batches[0][1])


def test_generic_subset_of_lazy_dataset():
    ds = _LazyToy(6)
    sub = ds.subset([1, 2, 3]).subset([2, 0])
    assert sub.labels.tolist() == [1, 1]
    assert sub[0][0].flatten().tolist() == [255] * 4


# ---------------------------------------------------------------------------------- mean / std


def test_mean_std_hand_computed():
    # Channel 0 pixels: 0,0,255,255 (x2 images) -> mean 0.5, std 0.5. Channel 1 constant 51 -> std 1.0.
    images = torch.zeros(2, 2, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, :] = 255
    images[:, 1] = 51
    mean, std = compute_mean_std(TensorImageDataset(images, [0, 1]))
    assert mean == pytest.approx((0.5, 0.2))
    assert std == pytest.approx((0.5, 1.0))


def test_mean_std_lazy_dataset_and_sampling():
    mean, std = compute_mean_std(_LazyToy(4))
    assert mean == pytest.approx((0.5,)) and std == pytest.approx((0.5,))
    mean_sampled, _ = compute_mean_std(_LazyToy(50), max_images=10, seed=3)
    assert 0.0 <= mean_sampled[0] <= 1.0


# ---------------------------------------------------------------------------------- bundle


def test_describe_counts_per_split():
    ds = _toy(12)
    bundle = DataBundle(
        name="toy",
        train=ds.subset(range(8)),
        val=ds.subset([8, 9]),
        test=ds.subset([10, 11]),
        num_classes=3,
        in_chans=1,
        image_size=2,
        mean=(0.1,),
        std=(0.2,),
        class_names=["a", "b", "c"],
        notes=["hello"],
    )
    d = bundle.describe()
    assert d["counts"] == {"train": 8, "val": 2, "test": 2}
    assert d["class_counts"]["train"] == [3, 3, 2]  # labels 0,1,2,0,1,2,0,1
    assert d["class_counts"]["val"] == [1, 0, 1]  # labels 8%3=2, 9%3=0
    assert d["notes"] == ["hello"] and d["num_classes"] == 3


# ---------------------------------------------------------------------------------- splitting


def test_allocate_hand_computed():
    # 10 picks over classes 50/30/20: quotas 5/3/2 exactly.
    assert allocate_stratified(np.array([50, 30, 20]), 10).tolist() == [5, 3, 2]
    # quotas 3.5/1.05/0.45 -> floors 3/1/0, one left for the largest remainder (class 0).
    assert allocate_stratified(np.array([70, 21, 9]), 5).tolist() == [4, 1, 0]
    # A singleton class keeps its one image while others can give.
    assert allocate_stratified(np.array([1, 3]), 2).tolist() == [0, 2]
    # ...unless the request can only be met by taking it.
    assert allocate_stratified(np.array([1, 3]), 4).tolist() == [1, 3]


def test_split_is_stratified_and_disjoint():
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    train, val = split_train_val(labels, 20, seed=0)
    assert len(val) == 20 and len(train) == 80
    assert np.bincount(labels[val]).tolist() == [12, 6, 2]
    assert set(train).isdisjoint(val) and sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert train.dtype == np.int64 and (np.diff(val) > 0).all()


def test_split_deterministic_and_independent_of_global_rngs():
    labels = torch.arange(200) % 7
    torch.manual_seed(1)
    np.random.seed(1)
    a = split_train_val(labels, 30, seed=5)
    torch.manual_seed(99)
    np.random.seed(99)
    torch.rand(10)
    b = split_train_val(labels, 30, seed=5)
    c = split_train_val(labels, 30, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_split_is_reexported_from_fashion_mnist_module():
    assert split_from_fashion_module is split_train_val


def test_split_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        split_train_val([0, 1], 3)
    assert len(split_train_val([0, 1, 1], 0)[1]) == 0


def test_stratified_subset_keeps_proportions():
    labels = np.repeat(np.arange(4), 25)
    idx = stratified_subset(labels, 40, seed=1)
    assert np.bincount(labels[idx]).tolist() == [10, 10, 10, 10]


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=2, max_value=30), min_size=1, max_size=8),
    frac=st.floats(min_value=0.0, max_value=0.5),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_split_properties(counts, frac, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    n = len(labels)
    val_size = int(frac * n)
    train, val = split_train_val(labels, val_size, seed=seed)
    assert len(val) == val_size and len(train) + len(val) == n
    assert np.intersect1d(train, val).size == 0
    per_class = np.bincount(labels[val], minlength=len(counts))
    quota = np.array(counts) * val_size / n
    assert np.all(np.abs(per_class - quota) < 1.0 + 1e-9)
    assert np.all(per_class <= np.array(counts) - 1)  # every class keeps a training image


def test_normalize_batch_scales_uint8_by_dtype_even_when_dark() -> None:
    from cmpnas.data.transforms import normalize_batch

    dark = torch.ones(2, 1, 3, 3, dtype=torch.uint8)  # every pixel <= 1: still 0..255 data
    out = normalize_batch(dark, [0.0], [1.0])
    assert torch.allclose(out, torch.full_like(out, 1 / 255))
    floats = torch.full((1, 1, 2, 2), 0.5)  # a 0..1 float batch is used as it is
    assert torch.allclose(normalize_batch(floats, [0.0], [1.0]), floats)
