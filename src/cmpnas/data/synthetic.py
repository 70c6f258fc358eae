"""A learnable synthetic image set, for fast tests only (no files, generated in milliseconds).

Each class has a smooth random prototype (a 4x4 noise grid upsampled to the image size). An image is
its class prototype, randomly shifted by up to 2 pixels, with random contrast/brightness and pixel
noise. Classes are separable (nearest-centroid gets most of them) but not identical copies, so a
small model's accuracy moves during training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cmpnas.data.base import DataBundle, SourceSplits, TensorImageDataset, compute_mean_std

_MAX_SHIFT = 2
_NOISE = 0.12


def _prototypes(rng: np.random.Generator, num_classes: int, in_chans: int, image_size: int) -> torch.Tensor:
    grid = torch.from_numpy(rng.standard_normal((num_classes, in_chans, 4, 4)).astype(np.float32))
    proto = F.interpolate(grid, size=(image_size, image_size), mode="bicubic", align_corners=False)
    lo = proto.amin(dim=(1, 2, 3), keepdim=True)
    hi = proto.amax(dim=(1, 2, 3), keepdim=True)
    return (proto - lo) / (hi - lo)


def _render(rng: np.random.Generator, prototypes: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images with balanced labels (each class ``n // K`` or one more), in random order."""
    num_classes, chans, size, _ = prototypes.shape
    labels = torch.from_numpy(rng.permutation(np.arange(n) % num_classes).astype(np.int64))
    dy = torch.from_numpy(rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, n))
    dx = torch.from_numpy(rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, n))
    axis = torch.arange(size)
    rows = (axis[None, :] - dy[:, None]) % size
    cols = (axis[None, :] - dx[:, None]) % size
    flat_index = (rows[:, :, None] * size + cols[:, None, :]).reshape(n, 1, size * size)
    shifted = prototypes[labels].reshape(n, chans, size * size)
    shifted = shifted.gather(2, flat_index.expand(-1, chans, -1)).reshape(n, chans, size, size)
    contrast = torch.from_numpy(rng.uniform(0.7, 1.0, (n, 1, 1, 1)).astype(np.float32))
    offset = torch.from_numpy(rng.uniform(0.0, 0.15, (n, 1, 1, 1)).astype(np.float32))
    noise = torch.from_numpy(rng.normal(0.0, _NOISE, shifted.shape).astype(np.float32))
    images = (shifted * contrast + offset + noise).clamp(0, 1)
    return (images * 255).round().to(torch.uint8), labels


def _generate(
    sizes: list[int], num_classes: int, image_size: int, in_chans: int, seed: int
) -> list[TensorImageDataset]:
    """Datasets of the given sizes drawn from the same class prototypes (one seeded stream)."""
    if num_classes < 2 or image_size < 4 or in_chans not in (1, 3):
        raise ValueError("need num_classes >= 2, image_size >= 4 and in_chans in (1, 3)")
    rng = np.random.default_rng(seed)
    prototypes = _prototypes(rng, num_classes, in_chans, image_size)
    return [TensorImageDataset(*_render(rng, prototypes, n)) for n in sizes]


def make_synthetic_splits(
    n_train: int, n_test: int, num_classes: int, image_size: int = 28, in_chans: int = 1, seed: int = 0
) -> SourceSplits:
    """Train pool + test for :func:`cmpnas.data.factory.build_data` (which carves val from train)."""
    train, test = _generate([n_train, n_test], num_classes, image_size, in_chans, seed)
    return SourceSplits(
        train=train,
        test=test,
        class_names=[f"class_{k}" for k in range(num_classes)],
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=image_size,
        notes=[f"synthetic data (seed {seed}): for tests only"],
    )


def make_synthetic_bundle(
    n_train: int,
    n_test: int,
    num_classes: int,
    image_size: int = 28,
    in_chans: int = 1,
    seed: int = 0,
    n_val: int | None = None,
) -> DataBundle:
    """A complete bundle: exactly ``n_train`` train, ``n_val`` (default ``n_test``) val, ``n_test`` test.

    Train and test are the same images :func:`make_synthetic_splits` gives for the same arguments.
    """
    n_val = n_test if n_val is None else n_val
    train, test, val = _generate([n_train, n_test, n_val], num_classes, image_size, in_chans, seed)
    mean, std = compute_mean_std(train)
    return DataBundle(
        name="synthetic",
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=image_size,
        mean=mean,
        std=std,
        class_names=[f"class_{k}" for k in range(num_classes)],
        notes=[f"synthetic data (seed {seed}): for tests only"],
    )
