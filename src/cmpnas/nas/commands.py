"""CLI commands of the architecture search: train-supernet, search, retrain, study."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmpnas import progress
from cmpnas.cli_options import (
    ConfigOpt,
    GalleryOpt,
    JsonOpt,
    OutOpt,
    QuietOpt,
    ResumeOpt,
    SetOpt,
    SupernetOpt,
)


def register(app: typer.Typer) -> None:
    from cmpnas.cli import _config, _setup

    @app.command("train-supernet")
    def train_supernet_cmd(
        gallery: GalleryOpt,
        out: OutOpt,
        config: ConfigOpt = None,
        set_: SetOpt = None,
        resume: ResumeOpt = False,
        quiet: QuietOpt = False,
        json_logs: JsonOpt = False,
    ) -> None:
        """Train the one-shot SPOS supernet with the BCT loss against the frozen gallery classifier."""
        _setup(quiet, json_logs)
        from cmpnas.nas.stages import train_supernet

        res = train_supernet(_config(config, set_), gallery, out, resume=resume)
        progress.event(
            "done",
            message=f"supernet: {out / 'supernet.safetensors'} (budget "
            f"{res.get('budget_macs', 0) / 1e6:.3f} MMACs)",
        )

    @app.command("search")
    def search_cmd(
        gallery: GalleryOpt,
        supernet: SupernetOpt,
        out: OutOpt,
        config: ConfigOpt = None,
        reward: Annotated[
            str | None,
            typer.Option(
                "--reward", help="R1 (homogeneous), R2 (heterogeneous) or R3 (weighted both; default)."
            ),
        ] = None,
        set_: SetOpt = None,
        fresh: Annotated[bool, typer.Option("--fresh", help="Ignore a saved search state.")] = False,
        quiet: QuietOpt = False,
        json_logs: JsonOpt = False,
    ) -> None:
        """Evolutionary search under the MACs budget; resumes from OUT/search_state.json; writes OUT/search.json."""
        _setup(quiet, json_logs)
        from cmpnas.nas.stages import search

        extra = [f"nas.search.reward={reward}"] if reward else []
        cfg = _config(config, set_, extra)
        res = search(cfg, gallery, supernet, out, resume=not fresh)
        b = res["best"]
        progress.event(
            "done",
            message=(
                f"best {res['reward']} arch: {b['macs'] / 1e6:.3f} MMACs, hom top-1 "
                f"{b['metrics']['hom_top1']:.2f}, het top-1 {b['metrics']['het_top1']:.2f} -> {out / 'search.json'}"
            ),
        )

    @app.command("retrain")
    def retrain_cmd(
        gallery: GalleryOpt,
        arch: Annotated[Path, typer.Option("--arch", help="search.json or arch JSON.")],
        out: OutOpt,
        config: ConfigOpt = None,
        set_: SetOpt = None,
        resume: ResumeOpt = False,
        quiet: QuietOpt = False,
        json_logs: JsonOpt = False,
    ) -> None:
        """Train the searched architecture from scratch with BCT (then `cmpnas evaluate` it)."""
        _setup(quiet, json_logs)
        from cmpnas.nas.stages import retrain

        res = retrain(_config(config, set_), gallery, arch, out, resume=resume)
        progress.event(
            "done", message=f"retrained: {out / 'model.safetensors'} ({res.get('macs', 0) / 1e6:.3f} MMACs)"
        )

    @app.command("study")
    def study_cmd(
        gallery: GalleryOpt,
        out: OutOpt,
        config: ConfigOpt = None,
        supernet: Annotated[
            Path | None,
            typer.Option(
                "--supernet", help="Also rank-correlate supernet estimates with standalone results."
            ),
        ] = None,
        n_archs: Annotated[int | None, typer.Option("--n-archs", help="Architectures to sample.")] = None,
        set_: SetOpt = None,
        quiet: QuietOpt = False,
        json_logs: JsonOpt = False,
    ) -> None:
        """Random architectures at equal cost, trained briefly with and without BCT (paper's Q1/Q2)."""
        _setup(quiet, json_logs)
        from cmpnas.nas.stages import study

        res = study(_config(config, set_), gallery, out, supernet_path=supernet, n_archs=n_archs)
        progress.event("done", message=f"study of {res['n_archs']} archs -> {out / 'study.json'}")
