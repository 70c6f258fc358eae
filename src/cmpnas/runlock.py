"""One `cmpnas run` per run folder: a lock file ``RUN/run.lock`` held for the whole run.

The lock is an ``flock`` on the file, so the kernel releases it when its process dies, even by SIGKILL: a
crashed run never blocks the folder. The file records who holds it (pid, host, process start time) for the
refusal message, and so that a run on a file system where ``flock`` does nothing still sees a live holder on
this host. A file left by a run that is gone is taken over; the caller is told whose it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmpnas.errors import CmpnasError

LOCK_FILE = "run.lock"


@dataclass
class RunLock:
    """A held lock; ``previous`` is the record of a run that died holding it (taken over), else None."""

    path: Path
    fd: int
    previous: dict[str, Any] | None = field(default=None)


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name in parentheses may hold spaces


def _record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _read(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


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


def acquire(folder: str | os.PathLike[str]) -> RunLock:
    """Take the lock of ``folder`` or raise :class:`CmpnasError` naming the run that holds it."""
    path = Path(folder) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            rec = _read(fd)
            os.close(fd)
            raise _refuse(Path(folder), rec) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder released (unlinked) it between our open and flock: lock the new file
    previous = _read(fd)
    if previous and previous.get("pid") != os.getpid() and holder_alive(previous):
        os.close(fd)  # flock is a no-op on some network file systems: the record still tells
        raise _refuse(Path(folder), previous)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(_record()) + "\n").encode())
    os.fsync(fd)
    return RunLock(path, fd, previous or None)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def release(lock: RunLock) -> None:
    """Remove the file, then drop the lock (in that order, so a waiting run locks a fresh file)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock.path)
    os.close(lock.fd)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike[str]) -> Iterator[RunLock]:
    lock = acquire(folder)
    try:
        yield lock
    finally:
        release(lock)
