"""Option types shared by every command (one definition, so --config/--out/--set read the same everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (see configs/); defaults if omitted.")
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder of this stage (created).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config key, dotted: --set gallery_train.epochs=3 (repeatable)."
    ),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt if it exists.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
JsonOpt = Annotated[bool, typer.Option("--json-logs", help="Machine-readable JSON event lines on stdout.")]


GalleryOpt = Annotated[
    Path, typer.Option("--gallery", "-g", help="Frozen gallery model (model.safetensors).")
]
SupernetOpt = Annotated[Path, typer.Option("--supernet", help="supernet.safetensors from train-supernet.")]
