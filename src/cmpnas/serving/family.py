"""Which query models a server answers with: ``--query-model`` values -> named model files.

A value is a model file (``.onnx`` export or ``.safetensors`` checkpoint), named after its stem, or a folder
holding a ``family.json`` (several query models of one family, e.g. one per device budget), which expands to
its members. The family file is read here only, so everything that serves a family reads it the same way.
Names must be unique: they are what a client asks for with ``/search?model=NAME``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cmpnas.errors import CmpnasError

FAMILY_FILE = "family.json"
FAMILY_FORMAT = "cmpnas.family.v1"


def read_family(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(family.json path, its content)`` of a family folder or file, checked: the one reader of the format
    (the search writes it, retrain and export add paths, the server reads the members)."""
    p = Path(path)
    file = p / FAMILY_FILE if p.is_dir() else p
    if not file.is_file():
        raise CmpnasError(
            f"'{p}' is not a query-model family: there is no {file.name if not p.is_dir() else FAMILY_FILE} there.",
            "pass a family folder or family.json written by cmpnas (search --family, retrain --family, export "
            "--family, cmpnas run), or a query model file (.onnx or .safetensors)",
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CmpnasError(
            f"Family file '{file}' is not readable JSON ({str(exc)[:200]}).",
            "restore it, or pass the members' model files as --query-model A --query-model B",
        ) from None
    fmt = data.get("format", FAMILY_FORMAT) if isinstance(data, dict) else None
    members = data.get("members") if isinstance(data, dict) else None
    if fmt != FAMILY_FORMAT or not isinstance(members, list) or not members:
        raise CmpnasError(
            f"Family file '{file}' is not a {FAMILY_FORMAT} file with a non-empty 'members' list.",
            "restore it, or pass the members' model files as --query-model A --query-model B",
        )
    for i, m in enumerate(members):
        name = m.get("name") if isinstance(m, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise CmpnasError(
                f"Member {i} of family file '{file}' has no name.", "give every member a non-empty 'name'"
            )
    return file, data


def family_members(path: str | Path) -> list[tuple[str, Path]]:
    """``(name, model file)`` of every member of a family: a folder holding ``family.json``, or that file.

    A member is served from its ``onnx`` export when it has one, else from its ``model`` checkpoint; paths
    are relative to the family file's folder. Keys this reader does not need (budgets, MACs) are ignored.
    """
    file, data = read_family(path)
    return [_member(file, m) for m in data["members"]]


def _member(file: Path, entry: dict[str, Any]) -> tuple[str, Path]:
    name = entry["name"]
    rel = entry.get("onnx") or entry.get("model")
    if not isinstance(rel, str):
        raise CmpnasError(
            f"Member '{name}' of family file '{file}' names no model file (neither 'onnx' nor 'model').",
            "export the member (cmpnas export) and record its .onnx, or record its .safetensors as 'model'",
        )
    model = file.parent / rel
    if not model.is_file():
        raise CmpnasError(
            f"Member '{name}' of family file '{file}': model file '{model}' does not exist.",
            "restore the file, or fix the member's path (relative to the family file's folder)",
        )
    return name, model


def expand_query_models(values: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """Every ``--query-model`` value expanded to uniquely named model files, in the order given (the first
    is the server's default). A plain file is named after its stem; a folder expands to its family."""
    named: list[tuple[str, Path]] = []
    for value in values:
        p = Path(value)
        named += family_members(p) if p.is_dir() or p.name == FAMILY_FILE else [(p.stem, p)]
    if not named:
        raise CmpnasError("No query model given.", "pass --query-model MODEL (repeat it for several)")
    seen: dict[str, Path] = {}
    for name, path in named:
        if name in seen:
            raise CmpnasError(
                f"Two query models are both named '{name}' ('{seen[name]}' and '{path}'); a client picks one "
                "by name.",
                "rename one file (or the member's 'name' in family.json)",
            )
        seen[name] = path
    return named
