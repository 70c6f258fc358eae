"""Honest protocol: everything that picks something (supernet training, the search's reward, the study)
runs without reading a single test image. The test split is swapped for one whose pixels raise."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cmpnas.config import build_config
from cmpnas.data.base import ImageDataset
from cmpnas.stages import search, study, train_supernet
from cmpnas.stages.supernet import SUPERNET_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


class SealedSplit(ImageDataset):
    """The labels of a split (counts for manifests) but no pixels: reading an image fails the test."""

    def __init__(self, real: ImageDataset) -> None:
        self.labels = real.labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise AssertionError(f"test image {index} was read by a stage that must only use train/val")

    def __getitems__(self, indices: list[int]) -> object:
        raise AssertionError(
            f"test images {indices[:5]}... were read by a stage that must only use train/val"
        )


def test_the_seal_breaks_on_a_read(tiny_data) -> None:
    sealed = SealedSplit(tiny_data.test)
    assert len(sealed) == len(tiny_data.test)
    with pytest.raises(AssertionError, match="test image 0"):
        sealed[0]


def test_supernet_search_and_study_never_read_the_test_split(
    tmp_path: Path, tiny_raw_factory, tiny_data, tiny_gallery
) -> None:
    sealed = dataclasses.replace(tiny_data, test=SealedSplit(tiny_data.test))
    cfg = build_config(tiny_raw_factory())
    train_supernet(cfg, tiny_gallery, tmp_path / "supernet", data=sealed)
    supernet = tmp_path / "supernet" / SUPERNET_FILE
    res = search(cfg, tiny_gallery, supernet, tmp_path / "search", data=sealed)
    assert res["n_candidates"] > 0
    out = study(cfg, tiny_gallery, tmp_path / "study", supernet_path=supernet, data=sealed, n_archs=1)
    assert out["bct"]["n"] == 1
