"""Commands of the architecture search: ``train-supernet``, ``search``, ``retrain``, ``study``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmpnas import progress
from cmpnas.cli.options import GalleryOpt, OutOpt, ResumeOpt, SupernetOpt, configured, with_overrides
from cmpnas.config import Config
from cmpnas.errors import CmpnasError
from cmpnas.stages import retrain, retrain_family, search, study, train_supernet


@configured
def train_supernet_cmd(
    cfg: Config,
    gallery: GalleryOpt,
    out: OutOpt,
    resume: ResumeOpt = False,
) -> None:
    """Train the one-shot SPOS supernet with the BCT loss against the frozen gallery classifier."""
    res = train_supernet(cfg, gallery, out, resume=resume)
    progress.event(
        "done",
        message=f"supernet: {out / 'supernet.safetensors'} (budget {res.get('budget_macs', 0) / 1e6:.3f} MMACs)",
    )


@configured
def search_cmd(
    cfg: Config,
    gallery: GalleryOpt,
    supernet: SupernetOpt,
    out: OutOpt,
    reward: Annotated[
        str | None,
        typer.Option("--reward", help="R1 (homogeneous), R2 (heterogeneous) or R3 (weighted both; default)."),
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore a saved search state.")] = False,
    family: Annotated[
        bool,
        typer.Option("--family", help="One search for every budget of nas.budgets; writes OUT/family.json."),
    ] = False,
) -> None:
    """Evolutionary search under the MACs budget; resumes from OUT/search_state.json; writes OUT/search.json."""
    cfg = with_overrides(cfg, [f"nas.search.reward={reward}"] if reward else [])
    res = search(cfg, gallery, supernet, out, resume=not fresh, family=family)
    for b in res["budgets"]:
        best = b["best"]
        progress.event(
            "done",
            message=(
                f"best {res['reward']} arch{'' if not family else ' for ' + b['name']}: {best['macs'] / 1e6:.3f} "
                f"MMACs, hom top-1 {best['metrics']['hom_top1']:.2f}, het top-1 {best['metrics']['het_top1']:.2f}"
                f" -> {out / ('family.json' if family else 'search.json')}"
            ),
        )


@configured
def retrain_cmd(
    cfg: Config,
    gallery: GalleryOpt,
    out: OutOpt,
    arch: Annotated[Path | None, typer.Option("--arch", help="search.json or arch JSON.")] = None,
    family: Annotated[
        Path | None,
        typer.Option(
            "--family", help="family.json of `cmpnas search --family`: retrain every member into OUT/NAME."
        ),
    ] = None,
    resume: ResumeOpt = False,
) -> None:
    """Train the searched architecture from scratch with BCT (then `cmpnas evaluate` it)."""
    if (arch is None) == (family is None):
        raise CmpnasError(
            "Pass exactly one of --arch and --family.", "--arch search.json, or --family family.json"
        )
    if family is not None:
        doc = retrain_family(cfg, gallery, family, out, resume=resume)
        progress.event("done", message=f"retrained {len(doc['members'])} members -> {out / 'family.json'}")
        return
    res = retrain(cfg, gallery, arch, out, resume=resume)
    progress.event(
        "done", message=f"retrained: {out / 'model.safetensors'} ({res.get('macs', 0) / 1e6:.3f} MMACs)"
    )


@configured
def study_cmd(
    cfg: Config,
    gallery: GalleryOpt,
    out: OutOpt,
    supernet: Annotated[
        Path | None,
        typer.Option("--supernet", help="Also rank-correlate supernet estimates with standalone results."),
    ] = None,
    n_archs: Annotated[int | None, typer.Option("--n-archs", help="Architectures to sample.")] = None,
) -> None:
    """Random architectures at equal cost, trained briefly with and without BCT (paper's Q1/Q2)."""
    res = study(cfg, gallery, out, supernet_path=supernet, n_archs=n_archs)
    progress.event("done", message=f"study of {res['n_archs']} archs -> {out / 'study.json'}")


def register(app: typer.Typer) -> None:
    app.command("train-supernet")(train_supernet_cmd)
    app.command("search")(search_cmd)
    app.command("retrain")(retrain_cmd)
    app.command("study")(study_cmd)
