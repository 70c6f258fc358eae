"""The packaged smoke profile as a user runs it: every stage, and a supernet that clears the default health floor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmpnas.cli import main


@pytest.mark.slow
def test_the_smoke_profile_runs_end_to_end_with_a_healthy_supernet(tmp_path: Path) -> None:
    main(["run", "-p", "smoke", "-o", str(tmp_path / "run"), "-q"])  # exit code 2 (SystemExit) on a refusal
    health = json.loads((tmp_path / "run" / "supernet" / "health.json").read_text())
    assert health["ok"] and health["min_skill"] == 0.2  # the default floor, not one lowered for the profile
    assert health["het_top1"]["mean"] >= health["floor"] + 5  # a margin: CPUs differ in their float kernels
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["supernet"]["health"]["ok"]
    assert (tmp_path / "run" / "report.md").is_file()
