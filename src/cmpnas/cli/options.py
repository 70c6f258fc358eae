"""Options every command shares, declared once, and the decorators that add them to a command.

``@configured``: the command also takes ``--config/--set/--quiet/--json-logs`` and receives the loaded
config as ``cfg``. ``@logged``: only ``--quiet/--json-logs`` (commands without a config).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from cmpnas import progress
from cmpnas.config import Config, build_config, load_config

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

_LOGGING = [("quiet", QuietOpt, False), ("json_logs", JsonOpt, False)]
_CONFIG = [("config", ConfigOpt, None), ("set_", SetOpt, None)]


def _with_options(
    fn: Callable[..., Any], added: list[tuple[str, Any, Any]], call: Callable[[dict[str, Any]], Any]
) -> Callable[..., Any]:
    """A command whose signature is ``fn``'s own options (minus ``cfg``) followed by ``added``."""
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(fn).parameters.values()
        if p.name != "cfg"
    ]
    extra = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in added
    ]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        return call(kwargs)

    params = own + extra
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer must read this signature, not fn's
    return command


def logged(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--quiet/--json-logs`` and configure progress output before the command runs."""

    def call(kwargs: dict[str, Any]) -> Any:
        progress.configure(quiet=kwargs.pop("quiet"), json_logs=kwargs.pop("json_logs"))
        return fn(**kwargs)

    return _with_options(fn, _LOGGING, call)


def configured(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config/--set/--quiet/--json-logs``; the command receives the loaded config as ``cfg``."""

    def call(kwargs: dict[str, Any]) -> Any:
        progress.configure(quiet=kwargs.pop("quiet"), json_logs=kwargs.pop("json_logs"))
        cfg = load_config(kwargs.pop("config"), list(kwargs.pop("set_") or []))
        return fn(cfg=cfg, **kwargs)

    return _with_options(fn, _CONFIG + _LOGGING, call)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with a command's own dotted overrides applied after ``--set`` (e.g. ``compat.mode=bct``)."""
    return build_config(cfg.model_dump(mode="json"), overrides) if overrides else cfg


# Options of the index and deploy commands
IndexDirOpt = Annotated[Path, typer.Option("--index", help="index folder written by cmpnas index")]
QueryModelOpt = Annotated[
    Path, typer.Option("--query-model", help="query model: .safetensors checkpoint or .onnx export")
]
QueryModelsOpt = Annotated[
    list[Path],
    typer.Option(
        "--query-model",
        help="query model: .safetensors checkpoint, .onnx export, or a folder with family.json (its members); "
        "repeat for several, all served against the index (the first is the default, the others are "
        "picked with /search?model=NAME)",
    ),
]
AllowIncompatibleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-incompatible",
        help="search even if the query model was not trained compatible with the index's gallery model (experts)",
    ),
]
NprobeOpt = Annotated[int | None, typer.Option("--nprobe", min=1, help="override ivf/ivfpq cells visited")]
EfSearchOpt = Annotated[int | None, typer.Option("--ef-search", min=1, help="override hnsw search beam")]
