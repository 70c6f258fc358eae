"""A few optimizer steps of a task on fixed batches, in memory: no checkpoint, no log, no schedule.

For short throw-away training inside another stage (the fine-tune estimator trains each candidate's path this
way); a stage that keeps its model trains through :func:`cmpnas.training.loop.train`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cmpnas.config import TrainConfig
from cmpnas.training.loop import build_optimizer
from cmpnas.training.tasks import CompatTask


def fine_tune(
    task: CompatTask, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cfg: TrainConfig
) -> float:
    """One step per batch of (images, labels, dataset rows) at ``cfg.optim``'s constant learning rate (the
    loop's optimizer: no decay on BN and biases); returns the last step's loss."""
    task.train()
    optimizer = build_optimizer(task, cfg)
    loss = torch.zeros(())
    for step, (x, y, index) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task(x, y, index, step)
        loss.backward()
        task.after_backward()
        optimizer.step()
    return float(loss.detach())
