"""BatchNorm recalibration: give a sub-network of a weight-sharing supernet its own BN statistics.

A supernet's running statistics are a blend over every path trained, so each candidate must re-estimate them
before it is evaluated (SPOS ``tester.py``; without it the search is unstable). Two choices make the estimate
reproducible and independent of history, as in OFA's ``set_running_statistics``:

- ``momentum=None`` turns the running statistics into a *cumulative* average over the calibration batches
  (the mean of the per-batch means and of the per-batch unbiased variances) instead of SPOS's EMA, which
  mostly reflects the last few dozen batches;
- the calibration images are a fixed, seeded subset cached as tensors (:func:`make_calibration_batches`), so
  every candidate sees identical data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cmpnas.errors import CmpnasError

log = logging.getLogger(__name__)

Batches = Sequence[Tensor] | Callable[[], Iterable[Any]]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Batches,
    forward: Callable[[Tensor], Any] | None = None,
) -> None:
    """Re-estimate the running statistics of every BatchNorm in ``model`` from ``batches``.

    Args:
        model: the network whose BN layers are recalibrated in place.
        batches: image tensors, or a callable returning an iterable of them. A ``(images, labels, ...)``
            tuple counts as its first element, so a DataLoader works too.
        forward: how to run one batch, e.g. ``lambda x: supernet(x, arch)``; default ``model(x)``.
            Batches are moved to the model's device first.

    Every BN's momentum and every module's training flag are restored afterwards, also on error.
    """
    bn_layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bn_layers:
        log.debug("recalibrate_bn: the model has no BatchNorm tracking running statistics; nothing to do")
        return
    run = forward if forward is not None else model
    device = _device_of(model)
    momenta = {bn: bn.momentum for bn in bn_layers}
    training = {m: m.training for m in model.modules()}
    try:
        for bn in bn_layers:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        n_batches = 0
        for batch in batches() if callable(batches) else batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if device is not None:
                images = images.to(device, non_blocking=True)
            try:
                run(images)
            except ValueError as exc:
                if "Expected more than 1 value per channel" not in str(exc):
                    raise
                raise CmpnasError(
                    f"BN recalibration got a batch of {len(images)} image(s), too few for batch statistics.",
                    "use calibration batches of at least 2 images (nas.search.recal_batch >= 2)",
                ) from None
            n_batches += 1
        if n_batches == 0:
            raise CmpnasError(
                "BN recalibration got no calibration batches.",
                "pass at least one batch of training images (check nas.search.recal_images and the data)",
            )
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for module, flag in training.items():
            module.training = flag


def make_calibration_batches(images: Tensor, n_images: int, batch_size: int, seed: int) -> list[Tensor]:
    """A fixed, seeded random subset of ``images`` (already preprocessed floats), split into batches.

    The subset is split into ``ceil(n / batch_size)`` batches of near-equal size (differing by at most one,
    none above ``batch_size``): a last batch of a single image would break BatchNorm on 1x1 feature maps,
    and equal sizes keep the cumulative average of batch means equal to the subset mean.
    If ``n_images`` exceeds the images available, all images are used.
    """
    if not isinstance(images, Tensor) or images.dim() == 0 or len(images) == 0:
        raise CmpnasError(
            "BN calibration needs a non-empty tensor of images.",
            "pass the preprocessed training images as an (N, C, H, W) tensor",
        )
    if n_images < 1 or batch_size < 1:
        raise CmpnasError(
            f"BN calibration needs n_images >= 1 and batch_size >= 1 (got {n_images}, {batch_size}).",
            "set nas.search.recal_images and nas.search.recal_batch to positive values",
        )
    if n_images > len(images):
        log.warning(
            "BN calibration: %d images requested, only %d available; using all", n_images, len(images)
        )
        n_images = len(images)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(images), generator=generator)[:n_images]
    subset = images[chosen.to(images.device)]
    return list(torch.tensor_split(subset, math.ceil(n_images / batch_size)))


def _device_of(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None
