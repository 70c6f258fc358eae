"""SPOS search space: MAC lookup table vs the hook counter, supernet weight sharing, operators, encoding."""

from __future__ import annotations

import io
import itertools
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmpnas.config import SpaceConfig
from cmpnas.errors import CmpnasError
from cmpnas.models.cost import LatencyTable, check_prediction, check_predictions, count_macs
from cmpnas.models.spaces.spos import SposSpace, Supernet, build, extract_subnet, mid_channels, split_shuffle
from cmpnas.models.spaces.spos.latency import measure_latency_table, query_net

SPOS_SCALES = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6]


def tiny_cfg(**kw) -> SpaceConfig:
    """Two stages (the second keeps the resolution: stride-1 first block with projection), 3 layers."""
    base = dict(
        stem_channels=8,
        stage_repeats=[1, 2],
        stage_widths=[16, 32],
        stage_strides=[2, 1],
        last_channels=24,
        channel_scales=[0.2, 1.0, 1.6],
    )
    base.update(kw)
    return SpaceConfig(**base)


def spos_like_cfg(width: float = 1.0, scales: list[float] | None = None) -> SpaceConfig:
    """SPOS's ShuffleNetV2 space (Guo et al., ECCV 2020), stage widths (and stem) scaled by ``width``."""
    widths = [int(w * width) // 2 * 2 for w in (64, 160, 320, 640)]
    return SpaceConfig(
        stem_channels=max(4, int(16 * width)),
        stem_stride=2,
        stage_repeats=[4, 4, 8, 4],
        stage_widths=widths,
        stage_strides=[2, 2, 2, 2],
        last_channels=1024 if width == 1 else 256,
        channel_scales=scales or [1.0],
    )


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> SposSpace:
    return SposSpace(tiny_cfg(), in_chans=1, input_size=16)


# ----------------------------------------------------------------------------------------- MACs


def test_mid_channels_hand_values() -> None:
    assert mid_channels(64, 1.0) == 32
    assert mid_channels(64, 0.2) == 6  # 6.4 -> 6
    assert mid_channels(64, 1.6) == 52  # 51.2 -> nearest even 52
    assert mid_channels(16, 0.2) == 2  # 1.6 -> 2
    assert mid_channels(4, 0.2) == 2  # floor of 2 channels


def test_macs_hand_counted_one_block_space() -> None:
    # 1x4x4 input. stem 1->4 3x3 s1: 16 px * 4 * 9 = 576.
    # layer (4->8, s2, projection, mid 4, main 4->4): pw 16*4*4=256, dw 4*4*9=144, pw 4*4*4=64,
    #   proj dw 4*4*9=144, proj pw 4*4*4=64 -> 672.  last conv 8->8 on 2x2: 4*8*8 = 256.
    cfg = SpaceConfig(
        stem_channels=4,
        stage_repeats=[1],
        stage_widths=[8],
        stage_strides=[2],
        last_channels=8,
        choices=["shuffle3"],
    )
    space = SposSpace(cfg, in_chans=1, input_size=4)
    arch = {"blocks": [0], "scales": [1.0]}
    assert space.macs(arch) == 576 + 672 + 256
    assert count_macs(build(space, arch), (1, 1, 4, 4)) == 576 + 672 + 256


def _check_lut_against_hook_counter(space: SposSpace, seeds: range) -> None:
    shape = (1, space.in_chans, space.input_size, space.input_size)
    rng = random.Random(seeds.start)
    archs = [space.sample(rng) for _ in seeds]
    # the per-layer extremes too: they define min_macs / max_macs
    for pick in (min, max):
        blocks, scales = [], []
        for layer in range(space.num_layers):
            options = itertools.product(range(len(space.choices)), space.scales)
            best = pick(options, key=lambda cs, layer=layer: space.lut_macs(layer, *cs))
            blocks.append(best[0])
            scales.append(best[1])
        archs.append({"blocks": blocks, "scales": scales})
    for arch in archs:
        assert space.macs(arch) == count_macs(build(space, arch), shape), arch
    assert space.macs(archs[-2]) == space.min_macs()
    assert space.macs(archs[-1]) == space.max_macs()


def test_lut_matches_hook_count_default_space_with_channel_scales() -> None:
    space = SposSpace(SpaceConfig(channel_scales=SPOS_SCALES), in_chans=1, input_size=28)
    _check_lut_against_hook_counter(space, range(0, 4))


def test_lut_matches_hook_count_spos_like_3x112() -> None:
    space = SposSpace(spos_like_cfg(0.25, [0.2, 1.0, 1.6]), in_chans=3, input_size=112)
    assert space.num_layers == 20
    _check_lut_against_hook_counter(space, range(10, 13))


def test_lut_matches_hook_count_tiny_stride1_projection(tiny: SposSpace) -> None:
    assert tiny.layers[1].project and tiny.layers[1].stride == 1
    _check_lut_against_hook_counter(tiny, range(20, 26))


def test_spos_reference_macs_from_the_spos_paper() -> None:
    # the SPOS paper: its searched arch is 323M MACs with its 1024->1000 FC; all-3x3 is 294.8M at 224.
    space = SposSpace(spos_like_cfg(1.0), in_chans=3, input_size=224)
    searched = [2, 1, 0, 1, 2, 0, 2, 0, 2, 0, 2, 3, 0, 0, 0, 0, 3, 2, 3, 3]
    assert abs(space.macs({"blocks": searched}) + 1024 * 1000 - 323e6) < 0.5e6
    assert abs(space.macs({"blocks": [0] * 20}) - 294.8e6) < 0.1e6
    assert abs(space.macs({"blocks": [3] * 20}) - 357.8e6) < 0.1e6


def test_min_max_exact_by_enumeration() -> None:
    space = SposSpace(
        tiny_cfg(choices=["shuffle3", "xception"], channel_scales=[0.2, 1.6]), in_chans=1, input_size=16
    )
    all_macs = [
        space.macs({"blocks": list(b), "scales": list(s)})
        for b in itertools.product(range(2), repeat=space.num_layers)
        for s in itertools.product(space.scales, repeat=space.num_layers)
    ]
    assert space.min_macs() == min(all_macs)
    assert space.max_macs() == max(all_macs)
    assert space.min_macs() < space.max_macs()


def test_lut_is_json_and_consistent(tiny: SposSpace) -> None:
    lut = json.loads(json.dumps(tiny.lut()))
    arch = tiny.sample(random.Random(3))
    total = lut["stem"] + lut["last"]
    for layer, (b, s) in enumerate(zip(arch["blocks"], arch["scales"], strict=True)):
        total += lut["layers"][layer]["macs"][lut["choices"][b]][repr(s)]
    assert total == tiny.macs(arch)
    assert lut["unit"] == "MACs"


# ----------------------------------------------------------------------------------------- networks


def test_build_output_shape(tiny: SposSpace) -> None:
    net = build(tiny, tiny.sample(random.Random(0)))
    assert net.num_features == 24
    out = net(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 24)


def test_supernet_grads_only_on_the_sampled_path(tiny: SposSpace) -> None:
    torch.manual_seed(0)
    net = Supernet(tiny)
    for p in net.parameters():  # BN is affine=False everywhere: only conv weights are parameters
        assert p.dim() == 4
    arch = {"blocks": [1, 3, 0], "scales": [1.6, 0.2, 1.0]}
    net.zero_grad(set_to_none=True)
    out = net(torch.randn(4, 1, 16, 16), arch)
    assert out.shape == (4, net.num_features)
    out.square().mean().backward()
    for layer, blocks in enumerate(net.layers):
        for choice, block in enumerate(blocks):
            on_path = choice == arch["blocks"][layer]
            for name, p in block.named_parameters():
                assert (p.grad is not None) == on_path, (layer, choice, name)
    assert all(p.grad is not None for p in net.stem.parameters())
    assert all(p.grad is not None for p in net.head.parameters())
    # layer 1 runs at scale 0.2 (mid 4 of 26 allocated): the first pw's unused output rows get no gradient
    first_pw = net.layers[1][3].main[1].conv.weight  # xception: dw, pw(in->mid), ...
    mid = tiny.mid(1, 0.2)
    assert first_pw.shape[0] == max(tiny.layers[1].mids) > mid
    assert first_pw.grad[mid:].abs().sum() == 0
    assert first_pw.grad[:mid].abs().sum() > 0


def test_supernet_sliced_bn_updates_only_used_statistics(tiny: SposSpace) -> None:
    net = Supernet(tiny).train()
    arch = {"blocks": [0, 0, 0], "scales": [0.2, 0.2, 0.2]}
    bn = net.layers[0][0].main[0].bn
    mid = tiny.mid(0, 0.2)
    net(torch.randn(4, 1, 16, 16), arch)
    assert (bn.running_mean[:mid] != 0).all()
    assert (bn.running_mean[mid:] == 0).all()
    assert int(bn.num_batches_tracked) == 1


def test_extracted_subnet_computes_the_supernet_path(tiny: SposSpace) -> None:
    torch.manual_seed(1)
    net = Supernet(tiny).train()
    rng = random.Random(5)
    for _ in range(3):  # give BN statistics non-trivial values on several paths
        net(torch.randn(8, 1, 16, 16), tiny.sample(rng))
    net.eval()
    x = torch.randn(3, 1, 16, 16)
    for arch in (tiny.sample(rng), {"blocks": [3, 1, 2], "scales": [0.2, 1.6, 1.0]}):
        sub = extract_subnet(net, arch).eval()
        with torch.no_grad():
            expected, got = net(x, arch), sub(x)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()


def test_build_exports_to_onnx(tiny: SposSpace) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = build(tiny, {"blocks": [3, 2, 0], "scales": [0.2, 1.6, 1.0]}).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        net,
        (torch.randn(1, 1, 16, 16),),
        buf,
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load_from_string(buf.getvalue()))
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, 16, 16)
    (y,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = net(x)
    assert torch.allclose(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_latency_table(tiny: SposSpace, runtime: str) -> None:
    table = measure_latency_table(tiny, threads=1, repeats=2, rounds=2, runtime=runtime, calibrate=0)
    arch = tiny.sample(random.Random(0))
    assert table.fixed_ms > 0
    assert table.latency_ms(arch) > table.fixed_ms
    assert len(table.entries) == tiny.num_layers
    assert set(table.entries[0]) == set(tiny.choices)
    meta = table.meta
    assert meta["runtime"] == runtime and meta["overhead_from"] == "probe" and meta["calibration"] == []
    assert meta["overhead_ms"] == meta["probe_ms"] > 0


@pytest.fixture(scope="module")
def repeated() -> SposSpace:
    """Layers 2 and 3 have the same shapes (stride 1, no projection, 32 channels at 8x8)."""
    return SposSpace(tiny_cfg(stage_repeats=[1, 3], channel_scales=[0.2, 1.6]), in_chans=1, input_size=16)


@pytest.fixture(scope="module")
def ort_table(repeated: SposSpace) -> LatencyTable:
    return measure_latency_table(repeated, threads=1, repeats=3, rounds=2, runtime="onnxruntime", embed_dim=16)


def test_onnx_latency_table_structure(repeated: SposSpace, ort_table: LatencyTable) -> None:
    table = ort_table
    keys = {LatencyTable.scale_key(s) for s in repeated.scales}
    assert len(table.entries) == repeated.num_layers == 4
    for row in table.entries:
        assert set(row) == set(repeated.choices)
        for per_scale in row.values():
            assert set(per_scale) == keys
            assert all(math.isfinite(v) and v >= 0 for v in per_scale.values())
    assert table.entries[2] == table.entries[3]  # same shapes: timed once
    assert table.entries[2] is not table.entries[3]  # but separate rows
    meta = table.meta
    assert meta["runtime"] == "onnxruntime" and meta["embed_dim"] == 16 and meta["statistic"] == "min"
    assert (meta["threads"], meta["repeats"], meta["rounds"]) == (1, 3, 2)
    assert meta["input_shape"] == [1, 1, 16, 16] and "onnxruntime" in meta["versions"]
    # The overhead is counted once, in the fixed part; ~10 us here, so a loose bound catches a unit slip.
    assert abs(meta["overhead_ms"]) < 5 and table.fixed_ms > 0
    assert meta["overhead_from"] == "calibration" and len(meta["calibration"]) == 3
    for fit in meta["calibration"]:  # the fit's residuals on its own whole models
        assert repeated.validate(fit["arch"]) == fit["arch"] and fit["measured_ms"] > 0
        assert fit["predicted_ms"] == pytest.approx(table.latency_ms(fit["arch"]))
        assert math.isfinite(fit["error_pct"])


def test_onnx_latency_table_sums_fixed_and_chosen_entries(
    repeated: SposSpace, ort_table: LatencyTable
) -> None:
    arch = {"blocks": [3, 0, 2, 1], "scales": [1.6, 0.2, 0.2, 1.6]}
    hand = ort_table.fixed_ms
    hand += ort_table.entries[0]["xception"]["1.6"] + ort_table.entries[1]["shuffle3"]["0.2"]
    hand += ort_table.entries[2]["shuffle7"]["0.2"] + ort_table.entries[3]["shuffle5"]["1.6"]
    assert ort_table.latency_ms(arch) == pytest.approx(hand)
    again = LatencyTable.from_dict(json.loads(json.dumps(ort_table.to_dict())))
    assert again.meta == ort_table.meta and again.latency_ms(arch) == pytest.approx(hand)


def test_check_predictions_against_whole_query_models(
    repeated: SposSpace, ort_table: LatencyTable, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(3)
    archs = [repeated.sample(rng) for _ in range(3)]
    rows = check_predictions(ort_table, [(query_net(repeated, a, 16), a) for a in archs], (1, 1, 16, 16))
    for arch, row in zip(archs, rows, strict=True):
        assert row["predicted_ms"] == pytest.approx(ort_table.latency_ms(arch))
        assert row["measured_ms"] > 0 and math.isfinite(row["error_pct"])
        expected = 100 * (row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"]
        assert row["error_pct"] == pytest.approx(expected)
    one = check_prediction(ort_table, query_net(repeated, archs[0], 16), archs[0], (1, 1, 16, 16))
    assert set(one) == {"predicted_ms", "measured_ms", "error_pct"}
    with capsys.disabled():  # recorded, not asserted: timing noise on a shared machine
        print("\nlatency table error %:", [round(r["error_pct"], 1) for r in rows + [one]])


def test_query_net_is_backbone_plus_embedding_head(repeated: SposSpace) -> None:
    arch = repeated.sample(random.Random(0))
    assert query_net(repeated, arch, 16).eval()(torch.randn(2, 1, 16, 16)).shape == (2, 16)
    assert query_net(repeated, arch).eval()(torch.randn(2, 1, 16, 16)).shape == (2, 24)


@pytest.mark.parametrize(
    "kwargs", [{"runtime": "tflite"}, {"statistic": "p99"}, {"rounds": 0}, {"calibrate": -1}]
)
def test_latency_table_bad_settings_are_user_errors(tiny: SposSpace, kwargs: dict) -> None:
    with pytest.raises(CmpnasError, match="onnxruntime|min|rounds|calibrate"):
        measure_latency_table(tiny, repeats=1, **kwargs)


# ----------------------------------------------------------------------------------------- operators

_SEEDS = st.integers(0, 2**32 - 1)


@settings(max_examples=40, deadline=None)
@given(seed=_SEEDS, prob=st.floats(0, 1))
def test_mutate_valid_and_deterministic(tiny: SposSpace, seed: int, prob: float) -> None:
    parent = tiny.sample(random.Random(seed))
    child = tiny.mutate(parent, random.Random(seed + 1), prob)
    assert tiny.validate(child) == child
    assert child == tiny.mutate(parent, random.Random(seed + 1), prob)
    if prob == 0:
        assert child == parent


def test_mutate_with_prob_one_resamples_genes(tiny: SposSpace) -> None:
    rng = random.Random(0)
    parent = {"blocks": [0, 0, 0], "scales": [0.2, 0.2, 0.2]}
    changed = sum(tiny.mutate(parent, rng, 1.0) != parent for _ in range(20))
    assert changed >= 15  # P(unchanged) = (1/4 * 1/3)^3 per draw


@settings(max_examples=40, deadline=None)
@given(seed=_SEEDS)
def test_crossover_takes_each_gene_from_a_parent(tiny: SposSpace, seed: int) -> None:
    rng = random.Random(seed)
    a, b = tiny.sample(rng), tiny.sample(rng)
    child = tiny.crossover(a, b, random.Random(seed))
    assert child == tiny.crossover(a, b, random.Random(seed))
    assert tiny.validate(child) == child
    for key in ("blocks", "scales"):
        assert all(c in (x, y) for c, x, y in zip(child[key], a[key], b[key], strict=True))
    assert tiny.crossover(a, a, rng) == a


def test_sample_is_deterministic_and_covers_choices(tiny: SposSpace) -> None:
    first = [tiny.sample(random.Random(7)) for _ in range(2)]
    assert first[0] == first[1]
    rng = random.Random(0)
    seen = {(b, s) for _ in range(200) for b, s in zip(*tiny.sample(rng).values(), strict=True)}
    assert seen == set(itertools.product(range(4), tiny.scales))


def test_sample_in_band_respects_band() -> None:
    space = SposSpace(SpaceConfig(channel_scales=SPOS_SCALES), in_chans=1, input_size=28)
    rng = random.Random(0)
    median = sorted(space.macs(space.sample(rng)) for _ in range(101))[50]
    low, high = 0.95 * median, 1.05 * median
    for seed in range(5):
        arch = space.sample_in_band(random.Random(seed), low, high)
        assert arch is not None and low <= space.macs(arch) <= high
    assert space.sample_in_band(rng, 0, space.min_macs() - 1) is None
    assert space.sample_in_band(rng, space.max_macs() + 1, space.max_macs() + 2) is None
    # a feasible but vanishingly unlikely band exhausts max_tries
    assert space.sample_in_band(rng, space.min_macs(), space.min_macs(), max_tries=5) is None
    with pytest.raises(CmpnasError, match="empty"):
        space.sample_in_band(rng, 2.0, 1.0)


# ----------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    ("arch", "match"),
    [
        ({"blocks": [0, 1], "scales": [1.0, 1.0]}, "'blocks' has 2 entries"),
        ({"blocks": [0, 1, 2], "scales": [1.0]}, "'scales' has 1 entries"),
        ({"blocks": [0, 4, 1], "scales": [1.0, 1.0, 1.0]}, r"blocks\[1\]"),
        ({"blocks": [0, -1, 1], "scales": [1.0, 1.0, 1.0]}, r"blocks\[1\]"),
        ({"blocks": [0, 1, True], "scales": [1.0, 1.0, 1.0]}, r"blocks\[2\]"),
        ({"blocks": [0, 1.0, 1], "scales": [1.0, 1.0, 1.0]}, r"blocks\[1\]"),
        ({"blocks": [0, 1, 2], "scales": [1.0, 0.5, 1.0]}, r"scales\[1\]"),
        ({"blocks": [0, 1, 2], "scales": [1.0, 1.0, "1.0"]}, r"scales\[2\]"),
        ({"blocks": [0, 1, 2]}, "'scales' must be a list"),
        ({"blocks": "012", "scales": [1.0, 1.0, 1.0]}, "'blocks' must be a list"),
        ({"blocks": [0, 1, 2], "scales": [1.0] * 3, "extra": 1}, "unknown keys"),
        ([0, 1, 2], "mapping"),
    ],
)
def test_validate_names_the_bad_gene(tiny: SposSpace, arch: object, match: str) -> None:
    with pytest.raises(CmpnasError, match=match):
        tiny.validate(arch)


def test_validate_normalises_and_single_scale_may_omit_scales() -> None:
    space = SposSpace(tiny_cfg(channel_scales=[1.0]), in_chans=1, input_size=16)
    assert space.validate({"blocks": (0, 1, 2)}) == {"blocks": [0, 1, 2], "scales": [1.0, 1.0, 1.0]}
    assert space.validate({"blocks": [0, 1, 2], "scales": [1, 1, 1]})["scales"] == [1.0, 1.0, 1.0]


def test_arch_key_canonical(tiny: SposSpace) -> None:
    a = {"blocks": [0, 1, 2], "scales": [1.0, 0.2, 1.6]}
    assert tiny.arch_key(a) == tiny.arch_key({"blocks": (0, 1, 2), "scales": [1, 0.2, 1.6]})
    assert tiny.arch_key(a) != tiny.arch_key({"blocks": [0, 1, 2], "scales": [1.0, 1.6, 0.2]})
    assert tiny.arch_key(a) != tiny.arch_key({"blocks": [0, 2, 1], "scales": [1.0, 0.2, 1.6]})


@pytest.mark.parametrize(
    "kw",
    [
        {"stage_widths": [16, 16]},  # not increasing: the projection branch would leave no main branch
        {"stage_widths": [8, 32]},  # not above stem_channels
        {"stage_widths": [17, 32]},  # odd
        {"stage_strides": [2]},  # length mismatch
        {"stage_strides": [2, 3]},
        {"stage_repeats": [1, 0]},
        {"channel_scales": [0.0]},
        {"choices": ["shuffle3", "shuffle3"]},
    ],
)
def test_bad_space_config_is_user_error(kw: dict) -> None:
    with pytest.raises(CmpnasError, match="nas.space"):
        SposSpace(tiny_cfg(**kw), in_chans=1, input_size=16)


def test_space_accepts_a_dict_and_reports_bad_keys() -> None:
    assert SposSpace(tiny_cfg().model_dump(), input_size=16).num_layers == 3
    with pytest.raises(CmpnasError, match="stage_widthz"):
        SposSpace({"stage_widthz": [1]})


@given(half=st.integers(1, 6), batch=st.integers(1, 3), size=st.integers(1, 4))
@settings(max_examples=25, deadline=None)
def test_split_shuffle_is_the_channel_shuffle_of_shufflenetv2(half: int, batch: int, size: int) -> None:
    """The strided-slice form equals the textbook shuffle: (c/2, 2) -> transpose -> flatten, then halves."""
    x = torch.randn(batch, 2 * half, size, size)
    shuffled = x.reshape(batch, half, 2, size, size).transpose(1, 2).reshape(batch, 2 * half, size, size)
    passthrough, main = split_shuffle(x)
    assert torch.equal(passthrough, shuffled[:, :half])
    assert torch.equal(main, shuffled[:, half:])
    assert torch.equal(passthrough[:, 0], x[:, 0]) and torch.equal(main[:, 0], x[:, 1])  # by hand
    if half > 1:
        assert torch.equal(passthrough[:, 1], x[:, 2]) and torch.equal(main[:, 1], x[:, 3])
