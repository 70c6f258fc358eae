"""The report's learning check against hand-computed floors."""

from __future__ import annotations

from cmpnas.report.learning_check import learning_check, learning_markdown


def model(name: str, hom: float, het: float) -> dict:
    return {"name": name, "homogeneous": {"top1": hom}, "heterogeneous": {"top1": het}}


def test_near_chance_models_are_named_and_independent_het_is_not_judged() -> None:
    models = [model("good", 80.0, 82.0), model("no-compat", 75.0, 9.0), model("broken", 12.0, 11.0), model("het", 70.0, 20.0)]
    check = learning_check(models, 86.0, 10, {"no-compat"}, 0.2)
    # 10 classes: chance 10; floor 10 + 0.2 x 90 = 28
    assert (check["chance"], check["floor"]) == (10.0, 28.0)
    assert [(f["model"], f["figure"]) for f in check["failed"]] == [
        ("broken", "homogeneous top-1"),
        ("broken", "heterogeneous top-1"),
        ("het", "heterogeneous top-1"),
    ]
    md = "\n".join(learning_markdown(check))
    assert "## Models that did not learn" in md and "**broken**: homogeneous top-1 12.0 %" in md


def test_a_gallery_at_chance_fails_and_all_learned_says_nothing() -> None:
    assert learning_check([], 11.0, 10, set(), 0.2)["failed"] == [
        {"model": "gallery", "figure": "paragon top-1", "value": 11.0}
    ]
    fine = learning_check([model("a", 60.0, 61.0)], 86.0, 10, set(), 0.2)
    assert fine["failed"] == [] and learning_markdown(fine) == []
    assert learning_check([model("a", 1.0, 1.0)], 86.0, None, set(), 0.2) is None


def test_chance_comes_from_the_classes_the_table_was_scored_on(tmp_path) -> None:
    from cmpnas.report.results import table_num_classes

    rows = [{"protocol": {"split": "test", "n_classes": 3}}, {"protocol": {"split": "test", "n_classes": 3}}]
    assert table_num_classes(rows, None) == 3  # an open-set test of 3 classes: chance 33 %, not 1 / training classes
    assert table_num_classes([{"protocol": {"split": "test"}}], None) is None  # older rows, no gallery file
    assert table_num_classes([{"protocol": {"n_classes": 3}}, {"protocol": {"n_classes": 4}}], None) is None
