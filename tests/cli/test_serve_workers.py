"""``cmpnas serve --workers 2``: each worker accepts from its own SO_REUSEPORT socket on the port.

Concurrent clients are answered, and by both workers; a worker killed with SIGKILL is restarted while the
service keeps answering; SIGTERM on the parent stops every worker, and a worker does not outlive a killed parent.
Which worker answered is read from the kernel (the process holding the accepted socket), not from the app.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

START_S = 300  # start-up and restart wait (each worker process loads torch and the models), not a speed check


def cmpnas_command() -> list[str]:
    script = Path(sys.executable).parent / "cmpnas"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cmpnas.cli"]


@contextlib.contextmanager
def server(*args: Any, tmpdir: Path | None = None) -> Iterator[tuple[int, subprocess.Popen]]:
    """``cmpnas serve ARGS --port P`` in a subprocess (temporary files under ``tmpdir`` if given); yields
    (P, process) once /healthz answers.

    The first /healthz goes out as soon as the parent says it serves, while the workers still load: it must wait
    in the kernel's queue and be answered, not refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} | ({"TMPDIR": str(tmpdir)} if tmpdir is not None else {})
    cmd = [*cmpnas_command(), "serve", *map(str, args), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        started(proc)
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=START_S)
        assert r.status_code == 200, r.text
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid in workers_of(proc):  # a test that failed half-way leaves none behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def started(proc: subprocess.Popen) -> None:
    """Wait for the parent's ``cmpnas serve: http://...`` line: every worker's socket listens and the workers
    are starting."""
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + START_S
    while b"cmpnas serve: http://" not in out:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the server did not start:\n{out.decode()}"
        if select.select([proc.stdout], [], [], remaining)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"the server exited with code {proc.wait()}:\n{out.decode()}"
            out += chunk


def until(check: Callable[[], Any], what: str, timeout: float = START_S) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return result


def workers_of(proc: subprocess.Popen) -> list[int]:
    """The worker processes of the server: its multiprocessing children (not the resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if parent == proc.pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def holder(server_port: int, client_port: int) -> int | None:
    """The pid holding the server's end of the connection from ``client_port``: the worker that accepted it."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
        if (local, remote) == (server_port, client_port):
            inode = fields[9]
    if inode is None:
        return None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and f"socket:[{inode}]" in _links(entry / "fd"):
            return int(entry.name)
    return None


def _links(folder: Path) -> set[str]:
    """Where the descriptors of a process point (one that closes meanwhile is left out)."""
    links = set()
    with contextlib.suppress(OSError):
        for fd in folder.iterdir():
            with contextlib.suppress(OSError):
                links.add(os.readlink(fd))
    return links


def search(port: int, png: bytes, healthz: bool = False) -> tuple[tuple[str, ...], int | None]:
    """POST /search on a new connection (after GET /healthz on it when asked): the result ids and the worker
    that answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=START_S)
    try:
        conn.connect()
        if healthz:
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        conn.request("POST", "/search?k=4", body=png, headers={"Content-Type": "image/png"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, body
        ids = tuple(h["id"] for h in json.loads(body)["results"])
        return ids, holder(port, conn.sock.getsockname()[1])  # the connection is still open: keep-alive
    finally:
        conn.close()


def until_answered_by(port: int, png: bytes, pids: set[int], what: str) -> None:
    """Search on new connections until each of ``pids`` has answered one."""
    seen: set[int | None] = set()

    def check() -> bool:
        seen.add(search(port, png)[1])
        return pids <= seen

    until(check, what)


@pytest.fixture(scope="module")
def png(pattern: Any) -> bytes:
    buf = io.BytesIO()
    pattern("stripes", 3).save(buf, format="PNG")
    return buf.getvalue()


def test_workers_answer_concurrent_clients_and_stop_with_their_parent(
    flat_index: Path, onnx_query: Path, png: bytes, tmp_path: Path
) -> None:
    """Eight clients at once, three connections each: every /healthz and /search is answered, all searches
    agree, and both workers took connections (the kernel spreads them: all 24 on one of two sockets would be a
    1 in 8 million chance). Then the parent is killed with SIGKILL: its workers stop too."""
    args = ["--index", flat_index, "--query-model", onnx_query, "--workers", 2]
    with server(*args, tmpdir=tmp_path) as (port, proc):  # a killed parent cannot remove its counters' folder
        workers = workers_of(proc)
        assert len(workers) == 2
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: search(port, png, healthz=True), range(24)))
        assert len({ids for ids, _ in answers}) == 1 and len(answers[0][0]) == 4
        assert {pid for _, pid in answers} == set(workers)
        proc.kill()
        proc.wait(timeout=30)
        try:
            until(lambda: not any(alive(pid) for pid in workers), "a worker outlived its parent", 60)
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_is_restarted_while_the_service_answers_and_sigterm_stops_all(
    flat_index: Path, onnx_query: Path, png: bytes, tmp_path: Path
) -> None:
    args = ["--index", flat_index, "--query-model", onnx_query, "--workers", 2]
    with server(*args, tmpdir=tmp_path) as (port, proc):
        assert len(list(tmp_path.glob("cmpnas-serve-stats-*"))) == 1  # the workers' shared counters
        before = workers_of(proc)
        assert len(before) == 2
        until_answered_by(port, png, set(before), "a worker never answered")
        expected = search(port, png)[0]
        victim, survivor = before
        os.kill(victim, signal.SIGKILL)
        restarted = until(lambda: set(workers_of(proc)) - {victim, survivor}, "the worker was not restarted")
        assert len(restarted) == 1 and workers_of(proc) == sorted({survivor, *restarted})
        # while the new worker loads, every connection is answered by the survivor alone (the replacement's
        # socket joins the port's group only once that worker listens)
        for _ in range(6):
            assert search(port, png)[0] == expected
        until_answered_by(port, png, restarted, "the new worker never answered")
        proc.terminate()
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode() if proc.stdout else ""
        assert not any(alive(pid) for pid in (survivor, *restarted))
        assert not list(tmp_path.glob("cmpnas-serve-stats-*"))  # SIGTERM leaves no temporary folder behind
