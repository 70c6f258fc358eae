"""Shared by the serving tests: another worker process of a server, recording searches into its metrics folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WORKER = """
import json, os, sys
from cmpnas.serving.stats import WorkerStats

stats = WorkerStats(json.loads(sys.argv[2]), sys.argv[1])
for latency_ms, model in json.loads(sys.argv[3]):
    stats.record(latency_ms, model)
print(os.getpid())
"""


def record_in_another_process(
    directory: Path, models: list[str], records: list[tuple[float | None, str | None]]
) -> int:
    """Count ``records`` (latency in ms, or None for a rejection; query model or None) in a separate Python
    process that shares ``directory`` with the server, as another of its workers would; returns that pid."""
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(directory), json.dumps(models), json.dumps(records)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)
