"""One `cmpnas run` per run folder: a second one is refused (exit 2, one line naming the holder); a lock left by
a run that died is taken over, with a ``lock`` event saying whose it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fault_injection import assert_one_line_error, cli, env

from cmpnas.errors import CmpnasError
from cmpnas.runlock import LOCK_FILE, acquire, process_start, release, run_lock


def record(pid: int, start: str | None) -> dict:
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "process_start": start,
        "started": "2026-11-22T10:00:00+0000",
    }


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- the lock
def test_a_held_lock_refuses_a_second_holder_until_released(tmp_path: Path) -> None:
    lock = acquire(tmp_path)
    saved = json.loads((tmp_path / LOCK_FILE).read_text())
    assert saved["pid"] == os.getpid() and saved["host"] == socket.gethostname()
    with pytest.raises(CmpnasError) as info:
        acquire(tmp_path)  # another open file description: flock refuses it even in this process
    assert f"pid {os.getpid()}" in info.value.problem and "in use by another" in info.value.problem
    assert LOCK_FILE in info.value.fix
    release(lock)
    assert not (tmp_path / LOCK_FILE).exists()
    with run_lock(tmp_path) as again:
        assert again.previous is None


def test_the_lock_of_a_dead_run_is_taken_over(tmp_path: Path, dead_pid: int) -> None:
    stale = record(dead_pid, "12345")
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with run_lock(tmp_path) as lock:
        assert lock.previous == stale
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path: Path, live_process) -> None:
    """The recorded pid runs again, but it is another process (another start time): the lock is stale."""
    (tmp_path / LOCK_FILE).write_text(json.dumps(record(live_process.pid, "1")))
    with run_lock(tmp_path) as lock:
        assert lock.previous["pid"] == live_process.pid


def test_a_live_holder_on_this_host_is_respected_where_flock_does_not_work(
    tmp_path: Path, live_process
) -> None:
    """No flock is held here (as on a file system that ignores flock): the record of a live process still
    refuses the run."""
    start = process_start(live_process.pid)
    assert start is not None
    (tmp_path / LOCK_FILE).write_text(json.dumps(record(live_process.pid, start)))
    with pytest.raises(CmpnasError, match=f"pid {live_process.pid}"):
        acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_process.pid  # left as it was


# ---------------------------------------------------------------------------------------------- cmpnas run
def test_a_rerun_takes_over_a_dead_runs_lock_and_says_so(
    capsys, tmp_path: Path, reference_run, dead_pid
) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference_run["out"], run)
    (run / LOCK_FILE).write_text(json.dumps(record(dead_pid, "12345")))
    code, out, err = cli(capsys, "run", "-c", run / "config.yaml", "-o", run, "--json-logs")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    taken = [e for e in events if e["event"] == "lock"]
    assert len(taken) == 1 and taken[0]["status"] == "taken_over" and taken[0]["previous"]["pid"] == dead_pid
    assert f"pid {dead_pid}" in taken[0]["message"]
    assert not (run / LOCK_FILE).exists()


def test_two_runs_on_the_same_folder_the_second_is_refused(
    capsys, tmp_path: Path, matrix_cfg_file: Path
) -> None:
    """A real `cmpnas run` holds the folder (its gallery training made long); a second one, started once the first
    is training, exits with code 2 and one line naming the first run's pid, and prints no stage event."""
    out = tmp_path / "run"
    first_cmd = [sys.executable, "-m", "cmpnas.cli", "run", "-c", str(matrix_cfg_file), "-o", str(out),
                 "--json-logs", "--set", "gallery_train.epochs=400"]  # fmt: skip
    first = subprocess.Popen(
        first_cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env()
    )
    try:
        for line in first.stdout:
            if '"stage": "gallery"' in line and '"start"' in line:
                break
        assert first.poll() is None, "the first run ended before the second could start"
        code, stdout, err = cli(capsys, "run", "-c", matrix_cfg_file, "-o", out, "--json-logs")
        assert first.poll() is None  # the first run was still running all along
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert_one_line_error(code, err, f"pid {first.pid}", str(out), "in use by another", "--out")
    assert stdout == ""
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid  # untouched by the refused run
