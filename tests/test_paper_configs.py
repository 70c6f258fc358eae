"""The paper-scale configs validate, and their NAS budgets are reachable in their search spaces.

The gallery MACs are the numbers docs/paper-benchmarks.md reports (ResNet-101 + embedding head, counted
with cmpnas.models.cost.count_macs); the slow test re-measures them and the baselines' MACs.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cmpnas.config import Config, load_config
from cmpnas.models.spaces.spos import SposSpace

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "cmpnas" / "configs"
# name -> (input size, gallery MACs at that size with the config's embedding head, cost reduction)
PAPER = {
    "deepfashion2": (224, 7_799_881_728, 80.0),
    "ijbc": (112, 2_004_955_136, 23.0),
}
# query MACs of the configs' baselines, as the docs list them
BASELINE_MACS = {
    "deepfashion2": {
        "mobilenetv2-x0.5-bct": 96_179_520,
        "mobilenetv2-x1.0-bct": 299_821_952,
        "shufflenetv2-x0.5-bct": 39_714_592,
        "shufflenetv2-x1.0-bct": 144_146_136,
    },
    "ijbc": {
        "mobilenetv2-x1.0-bct": 81_559_168,
        "shufflenetv2-x1.0-bct": 39_930_916,
        "shufflenetv2-x1.5-bct": 80_688_016,
        "shufflenetv2-x2.0-bct": 161_072_292,
    },
}


def _load(name: str) -> Config:
    return load_config(CONFIGS / f"paper-{name}.yaml")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_validates(name: str) -> None:
    cfg = _load(name)
    size, _, reduction = PAPER[name]
    assert cfg.gallery.backbone == "timm:resnet101"
    assert (cfg.data.image_size, cfg.data.in_chans) == (size, 3)
    assert cfg.nas.budget_cost_reduction == reduction and cfg.nas.budget_macs is None
    assert cfg.nas.space.stage_repeats == [4, 4, 8, 4] and cfg.nas.space.stem_stride == 2
    assert cfg.nas.space.channel_scales == [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6]
    assert (cfg.nas.search.population, cfg.nas.search.generations) == (50, 20)  # SPOS defaults
    assert all(b.model.embed_dim == cfg.gallery.embed_dim for b in cfg.run.baselines)
    assert cfg.query.embed_dim == cfg.gallery.embed_dim
    assert {"independent", "bct"} <= {b.compat for b in cfg.run.baselines}


def test_face_config_uses_an_angular_margin_and_fashion_the_official_data() -> None:
    faces, fashion = _load("ijbc"), _load("deepfashion2")
    assert faces.data.name == "ijbc_train" and faces.gallery.classifier == "arcface"
    assert fashion.data.name == "deepfashion2" and fashion.data.label == "identity"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_budget_is_reachable_by_random_architectures(name: str) -> None:
    """The search starts from random architectures and the supernet samples within [band, 1] x budget."""
    cfg = _load(name)
    size, gallery_macs, reduction = PAPER[name]
    space = SposSpace(cfg.nas.space, in_chans=3, input_size=size)
    head = cfg.nas.space.last_channels * cfg.gallery.embed_dim
    budget = gallery_macs / reduction
    rng = random.Random(0)
    costs = [space.macs(space.sample(rng)) + head for _ in range(400)]
    in_band = sum(cfg.nas.sample_band * budget <= c <= budget for c in costs) / len(costs)
    assert space.min_macs() + head < budget < space.max_macs() + head
    assert in_band > 0.3, f"only {in_band:.0%} of random architectures fit the budget"


def test_full_width_spos_space_cannot_meet_80x_at_224() -> None:
    """Why the DeepFashion2 config halves the stage widths (docs/paper-benchmarks.md)."""
    cfg = _load("ijbc")  # the full-width SPOS space
    space = SposSpace(cfg.nas.space, in_chans=3, input_size=224)
    budget = PAPER["deepfashion2"][1] / 80
    assert 0.95 * budget < space.min_macs() < budget
    rng = random.Random(0)
    assert all(space.macs(space.sample(rng)) > budget for _ in range(400))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER))
def test_documented_macs_are_measured(name: str) -> None:
    from cmpnas.models.cost import count_macs
    from cmpnas.models.embedding import EmbeddingModel, ModelSpec

    cfg = _load(name)
    size, gallery_macs, _ = PAPER[name]

    def macs(backbone: str, kwargs: dict) -> int:
        spec = ModelSpec(
            backbone=backbone, backbone_kwargs=kwargs, embed_dim=cfg.gallery.embed_dim, in_chans=3,
            input_size=size, mean=[0.5] * 3, std=[0.5] * 3,
        )  # fmt: skip
        model = EmbeddingModel(spec)
        return count_macs(model, model.input_shape(1))

    assert macs(cfg.gallery.backbone, cfg.gallery.backbone_kwargs) == gallery_macs
    baselines = {b.name: b.model for b in cfg.run.baselines}
    for baseline, expected in BASELINE_MACS[name].items():
        assert macs(baselines[baseline].backbone, baselines[baseline].backbone_kwargs) == expected, baseline
