"""The report's study and environment sections: tables with numbers rounded to what they support, no JSON."""

from __future__ import annotations

from cmpnas.report.sections import environment_section as _environment_section
from cmpnas.report.sections import study_section as _study_section


def _study() -> dict:
    rows = [{"mode": "bct", "set": "study", "het_top1": h, "hom_top1": h - 1} for h in (80.0, 82.0, 81.0)]
    rows.append({"mode": "bct", "set": "ranking", "het_top1": 10.0, "hom_top1": 9.0})  # not a study arch
    return {
        "budget_macs": 1.6e6,
        "band": 0.05,
        "bct": {"n": 3, "het_mean": 81.0, "het_spread": 2.0, "kendall_hom_het": 1 / 3, "spearman_hom_het": 0.5,
                "fraction_compatible": 2 / 3, "kendall_supernet_vs_standalone_het": -0.333333,
                "spearman_supernet_vs_standalone_het": -0.5, "kendall_supernet_vs_standalone_hom": 1.0,
                "spearman_supernet_vs_standalone_hom": 1.0},
        "independent": {"n": 0},
        "ranking": {"n": 12, "macs_range": [0.8e6, 1.6e6], "kendall_supernet_vs_standalone_het": 0.5454,
                    "spearman_supernet_vs_standalone_het": 0.7, "kendall_supernet_vs_standalone_hom": None},
        "rows": rows,
    }  # fmt: skip


def test_study_section_is_tables_rounded_by_hand() -> None:
    md = "\n".join(_study_section(_study()))
    assert "at 1.60 MMACs ± 5 %" in md
    # mean 81.0, sample std of (80, 82, 81) = 1.0, range 2.0, τ 0.33, ρ 0.50, 2 of 3 compatible
    assert "| bct | 3 | 81.0 ± 1.0 | 2.0 | 0.33 | 0.50 | 67 % |" in md
    assert "| independent |" not in md  # no independent archs: no row
    assert "| study archs (BCT) | 3 | -0.33 | -0.50 | 1.00 | 1.00 |" in md
    assert "| ranking set (0.80-1.60 MMACs) | 12 | 0.55 | 0.70 | n/a | n/a |" in md


def test_environment_is_a_table_not_json() -> None:
    md = "\n".join(_environment_section({"cpu": "AMD EPYC", "threads": 2, "torch": "2.14.1", "faiss": None}))
    assert "| CPU | AMD EPYC |" in md and "| torch threads | 2 |" in md and "| torch | 2.14.1 |" in md
    assert "faiss" not in md and "{" not in md


# ---------------------------------------------------------------------------------------------- best on validation
SMALL = {"backbone": "resnet_small", "embed_dim": 16, "backbone_kwargs": {"widths": [4, 8], "depths": [1, 1]}}
CONTROL = "control-random"
R3, R1 = "CMP-NAS R3 (searched, BCT)", "CMP-NAS R1 (searched, BCT)"
# name -> (kind, MACs, het top-1 on test, het top-1 on validation): on test the other model of each group wins
MODELS = {
    R3: ("searched-R3", 1000, 80.0, 78.0),
    R1: ("searched-R1", 1000, 79.0, 77.0),
    "stock-a": ("baseline", 900, 90.0, 60.0),
    "stock-b": ("baseline", 900, 70.0, 75.0),
    "stock-big": ("baseline", 2000, 99.0, 99.0),  # costs more than R3: never its competitor
    "matched-a": ("baseline", 1000, 85.0, 50.0),
    "matched-b": ("baseline", 800, 80.0, 70.0),
    "random arch 0 (same space, BCT)": (CONTROL, 950, 88.0, 40.0),
    "random arch 1 (same space, BCT)": (CONTROL, 990, 60.0, 80.0),
}


def _config(tiny_raw: dict, seeds: list[int] = (0,)):  # type: ignore[no-untyped-def]
    from cmpnas.config import build_config

    stems = {"stock-a": "stock", "stock-b": "stock", "stock-big": "stock", "matched-a": "matched", "matched-b": "matched"}
    tiny_raw["run"].update(seeds=list(seeds), random_controls=2, rewards=["R1", "R3"])
    tiny_raw["run"]["baselines"] = [{"name": n, "compat": "bct", "stem": s, "model": SMALL} for n, s in stems.items()]
    return build_config(tiny_raw)


def _models() -> list[dict]:
    return [
        {"name": n, "kind": k, "macs": macs, "heterogeneous": {"top1": test},
         "validation": {"split": "val", "heterogeneous_top1": val, "homogeneous_top1": val - 1.0}}
        for n, (k, macs, test, val) in MODELS.items()
    ]  # fmt: skip


def test_the_best_of_a_group_is_chosen_on_validation_not_on_test(tiny_raw: dict) -> None:
    from cmpnas.report.comparisons import comparison_pairs as _pairs

    pairs = {p.against: p for p in _pairs(_config(tiny_raw), _models()) if p.a == R3 and p.against}
    assert pairs["stock"].b == "stock-b"  # stock-a is the best on test, stock-big costs more than R3
    assert pairs["matched"].b == "matched-b"  # matched-a is the best on test
    assert pairs["random"].b == "random arch 1 (same space, BCT)"  # random arch 0 is the best on test
    assert all(p.chosen_on == "val" and "chosen on validation" in p.why for p in pairs.values())
    assert len(pairs) == 3


def test_without_validation_scores_nothing_is_chosen(tiny_raw: dict) -> None:
    from cmpnas.report.comparisons import comparison_pairs as _pairs

    models = [{**m, "validation": None} for m in _models()]
    assert [(p.a, p.b) for p in _pairs(_config(tiny_raw), models)] == [(R3, R1)]


def _row(name: str, seed: int) -> dict:
    kind, macs, test, val = MODELS[name]
    test, val = test + seed, val + (seed if name != "stock-b" else -seed)  # 2 seeds: a spread, one pair moves
    m = lambda top1: {"top1": top1, "map": top1 - 10}  # noqa: E731
    return {
        "query": {"name": name, "kind": kind, "seed": seed, "macs": macs, "latency_ms_b1": 1.0,
                  "fingerprint": f"{name}-{seed}"},
        "gallery": {"name": "g", "macs": 100_000, "fingerprint": "g", "latency_ms_b1": 3.0},
        "paragon": m(95.0), "homogeneous": m(test - 2), "heterogeneous": m(test),
        "gap_to_paragon": {"top1": 95.0 - test, "map": 95.0 - test}, "cost_reduction": 100.0, "compatible": True,
        "protocol": {"name": "leave_one_out", "split": "test", "n_images": 100},
        "validation": {"split": "val", "n_images": 50, "heterogeneous_top1": val, "homogeneous_top1": val - 2},
    }  # fmt: skip


def test_the_report_says_what_the_search_buys(tmp_path, tiny_raw: dict) -> None:
    import json

    from cmpnas.pipeline.layout import RunLayout
    from cmpnas.report import write_report

    (tmp_path / "evaluation").mkdir()
    rows = [_row(n, s) for n in MODELS for s in (0, 1)]
    (tmp_path / "evaluation" / "rows.json").write_text(json.dumps(rows))
    cfg = _config(tiny_raw, [0, 1])
    write_report(tmp_path, cfg, {}, RunLayout(tmp_path).report_inputs(cfg.run.rewards))
    results = json.loads((tmp_path / "results.json").read_text())
    stock = next(m for m in results["query_models"] if m["name"] == "stock-b")
    assert stock["validation"]["heterogeneous_top1"] == 74.5  # 75 and 74: the mean over seeds chooses
    versus = {c["against"]: c for c in results["paired_comparisons"] if c["a"] == R3 and c["against"]}
    assert {k: c["b"] for k, c in versus.items()} == {
        "random": "random arch 1 (same space, BCT)", "matched": "matched-b", "stock": "stock-b",
    }  # fmt: skip
    assert {c["chosen_on"] for c in versus.values()} == {"val"} and versus["stock"]["split"] == "test"
    # R3 - random arch 1 on test = 80 - 60 on both seeds: +20.0 [+20.0, +20.0]
    said = results["what_the_search_buys"]
    assert said[0].startswith(
        "Search vs a random architecture from the same space (the best of 2, chosen on validation): +20.0 "
    )
    assert said[1].startswith(
        "Search vs the best hand-designed model with the search space's stem at <= its MACs (matched-b, chosen "
        "on validation): 0.0 "
    )
    assert said[2].startswith("Search vs the best hand-designed model with a stock stem at <= its MACs (stock-b")
    md = (tmp_path / "report.md").read_text()
    section = md.split("## What the search buys", 1)[1].split("\n## ", 1)[0]
    assert all(s in section for s in said) and "test split" in section.splitlines()[0]
    assert "Stem-matched hand-designed rows" in md and "matched-a, matched-b" in md


def test_family_budget_use_names_unused_caps_and_shared_archs() -> None:
    from cmpnas.report import budget_use_notes

    a, b = {"blocks": [0], "scales": [1.0]}, {"blocks": [1], "scales": [0.5]}
    rows = [
        {"name": "40x", "budget_used": 0.485, "arch": a},  # 1.64 of a 3.38 MMACs cap
        {"name": "80x", "budget_used": 0.97, "arch": a},
        {"name": "160x", "budget_used": 0.99, "arch": b},
    ]
    assert budget_use_notes(rows) == [
        "Member 40x uses 48 % of its MACs cap (under 70 %): the search found nothing it scored higher with more room.",
        "Members 40x and 80x got the same architecture.",
    ]
    assert budget_use_notes([rows[1], rows[2]]) == []
