"""Stage ``gallery``: train the gallery model (backbone + embedding head + classifier), plain CE."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cmpnas.config import Config
from cmpnas.data.base import DataBundle
from cmpnas.models.cost import count_macs
from cmpnas.models.embedding import EmbeddingModel
from cmpnas.stages.common import StageResult, finish, load_data, make_spec, write_config
from cmpnas.training.loop import train
from cmpnas.training.tasks import ClassificationTask


def train_gallery(
    cfg: Config, out_dir: str | Path, resume: bool = False, data: DataBundle | None = None
) -> StageResult:
    """Train the gallery model (backbone + head + classifier) with plain cross-entropy."""
    started = time.time()
    out = Path(out_dir)
    data = data or load_data(cfg)
    torch.manual_seed(cfg.gallery_train.seed)  # the seed fixes the initial weights too, whatever ran before
    model = EmbeddingModel(make_spec(cfg.gallery, data, "gallery"), pretrained=cfg.gallery.pretrained)
    macs = count_macs(model, model.input_shape(1))
    task = ClassificationTask(model, cfg.gallery_train.label_smoothing)
    result = train(
        task,
        data.train,
        cfg.gallery_train,
        out,
        mean=data.mean,
        std=data.std,
        stage="gallery",
        resume=resume,
        macs_per_image=macs,
        identity_extra=data.train_identity(),
        on_start=lambda: write_config(out, cfg),
    )
    model.eval()
    return finish(
        out, "train-gallery", model, cfg.model_dump(mode="json"), {"data": data.describe()}, result, started
    )
