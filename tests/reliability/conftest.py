"""Reliability fixtures: the tiny pipeline config of the fault matrix and one uninterrupted reference run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fault_injection import ReplaceWatcher, matrix_config


@pytest.fixture(scope="session")
def matrix_raw(tiny_raw_factory) -> dict:
    return matrix_config(tiny_raw_factory())


@pytest.fixture(scope="session")
def matrix_cfg_file(tmp_path_factory: pytest.TempPathFactory, matrix_raw: dict) -> Path:
    path = tmp_path_factory.mktemp("matrix") / "tiny.yaml"
    path.write_text(yaml.safe_dump(matrix_raw))
    return path


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, matrix_cfg_file: Path) -> dict:
    """`cmpnas run` without faults (in this process, one thread): its folder, the number of file renames of
    each stage (where `write` faults can strike) and each stage's seconds (to place `delay` faults).
    Read-only: tests that change a run copy it first."""
    import torch

    from cmpnas import progress
    from cmpnas.config import load_config
    from cmpnas.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("reference") / "run"
    watcher = ReplaceWatcher()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    progress.configure(quiet=True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            watcher.install(mp.setattr)
            state = run_pipeline(load_config(matrix_cfg_file), out)
    finally:
        progress.configure()
        torch.set_num_threads(threads)
    return {
        "out": out,
        "counts": dict(watcher.counts),
        "seconds": {name: rec["seconds"] for name, rec in state.items()},
        "state": state,
    }
