"""The command line: ``cmpnas <command>`` (one Typer app, one module per command group)."""

from __future__ import annotations

from cmpnas.cli.app import app, main

__all__ = ["app", "main"]
