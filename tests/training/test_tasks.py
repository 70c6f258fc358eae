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


def test_a_sandwich_step_updates_the_union_of_its_paths_only(tmp_path: Path, tiny_raw: dict, tiny_data) -> None:
    space = create_space(tiny_raw["nas"]["space"], in_chans=1, input_size=28)
    torch.manual_seed(0)
    model = SupernetEmbedding(space, 16, tiny_data.num_classes)
    small = min(space.scales)
    paths = [
        {"blocks": [0] * space.num_layers, "scales": [small] * space.num_layers},
        {"blocks": [1] * space.num_layers, "scales": [small] * space.num_layers},
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = CompatTask(model, CompatLosses([]), arch_sampler=lambda step: paths, inplace_distill=True)
    cfg = TrainConfig(
        epochs=1, batch_size=50, warmup_epochs=0, log_every=100, threads=1,
        optim={"name": "sgd", "lr": 0.05, "weight_decay": 0.1, "momentum": 0.9},
    )
    train(task, tiny_data.train, cfg, tmp_path, mean=tiny_data.mean, std=tiny_data.std, stage="t")

    params = dict(model.named_parameters())
    for layer in range(space.num_layers):
        for choice in range(len(space.choices)):
            names = [n for n in params if n.startswith(f"supernet.layers.{layer}.{choice}.")]
            moved = any(not torch.equal(params[n], before[n]) for n in names)
            assert moved == (choice in (0, 1)), (layer, choice)
        name = f"supernet.layers.{layer}.1.main.0.conv.weight"  # the second path's block: sliced, distilled
        op = model.supernet.layers[layer][1].main[0]
        mask = torch.zeros_like(params[name], dtype=torch.bool)
        mask[op.used_slice(space.mid(layer, small))] = True
        assert torch.equal(params[name][~mask], before[name][~mask]), f"{name}: unused channels moved"
        assert not torch.equal(params[name][mask], before[name][mask]), f"{name}: the student did not learn"


def test_inplace_distillation_is_the_kl_to_the_first_paths_softmax(tiny_raw: dict, tiny_data) -> None:
    import numpy as np

    space = create_space(tiny_raw["nas"]["space"], in_chans=1, input_size=28)
    torch.manual_seed(0)
    model = SupernetEmbedding(space, 16, tiny_data.num_classes).train()  # batch statistics, as in training
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.mul_(5)  # logits far from uniform, so the KL is not ~0
    teacher = space.sample(__import__("random").Random(1))
    student = space.sample(__import__("random").Random(2))
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % tiny_data.num_classes
    task = CompatTask(model, CompatLosses([]), arch_sampler=lambda step: [teacher, student], inplace_distill=True)
    loss, logs = task(x, y, torch.arange(8), 0)

    with torch.no_grad():
        t = model.classifier(model(x, teacher)).double().numpy()
        s = model.classifier(model(x, student)).double().numpy()
    log_softmax = lambda z: z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))  # noqa: E731
    ce = -log_softmax(t)[np.arange(8), y.numpy()].mean()
    p = np.exp(log_softmax(t))
    kl = (p * (np.log(p) - log_softmax(s))).sum(1).mean()
    assert kl > 0.05
    assert float(loss.detach()) == pytest.approx(ce + kl, rel=1e-4)
    assert logs["paths"] == 2 and logs["loss_own"] == pytest.approx(kl, rel=1e-4)
