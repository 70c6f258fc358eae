"""`cmpnas run`: every stage from one config, skipping stages already done for the same inputs.

- :mod:`~cmpnas.pipeline.engine`: the generic run engine (stage keys, skip/resume, ``run_state.json``, the run
  lock, progress events); it knows no CMP-NAS stage.
- :mod:`~cmpnas.pipeline.layout`: the run folder, every stage's name and paths declared once.
- :mod:`~cmpnas.pipeline.graph`: the CMP-NAS stages built from a config, and the adapters that call
  :mod:`cmpnas.stages`.
"""

from __future__ import annotations

from cmpnas.pipeline.engine import (
    STATE_FILE,
    Plan,
    StageDef,
    artifact_problem,
    run_plan,
    stage_key,
    with_dependents,
)
from cmpnas.pipeline.graph import (
    RunContext,
    build_plan,
    build_stages,
    check_one_schedule,
    control_display_name,
    control_names,
    draw_random_controls,
    member_names,
    query_model_dirs,
    run_pipeline,
    seeded,
    table_schedule,
    wants_study,
)
from cmpnas.pipeline.graph import _clear_stage as _clear_stage
from cmpnas.pipeline.layout import (
    FAMILY_EXPORT,
    FAMILY_SEARCH,
    RunLayout,
    seed_folder,
    seed_suffix,
    split_seed,
    stage_paths,
)

__all__ = [
    "FAMILY_EXPORT",
    "FAMILY_SEARCH",
    "STATE_FILE",
    "Plan",
    "RunContext",
    "RunLayout",
    "StageDef",
    "artifact_problem",
    "build_plan",
    "build_stages",
    "check_one_schedule",
    "control_display_name",
    "control_names",
    "draw_random_controls",
    "member_names",
    "query_model_dirs",
    "run_pipeline",
    "run_plan",
    "seed_folder",
    "seed_suffix",
    "seeded",
    "split_seed",
    "stage_key",
    "stage_paths",
    "table_schedule",
    "wants_study",
    "with_dependents",
]
