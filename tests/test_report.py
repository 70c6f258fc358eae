"""The report's study and environment sections: tables with numbers rounded to what they support, no JSON."""

from __future__ import annotations

from cmpnas.report import _environment_section, _study_section


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
