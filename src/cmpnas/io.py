"""Atomic file writes: a killed process leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmpnas.errors import CmpnasError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``."""
    target = Path(path)
    make_dirs(target.parent)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        stale.unlink(missing_ok=True)  # half-written by a killed writer (SIGKILL skips the cleanup below)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _file_on_the_way(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` (or ``path`` itself) that is not a folder, if any."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_output_path(path: str | os.PathLike[str], kind: str = "folder") -> None:
    """Refuse, before any work is done, an output that cannot be created: a parent folder that is a file,
    or (``kind="file"``) a target that is an existing folder."""
    target = Path(path)
    if kind == "file" and target.is_dir():
        raise CmpnasError(
            f"Output '{target}' is an existing folder, not a file name.",
            f"pass a file path, e.g. --out {target / 'model.onnx'}",
        )
    blocker = _file_on_the_way(target.parent if kind == "file" else target)
    if blocker is not None:
        raise CmpnasError(
            f"Cannot create '{target}': '{blocker}' is a file, not a folder.",
            "choose an --out whose parent folders are folders (or move that file away)",
        )


def make_dirs(folder: str | os.PathLike[str]) -> None:
    """``mkdir -p`` whose failures (a file in the way, no permission) are user errors, not tracebacks."""
    target = Path(folder)
    check_output_path(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CmpnasError(
            f"Cannot create folder '{target}' ({exc.strerror or exc}).",
            "choose an output folder you can write to",
        ) from None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def append_jsonl(path: str | os.PathLike[str], obj: Any) -> None:
    """Append one JSON line (a crash can at worst lose this line, never corrupt earlier ones)."""
    make_dirs(Path(path).parent)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, default=_json_default) + "\n")
        fh.flush()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)!r}")
