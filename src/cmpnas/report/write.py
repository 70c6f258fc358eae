"""write_report: a run's stage outputs -> results.json, report.md and a self-contained report.html.

The report reads what the stages wrote and runs none of them; what only the pipeline knows (where each stage's
output is, how the upgrade stage renders its table) is passed in: the run-folder layout makes the
:class:`ReportInputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmpnas.config import Config
from cmpnas.io import write_json_atomic, write_text_atomic
from cmpnas.report.family import family_markdown, family_rows
from cmpnas.report.figures import backfill_figure, family_figure, png, report_plots
from cmpnas.report.html import report_html
from cmpnas.report.int8 import int8_markdown, int8_summary
from cmpnas.report.results import build_results, load_output, table_num_classes
from cmpnas.report.sections import report_markdown
from cmpnas.report.summary import summarize_models


@dataclass(frozen=True)
class ReportInputs:
    """The stage outputs a report reads (a missing file is a stage that did not run)."""

    rows: Path  # the evaluate stage's rows
    searches: dict[str, Path]  # reward -> its search's result
    study: Path
    upgrade: Path  # the upgrade evaluation's results
    family: Path  # the exported family's document
    int8: Path  # the int8 export's report
    # the gallery's model file, whose class count sets the learning check's chance level when the evaluated rows
    # do not record their split's classes (None: no learning check)
    gallery_model: Path | None = None


def write_report(
    out: Path,
    cfg: Config,
    state: dict[str, Any],
    inputs: ReportInputs,
    *,
    upgrade_markdown: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Write the run's report into ``out`` and return what was written.

    ``upgrade_markdown``: how the upgrade stage renders its results (None: the upgrade's numbers go to
    results.json and its figure to the HTML, without a Markdown section).
    """
    rows = load_output(inputs.rows) or []
    searches = {r: load_output(path) for r, path in inputs.searches.items()}
    searches = {k: v for k, v in searches.items() if v}
    study = load_output(inputs.study)
    upgrade = load_output(inputs.upgrade)
    family = load_output(inputs.family)
    int8 = load_output(inputs.int8)
    models = summarize_models(rows)
    results = build_results(
        cfg, rows, models, searches, study, state, table_num_classes(rows, inputs.gallery_model)
    )
    if upgrade:
        results["upgrade"] = upgrade
    if family:
        results["family"] = {
            "members": family_rows(models, family, results["paired_comparisons"]),
            "latency_check": family.get("latency_check"),
            "references": family.get("references", []),
            "split": "test",
        }
    if int8:
        results["int8"] = int8_summary(int8)
    write_json_atomic(out / "results.json", results)
    markdown = report_markdown(cfg, results, searches, study)
    if upgrade and upgrade_markdown is not None:
        markdown += "\n## Gallery-model upgrade\n\n" + upgrade_markdown(upgrade)
    if family:
        markdown += "\n## Query-model family (one search, several budgets)\n\n" + family_markdown(
            results["family"]["members"], family.get("latency_check")
        )
    if int8:
        markdown += "\n## int8 query model (beside the fp32 export)\n\n" + int8_markdown(results["int8"])
    write_text_atomic(out / "report.md", markdown)
    plots = report_plots(models, results["gallery"], searches, study)
    if upgrade:
        plots["backfill_curve"] = png(backfill_figure(upgrade))
    if family and models and results["gallery"]:
        plots["family"] = png(family_figure(models, results["gallery"], family, cfg.run.baselines))
    write_text_atomic(out / "report.html", report_html(markdown, plots))
    return {
        "results": "results.json",
        "report_md": "report.md",
        "report_html": "report.html",
        "headline": results["headline"],
        "plots": sorted(plots),
    }
