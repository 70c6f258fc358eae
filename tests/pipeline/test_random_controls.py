"""Random-architecture controls: the draw (uniform in the search's MACs band, distinct, reproducible), their
stages (gallery only, keys that leave the other stages alone), and the configs' stem-matched baselines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cmpnas.config import build_config, load_config
from cmpnas.errors import CmpnasError
from cmpnas.pipeline import build_stages, draw_random_controls, stage_key

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL = {"backbone": "resnet_small", "embed_dim": 16, "backbone_kwargs": {"widths": [4, 8], "depths": [1, 1]}}


def config(tiny_raw: dict, n: int = 3, seed: int = 0, **run: object):  # type: ignore[no-untyped-def]
    tiny_raw["run"].update({"random_controls": n, "random_controls_seed": seed, **run})
    return build_config(tiny_raw)


# ---------------------------------------------------------------------------------------------- draw
def test_the_draw_is_distinct_in_band_and_reproducible(tiny_raw_factory, tiny_data, tiny_gallery) -> None:
    from cmpnas.models.cost import count_macs
    from cmpnas.models.embedding import EmbeddingModel
    from cmpnas.nas.arch_io import query_config_for_arch
    from cmpnas.stages.common import make_spec, nas_setup

    cfg = config(tiny_raw_factory())
    draw = draw_random_controls(cfg, tiny_gallery, tiny_data)
    setup = nas_setup(cfg, tiny_gallery, tiny_data)
    assert draw["band"] == [cfg.nas.sample_band * setup.budget, setup.budget] and draw["seed"] == 0
    space, dim = setup.space, setup.gallery.spec.embed_dim
    assert len({space.arch_key(a) for a in draw["archs"]}) == len(draw["archs"]) == 3
    low, high = draw["band"]
    for arch in draw["archs"]:
        assert low <= space.query_macs(arch, dim) <= high
    # the trained model's MACs (counted on the built model, embedding head included) are the ones drawn by
    model = EmbeddingModel(make_spec(query_config_for_arch(cfg, draw["archs"][0]), tiny_data, "c"))
    assert count_macs(model, model.input_shape(1)) == space.query_macs(draw["archs"][0], dim)
    assert draw_random_controls(cfg, tiny_gallery, tiny_data) == draw  # a rerun draws the same archs
    more = draw_random_controls(config(tiny_raw_factory(), n=4), tiny_gallery, tiny_data)
    assert more["archs"][:3] == draw["archs"]  # one more control leaves the others as they were
    other = draw_random_controls(config(tiny_raw_factory(), seed=1), tiny_gallery, tiny_data)
    assert other["archs"] != draw["archs"]


def test_more_controls_than_the_band_holds_are_refused(tiny_raw_factory, tiny_data, tiny_gallery) -> None:
    cfg = config(tiny_raw_factory(), n=500)
    with pytest.raises(CmpnasError, match="random controls were found in the search band") as exc:
        draw_random_controls(cfg, tiny_gallery, tiny_data)
    assert "run.random_controls" in exc.value.fix


# ---------------------------------------------------------------------------------------------- stages
def keys(cfg) -> dict[str, str]:  # type: ignore[no-untyped-def]
    state: dict[str, dict] = {}
    for s in build_stages(cfg):
        state[s.name] = {"key": stage_key(s, cfg, state)}
    return {k: v["key"] for k, v in state.items()}


def test_control_stages_per_seed_on_the_gallery_only(tiny_raw: dict) -> None:
    stages = {s.name: s for s in build_stages(config(tiny_raw, n=2, seeds=[0, 1]))}
    names = [n for n in stages if n.startswith("control-")]
    assert names == ["control-random0", "control-random0@s1", "control-random1", "control-random1@s1"]
    assert all(stages[n].deps == ["gallery"] for n in names)
    assert set(names) <= set(stages["evaluate"].deps)


def test_no_controls_without_a_search(tiny_raw: dict) -> None:
    assert not [s for s in build_stages(config(tiny_raw, rewards=[], study=False)) if s.name.startswith("control")]


def test_controls_and_labels_leave_the_other_stage_keys_alone(tiny_raw_factory) -> None:
    """Adding controls re-keys only the evaluation and the report; one more control retrains no other; the stem
    label of a baseline retrains nothing; what the draw depends on re-keys the controls."""
    base = tiny_raw_factory()
    base["run"]["baselines"] = [{"name": "b", "compat": "bct", "model": SMALL}]
    without = keys(build_config(base))
    three = keys(config(tiny_raw_factory() | {"run": {**base["run"]}}, n=3))
    assert {k for k in without if without[k] != three[k]} == {"evaluate", "report"}
    four = keys(config(tiny_raw_factory() | {"run": {**base["run"]}}, n=4))
    assert all(four[f"control-random{i}"] == three[f"control-random{i}"] for i in range(3))
    labelled = tiny_raw_factory() | {"run": {**base["run"]}}
    labelled["run"]["baselines"] = [{**base["run"]["baselines"][0], "stem": "matched"}]
    assert keys(build_config(labelled))["baseline-b"] == without["baseline-b"]
    reseeded = keys(config(tiny_raw_factory() | {"run": {**base["run"]}}, n=3, seed=5))
    assert reseeded["control-random0"] != three["control-random0"]
    banded = tiny_raw_factory() | {"run": {**base["run"]}}
    banded["nas"]["sample_band"] = 0.8
    assert keys(config(banded, n=3))["control-random0"] != three["control-random0"]


# ---------------------------------------------------------------------------------------------- configs
def _final_map(net: torch.nn.Module) -> tuple[int, ...]:
    shapes: list[tuple[int, ...]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[2:])))
        for m in net.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    net.eval()
    with torch.no_grad():
        net(torch.randn(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    return shapes[-1]


@pytest.mark.parametrize("profile", ["smoke", "default", "full"])
def test_stem_matched_baselines_downsample_as_the_space_and_fit_the_budget(profile: str) -> None:
    """Each profile's stem-matched baselines end at the searched models' final feature-map size and cost at most
    the search's budget (gallery MACs over the cost reduction, counted at 28x28x1); its stock ones do not match."""
    from cmpnas.models.cost import count_macs
    from cmpnas.models.embedding import EmbeddingModel, ModelSpec
    from cmpnas.models.spaces import budget_from, create_space

    cfg = load_config(CONFIGS / f"{profile}.yaml")
    assert cfg.run.random_controls == 3

    def model(m) -> EmbeddingModel:  # type: ignore[no-untyped-def]
        spec = ModelSpec(backbone=m.backbone, backbone_kwargs=dict(m.backbone_kwargs), arch=m.arch,
                         embed_dim=m.embed_dim, in_chans=1, input_size=28, mean=[0.5], std=[0.5])  # fmt: skip
        return EmbeddingModel(spec)

    gallery = model(cfg.gallery)
    budget = budget_from(cfg.nas, count_macs(gallery, gallery.input_shape(1)))
    space = create_space(cfg.nas.space, in_chans=1, input_size=28)
    searched = _final_map(space.build({"blocks": [0] * space.num_layers, "scales": [1.0] * space.num_layers}))
    matched = [b for b in cfg.run.baselines if b.stem == "matched"]
    assert matched and all(b.compat == "bct" for b in matched)
    for b in cfg.run.baselines:
        m = model(b.model)
        assert (_final_map(m.backbone) == searched) == (b.stem == "matched"), b.name
        if b.stem == "matched":
            assert count_macs(m, m.input_shape(1)) <= budget, b.name
        if b.model.backbone == "spos":  # a copy of the space's shape: it must follow nas.space
            own = b.model.backbone_kwargs["space"]
            assert {k: getattr(cfg.nas.space, k) for k in own if k not in ("choices", "channel_scales")} == {
                k: v for k, v in own.items() if k not in ("choices", "channel_scales")
            }, b.name
