"""SPOS supernet training updates only the sampled path: off-path blocks and the unused channels of a
partly used (sliced) block keep their values although weight decay and momentum are on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cmpnas.compat.losses import CompatLosses
from cmpnas.config import TrainConfig
from cmpnas.models.spaces import create_space
from cmpnas.nas.supernet import SupernetEmbedding
from cmpnas.training.loop import train
from cmpnas.training.tasks import CompatTask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_only_the_sampled_path_is_updated(tmp_path: Path, tiny_raw: dict, tiny_data, optim: str) -> None:
    space = create_space(tiny_raw["nas"]["space"], in_chans=1, input_size=28)
    torch.manual_seed(0)
    model = SupernetEmbedding(space, 16, tiny_data.num_classes)
    small = min(space.scales)
    arch = {"blocks": [0] * space.num_layers, "scales": [small] * space.num_layers}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = CompatTask(model, CompatLosses([]), arch_sampler=lambda step: arch)
    cfg = TrainConfig(
        epochs=1, batch_size=50, warmup_epochs=0, log_every=100, threads=1,
        optim={"name": optim, "lr": 0.05, "weight_decay": 0.1, "momentum": 0.9},
    )
    train(task, tiny_data.train, cfg, tmp_path, mean=tiny_data.mean, std=tiny_data.std, stage="t")

    params = dict(model.named_parameters())
    for layer in range(space.num_layers):
        for choice in range(1, len(space.choices)):  # never on the path
            prefix = f"supernet.layers.{layer}.{choice}."
            for name in (n for n in params if n.startswith(prefix)):
                assert torch.equal(params[name], before[name]), name
        block = model.supernet.layers[layer][0]
        mid = space.mid(layer, small)
        for i, op in enumerate(block.main):
            name = f"supernet.layers.{layer}.0.main.{i}.conv.weight"
            used = op.used_slice(mid)
            mask = torch.zeros_like(params[name], dtype=torch.bool)
            mask[used] = True
            assert not mask.all(), "the path must use part of the block only"
            assert torch.equal(params[name][~mask], before[name][~mask]), f"{name}: unused channels moved"
            assert not torch.equal(params[name][mask], before[name][mask]), f"{name}: the path did not learn"
    assert not torch.equal(params["head.0.weight"], before["head.0.weight"])  # shared parts do learn
