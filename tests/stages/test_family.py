"""A query-model family on the tiny space: one search for several budgets -> retrain -> export.

Checked against independent recomputations: which budgets a candidate fits (MACs from the space's LUT and the
latency table), each member = the best candidate inside its budget (brute force over the candidates), the MACs
counted on the exported model, one evaluation per distinct architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmpnas.config import build_config
from cmpnas.errors import CmpnasError
from cmpnas.models.cost import LatencyTable
from cmpnas.models.spaces.spos import SposSpace
from cmpnas.serving.family import read_family
from cmpnas.stages import export_family, retrain_family, search, train_supernet
from cmpnas.stages.supernet import SUPERNET_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


def _budgets(raw: dict) -> list[dict]:
    space = SposSpace(raw["nas"]["space"], in_chans=1, input_size=28)
    head = raw["nas"]["space"]["last_channels"] * raw["gallery"]["embed_dim"]
    lo, hi = space.min_macs() + head, space.max_macs() + head
    return [
        {"name": "loose", "macs": lo + 0.7 * (hi - lo)},
        {"name": "tight", "macs": lo + 0.35 * (hi - lo), "latency_ms": 50.0},
        {"name": "loose-copy", "macs": lo + 0.7 * (hi - lo)},  # same caps: same member, trained once
    ]


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_raw_factory, tiny_data, tiny_gallery) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("family")
    raw = tiny_raw_factory()
    raw["nas"]["budgets"] = _budgets(raw)
    raw["nas"]["latency"] = {"repeats": 3, "warmup": 1}
    raw["nas"]["search"].update(population=9, generations=3)
    cfg = build_config(raw)
    train_supernet(cfg, tiny_gallery, root / "supernet", data=tiny_data)
    res = search(cfg, tiny_gallery, root / "supernet" / SUPERNET_FILE, root / "search", data=tiny_data, family=True)
    members = retrain_family(cfg, tiny_gallery, root / "search" / "family.json", root / "members", data=tiny_data)
    exported = export_family(
        read_family(root / "members")[1], root / "members", root / "export", exporter="legacy", latency_runs=3
    )
    torch.set_num_threads(before)
    return {"root": root, "raw": raw, "cfg": cfg, "search": res, "members": members, "export": exported}


def _fits(c: dict, budget: dict) -> bool:
    return c["macs"] <= budget["macs"] and (budget.get("latency_ms") is None or c["latency_ms"] <= budget["latency_ms"])


def test_one_evaluation_per_distinct_architecture_serves_every_budget(family) -> None:
    res = family["search"]
    space = SposSpace(family["raw"]["nas"]["space"], in_chans=1, input_size=28)
    keys = [space.arch_key(c["arch"]) for c in res["candidates"]]
    assert len(keys) == len(set(keys)) == res["n_candidates"] == res["evaluator_calls"]
    budgets = family["raw"]["nas"]["budgets"]
    for c in res["candidates"]:
        assert c["budgets"] == [b["name"] for b in budgets if _fits(c, b)]
        assert c["budgets"], "a candidate outside every budget was evaluated"
    # every budget's best is the best candidate inside it (brute force), ties broken as the search does
    for b in res["budgets"]:
        inside = [c for c in res["candidates"] if b["name"] in c["budgets"]]
        assert b["best"]["fitness"] == max(c["fitness"] for c in inside)


def test_members_respect_their_budgets_by_lut_count_and_latency_table(family) -> None:
    root = family["root"]
    table = LatencyTable.from_dict(json.loads((root / "search" / "latency_table.json").read_text()))
    assert table.meta["runtime"] == "onnxruntime"
    budgets = {b["name"]: b for b in family["raw"]["nas"]["budgets"]}
    exported = family["export"]["members"]
    assert [m["name"] for m in exported] == list(budgets)
    for m in exported:
        cap = budgets[m["name"]]
        assert m["macs"] == m["macs_counted"] <= cap["macs"]  # LUT == counted on the exported model
        assert m["latency_ms_predicted"] == pytest.approx(table.latency_ms(m["arch"]))
        if cap.get("latency_ms") is not None:
            assert m["latency_ms_predicted"] <= cap["latency_ms"]
        assert m["latency_ms_measured"] > 0 and m["parity_max_abs_diff"] <= 1e-4
        assert (root / "export" / m["onnx"]).is_file()
    check = family["export"]["latency_check"]
    assert check["mean_abs_error_pct"] is not None and check["max_abs_error_pct"] >= check["mean_abs_error_pct"]


def test_with_a_floor_every_member_uses_its_budget(family, tiny_data, tiny_gallery) -> None:
    """``nas.family_floor``: each member costs between floor x cap and its cap, so disjoint [floor, cap] ranges
    give distinct architectures; every evaluated candidate lies inside some member's range."""
    raw = {**family["raw"], "nas": {**family["raw"]["nas"], "family_floor": 0.8}}
    raw["nas"]["budgets"] = [b for b in raw["nas"]["budgets"] if b["name"] != "loose-copy"]
    cfg = build_config(raw)
    root = family["root"]
    res = search(cfg, tiny_gallery, root / "supernet" / SUPERNET_FILE, root / "search-floor", data=tiny_data, family=True)
    caps = {b["name"]: b["macs"] for b in raw["nas"]["budgets"]}
    assert caps["tight"] < 0.8 * caps["loose"]  # the two ranges do not overlap
    for b in res["budgets"]:
        assert 0.8 * caps[b["name"]] <= b["best"]["macs"] <= caps[b["name"]]
    assert res["budgets"][0]["best"]["arch"] != res["budgets"][1]["best"]["arch"]
    for c in res["candidates"]:
        assert any(0.8 * caps[n] <= c["macs"] <= caps[n] for n in c["budgets"])


def test_a_member_another_budget_already_has_is_trained_once(family) -> None:
    members = {m["name"]: m for m in family["members"]["members"]}
    assert members["loose-copy"]["arch"] == members["loose"]["arch"]
    assert members["loose-copy"]["model"] == members["loose"]["model"] == "loose/model.safetensors"
    assert not (family["root"] / "members" / "loose-copy").exists()


def test_family_file_served_from_the_export_folder(family) -> None:
    _, doc = read_family(family["root"] / "export")
    assert {m["name"] for m in doc["members"]} == {"loose", "tight", "loose-copy"}
    assert all((family["root"] / "export" / m["onnx"]).is_file() for m in doc["members"])


def test_resuming_a_search_saved_for_other_budgets_is_refused(family, tiny_data, tiny_gallery) -> None:
    raw = json.loads(json.dumps(family["raw"]))
    raw["nas"]["budgets"][1]["macs"] *= 1.1
    cfg = build_config(raw)
    root = family["root"]
    with pytest.raises(CmpnasError, match="saved for other budgets"):
        search(cfg, tiny_gallery, root / "supernet" / SUPERNET_FILE, root / "search", data=tiny_data, family=True)


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "not a query-model family"), ("{}", "not a cmpnas.family.v1 file"), ('{"format": "cmpnas.family.v1", "members": [{}]}', "has no name")],
)
def test_bad_family_files_are_refused(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "family.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CmpnasError, match=match):
        read_family(path)


def test_family_search_without_budgets_is_refused(family, tiny_data, tiny_gallery, tmp_path: Path) -> None:
    raw = json.loads(json.dumps(family["raw"]))
    raw["nas"]["budgets"] = None
    root = family["root"]
    with pytest.raises(CmpnasError, match="needs nas.budgets"):
        search(build_config(raw), tiny_gallery, root / "supernet" / SUPERNET_FILE, tmp_path, data=tiny_data, family=True)
