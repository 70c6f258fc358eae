"""Kill `cmpnas run` in every stage; rerunning it finishes with the result of an uninterrupted run.

A *chain* runs `cmpnas run` (tiny config, every kind of stage once) with a fault in one stage, then again with
a fault in the next stage, and so on, and finally without a fault. After every fault each file of the run
folder must read back (nothing half-written); the rerun must take over the dead run's lock, resume training
from the checkpoint step and the search from the generation on disk; at the end no temporary file is left and
every artifact equals the uninterrupted reference run's, timings aside: exact resume (same weights, optimiser
and RNG states), the same search.json, study, evaluation, ONNX bytes and index vectors.

Faults (``fault_injection.Fault``): ``write`` = SIGKILL just before the n-th file rename of the stage (n drawn
by seed), ``delay`` = SIGKILL a seeded random delay after the stage's start event, ``term`` = SIGTERM at the
first epoch event of a training stage (stops at the next step boundary with exit code 143).

The default suite runs one chain (SIGTERM in the gallery training, SIGKILL in the search: 3 processes); the
full matrix (every stage x {write, delay}: 22 processes, a few minutes) is marked slow.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from fault_injection import (
    STAGES,
    Fault,
    Launch,
    assert_intact,
    assert_same_results,
    events_of,
    hidden_leftovers,
    launch,
    stage_statuses,
)

TRAINING_FOLDERS = {
    "gallery": "gallery",
    "baseline-small-bct": "baselines/small-bct",
    "supernet": "supernet",
    "retrain-R3": "retrain/R3",
}


def state_at_end(out: Path) -> dict:
    """What a stopped run left: stage statuses, checkpoint steps of single-training stages, search generation."""
    import json

    import torch

    state = json.loads((out / "run_state.json").read_text()) if (out / "run_state.json").exists() else {}
    steps = {}
    for stage, folder in TRAINING_FOLDERS.items():
        ckpt = out / folder / "checkpoint.pt"
        if ckpt.exists():
            steps[stage] = int(torch.load(ckpt, weights_only=True)["step"])
    search_state = out / "search" / "R3" / "search_state.json"
    generation = json.loads(search_state.read_text())["generation"] if search_state.exists() else None
    return {"status": {k: v["status"] for k, v in state.items()}, "steps": steps, "generation": generation}


def run_chain(cfg_path: Path, out: Path, faults: list[Fault], reference: dict) -> list[Launch]:
    """Launch `cmpnas run` once per fault, then once without; check each stop as it happens."""
    launches = []
    for fault in [*faults, None]:
        run = launch(cfg_path, out, fault, reference["counts"], reference["seconds"])
        run.at_end = state_at_end(out)
        launches.append(run)
        if fault is not None:
            check_stop(run, out)
    return launches


def check_stop(run: Launch, out: Path) -> None:
    """The process ended the way its fault says, and every file it left reads back."""
    where = f"{run.fault} ({run.detail or 'write fault'})"
    if run.fault.mode == "term":
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 143, f"{where}: exit {run.returncode}\n{run.stderr[-2000:]}"
        assert len(lines) == 1 and lines[0].startswith("cmpnas: error: "), run.stderr
        m = re.search(
            r"Stage '(\w+)' stopped by SIGTERM at step (\d+)/(\d+); its checkpoint is saved", lines[0]
        )
        assert m and "--resume" in lines[0], lines[0]
        assert run.at_end["steps"][run.fault.stage] == int(m.group(2)) < int(m.group(3))
        assert not (out / "run.lock").exists()  # a clean stop releases the lock
    else:
        assert run.returncode == -signal.SIGKILL, f"{where}: exit {run.returncode}\n{run.stderr[-2000:]}"
        assert (out / "run.lock").exists()  # SIGKILL: the dead run's lock file stays behind
    assert run.at_end["status"].get(STAGES[-1]) != "done", f"{where}: the run had finished"
    assert_intact(out)


def check_rerun(before: Launch, rerun: Launch) -> None:
    """The rerun took over a dead run's lock, skipped what was done and resumed what was running."""
    taken = [e for e in events_of(rerun, "lock") if e.get("status") == "taken_over"]
    if before.returncode == -signal.SIGKILL:
        assert [e["previous"]["pid"] for e in taken] == [before.pid], taken
    else:
        assert not taken
    statuses = stage_statuses(rerun)
    for stage, status in before.at_end["status"].items():
        if status == "done":
            assert statuses[stage] == ["skipped"], (stage, statuses[stage])
    resumed = " | ".join(e["message"] for e in events_of(rerun, "resume"))
    for stage, step in before.at_end["steps"].items():
        if before.at_end["status"].get(stage) == "running":
            assert f"resuming at step {step}/" in resumed, (stage, step, resumed)
    if before.at_end["status"].get("search-R3") == "running" and before.at_end["generation"] is not None:
        assert f"search: resuming after generation {before.at_end['generation']}" in resumed, resumed


def check_finished(launches: list[Launch], out: Path, reference: dict) -> None:
    final = launches[-1]
    assert final.returncode == 0, final.stderr[-3000:]
    for before, rerun in zip(launches, launches[1:], strict=False):
        check_rerun(before, rerun)
    assert all(s == "done" for s in final.at_end["status"].values()) and len(final.at_end["status"]) == len(
        STAGES
    )
    assert hidden_leftovers(out) == []  # no temporary file / folder, no lock
    assert assert_intact(out) > 40
    assert_same_results(reference["out"], out)


# ---------------------------------------------------------------------------------------------- default suite
def test_sigterm_in_training_then_kill_in_search_then_rerun_equals_uninterrupted(
    tmp_path: Path, matrix_cfg_file: Path, reference_run: dict
) -> None:
    """SIGTERM in the gallery training (exit 143, checkpoint at the step boundary), then SIGKILL in the search
    just before the 5th rename (generation 1's state: its candidates are already in the shared cache)."""
    out = tmp_path / "run"
    faults = [Fault("gallery", "term"), Fault("search-R3", "write", nth=5)]
    launches = run_chain(matrix_cfg_file, out, faults, reference_run)
    check_finished(launches, out, reference_run)
    term, kill, _ = launches
    assert 5 <= term.at_end["steps"]["gallery"] < 30  # stopped inside the 30-step gallery training
    assert kill.at_end["status"]["search-R3"] == "running" and kill.at_end["generation"] == 1


# ---------------------------------------------------------------------------------------------- full matrix
SEED = 20261122


@pytest.fixture(scope="module", params=["write", "delay"])
def full_chain(request, tmp_path_factory, matrix_cfg_file: Path, reference_run: dict) -> dict:
    out = tmp_path_factory.mktemp(f"chain-{request.param}") / "run"
    faults = [Fault(stage, request.param, seed=SEED) for stage in STAGES]
    launches = run_chain(matrix_cfg_file, out, faults, reference_run)
    return {"out": out, "launches": launches, "by_stage": dict(zip(STAGES, launches, strict=False))}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_killed_in_stage_then_resumed(full_chain: dict, stage: str) -> None:
    """SIGKILL in this stage: every file read back (checked at the stop); the next run resumed it."""
    launches = full_chain["launches"]
    i = STAGES.index(stage)
    killed, rerun = launches[i], launches[i + 1]
    assert killed.fault.stage == stage and killed.returncode == -signal.SIGKILL
    if killed.fault.mode == "write":  # a write fault strikes inside its stage by construction
        assert killed.at_end["status"][stage] == "running"
    if killed.at_end["status"].get(stage) == "running":
        assert stage_statuses(rerun)[stage] == ["start", "done"]
    check_rerun(killed, rerun)


@pytest.mark.slow
def test_after_a_kill_in_every_stage_the_run_equals_an_uninterrupted_one(
    full_chain: dict, reference_run, capsys
) -> None:
    check_finished(full_chain["launches"], full_chain["out"], reference_run)
    with capsys.disabled():  # where the faults struck (a delay can end up after its stage has finished)
        for run in full_chain["launches"][:-1]:
            print(
                f"\n  {run.fault}: {run.detail}; {run.fault.stage} was {run.at_end['status'].get(run.fault.stage)}"
            )
