"""scikit-learn's handwritten digits: a second small image set that ships inside a package.

An objective chosen on Fashion-MNIST alone may not carry to other images; these 1,797 8x8 scans (10 classes)
can be read offline wherever scikit-learn is installed, so every machine can check it on a second dataset.
"""

from __future__ import annotations

import numpy as np
import torch

from cmpnas.data.base import SourceSplits, TensorImageDataset, split_train_val
from cmpnas.data.transforms import resize_uint8
from cmpnas.errors import CmpnasError

TEST_FRACTION = 0.2  # share of each class held out for test (the set names no splits)
_PIXEL_MAX = 16  # the scans are stored as 0..16 intensities
_SEED_TEST = 5


def load_digits_splits(image_size: int, in_chans: int, seed: int = 0) -> SourceSplits:
    """Train pool + a stratified, seeded test split, resized to ``image_size`` (bilinear, antialiased)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CmpnasError(
            "data.name=digits reads scikit-learn's bundled digits, but scikit-learn is not installed.",
            "pip install 'cmpnas[digits]' (or scikit-learn)",
        ) from None
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / _PIXEL_MAX)).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)
    if image_size != images.shape[-1]:
        images = resize_uint8(images, image_size)
    if in_chans == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    n_test = int(round(TEST_FRACTION * len(labels)))
    train_idx, test_idx = split_train_val(labels, n_test, seed=[seed, _SEED_TEST])
    full = TensorImageDataset(images, labels)
    return SourceSplits(
        train=full.subset(train_idx),
        test=full.subset(test_idx),
        class_names=[str(c) for c in bunch.target_names],
        num_classes=len(bunch.target_names),
        in_chans=in_chans,
        image_size=image_size,
        notes=[
            f"scikit-learn digits: {len(labels)} 8x8 scans resized to {image_size} px; "
            f"{len(test_idx)} ({TEST_FRACTION:.0%} per class) held out for test"
        ],
    )
