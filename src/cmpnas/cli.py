"""Thin command-line interface: parse options, call library functions, map errors to exit code 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cmpnas import progress
from cmpnas.errors import CmpnasError

app = typer.Typer(
    name="cmpnas",
    help="Compatibility-aware heterogeneous visual search: train a gallery model, a compact compatible query "
    "model (BCT) or search one (CMP-NAS), evaluate paragon / homogeneous / heterogeneous, index, export, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from cmpnas.cli_options import ConfigOpt, JsonOpt, OutOpt, QuietOpt, ResumeOpt, SetOpt  # noqa: E402


def _setup(quiet: bool, json_logs: bool) -> None:
    progress.configure(quiet=quiet, json_logs=json_logs)


def _config(config: Path | None, overrides: list[str] | None, extra: list[str] | None = None) -> Any:
    from cmpnas.config import load_config

    return load_config(config, list(overrides or []) + list(extra or []))


@app.command("train-gallery")
def train_gallery_cmd(
    out: OutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    json_logs: JsonOpt = False,
) -> None:
    """Train the gallery model (the large model that indexes the gallery)."""
    _setup(quiet, json_logs)
    from cmpnas.stages import train_gallery

    cfg = _config(config, set_)
    res = train_gallery(cfg, out, resume=resume)
    progress.event(
        "done", message=f"gallery model: {out / 'model.safetensors'} ({res.get('macs', 0) / 1e6:.2f} MMACs)"
    )


@app.command("train-query")
def train_query_cmd(
    gallery: Annotated[
        Path, typer.Option("--gallery", "-g", help="Frozen gallery model (model.safetensors).")
    ],
    out: OutOpt,
    config: ConfigOpt = None,
    compat: Annotated[
        str | None, typer.Option("--compat", help="'bct' (compatible; default) or 'independent' (baseline).")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option("--backbone", help="Query backbone, e.g. tv:mobilenet_v2.")
    ] = None,
    arch: Annotated[
        Path | None, typer.Option("--arch", help="SPOS architecture JSON (search.json or arch.json).")
    ] = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    json_logs: JsonOpt = False,
) -> None:
    """Train a compact query model against a frozen gallery model (weight-level compatibility)."""
    _setup(quiet, json_logs)
    from cmpnas.stages import train_query

    extra = []
    if compat:
        extra.append(f"compat.mode={compat}")
    if backbone:
        extra.append(f"query.backbone={backbone}")
    cfg = _config(config, set_, extra)
    if arch is not None:
        from cmpnas.nas.arch_io import query_config_for_arch

        cfg = cfg.model_copy(update={"query": query_config_for_arch(cfg, arch)})
    res = train_query(cfg, gallery, out, resume=resume)
    progress.event(
        "done", message=f"query model: {out / 'model.safetensors'} ({res.get('macs', 0) / 1e6:.2f} MMACs)"
    )


@app.command("evaluate")
def evaluate_cmd(
    out: OutOpt,
    gallery: Annotated[
        Path | None, typer.Option("--gallery", "-g", help="Gallery model (model.safetensors).")
    ] = None,
    query: Annotated[Path | None, typer.Option("--query", help="Query model (model.safetensors).")] = None,
    config: ConfigOpt = None,
    split: Annotated[
        str, typer.Option("--split", help="test (final numbers) or val (model selection).")
    ] = "test",
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol", help="classes (leave-one-out on the config's data), deepfashion2 or ijbc."
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
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    json_logs: JsonOpt = False,
) -> None:
    """Paragon M(g,g), homogeneous M(q,q), heterogeneous M(q,g) + MACs and cost reduction -> OUT/results.json.

    With --protocol deepfashion2|ijbc it runs the paper's benchmark protocols, from models or from
    precomputed embeddings (--embeddings).
    """
    _setup(quiet, json_logs)
    if protocol != "classes":
        from cmpnas.evaluation.protocols import run_protocol_evaluation

        run_protocol_evaluation(
            protocol=protocol,
            root=root,
            out=out,
            embeddings=embeddings,
            gallery_embeddings=gallery_embeddings,
            gallery_model=gallery,
            query_model=query,
            config=_config(config, set_),
            split=split,
        )
        return
    from cmpnas.stages import evaluate_models, markdown_table

    if split not in ("test", "val"):
        raise CmpnasError(f"Unknown split '{split}'.", "use --split test or --split val")
    if gallery is None or query is None:
        raise CmpnasError(
            "evaluate needs --gallery and --query model files.", "pass both model.safetensors paths"
        )
    cfg = _config(config, set_)
    res = evaluate_models(cfg, gallery, query, out, split=split)
    if not quiet and not json_logs:
        typer.echo(markdown_table([res]))


def _register_optional() -> None:
    """Commands owned by other modules register themselves here (NAS, run, serving, protocols)."""
    import importlib

    for mod in ("cmpnas.nas.commands", "cmpnas.pipeline_commands", "cmpnas.serving.commands"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue
            raise
        module.register(app)


_register_optional()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    try:
        app(args=argv, standalone_mode=False)
    except CmpnasError as exc:
        typer.echo(f"cmpnas: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo(
            "cmpnas: interrupted (completed stages and checkpoints are kept; rerun with --resume)", err=True
        )
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors
        import click

        # typer >= 0.2x raises the exceptions of its own vendored click copy: typer.BadParameter's base.
        typer_click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
        if isinstance(exc, (click.ClickException, typer_click_error)):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
