"""The one Typer app: every command module registers itself here; errors become one line and exit code 2."""

from __future__ import annotations

import os
import sys

import click
import typer

from cmpnas.cli import deploy, evaluate, index, nas, run, train, upgrade
from cmpnas.errors import CmpnasError, one_line

app = typer.Typer(
    name="cmpnas",
    help="Compatibility-aware heterogeneous visual search: train a gallery model, a compact compatible query "
    "model (BCT) or search one (CMP-NAS), evaluate paragon / homogeneous / heterogeneous, index, export, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command groups, in the order of the flow (a new group: one module with register(app), one line here).
for _group in (train, nas, evaluate, run, index, deploy, upgrade):
    _group.register(app)


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
        # typer >= 0.2x raises the exceptions of its own vendored click copy: typer.BadParameter's base.
        typer_click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
        if isinstance(exc, (click.ClickException, typer_click_error)):
            typer.echo(_usage_error_line(exc), err=True)
            sys.exit(2)
        raise


def _usage_error_line(exc: Exception) -> str:
    """A click usage error (missing option, out-of-range value) as the same one line as every other error."""
    ctx = getattr(exc, "ctx", None)
    command = f"cmpnas {ctx.info_name}" if ctx is not None and ctx.parent is not None else "cmpnas"
    message = one_line(exc.format_message()).rstrip(".")  # type: ignore[attr-defined]
    return f"cmpnas: error: {message}. Fix: see `{command} --help`."
