"""Commands of a gallery-model upgrade: ``upgrade-gallery``, ``train-transformation``, ``evaluate-upgrade``,
``backfill`` and ``transform-index`` (docs/upgrades.md)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cmpnas import progress
from cmpnas.cli.options import OutOpt, ResumeOpt, configured, logged
from cmpnas.config import Config
from cmpnas.serving.backfill import backfill, transform_index
from cmpnas.stages.upgrade import evaluate_upgrade, train_transformation, upgrade_gallery, upgrade_markdown


class Order(str, Enum):
    uncertainty = "uncertainty"
    confident = "confident"
    random = "random"


OldOpt = Annotated[Path, typer.Option("--old", help="The deployed (old) gallery model, model.safetensors.")]
NewOpt = Annotated[Path, typer.Option("--new", help="The new gallery model, model.safetensors.")]
IndexOpt = Annotated[Path, typer.Option("--index", help="Index folder written by cmpnas index.")]
NewGalleryOpt = Annotated[
    Path, typer.Option("--gallery-model", help="The new gallery model (model.safetensors).")
]


def _done(message: str, record: dict) -> None:
    if progress.human():
        typer.echo(message)
    else:
        progress.event("done", message=message, **{"record": json.dumps(record)})


@configured
def upgrade_gallery_cmd(
    cfg: Config,
    old: OldOpt,
    out: OutOpt,
    independent: Annotated[
        bool, typer.Option("--independent", help="Train without the compat term (the control experiment).")
    ] = False,
    resume: ResumeOpt = False,
) -> None:
    """Train a new gallery model (the config's gallery + gallery_train) compatible with the old one (BCT)."""
    res = upgrade_gallery(cfg, old, out, resume=resume, independent=independent)
    _done(
        f"new gallery model: {out / 'model.safetensors'} ({res['fingerprint']}, compatible with the old one)"
        if not independent
        else f"control gallery model (no compat term): {out / 'model.safetensors'}",
        res,
    )


@configured
def train_transformation_cmd(
    cfg: Config,
    old: OldOpt,
    new: NewOpt,
    out: OutOpt,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training embeddings.")] = 30,
) -> None:
    """Fit an FCT transformation from the old model's embedding space into the new one's (training images)."""
    res = train_transformation(cfg, old, new, out, epochs=epochs)
    _done(f"transformation: {out / res['transformation']} (train cosine {res['train_cosine']:.3f})", res)


@configured
def evaluate_upgrade_cmd(
    cfg: Config,
    old: OldOpt,
    new: NewOpt,
    out: OutOpt,
    small: Annotated[
        Path | None, typer.Option("--small", help="A query model trained against the old gallery.")
    ] = None,
    independent: Annotated[
        Path | None, typer.Option("--independent", help="The control: a new model trained without compat.")
    ] = None,
    transformation: Annotated[
        Path | None, typer.Option("--transformation", help="An FCT transformation old -> new.")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="test (final numbers) or val (choices).")] = "test",
) -> None:
    """The BCT compatibility table (M(old,old), M(new,new), M(new,old), ...) and the backfill curve."""
    res = evaluate_upgrade(
        cfg, old, new, out, small=small, independent=independent, transformation=transformation, split=split
    )
    if progress.human():
        typer.echo(upgrade_markdown(res))


@logged
def backfill_cmd(
    index: IndexOpt,
    gallery_model: NewGalleryOpt,
    fraction: Annotated[
        float,
        typer.Option(
            "--fraction", min=0.0, max=1.0, help="Share of the index the new model embeds when done."
        ),
    ],
    order: Annotated[
        Order,
        typer.Option(
            "--order",
            help="random (default) or uncertainty (lowest margin first; measured worse than random, see docs/upgrades.md)",
        ),
    ] = Order.random,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random order.")] = 0,
    chunk_size: Annotated[
        int,
        typer.Option("--chunk-size", min=1, help="Images per saved chunk (the unit a killed run redoes)."),
    ] = 256,
) -> None:
    """Re-embed part of an index with an upgraded gallery model (atomic; a killed run continues)."""
    rec = backfill(index, gallery_model, fraction, order.value, seed=seed, chunk_size=chunk_size)
    _done(
        f"backfill: {rec['reembedded']} re-embedded; {rec['embedded_by_model_after']}/{rec['count']} items now "
        f"by {rec['model']}",
        rec,
    )


@logged
def transform_index_cmd(
    index: IndexOpt,
    transformation: Annotated[Path, typer.Option("--transformation", help="transformation.safetensors.")],
    gallery_model: NewGalleryOpt,
) -> None:
    """Map an index's stored vectors into a new gallery model's space with an FCT transformation (atomic)."""
    rec = transform_index(index, transformation, gallery_model)
    _done(f"transform-index: {rec['transformed']} vectors mapped {rec['old']} -> {rec['new']}", rec)


def register(app: typer.Typer) -> None:
    app.command("upgrade-gallery")(upgrade_gallery_cmd)
    app.command("train-transformation")(train_transformation_cmd)
    app.command("evaluate-upgrade")(evaluate_upgrade_cmd)
    app.command("backfill")(backfill_cmd)
    app.command("transform-index")(transform_index_cmd)
