"""Dataset types shared by every data source, plus the deterministic stratified splitter.

Datasets hand out **uint8** images ``[C, H, W]``: the training loop converts, normalises and
augments whole float batches itself, which is much faster on CPU than per-image transforms.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

SeedLike = int | Sequence[int]


class ImageDataset(torch.utils.data.Dataset):
    """Base class: ``ds[i] -> (uint8 Tensor [C,H,W], int label)``.

    ``labels`` (int64 ``[N]``) is always available without decoding images, so splits, subsets and
    per-class counts never touch pixel data.
    """

    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """A dataset of the rows ``indices`` (in that order)."""
        return IndexedSubset(self, indices)


class IndexedSubset(ImageDataset):
    """Generic subset for datasets that cannot slice their storage (e.g. lazily decoded files)."""

    def __init__(self, parent: ImageDataset, indices: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        self.parent = parent
        self.indices = _as_index_tensor(indices, len(parent))
        self.labels = parent.labels[self.indices]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.parent[int(self.indices[index])]

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        return IndexedSubset(self.parent, self.indices[_as_index_tensor(indices, len(self))])


class StackedBatch(Sequence):
    """What :meth:`TensorImageDataset.__getitems__` returns: a batch already stacked in two tensors.

    It still behaves as a sequence of ``(image, label)`` pairs (so torch's ``default_collate`` works),
    but :func:`collate_uint8` takes the two tensors as they are, without unstacking and restacking.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.images[i], int(self.labels[i])


class TensorImageDataset(ImageDataset):
    """All images in memory as one uint8 tensor ``[N, C, H, W]`` (Fashion-MNIST, synthetic, small folders)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray | Sequence[int]) -> None:
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
        if labels_t.ndim != 1 or labels_t.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be [N={images.shape[0]}], got {tuple(labels_t.shape)}")
        self.images = images
        self.labels = labels_t

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> StackedBatch:
        """DataLoader's batched fetch: one gather per batch instead of B Python-level lookups."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return StackedBatch(self.images[idx], self.labels[idx])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> TensorImageDataset:
        idx = _as_index_tensor(indices, len(self))
        return TensorImageDataset(self.images[idx], self.labels[idx])


def collate_uint8(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate to ``(uint8 [B,C,H,W], int64 [B])``; a :class:`StackedBatch` passes straight through."""
    if isinstance(batch, StackedBatch):
        return batch.images, batch.labels
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    images = torch.stack([img for img, _ in batch])
    labels = torch.tensor([int(lbl) for _, lbl in batch], dtype=torch.int64)
    return images, labels


@dataclass
class SourceSplits:
    """What a data source hands to :func:`cmpnas.data.factory.build_data` before subsets / val split.

    ``val`` is ``None`` when the source has no explicit validation split; the factory then carves it
    out of ``train``. Labels ``>= num_classes`` only occur in an open-set ``test``.
    """

    train: ImageDataset
    test: ImageDataset
    class_names: list[str]
    num_classes: int
    in_chans: int
    image_size: int
    val: ImageDataset | None = None
    open_set: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class DataBundle:
    """The three splits plus what models and the training loop need to know about them.

    ``mean``/``std`` are per channel on the 0..1 scale (computed from ``train``). ``class_names[i]``
    names label ``i``; in open-set mode it also names the test-only labels ``>= num_classes``.
    """

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    open_set: bool = False
    notes: list[str] = field(default_factory=list)

    def train_identity(self) -> str:
        """What a training checkpoint must have been trained on to be resumed: the dataset, its classes and
        the training split's per-class counts (a different subset or split stops a silent resume)."""
        return json.dumps(
            {
                "name": self.name,
                "classes": list(self.class_names),
                "train": class_counts(self.train.labels, len(self.class_names)),
                "shape": [self.in_chans, self.image_size],
            },
            sort_keys=True,
        )

    def train_fingerprint(self) -> str:
        """Which images the training split holds (content, not just counts): keys caches of per-image
        targets such as the gallery embeddings, which must not be reused for another subset or seed."""
        return dataset_fingerprint(self.train)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (counts per split and per class) for run manifests and reports."""
        n_names = len(self.class_names)
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            "open_set": self.open_set,
            "counts": {k: len(ds) for k, ds in splits.items()},
            "class_counts": {k: class_counts(ds.labels, n_names) for k, ds in splits.items()},
            "class_names": list(self.class_names),
            "mean": [round(float(m), 6) for m in self.mean],
            "std": [round(float(s), 6) for s in self.std],
            "notes": list(self.notes),
        }


def dataset_fingerprint(dataset: Any) -> str:
    """Hash of a dataset's labels and images (pixels when in memory, file paths otherwise), in order."""
    h = hashlib.sha256()
    h.update(_labels_numpy(dataset.labels).astype(np.int64).tobytes())
    images = getattr(dataset, "images", None)
    parent, indices = getattr(dataset, "parent", None), getattr(dataset, "indices", None)
    if isinstance(images, torch.Tensor):
        h.update(images.contiguous().cpu().numpy().tobytes())
    elif parent is not None and indices is not None:
        h.update(dataset_fingerprint(parent).encode())
        h.update(np.asarray(indices, dtype=np.int64).tobytes())
    elif getattr(dataset, "paths", None) is not None:
        for path in dataset.paths:
            h.update(str(path).encode() + b"\0")
    else:
        for i in range(len(dataset)):
            h.update(np.asarray(dataset[i][0]).tobytes())
    return h.hexdigest()[:16]


def class_counts(labels: torch.Tensor, num_labels: int) -> list[int]:
    if labels.numel() == 0:
        return [0] * num_labels
    return torch.bincount(labels, minlength=num_labels).tolist()


def compute_mean_std(
    dataset: ImageDataset, max_images: int = 10_000, seed: SeedLike = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std on the 0..1 scale over all pixels of (a deterministic sample of) ``dataset``.

    In-memory datasets use every image (one histogram per channel: cheap); lazily decoded ones use at
    most ``max_images``, so this never turns into a full decoding pass over a large folder. A constant
    channel gets std 1.0 (dividing by ~0 would blow the inputs up).
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot compute mean/std of an empty dataset")
    if isinstance(dataset, TensorImageDataset):
        images = dataset.images
    else:
        pick = (
            np.arange(n)
            if n <= max_images
            else np.sort(np.random.default_rng(seed).choice(n, max_images, False))
        )
        images = torch.stack([dataset[int(i)][0] for i in pick])
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        # A 256-bin histogram gives exact moments without a float copy of the images.
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        prob = hist / hist.sum()
        mean = float((prob * values).sum()) / 255.0
        var = max(float((prob * values.square()).sum()) / 255.0**2 - mean**2, 0.0)
        means.append(mean)
        stds.append(var**0.5 if var**0.5 >= 1e-3 else 1.0)
    return tuple(means), tuple(stds)


def allocate_stratified(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` picks over classes in proportion to ``counts`` (largest-remainder rounding).

    Where possible one image of every class is left behind (a class must keep a training example);
    only if ``total`` cannot be met otherwise does a class give up all its images.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if not 0 <= total <= n:
        raise ValueError(f"cannot pick {total} of {n} items")
    if total == 0:
        return np.zeros_like(counts)
    quota = counts * (total / n)
    soft_cap = np.where(counts > 1, counts - 1, 0)
    alloc = np.minimum(np.floor(quota).astype(np.int64), soft_cap)
    class_ids = np.arange(len(counts))
    for cap in (soft_cap, counts):
        remaining = total - int(alloc.sum())
        while remaining > 0:
            eligible = class_ids[alloc < cap]
            if eligible.size == 0:
                break
            deficit = quota[eligible] - alloc[eligible]
            order = eligible[np.lexsort((eligible, -deficit))]
            chosen = order[:remaining]
            alloc[chosen] += 1
            remaining -= chosen.size
    return alloc


def split_train_val(labels: Any, val_size: int, seed: SeedLike = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-stratified split of ``range(len(labels))`` into (train_idx, val_idx).

    Uses its own ``numpy.random.Generator(seed)``, so it does not depend on (or disturb) torch's or
    numpy's global RNG. ``val_idx`` has exactly ``val_size`` entries, spread over classes in proportion
    to their sizes; both index arrays are sorted int64.
    """
    y = _labels_numpy(labels)
    n = y.shape[0]
    if not 0 <= val_size <= n:
        raise ValueError(f"val_size must be in [0, {n}], got {val_size}")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    alloc = allocate_stratified(counts, val_size)
    rng = np.random.default_rng(seed)
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    val_parts = [rng.permutation(members)[:k] for members, k in zip(by_class, alloc, strict=True)]
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    keep = np.ones(n, dtype=bool)
    keep[val_idx] = False
    return np.flatnonzero(keep).astype(np.int64), val_idx.astype(np.int64)


def hold_out_classes(
    source: SourceSplits, test_fraction: float, val_size: int, seed: SeedLike = 0
) -> SourceSplits:
    """An open-set version of an in-memory source: a seeded share of the classes never appears in training.

    Retrieval is deployed on classes the models never saw, so the held-out classes form both val (their images
    from the training pool, stratified, at most ``val_size``) and test (their test images); choosing on val
    then mimics the test without touching it. Training classes are numbered ``0..C-1``, held-out ones after.
    """
    k = source.num_classes
    if k < 2:
        raise ValueError("an open set needs at least 2 classes")
    n_held = min(k - 1, max(1, round(test_fraction * k)))
    held = sorted(int(c) for c in np.random.default_rng(seed).permutation(k)[:n_held])
    order = [c for c in range(k) if c not in held] + held
    new_label = torch.empty(k, dtype=torch.int64)
    new_label[torch.tensor(order)] = torch.arange(k)
    parts = []
    for ds in (source.train, source.test):
        if not isinstance(ds, TensorImageDataset):
            raise TypeError("hold_out_classes needs in-memory datasets")
        relabelled = TensorImageDataset(ds.images, new_label[ds.labels])
        is_held = relabelled.labels >= k - n_held
        seen_rows, held_rows = torch.nonzero(~is_held).flatten(), torch.nonzero(is_held).flatten()
        parts.append((relabelled.subset(seen_rows), relabelled.subset(held_rows)))
    (train, held_pool), (_, test) = parts
    val = held_pool.subset(stratified_subset(held_pool.labels, min(val_size, len(held_pool)), seed))
    return SourceSplits(
        train=train,
        test=test,
        val=val,
        class_names=[source.class_names[c] for c in order],
        num_classes=k - n_held,
        in_chans=source.in_chans,
        image_size=source.image_size,
        open_set=True,
        notes=[
            *source.notes,
            f"open set: {n_held} of {k} classes ({', '.join(source.class_names[c] for c in held)}) are held out "
            f"of training; val is {len(val)} of their training-pool images, test their {len(test)} test images",
        ],
    )


def stratified_subset(labels: Any, size: int, seed: SeedLike = 0) -> np.ndarray:
    """Sorted indices of a deterministic class-stratified subset of ``size`` items."""
    return split_train_val(labels, size, seed)[1]


def _labels_numpy(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    return y.astype(np.int64, copy=False)


def _as_index_tensor(indices: Sequence[int] | np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise IndexError(f"subset index out of range for a dataset of {n} items")
    return idx
