"""Commands of weight-level compatibility: ``train-gallery``, ``train-query``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmpnas import progress
from cmpnas.cli.options import GalleryOpt, OutOpt, ResumeOpt, configured, with_overrides
from cmpnas.config import Config
from cmpnas.nas.arch_io import query_config_for_arch
from cmpnas.stages import train_gallery, train_query


@configured
def train_gallery_cmd(cfg: Config, out: OutOpt, resume: ResumeOpt = False) -> None:
    """Train the gallery model (the large model that indexes the gallery)."""
    res = train_gallery(cfg, out, resume=resume)
    progress.event(
        "done", message=f"gallery model: {out / 'model.safetensors'} ({res.get('macs', 0) / 1e6:.2f} MMACs)"
    )


@configured
def train_query_cmd(
    cfg: Config,
    gallery: GalleryOpt,
    out: OutOpt,
    compat: Annotated[
        str | None, typer.Option("--compat", help="'bct' (compatible; default) or 'independent' (baseline).")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option("--backbone", help="Query backbone, e.g. tv:mobilenet_v2.")
    ] = None,
    arch: Annotated[
        Path | None, typer.Option("--arch", help="SPOS architecture JSON (search.json or arch.json).")
    ] = None,
    resume: ResumeOpt = False,
) -> None:
    """Train a compact query model against a frozen gallery model (weight-level compatibility)."""
    extra = [f"compat.mode={compat}"] if compat else []
    extra += [f"query.backbone={backbone}"] if backbone else []
    cfg = with_overrides(cfg, extra)
    if arch is not None:
        cfg = cfg.model_copy(update={"query": query_config_for_arch(cfg, arch)})
    res = train_query(cfg, gallery, out, resume=resume)
    progress.event(
        "done", message=f"query model: {out / 'model.safetensors'} ({res.get('macs', 0) / 1e6:.2f} MMACs)"
    )


def register(app: typer.Typer) -> None:
    app.command("train-gallery")(train_gallery_cmd)
    app.command("train-query")(train_query_cmd)
