"""Stage ``supernet``: the one-shot supernet trained with the compatibility objective."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from cmpnas import progress
from cmpnas.compat.targets import compat_losses_for
from cmpnas.config import Config, dump_config
from cmpnas.data.base import DataBundle
from cmpnas.distributed import barrier, init_distributed
from cmpnas.io import write_json_atomic, write_text_atomic
from cmpnas.manifest import write_manifest
from cmpnas.models.spaces import family_budgets, sample_bands
from cmpnas.nas.candidates import build_evaluator
from cmpnas.nas.health import health_line, health_paths, supernet_health
from cmpnas.nas.supernet import SupernetEmbedding, save_supernet
from cmpnas.stages.common import (
    StageResult,
    nas_setup,
    supernet_identity,
)
from cmpnas.training.loop import schedule_steps, train
from cmpnas.training.tasks import CompatTask

SUPERNET_FILE = "supernet.safetensors"
HEALTH_FILE = "health.json"


def measure_health(
    cfg: Config,
    model: SupernetEmbedding,
    gallery: Any,
    data: DataBundle,
    space: Any,
    bands: list[tuple[float, float]],
) -> dict[str, Any]:
    """Score ``nas.supernet.health_paths`` random paths of the search bands on validation, as the search will
    (same BN recalibration and reward images), each band in turn."""
    s = cfg.nas.search
    embed_dim = gallery.spec.embed_dim
    hm = space.head_macs(embed_dim)

    def sample(rng: Any) -> dict:
        if not bands:
            return space.sample(rng)
        lo, hi = bands[rng.randrange(len(bands))]
        return space.sample_in_band_or_fair(rng, lo - hm, hi - hm, max_tries=500)

    paths = health_paths(sample, space.arch_key, cfg.nas.supernet.health_paths, s.seed + 41)
    evaluator = build_evaluator(model, gallery, data, s.recal_images, s.recal_batch, s.val_images, s.seed)
    health = supernet_health(
        evaluator,
        paths,
        len(set(data.val.labels.tolist())),
        cfg.nas.supernet.min_skill,
        macs=lambda a: space.query_macs(a, embed_dim),
    )
    progress.event("health", message=health_line(health))
    return health


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
    scfg = cfg.nas.supernet
    compat = scfg.compat or cfg.compat
    tcfg = cfg.nas.supernet_train
    losses = compat_losses_for(cfg, gallery, gallery_path, data, compat, tcfg.label_smoothing)
    bands = sample_bands(cfg.nas, budget, family_budgets(cfg.nas, g_macs))
    _, total_steps = schedule_steps(len(data.train), tcfg, init_distributed().world_size)
    sampler = space.path_sampler(
        tcfg.seed,
        None,
        None,
        gallery.spec.embed_dim,
        sampling=scfg.sampling,
        widest_until=int(scfg.width_warmup * total_steps),
        bands=bands,
        sandwich=scfg.sandwich,
    )
    task = CompatTask(
        model, losses, tcfg.label_smoothing, arch_sampler=sampler, inplace_distill=scfg.inplace_distill
    )
    result = train(
        task,
        data.train,
        tcfg,
        out,
        mean=data.mean,
        std=data.std,
        stage="supernet",
        resume=resume,
        identity_extra=json.dumps(ident, sort_keys=True) + compat.model_dump_json() + scfg.model_dump_json(),
        on_start=lambda: write_text_atomic(out / "config.yaml", dump_config(cfg)),
    )
    outputs: dict[str, Any] = {}
    if init_distributed().is_main:
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        health = measure_health(cfg, model, gallery, data, space, bands)
        model.load_state_dict(trained)  # the saved supernet is the trained one, not the last path's BN statistics
        write_json_atomic(out / HEALTH_FILE, health)
        summary = {k: v for k, v in health.items() if k != "paths"}
        save_supernet(
            model,
            out / SUPERNET_FILE,
            {
                **ident,
                "classifier": cfg.query.classifier,
                "cosine_scale": cfg.query.cosine_scale,
                "budget_macs": budget,
                "health": summary,
            },
        )
        outputs = {
            "supernet": SUPERNET_FILE,
            "budget_macs": budget,
            "gallery_macs": g_macs,
            "sample_bands": [list(b) for b in bands],
            "health": summary,
            "space_macs_range": [space.min_macs(), space.max_macs()],
            "train": {
                "steps": result.steps,
                "seconds": round(result.seconds, 2),
                "images_per_second": round(result.images_per_second, 1),
                "final_loss": result.final_loss,
                "width_warmup_steps": int(scfg.width_warmup * total_steps),
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
