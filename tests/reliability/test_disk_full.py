"""A full disk (ENOSPC) while writing a checkpoint, a model, an index or a report: one line naming the file and
the fix ("free disk space ..."), exit code 2, and the previous version of the artifact intact.

The disk is never really filled: the write itself is made to fail the way it fails on a full disk (OSError
ENOSPC, or the library's own message: safetensors and faiss quote the C library's text, torch's zip writer
does not, so there the file system is made to report no free space).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import yaml
from fault_injection import assert_one_line_error, cli, file_bytes, hidden_leftovers
from PIL import Image

from cmpnas import io as io_module
from cmpnas.errors import CmpnasError
from cmpnas.io import append_jsonl, atomic_dir, write_json_atomic, write_text_atomic
from cmpnas.models import embedding as embedding_module
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint, load_model, save_model
from cmpnas.training import checkpoint as checkpoint_module
from cmpnas.training.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def enospc(*_a, **_kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def assert_disk_full(exc: CmpnasError, path: Path) -> None:
    assert "No space left" in exc.problem and str(path) in exc.problem, exc.problem
    assert exc.fix and "free disk space" in exc.fix, exc.fix


def tiny_model(seed: int) -> EmbeddingModel:
    torch.manual_seed(seed)
    spec = ModelSpec(
        backbone="resnet_small",
        backbone_kwargs={"widths": [4, 8], "depths": [1, 1], "strides": [1, 2]},
        embed_dim=8,
    )
    return EmbeddingModel(spec)


# ---------------------------------------------------------------------------------------------- each writer
def _json(path: Path, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(os, "replace", enospc)  # the commit point of every atomic write
    write_json_atomic(path, {"version": 2})


def _text(path: Path, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(os, "fsync", enospc)  # delayed allocation: the full disk shows at fsync
    write_text_atomic(path, "version 2\n")


def _checkpoint(path: Path, mp: pytest.MonkeyPatch) -> None:
    def half_then_enospc(obj, f, *a, **kw):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        enospc()

    mp.setattr(checkpoint_module.torch, "save", half_then_enospc)
    save_checkpoint(path, {"step": 2})


def _checkpoint_torch_message(path: Path, mp: pytest.MonkeyPatch) -> None:
    """torch's zip writer hides the errno; the nearly empty file system tells."""

    def torch_failure(obj, f, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 534")

    full = os.statvfs_result((4096, 4096, 1000, 0, 0, 1000, 0, 0, 0, 255))
    mp.setattr(checkpoint_module.torch, "save", torch_failure)
    mp.setattr(os, "statvfs", lambda _p: full)
    save_checkpoint(path, {"step": 2})


def _model(path: Path, mp: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError

    def safetensors_failure(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    mp.setattr(embedding_module, "save_file", safetensors_failure)
    save_model(tiny_model(2), path)


def _metrics_line(path: Path, mp: pytest.MonkeyPatch) -> None:
    class FullFile(io.StringIO):
        def write(self, s: str) -> int:
            enospc()
            return 0

    mp.setattr(io_module, "open", lambda *a, **kw: FullFile(), raising=False)
    append_jsonl(path, {"step": 2})


Writer = namedtuple("Writer", "name path first fault")
WRITERS = [
    Writer("json", "state.json", lambda p: write_json_atomic(p, {"version": 1}), _json),
    Writer("text", "config.yaml", lambda p: write_text_atomic(p, "version 1\n"), _text),
    Writer("checkpoint", "checkpoint.pt", lambda p: save_checkpoint(p, {"step": 1}), _checkpoint),
    Writer(
        "checkpoint-torch",
        "checkpoint.pt",
        lambda p: save_checkpoint(p, {"step": 1}),
        _checkpoint_torch_message,
    ),
    Writer("model", "model.safetensors", lambda p: save_model(tiny_model(1), p), _model),
    Writer("metrics", "metrics.jsonl", lambda p: append_jsonl(p, {"step": 1}), _metrics_line),
]


@pytest.mark.parametrize("writer", WRITERS, ids=[w.name for w in WRITERS])
def test_every_writer_reports_a_full_disk_and_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: Writer
) -> None:
    path = tmp_path / writer.path
    writer.first(path)
    before = path.read_bytes()
    with monkeypatch.context() as mp, pytest.raises(CmpnasError) as info:
        writer.fault(path, mp)
    assert_disk_full(info.value, path)
    assert path.read_bytes() == before
    assert hidden_leftovers(tmp_path) == []


def test_a_write_error_on_a_roomy_disk_is_not_called_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(
        checkpoint_module.torch, "save", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("bug"))
    )
    with pytest.raises(RuntimeError, match="bug"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    assert hidden_leftovers(tmp_path) == []


def test_a_folder_written_atomically_keeps_the_previous_one_on_a_full_disk(
    tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "index"
    with atomic_dir(out) as tmp:
        (tmp / "items.csv").write_text("id,path,label\n")
    with monkeypatch.context() as mp, pytest.raises(CmpnasError) as info:
        mp.setattr(os, "fsync", enospc)
        with atomic_dir(out) as tmp:
            (tmp / "items.csv").write_text("id,path,label\na,b,c\n")
    assert_disk_full(info.value, out)
    assert (out / "items.csv").read_text() == "id,path,label\n"
    assert hidden_leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def cfg_file(tmp_path: Path, tiny_raw: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return path


def test_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_ends_like_an_uninterrupted_run(
    capsys, tmp_path: Path, cfg_file: Path, monkeypatch
) -> None:
    """train-gallery (2 epochs of 5 steps): the epoch-2 checkpoint hits a full disk after half a file."""
    real_save = torch.save
    calls = []

    def second_write_fails(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"PK\x03\x04 half")
            enospc()
        return real_save(obj, f, *a, **kw)

    out = tmp_path / "gallery"
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint_module.torch, "save", second_write_fails)
        code, _, err = cli(capsys, "train-gallery", "-c", cfg_file, "-o", out, "--quiet")
    line = assert_one_line_error(code, err, "No space left", str(out / "checkpoint.pt"), "free disk space")
    assert "Traceback" not in line
    assert not (out / "model.safetensors").exists()
    assert hidden_leftovers(tmp_path) == []
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["step"] == 5  # the end-of-epoch-1 checkpoint, whole

    code, _, err = cli(capsys, "train-gallery", "-c", cfg_file, "-o", out, "--resume")
    assert code == 0, err
    code, _, err = cli(capsys, "train-gallery", "-c", cfg_file, "-o", tmp_path / "reference")
    assert code == 0, err
    assert fingerprint(load_model(out / "model.safetensors")) == fingerprint(
        load_model(tmp_path / "reference" / "model.safetensors")
    )


def test_full_disk_while_rebuilding_an_index_keeps_the_old_index(
    capsys, tmp_path: Path, reference_run
) -> None:
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(images / label / f"{i}.png")
    gallery = reference_run["out"] / "gallery" / "model.safetensors"
    out = tmp_path / "index"
    code, _, err = cli(
        capsys, "index", "--gallery-model", gallery, "--images", images, "--out", out, "--quiet"
    )
    assert code == 0, err
    before = file_bytes(out)

    def faiss_full_disk(index, path):
        Path(path).write_bytes(b"half an index")
        raise RuntimeError(
            f"Error in faiss::write_index: write error in {path}: 10 != 512000 (No space left on device)"
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(faiss, "write_index", faiss_full_disk)
        code, _, err = cli(
            capsys, "index", "--gallery-model", gallery, "--images", images, "--out", out, "--quiet"
        )
    assert_one_line_error(code, err, "No space left", str(out), "free disk space")
    assert file_bytes(out) == before
    assert hidden_leftovers(tmp_path) == []


def test_full_disk_while_writing_the_report_keeps_the_old_report(
    capsys, tmp_path: Path, reference_run
) -> None:
    run, cfg = tmp_path / "run", tmp_path / "run" / "config.yaml"
    shutil.copytree(reference_run["out"], run)
    report = (run / "report.html").read_bytes()
    real_replace = os.replace

    def report_html_full(src, dst, **kw):
        if str(dst).endswith("report.html"):
            enospc()
        return real_replace(src, dst, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", report_html_full)
        code, _, err = cli(capsys, "run", "-c", cfg, "-o", run, "--force", "report", "--quiet")
    assert_one_line_error(code, err, "No space left", str(run / "report.html"), "free disk space")
    assert (run / "report.html").read_bytes() == report
    assert hidden_leftovers(run) == []
    code, _, err = cli(capsys, "run", "-c", cfg, "-o", run, "--quiet")  # space freed: the report is written
    assert code == 0, err
    assert json.loads((run / "run_state.json").read_text())["report"]["status"] == "done"
