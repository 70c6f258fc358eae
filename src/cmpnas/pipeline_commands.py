"""`cmpnas run`: the whole pipeline from one command."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from cmpnas import progress
from cmpnas.cli_options import ConfigOpt, JsonOpt, QuietOpt, SetOpt
from cmpnas.errors import CmpnasError


def profile_path(name: str) -> Path:
    """A packaged profile (configs/<name>.yaml)."""
    root = resources.files("cmpnas") / "configs"
    names = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
    if name not in names:
        raise CmpnasError(f"Unknown profile '{name}'.", f"use one of: {', '.join(names)}")
    return Path(str(root / f"{name}.yaml"))


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        config: ConfigOpt = None,
        profile: Annotated[
            str | None,
            typer.Option(
                "--profile", "-p", help="Packaged profile: smoke, default, paper-deepfashion2, paper-ijbc."
            ),
        ] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (a stage per subfolder).")] = Path(
            "runs/default"
        ),
        force: Annotated[
            list[str] | None, typer.Option("--force", help="Rerun this stage (repeatable).")
        ] = None,
        set_: SetOpt = None,
        quiet: QuietOpt = False,
        json_logs: JsonOpt = False,
    ) -> None:
        """Gallery -> baselines -> supernet -> search (R1/R2/R3) -> retrain -> evaluate -> export/index -> report."""
        from cmpnas.cli import _config, _setup
        from cmpnas.pipeline import run_pipeline

        _setup(quiet, json_logs)
        if config is not None and profile is not None:
            raise CmpnasError("Both --config and --profile were given.", "pass only one of them")
        path = config if config is not None else profile_path(profile or "default")
        cfg = _config(path, set_)
        state = run_pipeline(cfg, out, force=force)
        head = state.get("report", {}).get("outputs", {}).get("headline", "")
        progress.event("done", message=f"{head} Report: {out / 'report.html'}")
        if not quiet and not json_logs:
            typer.echo(head)
