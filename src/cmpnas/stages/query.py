"""Stage ``query`` (and ``retrain``): a compact query model trained against the frozen gallery model.

``retrain`` is the same stage for an architecture found by the search (BCT, the retrain schedule).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cmpnas.compat.targets import compat_losses_for
from cmpnas.config import CompatConfig, Config, ModelConfig, TrainConfig
from cmpnas.data.base import DataBundle
from cmpnas.errors import CmpnasError
from cmpnas.models.cost import count_macs
from cmpnas.models.embedding import EmbeddingModel, fingerprint
from cmpnas.nas.arch_io import query_config_for_arch
from cmpnas.stages.common import StageResult, check_gallery, finish, load_data, make_spec, write_config
from cmpnas.training.loop import train
from cmpnas.training.tasks import CompatTask


def train_query(
    cfg: Config,
    gallery_path: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    data: DataBundle | None = None,
    model_cfg: ModelConfig | None = None,
    compat: CompatConfig | None = None,
    train_cfg: TrainConfig | None = None,
    name: str = "query",
    stage: str = "train-query",
) -> StageResult:
    """Train a query model against a frozen gallery model (independent / BCT / + alignment)."""
    started = time.time()
    out = Path(out_dir)
    data = data or load_data(cfg)
    mcfg = model_cfg or cfg.query
    compat = compat or cfg.compat
    tcfg = train_cfg or cfg.query_train
    gallery = check_gallery(gallery_path, data)
    if mcfg.embed_dim != gallery.spec.embed_dim:
        raise CmpnasError(
            f"Query embed_dim {mcfg.embed_dim} differs from the gallery's {gallery.spec.embed_dim}: the embeddings "
            "would not be comparable.",
            f"set query.embed_dim: {gallery.spec.embed_dim}",
        )
    gfp = fingerprint(gallery)
    compatible_with = gfp if compat.mode != "independent" else None
    torch.manual_seed(tcfg.seed)  # the seed fixes the initial weights too, whatever ran before
    model = EmbeddingModel(make_spec(mcfg, data, name, compatible_with), pretrained=mcfg.pretrained)
    losses = compat_losses_for(cfg, gallery, gallery_path, data, compat, tcfg.label_smoothing)
    del gallery
    task = CompatTask(model, losses, tcfg.label_smoothing)
    macs = count_macs(model, model.input_shape(1))
    result = train(
        task,
        data.train,
        tcfg,
        out,
        mean=data.mean,
        std=data.std,
        stage=name,
        resume=resume,
        macs_per_image=macs,
        identity_extra=gfp + compat.model_dump_json() + data.train_identity(),
        on_start=lambda: write_config(out, cfg),
    )
    model.eval()
    inputs = {
        "data": data.describe(),
        "gallery": {"path": str(gallery_path), "fingerprint": gfp},
        "compat": compat.model_dump(mode="json"),
        "train": tcfg.model_dump(mode="json"),  # the schedule and seed actually used (per-seed runs)
    }
    return finish(out, stage, model, cfg.model_dump(mode="json"), inputs, result, started)


def retrain(
    cfg: Config,
    gallery_path: str | Path,
    arch: str | Path | dict,
    out_dir: str | Path,
    resume: bool = False,
    data: DataBundle | None = None,
    name: str = "cmpnas",
    train_cfg: TrainConfig | None = None,
) -> StageResult:
    """The found architecture trained from scratch with BCT against the frozen gallery (``train_cfg``
    defaults to ``nas.retrain``; the pipeline passes it with a per-seed seed)."""
    mcfg = query_config_for_arch(cfg, arch)
    return train_query(
        cfg,
        gallery_path,
        out_dir,
        resume=resume,
        data=data,
        model_cfg=mcfg,
        train_cfg=train_cfg or cfg.nas.retrain or cfg.query_train,
        name=name,
        stage="retrain",
    )
