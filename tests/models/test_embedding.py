"""Embedding model files: round-trip, fingerprint, refusal of foreign/corrupt files, atomic save."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cmpnas.errors import CmpnasError
from cmpnas.models import embedding as embedding_module
from cmpnas.models.embedding import (
    EmbeddingModel,
    ModelSpec,
    fingerprint,
    load_model,
    read_metadata,
    save_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **spec_kw) -> EmbeddingModel:
    torch.manual_seed(seed)
    spec = ModelSpec(
        backbone="resnet_small",
        backbone_kwargs={"widths": [8, 16], "depths": [1, 1], "strides": [1, 2]},
        embed_dim=12,
        num_classes=5,
        mean=[0.3],
        std=[0.2],
        name="tiny",
        **spec_kw,
    )
    model = EmbeddingModel(spec)
    # non-trivial BN statistics, so a lost buffer would show in the outputs
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 28, 28) * 2 + 1)
    return model.eval()


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_forward_shapes_and_input_shape() -> None:
    model = tiny_model()
    assert model.input_shape(4) == (4, 1, 28, 28)
    emb = model(torch.randn(4, 1, 28, 28))
    assert emb.shape == (4, 12)
    assert model.classifier(emb).shape == (4, 5)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = tiny_model(cosine_scale=8.0, compatible_with="abc123", arch=None)
    path = tmp_path / "m" / "model.safetensors"
    fp = save_model(model, path)
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.spec == model.spec
    assert fingerprint(loaded) == fp == fingerprint(model)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.classifier(loaded(x)), model.classifier(model(x)))
    meta = read_metadata(path)
    assert meta["fingerprint"] == fp and meta["format"] == embedding_module.FORMAT
    assert no_temp_files(path.parent)


def test_extra_metadata_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(tiny_model(), path, extra={"note": "hello"})
    assert read_metadata(path)["note"] == "hello"


def test_fingerprint_changes_with_weights_buffers_and_spec_but_not_the_name() -> None:
    model = tiny_model()
    fp = fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(tiny_model()) == fp  # deterministic
    with torch.no_grad():
        model.head[0].weight[0, 0] += 1e-3
    assert fingerprint(model) != fp
    model = tiny_model()
    model.head[1].running_mean[0] += 1.0  # BN statistics are part of the model's function
    assert fingerprint(model) != fp
    assert fingerprint(tiny_model(seed=1)) != fp
    renamed = tiny_model()
    renamed.spec.name = "something else"
    assert fingerprint(renamed) == fp
    other_norm = tiny_model()
    other_norm.spec.mean = [0.5]  # same weights, different preprocessing: a different model
    assert fingerprint(other_norm) != fp


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CmpnasError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_non_cmpnas_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CmpnasError, match="not a cmpnas model"):
        load_model(path)


@pytest.mark.parametrize("kind", ["random_bytes", "empty", "truncated", "text"])
def test_corrupt_files_are_refused(tmp_path: Path, kind: str) -> None:
    good = tmp_path / "good.safetensors"
    save_model(tiny_model(), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    content = {
        "random_bytes": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes(),
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "text": b"model: definitely not safetensors\n",
    }[kind]
    bad.write_bytes(content)
    with pytest.raises(CmpnasError):
        load_model(bad)


def test_weights_that_do_not_match_the_spec_are_refused(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "edited.safetensors"
    save_model(model, path)
    meta = read_metadata(path)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors.pop("head.0.weight")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CmpnasError, match="do not match their spec"):
        load_model(path)


def test_save_is_atomic_when_the_write_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.safetensors"
    old_fp = save_model(tiny_model(seed=0), path)
    old_bytes = path.read_bytes()

    def half_write_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(old_bytes[:100])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(embedding_module, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_model(tiny_model(seed=1), path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert fingerprint(load_model(path)) == old_fp
    assert no_temp_files(tmp_path)


def test_overwrite_replaces_the_model(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(tiny_model(seed=0), path)
    fp = save_model(tiny_model(seed=1), path)
    assert fingerprint(load_model(path)) == fp
    assert no_temp_files(tmp_path)
