"""Truncated or corrupt files in a run folder or an index are refused with one line naming the file and the
fix, exit code 2, never a traceback, and nothing is retrained or rewritten over them.

Each case corrupts one file of a copy of the finished reference run and reruns `cmpnas run` (or the command
that reads the file). A stage recorded as done is only skipped when its outputs read back (JSON parses,
safetensors headers are whole, models hash to their fingerprint, the index loads); a running stage refuses a
corrupt checkpoint / search state / study rows; a corrupt run_state.json is refused as a whole.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fault_injection import assert_one_line_error, assert_same_results, cli, file_bytes
from PIL import Image

from cmpnas.io import write_json_atomic
from cmpnas.models.embedding import fingerprint, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def garbage(p: Path) -> None:
    p.write_bytes(
        np.random.default_rng(7).integers(0, 256, max(64, p.stat().st_size), dtype=np.uint8).tobytes()
    )


def empty(p: Path) -> None:
    p.write_bytes(b"")


def flip_bytes(p: Path) -> None:
    """Damage the weights (the end of a safetensors file) and keep the format valid."""
    data = bytearray(p.read_bytes())
    for i in range(1, 65):
        data[-i] ^= 0x5A
    p.write_bytes(bytes(data))


def delete(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def break_a_middle_line(p: Path) -> None:
    lines = p.read_text().splitlines(keepends=True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"
    p.write_text("".join(lines))


@pytest.fixture
def run_copy(tmp_path: Path, reference_run: dict) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference_run["out"], out)
    return out


def rerun(capsys, run: Path, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "run", "-c", run / "config.yaml", "-o", run, "--quiet", *extra)


# ---------------------------------------------------------------------------------------------- done stages
DONE_CASES = [
    ("gallery", "gallery/model.safetensors", truncate),
    ("gallery", "gallery/model.safetensors", flip_bytes),
    ("gallery", "gallery/manifest.json", truncate),
    ("gallery", "gallery/metrics.jsonl", break_a_middle_line),
    ("baseline-small-bct", "baselines/small-bct/model.safetensors", garbage),
    ("supernet", "supernet/supernet.safetensors", truncate),
    ("search-R3", "search/R3/search.json", truncate),
    ("search-R3", "search/candidates.json", garbage),
    ("retrain-R3", "retrain/R3/model.safetensors", empty),
    ("study", "study/study_rows.json", garbage),
    ("evaluate", "evaluation/rows.json", empty),
    ("index", "index/index.faiss", truncate),
    ("index", "index/items.csv", garbage),
    ("index", "index/manifest.json", truncate),
    ("index", "index", delete),
    ("report", "results.json", truncate),
]


@pytest.mark.parametrize(
    ("stage", "rel", "damage"), DONE_CASES, ids=[f"{rel}-{d.__name__}" for _, rel, d in DONE_CASES]
)
def test_a_corrupt_output_of_a_done_stage_is_refused_and_nothing_is_redone(
    capsys, run_copy: Path, stage: str, rel: str, damage: Callable[[Path], None]
) -> None:
    damage(run_copy / rel)
    before = file_bytes(run_copy)
    code, _, err = rerun(capsys, run_copy)
    shown = rel.split("/")[0] if rel.startswith("index/") else rel  # the index is named as a folder
    assert_one_line_error(code, err, f"Stage '{stage}' is recorded as done", shown, f"--force {stage}")
    assert file_bytes(run_copy) == before


def test_the_advertised_fix_redoes_the_stage(capsys, run_copy: Path, reference_run: dict) -> None:
    truncate(run_copy / "gallery" / "model.safetensors")
    code, _, err = rerun(capsys, run_copy)
    assert code == 2
    code, _, err = rerun(capsys, run_copy, "--force", "gallery")
    assert code == 0, err
    redone = fingerprint(load_model(run_copy / "gallery" / "model.safetensors"))
    assert redone == reference_run["state"]["gallery"]["outputs"]["fingerprint"]


# ---------------------------------------------------------------------------------------------- running stages
RUNNING_CASES = [
    ("gallery", "gallery/checkpoint.pt", truncate, "unreadable"),
    ("baseline-small-bct", "baselines/small-bct/checkpoint.pt", garbage, "unreadable"),
    ("search-R3", "search/R3/search_state.json", truncate, "corrupt"),
    ("study", "study/study_rows.json", empty, "corrupt"),
]


@pytest.mark.parametrize(
    ("stage", "rel", "damage", "word"), RUNNING_CASES, ids=[rel for _, rel, _, _ in RUNNING_CASES]
)
def test_a_killed_stage_with_a_corrupt_checkpoint_is_refused_not_retrained(
    capsys, run_copy: Path, stage: str, rel: str, damage: Callable[[Path], None], word: str
) -> None:
    """As if the run had been killed in ``stage`` and then its checkpoint damaged: no training over it."""
    state = json.loads((run_copy / "run_state.json").read_text())
    state[stage] = {"key": state[stage]["key"], "status": "running"}
    write_json_atomic(run_copy / "run_state.json", state)
    damage(run_copy / rel)
    before = file_bytes(run_copy)
    code, _, err = rerun(capsys, run_copy)
    line = assert_one_line_error(code, err, rel.split("/")[-1], word)
    assert "delete" in line.split("Fix:")[1]
    assert file_bytes(run_copy) == before


# ---------------------------------------------------------------------------------------------- run state
@pytest.mark.parametrize(
    "content",
    [
        b'{"gallery": {"key": "abc", "sta',
        b"\x00\x01garbage",
        b"[]",
        b'{"gallery": {"key": "abc", "status": "ok"}}',
    ],
    ids=["truncated", "binary", "a-list", "unknown-status"],
)
def test_a_corrupt_run_state_is_refused(capsys, run_copy: Path, content: bytes) -> None:
    (run_copy / "run_state.json").write_bytes(content)
    before = file_bytes(run_copy)
    code, _, err = rerun(capsys, run_copy)
    line = assert_one_line_error(code, err, str(run_copy / "run_state.json"))
    assert f"delete '{run_copy / 'run_state.json'}'" in line
    assert file_bytes(run_copy) == before


def test_deleting_a_corrupt_run_state_redoes_the_run_from_its_checkpoints(
    capsys, run_copy: Path, reference_run: dict
) -> None:
    """The advertised fix: every stage runs again, trainings resume at their last step, same results."""
    (run_copy / "run_state.json").write_bytes(b"\x00")
    assert rerun(capsys, run_copy)[0] == 2
    (run_copy / "run_state.json").unlink()
    code, out, err = cli(capsys, "run", "-c", run_copy / "config.yaml", "-o", run_copy, "--json-logs")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {e["stage"] for e in events if e["event"] == "stage" and e["status"] == "done"} == set(
        reference_run["state"]
    )
    assert "resuming at step" in " ".join(e["message"] for e in events if e["event"] == "resume")
    assert_same_results(reference_run["out"], run_copy)


# ---------------------------------------------------------------------------------------------- single commands
@pytest.fixture
def query_image(tmp_path: Path) -> Path:
    path = tmp_path / "query.png"
    Image.fromarray(np.full((28, 28), 128, dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    ("rel", "damage", "needle"),
    [
        ("index/items.csv", truncate, "items.csv"),
        ("index/items.csv", garbage, "items.csv"),
        ("index/index.faiss", garbage, "index.faiss"),
        ("index/manifest.json", truncate, "manifest.json"),
        ("retrain/R3/model.safetensors", flip_bytes, "model.safetensors"),
    ],
    ids=["items-truncated", "items-garbage", "faiss-garbage", "manifest-truncated", "query-model-flipped"],
)
def test_query_refuses_a_corrupt_index_or_model(
    capsys, run_copy: Path, query_image: Path, rel: str, damage: Callable[[Path], None], needle: str
) -> None:
    damage(run_copy / rel)
    code, _, err = cli(
        capsys, "query", "--index", run_copy / "index", "--query-model",
        run_copy / "retrain" / "R3" / "model.safetensors", query_image,
    )  # fmt: skip
    assert_one_line_error(code, err, needle)


def test_search_refuses_a_truncated_supernet(capsys, run_copy: Path, tmp_path: Path) -> None:
    truncate(run_copy / "supernet" / "supernet.safetensors")
    code, _, err = cli(
        capsys, "search", "-g", run_copy / "gallery" / "model.safetensors",
        "--supernet", run_copy / "supernet" / "supernet.safetensors",
        "-c", run_copy / "config.yaml", "-o", tmp_path / "search",
    )  # fmt: skip
    assert_one_line_error(code, err, "supernet.safetensors", "truncated or corrupt")
    assert not (tmp_path / "search").exists()
