"""The SPOS space with one channel scale per stage: every operator keeps a stage's layers at one scale."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmpnas.config import SpaceConfig
from cmpnas.errors import CmpnasError
from cmpnas.models.cost import count_macs
from cmpnas.models.spaces import create_space
from cmpnas.models.spaces.spos import SposSpace, SposStageWidthSpace

SCALES = [0.2, 0.6, 1.0, 1.6]
_SEEDS = st.integers(0, 2**32 - 1)


@pytest.fixture(scope="module")
def space() -> SposStageWidthSpace:
    """Three stages of 1, 2 and 3 layers at 16 px."""
    cfg = SpaceConfig(
        name="spos-stage",
        stem_channels=8,
        stage_repeats=[1, 2, 3],
        stage_widths=[16, 32, 48],
        stage_strides=[2, 1, 2],
        last_channels=24,
        channel_scales=SCALES,
    )
    return create_space(cfg, in_chans=1, input_size=16)


def tied(space: SposStageWidthSpace, arch: dict) -> bool:
    return all(len({arch["scales"][i] for i in layers}) == 1 for layers in space.stage_layers)


def test_registry_builds_it_and_stages_group_layers(space: SposStageWidthSpace) -> None:
    assert isinstance(space, SposStageWidthSpace) and isinstance(space, SposSpace)
    assert space.stage_layers == [[0], [1, 2], [3, 4, 5]]
    assert space.expand([0.2, 1.0, 1.6]) == [0.2, 1.0, 1.0, 1.6, 1.6, 1.6]


def test_validate_refuses_a_stage_with_two_scales(space: SposStageWidthSpace) -> None:
    ok = {"blocks": [0] * 6, "scales": [0.2, 1.0, 1.0, 1.6, 1.6, 1.6]}
    assert space.validate(ok) == ok
    with pytest.raises(CmpnasError, match=r"stage 2 \(layers 3-5\) differ: \[1.0, 1.6\]"):
        space.validate({"blocks": [0] * 6, "scales": [0.2, 1.0, 1.0, 1.6, 1.0, 1.6]})
    with pytest.raises(CmpnasError, match=r"scales\[1\]"):  # the parent's checks still run first
        space.validate({"blocks": [0] * 6, "scales": [0.2, 0.5, 1.0, 1.6, 1.6, 1.6]})


def test_sample_covers_every_scale_of_every_stage(space: SposStageWidthSpace) -> None:
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(200)]
    assert all(tied(space, a) for a in archs)
    for stage in range(3):
        assert {space.stage_scales(a)[stage] for a in archs} == set(SCALES)
    assert space.sample(random.Random(3)) == space.sample(random.Random(3))


@settings(max_examples=40, deadline=None)
@given(seed=_SEEDS, prob=st.floats(0, 1))
def test_mutate_keeps_stages_tied(space: SposStageWidthSpace, seed: int, prob: float) -> None:
    parent = space.sample(random.Random(seed))
    child = space.mutate(parent, random.Random(seed + 1), prob)
    assert tied(space, child) and space.validate(child) == child
    assert child == space.mutate(parent, random.Random(seed + 1), prob)
    if prob == 0:
        assert child == parent


def test_mutate_with_prob_one_moves_stage_scales(space: SposStageWidthSpace) -> None:
    parent = {"blocks": [0] * 6, "scales": [0.2] * 6}
    rng = random.Random(0)
    stage_scales = {tuple(space.stage_scales(space.mutate(parent, rng, 1.0))) for _ in range(30)}
    assert len(stage_scales) > 20  # 4^3 equally likely patterns


@settings(max_examples=40, deadline=None)
@given(seed=_SEEDS)
def test_crossover_takes_each_stage_scale_from_a_parent(space: SposStageWidthSpace, seed: int) -> None:
    rng = random.Random(seed)
    a, b = space.sample(rng), space.sample(rng)
    child = space.crossover(a, b, random.Random(seed))
    assert tied(space, child)
    assert all(
        c in (x, y)
        for c, x, y in zip(space.stage_scales(child), space.stage_scales(a), space.stage_scales(b), strict=True)
    )
    assert all(c in (x, y) for c, x, y in zip(child["blocks"], a["blocks"], b["blocks"], strict=True))
    assert space.crossover(a, a, rng) == a


@settings(max_examples=40, deadline=None)
@given(seed=_SEEDS, where=st.floats(0.05, 0.95), width=st.floats(0.02, 0.2))
def test_fair_and_below_stay_in_the_band(space: SposStageWidthSpace, seed: int, where: float, width: float) -> None:
    lo_all, hi_all = space.min_macs(), space.max_macs()
    low = lo_all + (hi_all - lo_all) * where
    high = low + (hi_all - lo_all) * width
    fair = space.sample_fair(random.Random(seed), low, high)
    assert tied(space, fair) and space.macs(fair) <= high
    below = space.sample_below(random.Random(seed), high)
    assert tied(space, below) and space.macs(below) <= high


def test_fair_sampling_reaches_every_scale_inside_a_middle_band(space: SposStageWidthSpace) -> None:
    mid = (space.min_macs() + space.max_macs()) / 2
    low, high = 0.9 * mid, 1.1 * mid
    archs = [space.sample_fair(random.Random(s), low, high) for s in range(300)]
    inside = [a for a in archs if low <= space.macs(a) <= high]
    assert len(inside) >= 240  # a whole stage moves at once: a step can jump over a narrow band
    widest = max(SCALES)
    assert any(widest in space.stage_scales(a) for a in inside)


def test_built_network_costs_what_the_table_says(space: SposStageWidthSpace) -> None:
    torch.set_num_threads(1)
    arch = space.sample(random.Random(5))
    assert count_macs(space.build(arch), (1, 1, 16, 16)) == space.macs(arch)


@pytest.mark.parametrize("sampling", ["fair", "rejection"])
def test_supernet_paths_keep_stages_tied(space: SposStageWidthSpace, sampling: str) -> None:
    mid = (space.min_macs() + space.max_macs()) / 2 + space.head_macs(8)
    sample = space.path_sampler(0, 0.8 * mid, 1.2 * mid, 8, sampling=sampling, widest_until=3, sandwich=True)
    for step in range(40):
        paths = sample(step)
        paths = paths if isinstance(paths, list) else [paths]
        assert all(tied(space, p) for p in paths)
        if step < 3:  # the warm-up trains the widest scale everywhere
            assert set(paths[0]["scales"]) == {max(SCALES)}
