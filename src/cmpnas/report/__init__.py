"""The run report: results.json, report.md and a self-contained report.html (PNG plots inlined).

Every number says which split it comes from: the query-model table and the paired comparisons are on the test
split; the search rewards, the study and the scores that choose "the best" model of a group are on the
validation split. With several seeds (``run.seeds``) a model's numbers are mean ± sample std over its seeds, and
models are compared paired by seed (``cmpnas.evaluation.stats``).

Modules: ``write`` (write_report), ``results`` (results.json), ``summary`` (one entry per model, the headline),
``comparisons`` (which models are compared, paired by seed), ``sections`` (report.md), ``tables`` (the one
Markdown table builder), ``family``, ``supernet`` and ``learning_check`` (their sections), ``figures``, ``html``.
"""

from cmpnas.report.comparisons import CONTROL_KIND
from cmpnas.report.family import budget_use_notes
from cmpnas.report.figures import backfill_figure, family_figure
from cmpnas.report.summary import summarize_models
from cmpnas.report.write import ReportInputs, write_report

__all__ = [
    "CONTROL_KIND",
    "backfill_figure",
    "budget_use_notes",
    "family_figure",
    "summarize_models",
    "ReportInputs",
    "write_report",
]
