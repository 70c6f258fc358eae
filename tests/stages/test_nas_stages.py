"""CMP-NAS stages on a tiny space: supernet -> search (R3) -> retrain; budget, resume and mismatch errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmpnas.config import build_config
from cmpnas.errors import CmpnasError
from cmpnas.models.cost import count_macs
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint, load_model, save_model
from cmpnas.models.spaces.spos import SposSpace
from cmpnas.stages import retrain, search, train_supernet
from cmpnas.stages.supernet import SUPERNET_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING_KEYS = {"seconds", "evaluator_timings", "evaluator_calls"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_raw_factory, tiny_data, tiny_gallery):
    """supernet -> search (R3) -> retrain once for the module (each takes about a second)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("nas")
    cfg = build_config(tiny_raw_factory())
    sup = train_supernet(cfg, tiny_gallery, root / "supernet", data=tiny_data)
    res = search(cfg, tiny_gallery, root / "supernet" / SUPERNET_FILE, root / "search", data=tiny_data)
    ret = retrain(cfg, tiny_gallery, root / "search" / "search.json", root / "retrain", data=tiny_data)
    torch.set_num_threads(before)
    return {"root": root, "cfg": cfg, "supernet": sup, "search": res, "retrain": ret}


def tiny_space(raw: dict) -> SposSpace:
    return SposSpace(raw["nas"]["space"], in_chans=1, input_size=28)


def head_macs(raw: dict) -> int:
    """The query model's embedding head: Linear(last_channels -> embed_dim), no bias."""
    return raw["nas"]["space"]["last_channels"] * raw["gallery"]["embed_dim"]


def without_timings(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in TIMING_KEYS}
    out["history"] = [{k: v for k, v in h.items() if k != "wall_time_s"} for h in result["history"]]
    return out


# ---------------------------------------------------------------------------------------------- the chain
def test_supernet_outputs_and_budget(chain, tiny_raw: dict, tiny_gallery: Path) -> None:
    folder = chain["root"] / "supernet"
    assert {SUPERNET_FILE, "config.yaml", "manifest.json", "metrics.jsonl", "checkpoint.pt"} <= {
        p.name for p in folder.iterdir()
    }
    gallery = load_model(tiny_gallery)
    g_macs = count_macs(gallery, gallery.input_shape(1))
    sup = chain["supernet"]
    assert sup["gallery_macs"] == g_macs
    assert sup["budget_macs"] == pytest.approx(g_macs / tiny_raw["nas"]["budget_cost_reduction"])
    space = tiny_space(tiny_raw)
    # the budget binds: some archs of the space are too expensive, the cheapest one fits
    assert (
        space.min_macs() + head_macs(tiny_raw) < sup["budget_macs"] < space.max_macs() + head_macs(tiny_raw)
    )
    assert sup["train"]["steps"] > 0


def test_search_respects_budget_and_never_evaluates_twice(chain, tiny_raw: dict) -> None:
    res = chain["search"]
    space = tiny_space(tiny_raw)
    budget = res["budget_macs"]
    assert res["reward"] == "R3"
    assert len(res["history"]) == tiny_raw["nas"]["search"]["generations"]
    keys = [space.arch_key(c["arch"]) for c in res["candidates"]]
    assert len(keys) == len(set(keys)) == res["n_candidates"] == res["evaluator_calls"]
    for c in res["candidates"]:
        assert c["macs"] == space.macs(c["arch"]) + head_macs(tiny_raw) <= budget
        assert c["fitness"] == pytest.approx(0.5 * c["het_top1"] + 0.5 * c["hom_top1"])
    best = res["best"]
    assert best["fitness"] == max(c["fitness"] for c in res["candidates"])
    assert best["macs"] <= budget
    json.loads((chain["root"] / "search" / "search.json").read_text())  # written, valid JSON


def test_pareto_front_is_non_dominated(chain) -> None:
    res = chain["search"]
    front = res["pareto_front"]
    assert front
    for p in front:
        dominating = [
            c for c in res["candidates"]
            if c["macs"] <= p["macs"] and c["het_top1"] >= p["het_top1"]
            and (c["macs"] < p["macs"] or c["het_top1"] > p["het_top1"])
        ]  # fmt: skip
        assert not dominating, p


def test_retrain_builds_the_found_arch_with_the_lut_cost(chain, tiny_gallery: Path) -> None:
    model = load_model(chain["root"] / "retrain" / "model.safetensors")
    best = chain["search"]["best"]
    assert model.spec.backbone == "spos"
    assert model.spec.arch == best["arch"]
    assert model.spec.compatible_with == fingerprint(load_model(tiny_gallery))
    assert count_macs(model, model.input_shape(1)) == best["macs"] == chain["retrain"]["macs"]
    manifest = json.loads((chain["root"] / "retrain" / "manifest.json").read_text())
    assert manifest["stage"] == "retrain"


# ---------------------------------------------------------------------------------------------- budget
def test_budget_below_the_cheapest_arch_is_refused_with_its_cost(
    tmp_path: Path, tiny_raw: dict, tiny_data, tiny_gallery: Path, chain
) -> None:
    cheapest = tiny_space(tiny_raw).min_macs() + head_macs(tiny_raw)
    tiny_raw["nas"]["budget_macs"] = cheapest * 0.9
    cfg = build_config(tiny_raw)
    for run in (
        lambda out: train_supernet(cfg, tiny_gallery, out, data=tiny_data),
        lambda out: search(
            cfg, tiny_gallery, chain["root"] / "supernet" / SUPERNET_FILE, out, data=tiny_data
        ),
    ):
        out = tmp_path / "out"
        with pytest.raises(CmpnasError) as exc:
            run(out)
        assert f"{cheapest / 1e6:.3f} M MACs" in str(exc.value)
        assert "budget" in exc.value.fix
        assert not out.exists()


# ---------------------------------------------------------------------------------------------- resume
def test_resumed_search_ends_exactly_like_an_uninterrupted_one(
    chain, tiny_raw: dict, tiny_data, tiny_gallery
):
    supernet = chain["root"] / "supernet" / SUPERNET_FILE
    root = chain["root"]
    tiny_raw["nas"]["search"]["generations"] = 4
    full_cfg = build_config(tiny_raw)
    tiny_raw["nas"]["search"]["generations"] = 2
    short_cfg = build_config(tiny_raw)

    uninterrupted = search(full_cfg, tiny_gallery, supernet, root / "full", data=tiny_data)
    first = search(short_cfg, tiny_gallery, supernet, root / "killed", data=tiny_data)  # "killed" after gen 2
    resumed = search(full_cfg, tiny_gallery, supernet, root / "killed", data=tiny_data)

    assert len(first["history"]) == 2 and len(resumed["history"]) == 4
    assert without_timings(resumed) == without_timings(uninterrupted)
    # nothing evaluated twice across the interruption
    assert first["evaluator_calls"] + resumed["evaluator_calls"] == uninterrupted["evaluator_calls"]
    state = json.loads((root / "killed" / "search_state.json").read_text())
    assert state["generation"] == 4


def test_search_refuses_a_state_from_a_different_search_config(
    chain, tiny_raw, tiny_data, tiny_gallery
) -> None:
    supernet = chain["root"] / "supernet" / SUPERNET_FILE
    out = chain["root"] / "changed"
    search(build_config(tiny_raw), tiny_gallery, supernet, out, data=tiny_data)
    tiny_raw["nas"]["search"]["mutation_prob"] = 0.5
    with pytest.raises(CmpnasError, match="mutation_prob"):
        search(build_config(tiny_raw), tiny_gallery, supernet, out, data=tiny_data)


@pytest.mark.parametrize(("reward", "field"), [("R1", "hom_top1"), ("R2", "het_top1")])
def test_single_metric_rewards(
    chain, tiny_raw, tiny_data, tiny_gallery, tmp_path: Path, reward, field
) -> None:
    tiny_raw["nas"]["search"].update({"reward": reward, "generations": 1})
    supernet = chain["root"] / "supernet" / SUPERNET_FILE
    res = search(build_config(tiny_raw), tiny_gallery, supernet, tmp_path / reward, data=tiny_data)
    assert res["best"]["fitness"] == res["best"]["metrics"][field] == max(c[field] for c in res["candidates"])


# ---------------------------------------------------------------------------------------------- mismatches
def _mismatch_case(
    case: str, raw: dict, tmp_path: Path, chain, tiny_gallery: Path
) -> tuple[dict, Path, Path, str]:
    supernet = chain["root"] / "supernet" / SUPERNET_FILE
    if case == "space":
        raw["nas"]["space"]["channel_scales"] = [0.5, 1.0, 1.5]
        return raw, tiny_gallery, supernet, "'space'"
    if case == "gallery":
        torch.manual_seed(5)
        other = tmp_path / "other-gallery" / "model.safetensors"
        save_model(EmbeddingModel(ModelSpec(**raw["gallery"])), other)
        return raw, other, supernet, "'gallery_fingerprint'"
    if case == "not_a_supernet":
        return raw, tiny_gallery, tiny_gallery, "not a cmpnas supernet"
    return raw, tiny_gallery, tmp_path / "missing.safetensors", "does not exist"


@pytest.mark.parametrize("case", ["space", "gallery", "not_a_supernet", "missing"])
def test_supernet_that_does_not_match_is_refused(
    case, chain, tiny_raw, tiny_data, tiny_gallery, tmp_path
) -> None:
    raw, gallery, supernet, needle = _mismatch_case(case, tiny_raw, tmp_path, chain, tiny_gallery)
    out = tmp_path / "search"
    with pytest.raises(CmpnasError, match=needle):
        search(build_config(raw), gallery, supernet, out, data=tiny_data)
    assert not out.exists()


def test_resuming_a_supernet_with_another_space_is_refused(chain, tiny_raw, tiny_data, tiny_gallery) -> None:
    folder = chain["root"] / "supernet"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    tiny_raw["nas"]["space"]["channel_scales"] = [0.5, 1.0, 1.5]
    with pytest.raises(CmpnasError, match="different run"):
        train_supernet(build_config(tiny_raw), tiny_gallery, folder, resume=True, data=tiny_data)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def _kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b from its definition (concordant minus discordant pairs, tie-corrected); NaN when one
    side is constant (no ranking to correlate), as scipy."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    conc = disc = tie_x = tie_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif dx * dy > 0:
                conc += 1
            else:
                disc += 1
    return (conc - disc) / ((conc + disc + tie_x) * (conc + disc + tie_y)) ** 0.5


def test_study_with_three_archs_computes_its_rank_correlations(chain, tmp_path: Path, tiny_data, tiny_gallery) -> None:
    from cmpnas.stages import study

    cfg = chain["cfg"]
    res = study(cfg, tiny_gallery, tmp_path / "study", supernet_path=chain["root"] / "supernet" / SUPERNET_FILE,
                data=tiny_data, n_archs=3)
    assert res["n_archs"] == 3
    bct = [r for r in res["rows"] if r["mode"] == "bct"]
    assert len(bct) == 3 and res["bct"]["n"] == 3
    hom, het = [r["hom_top1"] for r in bct], [r["het_top1"] for r in bct]
    sup, sup_hom = [r["supernet_het_top1"] for r in bct], [r["supernet_hom_top1"] for r in bct]
    for key, x, y in (
        ("hom_het", hom, het), ("supernet_vs_standalone_het", sup, het), ("supernet_vs_standalone_hom", sup_hom, hom)
    ):  # fmt: skip
        assert res["bct"][f"kendall_{key}"] == _or_none(_kendall_tau_b(x, y)), key
        assert res["bct"][f"spearman_{key}"] == _or_none(_spearman_rho(x, y)), key
    assert res["bct"]["het_spread"] == pytest.approx(max(het) - min(het))
    assert json.loads((tmp_path / "study" / "study.json").read_text())["n_archs"] == 3


def test_ranking_set_spreads_over_the_search_band_and_measures_the_supernet(
    chain, tmp_path: Path, tiny_data, tiny_gallery
) -> None:
    """``nas.ranking_archs``: BCT-only archs over [sample_band*cap, cap], none repeated from the study, whose
    stand-alone top-1 is ranked against the supernet's estimates (τ/ρ against the oracles above)."""
    from cmpnas.stages import study
    from cmpnas.stages.common import nas_setup

    cfg = chain["cfg"].model_copy(deep=True)
    cfg.nas.ranking_archs, cfg.nas.study_modes, cfg.nas.sample_band = 3, ["bct"], 0.5
    res = study(cfg, tiny_gallery, tmp_path / "study", supernet_path=chain["root"] / "supernet" / SUPERNET_FILE,
                data=tiny_data, n_archs=1)
    setup = nas_setup(cfg, tiny_gallery, tiny_data)
    study_rows = [r for r in res["rows"] if r["set"] == "study"]
    ranked = [r for r in res["rows"] if r["set"] == "ranking"]
    assert [r["mode"] for r in study_rows] == ["bct"]  # study_modes: no independent training
    assert len(ranked) == 3 and all(r["mode"] == "bct" for r in ranked)
    assert {r["arch_key"] for r in ranked}.isdisjoint(r["arch_key"] for r in study_rows)
    assert all(0.5 * setup.budget <= r["macs"] <= setup.budget for r in ranked), [r["macs"] for r in ranked]
    sup, het = [r["supernet_het_top1"] for r in ranked], [r["het_top1"] for r in ranked]
    assert res["ranking"]["n"] == 3
    assert res["ranking"]["kendall_supernet_vs_standalone_het"] == _or_none(_kendall_tau_b(sup, het))
    assert res["ranking"]["spearman_supernet_vs_standalone_het"] == _or_none(_spearman_rho(sup, het))
    assert res["bct"]["n"] == 1  # the study's own statistics do not mix in the ranking set
    assert sorted(p.name for p in (tmp_path / "study").iterdir() if p.is_dir()) == [
        "arch000_bct", "rank000_bct", "rank001_bct", "rank002_bct"
    ]  # fmt: skip


def _average_ranks(x: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their positions."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman_rho(x: list[float], y: list[float]) -> float:
    """Pearson correlation of the average ranks (NaN when one side is constant)."""
    rx, ry = _average_ranks(x), _average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def _or_none(value: float) -> object:
    """The study stores an undefined correlation as None (JSON has no NaN); compare within 1e-9."""
    return None if value != value else pytest.approx(value, abs=1e-9)


def test_kendall_oracle_on_a_hand_example() -> None:
    assert _kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
    assert _kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert _kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert _spearman_rho([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert _spearman_rho([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ranks 1, 2.5, 2.5, 4


def test_search_under_a_latency_cap_times_query_models_in_onnx_runtime(
    chain, tiny_raw_factory, tiny_data, tiny_gallery, tmp_path: Path
) -> None:
    """The cap is on the predicted ORT latency of the whole query model (backbone + embedding head)."""
    raw = tiny_raw_factory()
    raw["nas"]["budget_latency_ms"] = 100.0  # loose: the point is the wiring, not a binding cap
    cfg = build_config(raw)
    supernet = chain["root"] / "supernet" / SUPERNET_FILE
    res = search(cfg, tiny_gallery, supernet, tmp_path / "search", data=tiny_data)
    best = res["best"]
    assert best["latency_ms"] is not None and 0 < best["latency_ms"] <= 100.0


def test_ranking_protocol_two_seeds_stratified(chain, tmp_path: Path, tiny_data, tiny_gallery) -> None:
    """Two seeds per ranking arch: per-arch rows kept, split-half reliability, ceiling, MACs-only tau, a verdict."""
    from cmpnas.evaluation.ranking import ranking_report
    from cmpnas.stages import study
    from cmpnas.stages.common import nas_setup

    cfg = chain["cfg"].model_copy(deep=True)
    cfg.nas.ranking_archs, cfg.nas.ranking_seeds, cfg.nas.study_modes = 4, [0, 1], ["bct"]
    res = study(cfg, tiny_gallery, tmp_path / "study", supernet_path=chain["root"] / "supernet" / SUPERNET_FILE,
                data=tiny_data, n_archs=0)
    setup = nas_setup(cfg, tiny_gallery, tiny_data)
    ranking = res["ranking"]
    assert ranking["n"] == 4 and ranking["seeds"] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "study").iterdir() if p.is_dir()) == sorted(
        [f"rank00{i}_bct" for i in range(4)] + [f"rank00{i}_bct_s1" for i in range(4)]
    )
    archs = ranking["archs"]
    assert all(len(a["standalone"]) == 2 and [s["seed"] for s in a["standalone"]] == [0, 1] for a in archs)
    # stratified: two archs in each half of the band [0.5 x budget, budget]
    mid = 0.75 * setup.budget
    assert sorted(a["macs"] <= mid for a in archs) == [False, False, True, True]
    het = ranking["heterogeneous"]
    expect = ranking_report(
        [a["supernet"]["het_top1"] for a in archs],
        [a["macs"] for a in archs],
        np.array([[s["het_top1"] for s in a["standalone"]] for a in archs]),
        np.array([[s["het_map"] for s in a["standalone"]] for a in archs]),
    )
    assert {k: het[k] for k in expect} == expect
    assert set(het["split_half"]) == {"r1", "r2", "tau_ceiling"}
    assert het["verdict"]["verdict"] in {"pass", "fail", "not measurable"}


def test_a_space_with_one_scale_per_stage_searches_and_retrains(
    tmp_path: Path, tiny_raw: dict, tiny_data, tiny_gallery: Path
) -> None:
    from cmpnas.models.spaces import create_space

    raw = json.loads(json.dumps(tiny_raw))
    raw["nas"]["space"]["name"] = "spos-stage"
    cfg = build_config(raw)
    train_supernet(cfg, tiny_gallery, tmp_path / "supernet", data=tiny_data)
    res = search(cfg, tiny_gallery, tmp_path / "supernet" / SUPERNET_FILE, tmp_path / "search", data=tiny_data)
    space = create_space(raw["nas"]["space"], in_chans=1, input_size=28)
    for c in res["candidates"]:  # validate refuses a stage with two scales
        assert space.validate(c["arch"]) == c["arch"] and c["macs"] <= res["budget_macs"]
    ret = retrain(cfg, tiny_gallery, tmp_path / "search" / "search.json", tmp_path / "retrain", data=tiny_data)
    model = load_model(tmp_path / "retrain" / "model.safetensors")
    assert model.spec.arch == res["best"]["arch"]
    assert count_macs(model, model.input_shape(1)) == res["best"]["macs"] == ret["macs"]


def test_a_supernet_scores_another_space_over_the_same_layers_only(chain, tiny_raw: dict) -> None:
    from safetensors.torch import load_file

    from cmpnas.models.spaces import create_space
    from cmpnas.nas.supernet import load_supernet

    path = chain["root"] / "supernet" / SUPERNET_FILE
    per_stage = create_space({**tiny_raw["nas"]["space"], "name": "spos-stage"}, in_chans=1, input_size=28)
    supernet, _ = load_supernet(path, {}, per_stage)
    assert supernet.space is per_stage
    saved = load_file(str(path))
    assert all(torch.equal(v, saved[k]) for k, v in supernet.state_dict().items())

    wider = {**tiny_raw["nas"]["space"], "channel_scales": [0.5, 1.0, 1.5]}
    with pytest.raises(CmpnasError, match="other layers"):
        load_supernet(path, {}, create_space(wider, in_chans=1, input_size=28))
