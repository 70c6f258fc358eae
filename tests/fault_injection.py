"""Fault injection for the reliability tests (docs/reliability.md): kill `cmpnas run` at chosen points and
check what it leaves on disk.

Run as a script it is `cmpnas` with one fault armed, e.g. SIGKILL just before the 3rd file rename (the commit
point of every atomic write) of stage ``search-R3``::

    python tests/fault_injection.py --kill-before-replace search-R3:3 -- run -c tiny.yaml -o RUN --json-logs

Imported, it gives the tests the tiny pipeline config, the launcher that kills a run from its ``--json-logs``
events (after a seeded delay, or SIGTERM) and the checks: every artifact on disk reads back, and a finished
run equals an uninterrupted one except for timings.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli_support import cli  # noqa: F401  (re-exported for the reliability tests)

SCRIPT = Path(__file__).resolve()

TINY_QUERY = {
    "backbone": "resnet_small",
    "backbone_kwargs": {"widths": [4, 8], "depths": [1, 1], "strides": [2, 2]},
    "embed_dim": 16,
}
# The stages of `cmpnas run` with :func:`matrix_config`, in order (one per kind of stage).
STAGES = [
    "gallery", "baseline-small-bct", "supernet", "search-R3", "retrain-R3", "study", "evaluate", "export",
    "index", "report",
]  # fmt: skip

# Fields that measure time or the machine, not the result: left out when two runs are compared.
TIMING_KEYS = frozenset({
    "seconds", "wall_time_s", "evaluator_timings", "evaluator_calls", "latency_ms", "latency_ms_b1",
    "created_at", "updated_at", "build_seconds", "export_seconds", "stage_seconds", "total_seconds",
    "img_per_s", "images_per_second", "gflops_per_second", "resumed_from_step", "environment", "started",
    "finished", "versions",
})  # fmt: skip


def matrix_config(base: dict) -> dict:
    """``tiny_config_raw()`` with every stage of `cmpnas run` once: one baseline, one reward, the study,
    export and index. The gallery trains 6 epochs (30 steps) so that SIGTERM can land inside it."""
    raw = copy.deepcopy(base)
    raw["gallery_train"]["epochs"] = 6
    raw["run"] = {
        "baselines": [{"name": "small-bct", "compat": "bct", "model": TINY_QUERY}],
        "rewards": ["R3"],
        "headline_reward": "R3",
        "latency_repeats": 3,
        "onnx_exporter": "legacy",
    }
    return raw


# ---------------------------------------------------------------------------------------------- the fault
class ReplaceWatcher:
    """Counts the file renames (``os.replace``) of each stage of a run; optionally SIGKILLs the process just
    before the ``nth`` rename of ``kill_stage`` (so the new file is complete but not yet in place)."""

    def __init__(self, kill_stage: str | None = None, nth: int = 0) -> None:
        self.kill_stage, self.nth = kill_stage, nth
        self.counts: Counter[str] = Counter()
        self.stage: str | None = None

    def on_event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "stage":
            self.stage = fields.get("stage") if fields.get("status") == "start" else None

    def before_replace(self) -> None:
        if self.stage is None and self.kill_stage != "*":  # "*": count every rename (commands without stages)
            return
        stage = self.stage if self.kill_stage != "*" else "*"
        self.counts[stage] += 1
        if stage == self.kill_stage and self.counts[stage] == self.nth:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self, setattr_: Callable[[Any, str, Any], None]) -> None:
        """Hook ``progress.event`` and ``os.replace`` (``setattr_`` is ``setattr`` or a monkeypatch's)."""
        from cmpnas import progress

        real_event, real_replace = progress.event, os.replace

        def event(kind: str, **fields: Any) -> None:
            self.on_event(kind, fields)
            real_event(kind, **fields)

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            self.before_replace()
            real_replace(src, dst, **kw)

        setattr_(progress, "event", event)
        setattr_(os, "replace", replace)


def _script_main(argv: list[str]) -> None:
    split = argv.index("--")
    own, cmpnas_argv = argv[:split], argv[split + 1 :]
    watcher = ReplaceWatcher()
    if own[:1] == ["--kill-before-replace"]:
        stage, nth = own[1].rsplit(":", 1)
        watcher = ReplaceWatcher(stage, int(nth))
    watcher.install(setattr)
    from cmpnas.cli.app import main

    main(cmpnas_argv)


# ---------------------------------------------------------------------------------------------- a launch
@dataclass
class Fault:
    """Where to stop a run: ``mode`` is ``write`` (SIGKILL before a rename, chosen by seed), ``delay``
    (SIGKILL a seeded random delay after the stage's start event) or ``term`` (SIGTERM at its first
    ``epoch`` event: training stops at the next step boundary)."""

    stage: str
    mode: str
    seed: int = 0
    nth: int | None = None  # write faults: this rename instead of a seeded one

    def rng(self) -> random.Random:
        return random.Random(f"{self.seed}:{self.stage}:{self.mode}")

    def nth_write(self, counts: dict[str, int]) -> int:
        return self.nth or self.rng().randint(1, counts[self.stage])

    def delay(self, seconds: dict[str, float]) -> float:
        """5-60 % of the stage's reference duration, capped at 1 s: the reference may have run on a busier
        machine than this run, and a delay longer than the last stage would let the run finish first."""
        return self.rng().uniform(0.05, 0.6) * min(seconds[self.stage], 1.0)

    def __str__(self) -> str:
        return f"{self.mode}@{self.stage}"


@dataclass
class Launch:
    """One `cmpnas run` process: how it ended, its JSON events, what it printed on stderr."""

    fault: Fault | None
    returncode: int
    events: list[dict[str, Any]]
    stderr: str
    pid: int
    detail: str = ""
    at_end: dict[str, Any] = field(default_factory=dict)


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(
    cfg_path: Path, out: Path, fault: Fault | None, counts: dict[str, int], seconds: dict[str, float]
) -> Launch:
    """Run `cmpnas run` in a new process, with ``fault`` armed; returns when the process has ended."""
    own, detail = [], ""
    if fault is not None and fault.mode == "write":
        nth = fault.nth_write(counts)
        own = ["--kill-before-replace", f"{fault.stage}:{nth}"]
        detail = f"SIGKILL before rename {nth} of the {counts[fault.stage]} of {fault.stage}"
    cmd = [sys.executable, str(SCRIPT), *own, "--", "run", "-c", str(cfg_path), "-o", str(out), "--json-logs"]
    err_path = out.parent / f"{out.name}.stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env())
        watchdog = threading.Timer(600, proc.kill)  # a hung run fails the test instead of hanging it
        watchdog.start()
        try:
            events, followed = _follow(proc, fault, seconds)
            proc.wait()
        finally:
            watchdog.cancel()
    return Launch(fault, proc.returncode, events, err_path.read_text(), proc.pid, detail or followed)


def _follow(
    proc: subprocess.Popen, fault: Fault | None, seconds: dict[str, float]
) -> tuple[list[dict[str, Any]], str]:
    """Read the run's events; send the fault's signal at its trigger event."""
    events: list[dict[str, Any]] = []
    detail = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        e = json.loads(line)
        events.append(e)
        if fault is None or detail or e.get("stage") != fault.stage:
            continue
        if fault.mode == "delay" and e["event"] == "stage" and e["status"] == "start":
            delay = fault.delay(seconds)
            time.sleep(delay)
            detail = f"SIGKILL {delay:.3f}s after the start of {fault.stage}"
            proc.send_signal(signal.SIGKILL)
        elif fault.mode == "term" and e["event"] == "epoch":
            detail = f"SIGTERM at {e['message']!r}"
            proc.send_signal(signal.SIGTERM)
    return events, detail


# ---------------------------------------------------------------------------------------------- the checks
def visible_files(folder: Path) -> list[Path]:
    """Every file of a run folder outside hidden (temporary) files and folders."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def hidden_leftovers(folder: Path) -> list[Path]:
    """Temporary files / folders of atomic writes (hidden names): a finished run must have none."""
    return sorted(p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def read_artifact(path: Path) -> Any:
    """Parse one file with the reader its kind needs (raises if it is truncated or corrupt)."""
    import faiss
    import onnx
    import torch
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file

    suffix = path.suffix
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        return {"metadata": meta, "tensors": load_file(str(path))}
    if suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if suffix == ".yaml":
        return yaml.safe_load(path.read_text())
    if suffix == ".faiss":
        index = faiss.read_index(str(path))
        return index.reconstruct_n(0, index.ntotal)
    if suffix == ".onnx":
        return onnx.load(str(path))
    if suffix == ".csv":
        import csv

        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    if suffix in (".md", ".html", ".lock"):
        return path.read_text()
    raise AssertionError(f"unexpected file kind in a run folder: {path}")


def assert_intact(folder: Path) -> int:
    """Every visible file reads back completely (nothing half-written); returns how many there are."""
    files = visible_files(folder)
    for p in files:
        try:
            value = read_artifact(p)
        except Exception as exc:  # noqa: BLE001 - the message must name the file
            raise AssertionError(f"{p.relative_to(folder)} does not read back: {exc!r}") from exc
        if p.suffix == ".json" or p.suffix == ".html":
            assert value, f"{p} is empty"
    return len(files)


def normalized(value: Any, *runs: Path) -> Any:
    """``value`` without timing fields, with the run folders' paths replaced by ``<RUN>`` (a copied run folder
    keeps the original's paths in the files it did not rewrite)."""
    if isinstance(value, dict):
        return {k: normalized(v, *runs) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [normalized(v, *runs) for v in value]
    if isinstance(value, str):
        for run in runs:
            value = value.replace(str(run), "<RUN>")
    return value


def assert_same_results(reference: Path, run: Path) -> None:
    """``run`` holds the files of ``reference`` with the same contents, timings aside (models, optimiser and
    RNG states of the final checkpoints, search, study, evaluation, ONNX bytes, index vectors, report data)."""
    ref_files = [p.relative_to(reference) for p in visible_files(reference)]
    run_files = [p.relative_to(run) for p in visible_files(run)]
    assert run_files == ref_files, f"other files: {sorted(set(run_files) ^ set(ref_files))}"
    for rel in ref_files:
        if rel.suffix in (
            ".md",
            ".html",
        ):  # report text: timings and latencies in prose (data in results.json)
            continue
        a, b = read_artifact(reference / rel), read_artifact(run / rel)
        _assert_equal(_comparable(a, rel, reference, run), _comparable(b, rel, reference, run), str(rel))


def _comparable(value: Any, rel: Path, *runs: Path) -> Any:
    if rel.suffix == ".pt":  # python / numpy global RNG: unseeded, unused by training (differs per process)
        value = {**value, "rng": {k: v for k, v in value["rng"].items() if k in ("torch", "augment")}}
    if rel.suffix == ".onnx":
        return value.SerializeToString()
    return normalized(value, *runs)


def _assert_equal(a: Any, b: Any, where: str) -> None:
    import numpy as np
    import torch

    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{where}: arrays differ"
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) by relative path: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, err: str, *needles: str, exit_code: int = 2) -> str:
    """A user-facing error: exit code 2 (or ``exit_code``), one stderr line with the fix, no traceback."""
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("cmpnas: error: ") and "Fix:" in lines[0], lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def events_of(launch: Launch, kind: str) -> list[dict[str, Any]]:
    return [e for e in launch.events if e["event"] == kind]


def stage_statuses(launch: Launch) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events_of(launch, "stage"):
        out.setdefault(e["stage"], []).append(e["status"])
    return out


if __name__ == "__main__":
    _script_main(sys.argv[1:])
