"""The three-way comparison's derived numbers: cost reduction, gap to the paragon, compatibility verdict."""

from __future__ import annotations

import copy

import pytest
import torch

import cmpnas.evaluation.compare as compare_module
from cmpnas.evaluation.compare import compare, comparison_table, gap_to_paragon, is_compatible, settings_for
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint


def _tiny(seed: int, widths: list[int], name: str) -> EmbeddingModel:
    torch.manual_seed(seed)
    kw = {"widths": widths, "depths": [1, 1], "strides": [1, 2]}
    return EmbeddingModel(
        ModelSpec(backbone="resnet_small", backbone_kwargs=kw, embed_dim=8, name=name)
    ).eval()


@pytest.mark.parametrize(("het_top1", "compatible"), [(75.5, True), (70.0, False), (60.0, False)])
def test_compare_derives_cost_reduction_gap_and_verdict(
    monkeypatch, het_top1: float, compatible: bool
) -> None:
    gallery, query = _tiny(0, [8, 16], "big"), _tiny(1, [4, 8], "small")
    rows = {
        "paragon": {"top1": 90.0, "top5": 97.0, "map": 80.0, "n_queries": 10},
        "homogeneous": {"top1": 70.0, "top5": 90.0, "map": 60.0, "n_queries": 10},
        "heterogeneous": {"top1": het_top1, "top5": 93.0, "map": 65.0, "n_queries": 10},
    }
    monkeypatch.setattr(compare_module, "three_way", lambda *a, **kw: copy.deepcopy(rows))
    monkeypatch.setattr(compare_module, "count_macs", lambda m, shape: 1_000_000 if m is gallery else 8_000)
    res = compare(gallery, query, protocol=None)
    assert res["cost_reduction"] == 125.0
    assert res["gap_to_paragon"] == pytest.approx({"top1": 90.0 - het_top1, "top5": 4.0, "map": 15.0})
    assert res["relative_gap_to_paragon"]["top1"] == pytest.approx((90.0 - het_top1) / 90.0 * 100, abs=1e-3)
    assert res["compatible"] is compatible  # strictly M(q,g) > M(q,q)
    assert res["gallery"] == {"name": "big", "macs": 1_000_000, "fingerprint": fingerprint(gallery)}
    assert res["query"]["name"] == "small" and res["query"]["macs"] == 8_000
    assert res["n_queries"] == 10
    table = comparison_table([res])
    assert "| small | 0.01 M | 125.0x |" in table
    assert f"{het_top1:.2f} / 65.00" in table and ("| yes |" if compatible else "| no |") in table


def test_settings_for_the_available_sources() -> None:
    names = lambda sides: [s.name for s in settings_for(sides)]  # noqa: E731
    assert names(["gallery", "query"]) == ["paragon", "homogeneous", "heterogeneous"]
    assert names(["query"]) == ["homogeneous"]
    assert names(["embeddings"]) == ["homogeneous"]
    assert names(["embeddings", "gallery_embeddings"]) == ["heterogeneous"]


def test_gap_and_verdict_hand_example() -> None:
    settings = {"paragon": {"top1": 80.0}, "homogeneous": {"top1": 60.0}, "heterogeneous": {"top1": 70.0}}
    assert gap_to_paragon(settings) == {"top1": 10.0}
    assert gap_to_paragon(settings, relative=True) == {"top1": 12.5}
    assert is_compatible(settings, lambda m: m["top1"]) is True
    settings["heterogeneous"]["top1"] = 60.0  # a tie is not compatible: strictly better is required
    assert is_compatible(settings, lambda m: m["top1"]) is False
