"""Command ``evaluate``: the three-way comparison on the config's data, or a benchmark protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmpnas import progress
from cmpnas.cli.options import OutOpt, configured
from cmpnas.config import Config
from cmpnas.errors import CmpnasError
from cmpnas.evaluation.compare import comparison_table
from cmpnas.evaluation.protocols import PROTOCOLS
from cmpnas.stages import evaluate_models, evaluate_protocol


@configured
def evaluate_cmd(
    cfg: Config,
    out: OutOpt,
    gallery: Annotated[
        Path | None, typer.Option("--gallery", "-g", help="Gallery model (model.safetensors).")
    ] = None,
    query: Annotated[Path | None, typer.Option("--query", help="Query model (model.safetensors).")] = None,
    split: Annotated[
        str, typer.Option("--split", help="test (final numbers) or val (model selection).")
    ] = "test",
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            help=f"classes (leave-one-out on the config's data) or a benchmark: {', '.join(PROTOCOLS)}.",
        ),
    ] = "classes",
    root: Annotated[Path | None, typer.Option("--root", help="Dataset root for deepfashion2 / ijbc.")] = None,
    embeddings: Annotated[
        Path | None,
        typer.Option("--embeddings", help="Score precomputed embeddings (.npz with ids, embeddings)."),
    ] = None,
    gallery_embeddings: Annotated[
        Path | None, typer.Option("--gallery-embeddings", help="Gallery-side .npz for a cross-model score.")
    ] = None,
) -> None:
    """Paragon M(g,g), homogeneous M(q,q), heterogeneous M(q,g) + MACs and cost reduction -> OUT/results.json.

    With --protocol deepfashion2|ijbc it runs the paper's benchmark protocols, from models or from
    precomputed embeddings (--embeddings).
    """
    if protocol != "classes":
        evaluate_protocol(
            cfg,
            protocol,
            root,
            out,
            gallery_path=gallery,
            query_path=query,
            embeddings=embeddings,
            gallery_embeddings=gallery_embeddings,
            split=split,
        )
        return
    if split not in ("test", "val"):
        raise CmpnasError(f"Unknown split '{split}'.", "use --split test or --split val")
    if gallery is None or query is None:
        raise CmpnasError(
            "evaluate needs --gallery and --query model files.", "pass both model.safetensors paths"
        )
    res = evaluate_models(cfg, gallery, query, out, split=split)
    if progress.human():
        typer.echo(comparison_table([res]))


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
