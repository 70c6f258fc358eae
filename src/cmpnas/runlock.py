"""One `cmpnas run` per run folder: a lock file ``RUN/run.lock`` held for the whole run.

The lock is filelock's ``flock`` on the file, so the kernel releases it when its process dies, even by SIGKILL:
a crashed run never blocks the folder. The file records who holds it (pid, host, process start time) for the
refusal message, and so that a run on a file system where ``flock`` does nothing still sees a live holder on
this host. A file left by a run that is gone is taken over; the caller is told whose it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import BaseFileLock, FileLock, Timeout

from cmpnas.errors import CmpnasError

LOCK_FILE = "run.lock"


@dataclass
class RunLock:
    """A held lock; ``previous`` is the record of a run that died holding it (taken over), else None."""

    path: Path
    file_lock: BaseFileLock
    previous: dict[str, Any] | None = field(default=None)


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name in parentheses may hold spaces


# Our own holder record: filelock's native lock records no holder (its pid/host marker exists only in its soft
# fallback for file systems whose flock fails, never where flock silently does nothing), and names none on refusal.
def _record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _read(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    return _parse(os.read(fd, 65536))


def _read_path(path: Path) -> dict[str, Any] | None:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def holder_alive(rec: dict[str, Any]) -> bool:
    """Whether the recorded holder still runs on this host (a reused pid has another start time)."""
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return False
    pid = rec["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = process_start(pid)
    return started is None or rec.get("process_start") in (None, started)


def describe(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "holder unknown"
    return f"pid {rec.get('pid')} on {rec.get('host')}, started {rec.get('started')}"


def _refuse(folder: Path, rec: dict[str, Any] | None) -> CmpnasError:
    return CmpnasError(
        f"Run folder '{folder}' is in use by another `cmpnas run` ({describe(rec)}).",
        f"wait for that run to finish (or stop it), or pass another --out; if no such run exists, delete "
        f"'{folder / LOCK_FILE}'",
    )


class _HeldByRecord(Exception):
    """Raised inside filelock's ``on_acquired`` hook, which makes filelock drop the flock it just took."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(describe(record))
        self.record = record


def acquire(folder: str | os.PathLike[str]) -> RunLock:
    """Take the lock of ``folder`` or raise :class:`CmpnasError` naming the run that holds it."""
    root = Path(folder)
    path = root / LOCK_FILE
    previous: list[dict[str, Any] | None] = []

    def claim(fd: int) -> None:
        """Runs with the flock held: check the record (flock is a no-op on some network file systems), then
        replace it by ours."""
        rec = _read(fd)
        if rec and rec.get("pid") != os.getpid() and holder_alive(rec):
            raise _HeldByRecord(rec)
        previous.append(rec)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_record()) + "\n").encode())
        os.fsync(fd)

    while True:
        # Not thread-local: the run may be released from another thread than the one that locked it. The record
        # lives in the locked file itself, which filelock's soft fallback would overwrite with its own marker.
        lock = FileLock(
            path, mode=0o644, thread_local=False, blocking=False, fallback_to_soft=False, on_acquired=claim
        )
        try:
            lock.acquire()
        except _HeldByRecord as held:
            raise _refuse(root, held.record) from None
        except Timeout:
            if not path.exists():
                continue  # the holder released (unlinked) it between our open and flock: lock a new file
            raise _refuse(root, _read_path(path)) from None
        return RunLock(path, lock, previous[-1] or None)


def release(lock: RunLock) -> None:
    """Remove the file, then drop the lock (in that order, so a waiting run locks a fresh file: filelock skips
    an inode unlinked before its flock succeeded)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock.path)
    lock.file_lock.release(force=True)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike[str]) -> Iterator[RunLock]:
    lock = acquire(folder)
    try:
        yield lock
    finally:
        release(lock)
