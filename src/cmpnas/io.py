"""Atomic file writes: a killed process leaves the old file or the new one, never half of one.

Every writer goes through :func:`atomic_path` (a file) or :func:`atomic_dir` (a folder, e.g. a gallery index),
so a full disk is reported in one place: as a :class:`~cmpnas.errors.CmpnasError` naming the file and the fix,
with the previous version of the file untouched.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmpnas.errors import CmpnasError

_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Libraries that wrap the OSError keep the C library's text in their message (faiss, safetensors); torch's zip
# writer does not ("unexpected pos ..."): a write that fails on a file system with almost nothing free is taken
# for a full disk too.
_NO_SPACE_TEXTS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
_NEARLY_FULL_BYTES = 1 << 20
_TEMP_FILE_SUFFIX = ".tmp"
_TEMP_DIR_MARK = ".tmp-"
_OLD_DIR_MARK = ".old-"


# --------------------------------------------------------------------------------------------- full disk
def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means 'no space left on the device'."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE_ERRNOS:
            return True
        if any(text in str(current) for text in _NO_SPACE_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def nearly_full(folder: str | os.PathLike[str]) -> bool:
    """Whether the file system of ``folder`` has less than 1 MiB left for ordinary users."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES


def disk_full_error(path: str | os.PathLike[str]) -> CmpnasError:
    """The one message for a full disk: which file, how much is free, and what to do."""
    target = Path(path)
    folder = target.parent if target.parent.exists() else Path.cwd()
    try:
        free = f"{_megabytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    return CmpnasError(
        f"No space left on the device while writing '{target}' ({free}); the previous version of it, if "
        "any, is unchanged.",
        f"free disk space on the file system of '{folder}' (or write to another --out) and rerun the same "
        "command: completed stages and checkpoints are kept",
    )


def _megabytes(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a full-disk failure inside the block into :func:`disk_full_error`; other errors pass through."""
    try:
        yield
    except CmpnasError:
        raise
    except Exception as exc:
        if is_disk_full(exc) or nearly_full(Path(path).parent):
            raise disk_full_error(path) from None
        raise


# --------------------------------------------------------------------------------------------- writers
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``."""
    target = Path(path)
    make_dirs(target.parent)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*{_TEMP_FILE_SUFFIX}"):
        stale.unlink(missing_ok=True)  # half-written by a killed writer (SIGKILL skips the cleanup below)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_TEMP_FILE_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with disk_full_as_error(target):
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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty hidden folder next to ``path``; on success its files are fsynced and it replaces ``path``.

    A folder cannot be renamed onto a non-empty one, so an existing ``path`` is first renamed aside to
    ``.NAME.old-*`` and removed once the new folder is in place (a kill in between leaves that complete old
    copy, never a half-built folder). Temporary folders of killed writers are removed first.
    """
    target = Path(path)
    make_dirs(target.parent)
    _remove_stale_dirs(target)
    tmp = target.parent / f".{target.name}{_TEMP_DIR_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with disk_full_as_error(target):
            yield tmp
            _fsync_files(tmp)
            _swap_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_dirs(target: Path) -> None:
    """Temporary folders of writers that are gone; ``.old-*`` copies once a complete ``target`` exists."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}{_TEMP_DIR_MARK}*"):
        pid = stale.name.rsplit(_TEMP_DIR_MARK, 1)[-1].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        for old in target.parent.glob(f".{glob.escape(target.name)}{_OLD_DIR_MARK}*"):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_files(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _swap_into_place(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".{target.name}{_OLD_DIR_MARK}{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary file or folder of :func:`atomic_path` / :func:`atomic_dir`."""
    name = path.name
    return name.startswith(".") and (
        name.endswith(_TEMP_FILE_SUFFIX) or _TEMP_DIR_MARK in name or _OLD_DIR_MARK in name
    )


def remove_temporaries(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Delete what killed writers left in ``folder`` (and below it when ``recursive``); only call it while no
    other process writes there."""
    root = Path(folder)
    if not root.is_dir():
        return []
    candidates = root.rglob(".*") if recursive else root.glob(".*")
    found = sorted((p for p in candidates if is_temporary(p)), key=lambda p: len(p.parts))
    removed: list[Path] = []
    for p in found:
        if any(parent in removed for parent in p.parents):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def append_jsonl(path: str | os.PathLike[str], obj: Any) -> None:
    """Append one JSON line (a crash can at worst lose this line, never corrupt earlier ones)."""
    make_dirs(Path(path).parent)
    with disk_full_as_error(path), open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, default=_json_default) + "\n")
        fh.flush()


# --------------------------------------------------------------------------------------------- readers
def read_json(path: str | os.PathLike[str], fix: str) -> Any:
    """Parse a JSON file this package wrote; a truncated or corrupt one is a one-line error naming it."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CmpnasError(f"'{p}' is corrupt or truncated (not valid JSON: {exc}).", fix) from None


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """The records of a JSON-lines log; a torn last line (a kill in the middle of an append) is dropped."""
    p = Path(path)
    if not p.exists():
        return []
    records = []
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise CmpnasError(
                    f"'{p}' is corrupt (line {i + 1} is not JSON).", f"delete '{p}' or restore it"
                ) from None
    return records


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)!r}")
