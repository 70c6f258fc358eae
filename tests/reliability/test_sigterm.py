"""SIGTERM during training: the step in progress finishes, a checkpoint is written at that step boundary and
the command exits with code 143 and one line; ``--resume`` continues exactly (same weights, same logged
metrics as an uninterrupted run). The signal is sent by the process to itself at a chosen step."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from fault_injection import TIMING_KEYS, assert_one_line_error, cli, hidden_leftovers

from cmpnas.config import TrainConfig
from cmpnas.data.synthetic import make_synthetic_bundle
from cmpnas.errors import Terminated
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint, load_model
from cmpnas.training import loop as loop_module
from cmpnas.training.loop import train
from cmpnas.training.tasks import ClassificationTask

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, BATCH = 200, 50  # 4 steps per epoch


class SigtermAt(torch.nn.Module):
    """Wraps a task; sends SIGTERM to this process while computing step ``at``."""

    def __init__(self, task: torch.nn.Module, at: int | None) -> None:
        super().__init__()
        self.task, self.at = task, at

    def forward(self, x, y, index, step):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.task(x, y, index, step)


def make_task(seed: int) -> ClassificationTask:
    torch.manual_seed(seed)
    spec = ModelSpec(
        backbone="resnet_small",
        backbone_kwargs={"widths": [8, 16], "depths": [1, 1], "strides": [1, 2]},
        embed_dim=16,
        num_classes=10,
    )
    return ClassificationTask(EmbeddingModel(spec), label_smoothing=0.0)


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_sigterm_stops_at_the_next_step_boundary_and_resume_is_exact(tmp_path: Path) -> None:
    data = make_synthetic_bundle(N_TRAIN, 20, num_classes=10, seed=3)
    cfg = TrainConfig(epochs=3, batch_size=BATCH, warmup_epochs=0.25, log_every=3, threads=1, seed=5)

    def run(task, out: Path, **kw):
        return train(task, data.train, cfg, out, mean=data.mean, std=data.std, stage="gallery", **kw)

    reference = SigtermAt(make_task(0), at=None)
    run(reference, tmp_path / "reference")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info:
        run(SigtermAt(make_task(0), at=5), tmp_path / "run")  # in epoch 2 (steps 4..7): not an epoch end
    assert info.value.exit_code == 143
    assert "stopped by SIGTERM at step 6/12" in info.value.problem and "--resume" in info.value.fix
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only as long as the loop
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert payload["step"] == 6  # the step in progress finished, then a checkpoint at its boundary

    resumed = SigtermAt(make_task(123), at=None)  # other initial weights: all state comes from the checkpoint
    result = run(resumed, tmp_path / "run", resume=True)
    assert result.resumed_from_step == 6 and result.steps == 12
    ref_state, got_state = reference.state_dict(), resumed.state_dict()
    assert [k for k in ref_state if not torch.equal(ref_state[k], got_state[k])] == []
    assert metrics(tmp_path / "run") == metrics(tmp_path / "reference")  # logged means too (log_every=3)
    assert hidden_leftovers(tmp_path) == []


def test_train_gallery_exits_143_with_one_line_and_resume_finishes_like_an_uninterrupted_run(
    capsys, tmp_path: Path, tiny_raw: dict, monkeypatch
) -> None:
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw))  # gallery: 2 epochs of 5 steps
    real_fetch, calls = loop_module.fetch_batch, []

    def sigterm_at_the_7th_batch(dataset, idx):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_fetch(dataset, idx)

    out = tmp_path / "gallery"
    with monkeypatch.context() as mp:
        mp.setattr(loop_module, "fetch_batch", sigterm_at_the_7th_batch)
        code, _, err = cli(capsys, "train-gallery", "-c", cfg_path, "-o", out, "--quiet")
    assert_one_line_error(
        code, err, "Stage 'gallery' stopped by SIGTERM at step 7/10", "--resume", exit_code=143
    )
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 7
    assert not (out / "model.safetensors").exists()

    code, _, err = cli(capsys, "train-gallery", "-c", cfg_path, "-o", out, "--resume")
    assert code == 0, err
    assert "resuming at step 7/10" in err
    code, _, err = cli(capsys, "train-gallery", "-c", cfg_path, "-o", tmp_path / "reference", "--quiet")
    assert code == 0, err
    assert fingerprint(load_model(out / "model.safetensors")) == fingerprint(
        load_model(tmp_path / "reference" / "model.safetensors")
    )
    assert metrics(out) == metrics(tmp_path / "reference")
