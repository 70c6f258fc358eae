"""The report's int8 section: figures taken from the export stage's record, differences computed by hand."""

from __future__ import annotations

from cmpnas.report.int8 import int8_markdown, int8_summary


def _record() -> dict:
    side = lambda top1, mAP: {"top1": top1, "map": mAP, "top5": 99.0}  # noqa: E731
    return {
        "quantization": {"granularity": "per-tensor"},
        "parity": {"mean_cosine": 0.99966, "min_cosine": 0.99},
        "bytes": {"fp32": 400, "int8": 100, "ratio": 0.25},
        "retrieval": {
            "protocol": {"split": "test"},
            "fp32": {"heterogeneous": side(82.73, 76.7), "homogeneous": side(82.02, 77.8)},
            "int8": {"heterogeneous": side(82.50, 76.6), "homogeneous": side(81.78, 77.7)},
        },
        "latency_ms": {"fp32_p50": {"1thread": 0.19, "default": 0.3}, "int8_p50": {"1thread": 0.35, "default": 0.4}},
    }


def test_summary_keeps_the_fp32_and_int8_figures() -> None:
    s = int8_summary(_record())
    assert s["heterogeneous"] == {"fp32": {"top1": 82.73, "map": 76.7}, "int8": {"top1": 82.50, "map": 76.6}}
    assert s["split"] == "test" and s["bytes"]["int8"] == 100


def test_markdown_shows_the_loss_and_the_size_by_hand() -> None:
    md = int8_markdown(int8_summary(_record()))
    assert "| heterogeneous | 82.73 | 82.50 | -0.23 | 76.60 |" in md  # 82.50 - 82.73
    assert "| homogeneous | 82.02 | 81.78 | -0.24 | 77.70 |" in md
    assert "100 of 400 bytes (0.25x)" in md and "0.9997" in md
    assert "fp32 0.190 ms, int8 0.350 ms" in md
