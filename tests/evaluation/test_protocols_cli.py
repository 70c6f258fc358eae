"""`cmpnas evaluate --protocol deepfashion2|ijbc` end to end on generated fixtures in the official formats.

Expected numbers come from the fixtures' ground truth (tests/fixtures_protocols.py): every item / face is
painted in a colour that encodes its identity, so mean-colour "embeddings" retrieve perfectly and the
only DeepFashion2 miss is the one query the fixture builds without a positive in the gallery.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_protocols import (  # noqa: E402
    GREY,
    DeepFashion2Fixture,
    IJBCFixture,
    make_deepfashion2_fixture,
    make_ijbc_fixture,
)

from cmpnas.cli import main  # noqa: E402
from cmpnas.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from cmpnas.data.deepfashion2 import DeepFashion2Crops, read_deepfashion2  # noqa: E402
from cmpnas.data.factory import build_data  # noqa: E402
from cmpnas.data.ijbc import IJBCAlignedFaces, read_ijbc_meta  # noqa: E402
from cmpnas.errors import CmpnasError  # noqa: E402
from cmpnas.evaluation.embeddings_io import score_deepfashion2_embeddings, score_ijbc_embeddings  # noqa: E402
from cmpnas.evaluation.protocols import _embed_faces, run_protocol_evaluation  # noqa: E402
from cmpnas.models.embedding import EmbeddingModel, ModelSpec  # noqa: E402
from cmpnas.models.inference import embed  # noqa: E402
from cmpnas.stages import train_gallery  # noqa: E402

FARS = ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"]
TINY_RESNET = {"widths": [8, 16], "depths": [1, 1], "strides": [2, 2], "stem_stride": 2}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def df2(tmp_path_factory: pytest.TempPathFactory) -> DeepFashion2Fixture:
    root = tmp_path_factory.mktemp("df2")
    make_deepfashion2_fixture(root, split="train")  # same products, used by the train -> evaluate test
    return make_deepfashion2_fixture(root, split="validation")


@pytest.fixture(scope="module")
def df2_npz(df2: DeepFashion2Fixture, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Mean-colour embeddings of every validation item, and the same with colour channels permuted."""
    items = read_deepfashion2(df2.root, "validation")
    crops = DeepFashion2Crops(items, 16, label="category")
    emb = np.stack([crops[i][0].float().mean(dim=(1, 2)).numpy() - GREY for i in range(len(crops))])
    folder = tmp_path_factory.mktemp("df2_npz")
    ids = np.array([item.item_id for item in items])
    np.savez(folder / "colour.npz", ids=ids, embeddings=emb)
    np.savez(folder / "permuted.npz", ids=ids, embeddings=emb[:, [2, 0, 1]])
    return folder / "colour.npz", folder / "permuted.npz"


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory: pytest.TempPathFactory) -> IJBCFixture:
    return make_ijbc_fixture(tmp_path_factory.mktemp("ijbc"))


@pytest.fixture(scope="module")
def ijbc_npz(ijbc: IJBCFixture, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Mean colour of the aligned face centre (and of its mirror image), plus a channel-permuted copy."""
    meta = read_ijbc_meta(ijbc.root)

    def colour(flip: bool) -> np.ndarray:
        faces = IJBCAlignedFaces(meta, flip=flip)
        rows = [faces[i][0][:, 40:60, 30:80].float().mean(dim=(1, 2)) - GREY for i in range(len(faces))]
        return torch.stack(rows).numpy()

    feats, flipped = colour(False), colour(True)
    folder = tmp_path_factory.mktemp("ijbc_npz")
    names = np.array(ijbc.names)
    np.savez(folder / "colour.npz", ids=names, embeddings=feats, embeddings_flip=flipped)
    np.savez(folder / "permuted.npz", ids=names, embeddings=feats[:, [2, 0, 1]])
    return folder / "colour.npz", folder / "permuted.npz"


def _cli(args: list[str]) -> None:
    main(["evaluate", *[str(a) for a in args]])


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _cli(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmpnas: error:") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------------------ DeepFashion2
def test_cli_deepfashion2_from_embeddings(df2, df2_npz, tmp_path: Path) -> None:
    colour, _ = df2_npz
    _cli(["--protocol", "deepfashion2", "--root", df2.root, "--embeddings", colour, "--out", tmp_path, "-q"])
    results = json.loads((tmp_path / "results.json").read_text())
    # 13 queries, 12 with a positive among the 24 shop items: each is found at rank 1
    for k in (1, 5, 10, 15, 20):
        assert results[f"top{k}"] == pytest.approx(100 * 12 / 13)
    assert (results["n_queries"], results["n_gallery"]) == (13, 24)
    assert (results["n_missed"], results["n_without_positive"]) == (0, 1)
    assert results["split"] == "validation" and results["setting"] == "homogeneous"
    official = json.loads((tmp_path / "retrieval_results.json").read_text())
    assert len(official) == 13 and all(len(entry["gallery_image_id"]) == 20 for entry in official)


def test_deepfashion2_heterogeneous_embeddings_match_the_library_scorer(df2, df2_npz, tmp_path) -> None:
    colour, permuted = df2_npz
    results = run_protocol_evaluation(
        protocol="deepfashion2", root=df2.root, out=tmp_path, embeddings=colour, gallery_embeddings=permuted
    )
    expected = score_deepfashion2_embeddings(df2.root, colour, gallery_npz=permuted)
    assert results["setting"] == "heterogeneous"
    assert {k: results[k] for k in expected} == pytest.approx(expected)
    assert results["top1"] < 50  # permuted colours do not match: an incompatible gallery


# ------------------------------------------------------------------------------------------- IJB-C
def test_cli_ijbc_from_embeddings(ijbc, ijbc_npz, tmp_path: Path) -> None:
    colour, _ = ijbc_npz
    _cli(["--protocol", "ijbc", "--root", ijbc.root, "--embeddings", colour, "--out", tmp_path, "-q"])
    results = json.loads((tmp_path / "results.json").read_text())
    for convention in ("insightface", "strict"):
        assert list(results["tar_at_far"][convention]) == FARS
        assert all(v == 100.0 for v in results["tar_at_far"][convention].values())
    # 4 subjects x 2 templates: 4 genuine pairs and C(8,2) - 4 = 24 impostor pairs
    assert (results["n_pairs"], results["n_genuine"], results["n_impostor"]) == (28, 4, 24)
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ijbc_heterogeneous_embeddings_match_the_library_scorer(ijbc, ijbc_npz, tmp_path) -> None:
    colour, permuted = ijbc_npz
    results = run_protocol_evaluation(
        protocol="ijbc", root=ijbc.root, out=tmp_path, embeddings=colour, gallery_embeddings=permuted
    )
    expected = score_ijbc_embeddings(ijbc.root, colour, gallery_npz=permuted)
    for convention in ("insightface", "strict"):
        got = results["tar_at_far"][convention]
        assert [got[f"{far:.0e}"] for far in expected["tar_at_far"][convention]] == pytest.approx(
            list(expected["tar_at_far"][convention].values())
        )
    assert results["tar_at_far"]["strict"]["1e-01"] < 60


def _tiny_face_model(seed: int) -> EmbeddingModel:
    torch.manual_seed(seed)
    spec = ModelSpec(
        backbone="resnet_small", backbone_kwargs=TINY_RESNET, embed_dim=8, in_chans=3, input_size=112,
        mean=[0.5] * 3, std=[0.25] * 3,
    )  # fmt: skip
    return EmbeddingModel(spec).eval()


def test_ijbc_from_models_scores_three_settings(ijbc, tmp_path: Path) -> None:
    gallery, query = _tiny_face_model(0), _tiny_face_model(1)
    results = run_protocol_evaluation(
        protocol="ijbc", root=ijbc.root, out=tmp_path, gallery_model=gallery, query_model=query
    )
    assert list(results["settings"]) == ["paragon", "homogeneous", "heterogeneous"]
    assert results["tar_at_far"] == results["settings"]["heterogeneous"]["tar_at_far"]
    assert results["cost_reduction"] == 1.0 and results["models"]["gallery"]["macs"] > 0
    assert results["notes"]  # the query model was not trained against this gallery
    assert (tmp_path / "roc.png").is_file()


def test_face_features_are_image_plus_mirror_image(ijbc) -> None:
    meta = read_ijbc_meta(ijbc.root)
    model = _tiny_face_model(2)
    by_hand = embed(model, IJBCAlignedFaces(meta)) + embed(model, IJBCAlignedFaces(meta, flip=True))
    np.testing.assert_allclose(_embed_faces(model, meta, batch_size=7), by_hand.numpy(), rtol=1e-4, atol=1e-5)


def test_ijbc_needs_a_112px_model(ijbc, tmp_path: Path) -> None:
    spec = ModelSpec(
        backbone="resnet_small", backbone_kwargs=TINY_RESNET, embed_dim=8, in_chans=3, input_size=32
    )
    with pytest.raises(CmpnasError, match="aligned to 112x112"):
        run_protocol_evaluation(
            protocol="ijbc", root=ijbc.root, out=tmp_path, gallery_model=EmbeddingModel(spec)
        )


# ----------------------------------------------------------------------------- train -> evaluate
def test_train_gallery_then_evaluate_on_deepfashion2(df2, tmp_path: Path) -> None:
    cfg = Config(
        data=DataConfig(name="deepfashion2", root=str(df2.root), image_size=32, in_chans=3, val_size=4),
        gallery=ModelConfig(backbone="resnet_small", backbone_kwargs=TINY_RESNET, embed_dim=16),
        gallery_train=TrainConfig(epochs=1, batch_size=8, warmup_epochs=0, log_every=1),
        eval_batch_size=16,
    )
    data = build_data(cfg.data)
    # train split: 13 (pair_id, style > 0) identities over 33 crops; 4 go to val (one per class at most)
    assert data.num_classes == 13 and (len(data.train), len(data.val)) == (29, 4)
    assert data.open_set and int(data.test.labels.min()) >= 13  # validation products are new classes
    assert data.train[0][0].shape == (3, 32, 32)
    train_gallery(cfg, tmp_path / "gallery", data=data)
    model_path = tmp_path / "gallery" / "model.safetensors"
    results = run_protocol_evaluation(
        protocol="deepfashion2", root=df2.root, out=tmp_path / "eval", gallery_model=model_path,
        query_model=model_path, config=cfg,
    )  # fmt: skip
    assert results["source"] == "models" and results["n_queries"] == 13 and results["n_gallery"] == 24
    tops = [results[f"top{k}"] for k in (1, 5, 10, 15, 20)]
    assert tops == sorted(tops) and 0 <= tops[0] and tops[-1] <= 100 * 12 / 13 + 1e-9
    # one model on both sides: the three settings coincide
    settings = results["settings"]
    assert settings["paragon"] == settings["homogeneous"] == settings["heterogeneous"]
    assert results["cost_reduction"] == 1.0 and results["compatible"] is False
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["top1"] == results["top1"]


# ------------------------------------------------------------------------------------------ errors
def test_bad_inputs_exit_2_with_one_line(df2, df2_npz, tmp_path, capsys) -> None:
    colour, _ = df2_npz
    out = ["--out", tmp_path / "o"]
    assert "Unknown protocol" in _cli_error(
        ["--protocol", "lfw", "--root", df2.root, "--embeddings", colour, *out], capsys
    )
    assert "--root" in _cli_error(["--protocol", "deepfashion2", "--embeddings", colour, *out], capsys)
    missing = tmp_path / "nowhere"
    assert "not a folder" in _cli_error(
        ["--protocol", "ijbc", "--root", missing, "--embeddings", colour, *out], capsys
    )
    assert "neither models nor embeddings" in _cli_error(
        ["--protocol", "deepfashion2", "--root", df2.root, *out], capsys
    )
    both = ["--embeddings", colour, "--gallery", tmp_path / "m.safetensors"]
    assert "not both" in _cli_error(["--protocol", "deepfashion2", "--root", df2.root, *both, *out], capsys)
    alone = ["--gallery-embeddings", colour]
    assert "needs --embeddings" in _cli_error(
        ["--protocol", "deepfashion2", "--root", df2.root, *alone, *out], capsys
    )
    np.savez(tmp_path / "bad.npz", names=np.array(["x"]), embeddings=np.zeros((1, 2)))
    bad = ["--embeddings", tmp_path / "bad.npz"]
    assert "'ids'" in _cli_error(["--protocol", "deepfashion2", "--root", df2.root, *bad, *out], capsys)
    assert "split" in _cli_error(
        ["--protocol", "ijbc", "--root", df2.root, "--split", "val", *bad, *out], capsys
    )
    assert not (tmp_path / "o" / "results.json").exists()
