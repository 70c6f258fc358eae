"""Candidate evaluation inputs: calibration and reward images drawn stratified by class."""

from __future__ import annotations

import numpy as np
import torch

from cmpnas.data.base import TensorImageDataset
from cmpnas.nas.candidates import load_normalized


def test_subset_is_stratified_even_when_the_data_is_sorted_by_class() -> None:
    labels = torch.arange(10).repeat_interleave(20)  # folder/CSV order: class 0 first, class 9 last
    ds = TensorImageDataset(torch.zeros(200, 1, 4, 4, dtype=torch.uint8), labels)
    _, picked = load_normalized(ds, 50, [0.0], [1.0], seed=0)
    counts = np.bincount(picked.numpy(), minlength=10)
    assert counts.tolist() == [5] * 10  # the first 50 would be classes 0-2 only
    _, other_seed = load_normalized(ds, 50, [0.0], [1.0], seed=1)
    assert np.bincount(other_seed.numpy(), minlength=10).tolist() == [5] * 10


def test_subset_larger_than_the_set_takes_all() -> None:
    ds = TensorImageDataset(torch.zeros(7, 1, 4, 4, dtype=torch.uint8), torch.arange(7) % 2)
    x, y = load_normalized(ds, 100, [0.0], [1.0])
    assert len(y) == 7 and x.shape == (7, 1, 4, 4)
