"""The backfill curve's summary: its area (mean top-1 over the transition), by hand."""

from __future__ import annotations

import pytest

from cmpnas.stages.upgrade import curve_area


def test_curve_area_by_hand() -> None:
    # trapezoids: 0.5 * (80 + 90) / 2 + 0.5 * (90 + 70) / 2 = 82.5 over a unit range
    pts = [{"fraction": 0.0, "top1": 80.0}, {"fraction": 0.5, "top1": 90.0}, {"fraction": 1.0, "top1": 70.0}]
    assert curve_area(pts) == pytest.approx(82.5)
    assert curve_area(pts[1:]) == pytest.approx(80.0)  # over [0.5, 1]: (90 + 70) / 2
