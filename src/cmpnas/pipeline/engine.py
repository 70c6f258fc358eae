"""The run engine: a list of stages run in order, each skipped when already done for the same inputs.

Each stage's record (a key = hash of its config sections and upstream keys, its outputs and timing) is kept in
``RUN/run_state.json``; a stage whose record matches is skipped, so a killed run continues where it stopped (and
long stages resume from their own checkpoints).

Reliability (docs/reliability.md): one run per folder (``RUN/run.lock``); a stage is only skipped when its
outputs still read back; a corrupt ``run_state.json`` is refused rather than guessed around.

The engine knows no stage by name: what the stages are, where each writes and what they are handed comes in a
:class:`Plan` (the CMP-NAS one is built by :mod:`cmpnas.pipeline.graph`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from cmpnas import progress
from cmpnas.config import Config
from cmpnas.distributed import init_distributed
from cmpnas.errors import CmpnasError
from cmpnas.io import is_temporary, make_dirs, read_json, read_jsonl, remove_temporaries, write_json_atomic
from cmpnas.models.embedding import verify_safetensors
from cmpnas.runlock import describe, run_lock
from cmpnas.serving.index import GalleryIndex

STATE_FILE = "run_state.json"
# an output key by which a stage says it reuses another stage's artifacts (so it may have no files of its own)
SAME_AS = "same_as"

Ctx = TypeVar("Ctx")


@dataclass
class StageDef(Generic[Ctx]):
    """One stage: its name, the stages it builds on, the config sections its key hashes, and what it runs."""

    name: str
    deps: list[str]
    config_parts: Callable[[Config], Any]
    fn: Callable[[Ctx], dict[str, Any]]


@dataclass
class Plan(Generic[Ctx]):
    """Everything the engine needs to know about a run's stages, so that it needs no stage name of its own."""

    cfg: Config
    out: Path
    stages: list[StageDef[Ctx]]
    # the files and folders a stage writes: read back before a skip, swept for a killed writer's temporaries
    writes: Callable[[str], list[Path]]
    # what goes before a stage is redone from scratch (forced, or its key changed)
    clears: Callable[[str], list[Path]]
    # given the run state once it is read (and the forced stages forgotten): records what the run records up
    # front and returns what every stage is handed
    start: Callable[[dict[str, Any]], Ctx]
    # called before each stage that runs (not before a skip), e.g. to load the data only when needed
    before_stage: Callable[[Ctx], None]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(stage: StageDef[Any], cfg: Config, state: dict[str, Any]) -> str:
    """What a stage's record must match to be skipped: its name, its config sections and its deps' keys."""
    return _hash([stage.name, stage.config_parts(cfg), [state.get(d, {}).get("key") for d in stage.deps]])


def delete_paths(paths: list[Path]) -> None:
    """Delete files and folders (missing ones are fine)."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def with_dependents(stages: list[StageDef[Any]], force: list[str]) -> list[str]:
    """The forced stages and every stage that uses one of them, directly or not (in run order).

    A key hashes its deps' keys, not their outputs: a redone stage keeps its key, so without this the stages
    built on its old outputs (e.g. the report) would be skipped with stale results.
    """
    forced = set(force)
    for stage in stages:  # in dependency order
        if any(d in forced for d in stage.deps):
            forced.add(stage.name)
    return [s.name for s in stages if s.name in forced]


# ------------------------------------------------------------------------------------------ run state
def _read_state(path: Path) -> dict[str, Any]:
    """The run state; a corrupt one is refused (guessing which stages are done could redo or skip work)."""
    if not path.exists():
        return {}
    fix = (
        f"delete '{path}': cmpnas run then redoes every stage, resuming from the checkpoints in "
        f"'{path.parent}' (or restore the file, or use a new --out)"
    )
    state = read_json(path, fix)
    valid = isinstance(state, dict) and all(
        isinstance(r, dict) and isinstance(r.get("key"), str) and r.get("status") in ("running", "done")
        for r in state.values()
    )
    if not valid:
        raise CmpnasError(f"'{path}' is not a cmpnas run state (corrupt or edited).", fix)
    return state


def _start_state(plan: Plan[Any], force: list[str]) -> dict[str, Any]:
    """Read the state and forget the forced stages and what uses them (saved before their files go, so a kill
    cannot leave a stage recorded as done without its outputs)."""
    state_path = plan.out / STATE_FILE
    state = _read_state(state_path)
    names = [s.name for s in plan.stages]
    for f in force:
        if f not in names:
            raise CmpnasError(f"Unknown stage '{f}' for --force.", f"use one of: {', '.join(names)}")
    force = with_dependents(plan.stages, force)
    if any(f in state for f in force):
        for f in force:
            state.pop(f, None)
        write_json_atomic(state_path, state)
    for f in force:
        delete_paths(plan.clears(f))
    return state


# ------------------------------------------------------------------------------------------ artifacts
def _check_done(plan: Plan[Any], name: str, rec: dict[str, Any]) -> None:
    """A stage about to be skipped must still have its outputs, readable: never build on a corrupt file."""
    # e.g. a retrain that reuses another reward's model has no folder of its own
    shared = SAME_AS in rec.get("outputs", {})
    for p in plan.writes(name):
        problem = None if shared and not p.exists() else artifact_problem(p)
        if problem is not None:
            raise CmpnasError(
                f"Stage '{name}' is recorded as done, but {problem}.",
                f"restore the file, or redo the stage (and what uses it): cmpnas run ... --force {name}",
            )


def artifact_problem(path: Path) -> str | None:
    """Why ``path`` (a file, or a folder of them) is not a readable artifact, or None when it is."""
    if path.is_dir():
        if (path / "manifest.json").is_file() and (path / "index.faiss").exists():
            return _index_problem(path)
        for child in sorted(path.iterdir()):
            if not is_temporary(child):
                problem = artifact_problem(child)
                if problem is not None:
                    return problem
        return None
    readers: dict[str, Callable[[Path], object]] = {
        ".json": lambda p: read_json(p, ""),
        ".jsonl": read_jsonl,
        ".safetensors": verify_safetensors,
    }
    if not path.exists():
        return f"'{path}' is missing"
    reader = readers.get(path.suffix)
    if reader is None:
        return None
    try:
        reader(path)
    except CmpnasError as exc:
        return f"'{path}' is unreadable ({exc.problem})"
    return None


def _index_problem(folder: Path) -> str | None:
    try:
        GalleryIndex.load(folder)
    except CmpnasError as exc:
        return f"the index '{folder}' is unreadable ({exc.problem})"
    return None


def _remove_leftovers(plan: Plan[Any]) -> None:
    """Temporary files and folders of writers that were killed (they never become artifacts): in the run
    folder itself and in the stages' folders, nowhere else (``--out`` may be a folder with other files)."""
    out = plan.out
    paths = [p for stage in plan.stages for p in plan.writes(stage.name)]
    flat = {out, *(p.parent for p in paths)}
    removed = [p for folder in sorted(flat) for p in remove_temporaries(folder, recursive=False)]
    removed += [p for d in sorted({p for p in paths if p.is_dir()}) for p in remove_temporaries(d)]
    if removed:
        progress.event(
            "cleanup",
            removed=[str(p.relative_to(out)) for p in removed],
            message=f"removed {len(removed)} temporary file(s) left by a killed run",
        )


# ------------------------------------------------------------------------------------------ running
def run_plan(plan: Plan[Any], force: list[str]) -> dict[str, Any]:
    """Run (or continue) every stage of ``plan``; returns the run state.

    One run per folder: a second run on the same folder is refused while this one runs (a lock left by a run
    that died is taken over, with a ``lock`` event).
    """
    make_dirs(plan.out)
    info = init_distributed()
    if not info.is_main:  # rank 0 holds the lock for all ranks of a torchrun
        return _run_locked(plan, force)
    with run_lock(plan.out) as lock:
        if lock.previous is not None:
            progress.event(
                "lock",
                status="taken_over",
                previous=lock.previous,
                message=f"took over the lock of a run that is gone ({describe(lock.previous)})",
            )
        if not info.enabled:  # with the lock held no other process writes here (other ranks would)
            _remove_leftovers(plan)
        return _run_locked(plan, force)


def _run_locked(plan: Plan[Any], force: list[str]) -> dict[str, Any]:
    stages, cfg = plan.stages, plan.cfg
    state = _start_state(plan, force)
    ctx = plan.start(state)
    state_path = plan.out / STATE_FILE
    t_run = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        key = stage_key(stage, cfg, state)
        rec = state.get(stage.name)
        if rec and rec.get("key") == key and rec.get("status") == "done":
            _check_done(plan, stage.name, rec)
            progress.event(
                "stage",
                stage=stage.name,
                status="skipped",
                message=f"{stage.name} ({i}/{len(stages)}) already done, skipped",
            )
            continue
        if rec and rec.get("key") != key:
            # made with another config or inputs: its checkpoints are foreign now
            delete_paths(plan.clears(stage.name))
        state[stage.name] = {"key": key, "status": "running"}  # a killed stage resumes only for this key
        write_json_atomic(state_path, state)
        plan.before_stage(ctx)
        with progress.Stage(stage.name, i, len(stages)) as st:
            outputs = stage.fn(ctx)
        state[stage.name] = {
            "key": key,
            "status": "done",
            "seconds": round(st.elapsed, 2),
            "outputs": outputs,
        }
        write_json_atomic(state_path, state)
        remaining = len(stages) - i
        progress.event(
            "progress",
            message=(
                f"{i}/{len(stages)} stages done, elapsed "
                f"{progress.format_seconds(time.perf_counter() - t_run)}, "
                f"{remaining} to go"
            ),
        )
    return state
