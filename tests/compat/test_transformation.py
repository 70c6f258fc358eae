"""FCT transformation: it learns a known map between two embedding spaces, and round-trips through a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmpnas.compat.transformation import (
    TransformationSpec,
    fit_transformation,
    load_transformation,
    save_transformation,
)
from cmpnas.errors import CmpnasError


def _pairs(n: int = 2000, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """New space = a random rotation of the old one, then a coordinate-wise nonlinearity (not linear)."""
    g = torch.Generator().manual_seed(seed)
    old = F.normalize(torch.randn(n, d, generator=g), dim=1)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    new = F.normalize(torch.tanh(2.0 * old @ q), dim=1)
    return old, new


def test_fit_learns_the_map_and_generalises(one_thread) -> None:  # type: ignore[no-untyped-def]
    old, new = _pairs()
    spec = TransformationSpec("a", "b", 16, 64)
    model, fit = fit_transformation(old[:1500], new[:1500], spec, epochs=40, batch_size=64)
    assert fit["train_cosine_identity"] < 0.3  # a rotation: the old space itself is far from the new one
    assert fit["train_cosine"] > 0.97
    held_out = (torch.from_numpy(model.apply_numpy(old[1500:].numpy())) * new[1500:]).sum(1).mean()
    assert float(held_out) > 0.95


def test_save_and_load_give_the_same_map(tmp_path: Path) -> None:
    old, new = _pairs(200)
    model, _ = fit_transformation(old, new, TransformationSpec("old-fp", "new-fp", 16, 32), epochs=2)
    save_transformation(model, tmp_path / "t.safetensors")
    back = load_transformation(tmp_path / "t.safetensors")
    assert (back.spec.old_fingerprint, back.spec.new_fingerprint) == ("old-fp", "new-fp")
    np.testing.assert_allclose(back.apply_numpy(old.numpy()), model.apply_numpy(old.numpy()), atol=1e-6)


def test_refuses_mismatched_pairs_and_foreign_files(tmp_path: Path) -> None:
    old, new = _pairs(10)
    with pytest.raises(CmpnasError, match="differ in shape"):
        fit_transformation(old, new[:5], TransformationSpec("a", "b", 16))
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CmpnasError, match="Cannot read transformation"):
        load_transformation(tmp_path / "x.safetensors")
    with pytest.raises(CmpnasError, match="does not exist"):
        load_transformation(tmp_path / "missing.safetensors")
