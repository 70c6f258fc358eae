"""Stage ``supernet``: the one-shot supernet trained with the compatibility objective."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from cmpnas.compat.targets import compat_losses_for
from cmpnas.config import Config, dump_config
from cmpnas.data.base import DataBundle
from cmpnas.distributed import barrier, init_distributed
from cmpnas.io import write_text_atomic
from cmpnas.manifest import write_manifest
from cmpnas.models.spaces import band_limits, family_budgets
from cmpnas.nas.supernet import SupernetEmbedding, save_supernet
from cmpnas.stages.common import (
    StageResult,
    nas_setup,
    supernet_identity,
)
from cmpnas.training.loop import train
from cmpnas.training.tasks import CompatTask

SUPERNET_FILE = "supernet.safetensors"


def train_supernet(
    cfg: Config,
    gallery_path: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    data: DataBundle | None = None,
) -> StageResult:
    """One-shot supernet trained with own CE + the BCT loss through the frozen gallery classifier."""
    started = time.time()
    out = Path(out_dir)
    setup = nas_setup(cfg, gallery_path, data)
    data, gallery, space, budget, g_macs = (
        setup.data, setup.gallery, setup.space, setup.budget, setup.gallery_macs
    )
    ident = supernet_identity(cfg, data, gallery)
    torch.manual_seed(cfg.nas.supernet_train.seed)  # the seed fixes the initial weights too
    model = SupernetEmbedding(
        space, gallery.spec.embed_dim, data.num_classes, cfg.query.classifier, cfg.query.cosine_scale
    )
    compat = cfg.compat
    tcfg = cfg.nas.supernet_train
    losses = compat_losses_for(cfg, gallery, gallery_path, data, compat, tcfg.label_smoothing)
    low, high = band_limits(cfg.nas, budget, family_budgets(cfg.nas, g_macs))
    sampler = space.path_sampler(tcfg.seed, low, high, gallery.spec.embed_dim)
    task = CompatTask(model, losses, tcfg.label_smoothing, arch_sampler=sampler)
    result = train(
        task,
        data.train,
        tcfg,
        out,
        mean=data.mean,
        std=data.std,
        stage="supernet",
        resume=resume,
        identity_extra=json.dumps(ident, sort_keys=True) + compat.model_dump_json(),
        on_start=lambda: write_text_atomic(out / "config.yaml", dump_config(cfg)),
    )
    outputs: dict[str, Any] = {}
    if init_distributed().is_main:
        save_supernet(
            model,
            out / SUPERNET_FILE,
            {
                **ident,
                "classifier": cfg.query.classifier,
                "cosine_scale": cfg.query.cosine_scale,
                "budget_macs": budget,
            },
        )
        outputs = {
            "supernet": SUPERNET_FILE,
            "budget_macs": budget,
            "gallery_macs": g_macs,
            "sample_band": [low, high],
            "space_macs_range": [space.min_macs(), space.max_macs()],
            "train": {
                "steps": result.steps,
                "seconds": round(result.seconds, 2),
                "images_per_second": round(result.images_per_second, 1),
            },
        }
        write_manifest(
            out,
            "train-supernet",
            cfg.model_dump(mode="json"),
            {
                "data": data.describe(),
                "gallery": {"path": str(gallery_path), "fingerprint": ident["gallery_fingerprint"]},
            },
            outputs,
            started,
        )
    barrier(init_distributed())
    return StageResult("train-supernet", out, outputs)
