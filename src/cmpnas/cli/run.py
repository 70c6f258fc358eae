"""Command ``run``: the whole pipeline from one config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmpnas import progress
from cmpnas.cli.options import ConfigOpt, SetOpt, logged
from cmpnas.config import load_config, profile_path
from cmpnas.errors import CmpnasError
from cmpnas.pipeline import run_pipeline


@logged
def run_cmd(
    config: ConfigOpt = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", "-p", help="Packaged profile: smoke, default, full, paper-deepfashion2, paper-ijbc."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (a stage per subfolder).")] = Path(
        "runs/default"
    ),
    force: Annotated[
        list[str] | None,
        typer.Option("--force", help="Rerun this stage and every stage that uses it (repeatable)."),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="Train every query model once per seed, e.g. 0,1,2 (sets run.seeds; seed s trains with the "
            "stage's training seed + s). The report gives mean ± std and paired comparisons over seeds.",
        ),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Gallery -> baselines -> supernet -> search (R1/R2/R3) -> retrain -> evaluate -> export/index -> report."""
    if config is not None and profile is not None:
        raise CmpnasError("Both --config and --profile were given.", "pass only one of them")
    path = config if config is not None else profile_path(profile or "default")
    overrides = list(set_ or []) + ([f"run.seeds={parse_seeds(seeds)}"] if seeds is not None else [])
    cfg = load_config(path, overrides)
    state = run_pipeline(cfg, out, force=force)
    head = state.get("report", {}).get("outputs", {}).get("headline", "")
    progress.event("done", message=f"{head} Report: {out / 'report.html'}")
    if progress.human():
        typer.echo(head)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; anything else is a user error with the fix."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CmpnasError(
            f"--seeds '{text}' is not a comma-separated list of integers.", "write e.g. --seeds 0,1,2"
        ) from None


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
