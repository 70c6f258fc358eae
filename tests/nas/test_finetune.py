"""The inherit-and-fine-tune estimator scores a trained copy of the path and leaves the shared supernet alone."""

from __future__ import annotations

import random

import pytest
import torch

from cmpnas.compat.losses import CompatLosses
from cmpnas.config import TrainConfig
from cmpnas.models.spaces import create_space
from cmpnas.nas.finetune import FineTunedEvaluator
from cmpnas.nas.supernet import SupernetEmbedding
from cmpnas.training.finetune import fine_tune
from cmpnas.training.tasks import CompatTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _supernet(tiny_raw: dict, classes: int) -> tuple[SupernetEmbedding, dict]:
    space = create_space(tiny_raw["nas"]["space"], in_chans=1, input_size=28)
    torch.manual_seed(0)
    return SupernetEmbedding(space, 16, classes), space.sample(random.Random(3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.arange(32) % 4
    return [(x, y, torch.arange(32))] * n


def test_fine_tuning_a_path_fits_its_batches(tiny_raw: dict) -> None:
    model, arch = _supernet(tiny_raw, 4)
    task = CompatTask(model, CompatLosses([]), arch_sampler=lambda step: arch)
    cfg = TrainConfig(optim={"name": "sgd", "lr": 0.05})
    first = fine_tune(task, _batches(1), cfg)
    last = fine_tune(task, _batches(30), cfg)
    assert last < 0.5 * first


def test_the_estimator_scores_a_tuned_copy_and_restores_the_supernet(tiny_raw: dict) -> None:
    model, arch = _supernet(tiny_raw, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Scorer:  # stands in for the one-shot evaluator: scores whatever supernet it holds
        supernet = model

        def __call__(self, a: dict) -> dict:
            return {"weights": float(sum(p.double().sum() for p in self.supernet.parameters()))}

    base = Scorer()
    cfg = TrainConfig(optim={"name": "sgd", "lr": 0.05})
    tuned = FineTunedEvaluator(
        base, lambda m, a: fine_tune(CompatTask(m, CompatLosses([]), arch_sampler=lambda s: a), _batches(5), cfg)
    )
    assert tuned(arch)["weights"] != base(arch)["weights"]
    assert base.supernet is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
