"""MAC counter (hand-counted nets), latency measurement and the latency table."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cmpnas.errors import CmpnasError
from cmpnas.models.cost import (
    LATENCY_RUNTIMES,
    LatencyTable,
    check_prediction,
    count_macs,
    fit_overhead,
    latency_runtime,
    measure_latency_ms,
)
from cmpnas.models.onnx_runtime import measure_onnx_latency_ms, session, to_onnx_bytes
from cmpnas.models.timing import Timer, measure_rounds


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hand_net() -> nn.Module:
    # conv 1->4 3x3 s1 p1 on 8x8: 4*8*8 outputs x 1*9            = 2304
    # BN, ReLU: free
    # depthwise 4->4 3x3 s2 p1 (groups 4): 4*4*4 outputs x 1*9    =  576
    # pw 4->6 1x1 on 4x4: 6*4*4 outputs x 4                        =  384
    # flatten 96 -> Linear(96, 10): 96*10                          =  960
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, 1, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, 2, 1, groups=4),
        nn.Conv2d(4, 6, 1),
        nn.Flatten(),
        nn.Linear(96, 10),
    )


HAND_MACS = 2304 + 576 + 384 + 960


def test_count_macs_matches_hand_count() -> None:
    assert count_macs(_hand_net(), (1, 1, 8, 8)) == HAND_MACS


def test_count_macs_scales_with_batch() -> None:
    assert count_macs(_hand_net(), (3, 1, 8, 8)) == 3 * HAND_MACS


def test_count_macs_linear_on_sequence_counts_every_position() -> None:
    # 5 positions x 7 inputs x 3 outputs
    assert count_macs(nn.Linear(7, 3), (1, 5, 7)) == 105


def test_count_macs_grouped_conv() -> None:
    # 8 -> 8, groups 2: each output sees 4 inputs; 8 x 3 x 3 outputs (5x5, k3, no pad) x 4 x 9
    assert count_macs(nn.Conv2d(8, 8, 3, groups=2), (1, 8, 5, 5)) == 8 * 9 * 4 * 9


class _KwargNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        return self.b(self.a(x)) if use_b else self.a(x)


def test_count_macs_forward_kwargs_and_mode_restored() -> None:
    net = _KwargNet().train()
    assert count_macs(net, (1, 4), {"use_b": False}) == 16
    assert count_macs(net, (1, 4), {"use_b": True}) == 16 + 8
    assert net.training
    net.eval()
    count_macs(net, (1, 4), {"use_b": True})
    assert not net.training


def test_count_macs_does_not_touch_bn_statistics() -> None:
    net = _hand_net().train()
    before = net[1].running_mean.clone()
    count_macs(net, (1, 1, 8, 8))
    assert torch.equal(net[1].running_mean, before)


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (0, 1, 8, 8), ()])
def test_count_macs_bad_shape_is_user_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(CmpnasError):
        count_macs(_hand_net(), shape)


def test_measure_latency_positive_and_threads_restored() -> None:
    torch.set_num_threads(2)
    out = measure_latency_ms(_hand_net(), (1, 1, 8, 8), warmup=1, repeats=5, threads=1)
    assert set(out) == {"p50", "p90", "mean"}
    assert all(v > 0 for v in out.values())
    assert out["p50"] <= out["p90"]
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"threads": 0}])
def test_measure_latency_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(CmpnasError):
        measure_latency_ms(_hand_net(), (1, 1, 8, 8), **kwargs)


def _table() -> LatencyTable:
    return LatencyTable(
        entries=[
            {"shuffle3": {"0.5": 1.0, "1.0": 2.0}, "xception": {"0.5": 3.0, "1.0": 4.0}},
            {"shuffle3": {"0.5": 10.0, "1.0": 20.0}, "xception": {"0.5": 30.0, "1.0": 40.0}},
        ],
        fixed_ms=0.5,
        choices=["shuffle3", "xception"],
    )


def test_latency_table_sums_fixed_and_chosen_blocks() -> None:
    table = _table()
    assert table.latency_ms({"blocks": [1, 0], "scales": [0.5, 1.0]}) == pytest.approx(0.5 + 3.0 + 20.0)
    assert table.latency_ms({"blocks": [0, 1], "scales": [1.0, 0.5]}) == pytest.approx(0.5 + 2.0 + 30.0)


def test_latency_table_roundtrip_and_errors() -> None:
    table = _table()
    again = LatencyTable.from_dict(table.to_dict())
    arch = {"blocks": [1, 1], "scales": [1.0, 1.0]}
    assert again.latency_ms(arch) == table.latency_ms(arch)
    with pytest.raises(CmpnasError, match="layers"):
        table.latency_ms({"blocks": [0], "scales": [1.0]})
    with pytest.raises(CmpnasError, match="not in the latency table"):
        table.latency_ms({"blocks": [0, 0], "scales": [0.7, 1.0]})
    with pytest.raises(CmpnasError):
        LatencyTable.from_dict({"entries": []})


def test_latency_table_save_load_keeps_meta(tmp_path: Path) -> None:
    table = _table()
    table.meta = {"runtime": "onnxruntime", "overhead_ms": 0.01, "embed_dim": 16}
    table.save(tmp_path / "lat.json")
    again = LatencyTable.load(tmp_path / "lat.json")
    assert again == table
    with pytest.raises(CmpnasError, match="does not exist"):
        LatencyTable.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------- ONNX Runtime


def _trained_bn_net() -> nn.Module:
    """The hand net in train mode with BN statistics far from their init: the exported graph must fold them
    as torch's eval forward uses them (a train-mode graph would normalise with the batch's statistics)."""
    net = _hand_net()
    with torch.no_grad():
        net[1].running_mean.fill_(0.7)
        net[1].running_var.fill_(3.0)
    return net.train()


def test_to_onnx_bytes_runs_the_same_graph_as_torch() -> None:
    net = _trained_bn_net()
    data = to_onnx_bytes(net, (1, 1, 8, 8))
    assert net.training  # mode restored
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    sess = session(data, threads=1)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = net.eval()(x).numpy()
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_measure_onnx_latency_positive_and_ordered() -> None:
    net = _trained_bn_net()
    out = measure_onnx_latency_ms(net, (1, 1, 8, 8), warmup=1, repeats=5, threads=1)
    assert set(out) == {"p50", "p90", "mean"}
    assert all(math.isfinite(v) and v > 0 for v in out.values())
    assert out["p50"] <= out["p90"]
    assert net.training


def test_session_rejects_bad_models_clearly() -> None:
    with pytest.raises(CmpnasError, match="in-memory ONNX model"):
        session(b"not an onnx model")


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"threads": 0}])
def test_measure_onnx_latency_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(CmpnasError):
        measure_onnx_latency_ms(_hand_net(), (1, 1, 8, 8), **kwargs)


def test_runtime_registry() -> None:
    assert set(LATENCY_RUNTIMES) == {"torch", "onnxruntime"}
    for name in LATENCY_RUNTIMES:
        stats = latency_runtime(name)(_hand_net(), (1, 1, 8, 8), 1).measure(warmup=1, repeats=3)
        assert stats["p50"] > 0
    with pytest.raises(CmpnasError, match="onnxruntime, torch"):
        latency_runtime("tensorrt")


def test_measure_rounds_keeps_the_quietest_round_and_the_fastest_run() -> None:
    calls = {"n": 0}

    def run() -> None:  # the first round (5 calls) is "loaded": 20 ms per call
        calls["n"] += 1
        if calls["n"] <= 5:
            time.sleep(0.02)

    (stats,) = measure_rounds([Timer(run)], warmup=0, repeats=5, rounds=3)
    assert calls["n"] == 15
    assert stats["p90"] < 10 and stats["min"] <= stats["p50"] <= stats["p90"]
    with pytest.raises(CmpnasError, match="rounds"):
        measure_rounds([Timer(run)], warmup=0, repeats=5, rounds=0)


def test_measure_rounds_prepares_factories_once_in_the_first_round() -> None:
    made: list[int] = []
    runs = {"n": 0}

    def run() -> None:
        runs["n"] += 1

    def factory() -> Timer:
        made.append(runs["n"])
        return Timer(run)

    stats = measure_rounds([Timer(run), factory], warmup=1, repeats=2, rounds=3)
    assert made == [3]  # prepared once, after the first timer's first round (1 warmup + 2 runs)
    assert runs["n"] == 2 * 3 * 3 and len(stats) == 2


def test_check_prediction_uses_the_table_settings() -> None:
    table = LatencyTable(
        entries=[{"a": {"1.0": 2.0}}],
        fixed_ms=1.0,
        choices=["a"],
        meta={"runtime": "torch", "threads": 1, "repeats": 3, "warmup": 1, "rounds": 2, "statistic": "p50"},
    )
    row = check_prediction(table, _hand_net(), {"blocks": [0], "scales": [1.0]}, (1, 1, 8, 8))
    assert row["predicted_ms"] == 3.0
    assert row["measured_ms"] > 0
    assert row["error_pct"] == pytest.approx(100 * (3.0 - row["measured_ms"]) / row["measured_ms"])
    with pytest.raises(CmpnasError, match="Unknown latency runtime"):
        check_prediction(table, _hand_net(), {"blocks": [0], "scales": [1.0]}, (1, 1, 8, 8), runtime="x")


def test_fit_overhead_hand_values() -> None:
    # 11 parts summing to 1.2 ms, measured whole at 1.0 ms: 10 surplus overheads of 0.02 ms.
    assert fit_overhead([1.2], [1.0], 11) == pytest.approx(0.02)
    # Median of the fits 0.02, 0.01, 0.5 (an outlier whole model measured in a quiet moment).
    assert fit_overhead([1.2, 1.1, 6.0], [1.0, 1.0, 1.0], 11) == pytest.approx(0.02)
    assert fit_overhead([1.0], [1.1], 11) == pytest.approx(-0.01)  # whole slower than its parts
    with pytest.raises(CmpnasError, match="Cannot fit"):
        fit_overhead([], [], 11)
