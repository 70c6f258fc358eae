"""What every stage shares: loading data, checking the gallery, the space and budget of the NAS
stages, and finishing (save the model, write the manifest) — plus the result object stages return."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmpnas.config import Config, ModelConfig, dump_config
from cmpnas.data.base import DataBundle
from cmpnas.data.factory import build_data
from cmpnas.distributed import barrier, init_distributed
from cmpnas.errors import CmpnasError
from cmpnas.io import write_text_atomic
from cmpnas.manifest import write_manifest
from cmpnas.models.cost import count_macs
from cmpnas.models.embedding import EmbeddingModel, ModelSpec, fingerprint, load_model, save_model
from cmpnas.models.spaces import budget_from, create_space
from cmpnas.training.loop import TrainResult

MODEL_FILE = "model.safetensors"


class StageResult(dict[str, Any]):
    """What a stage returns: its outputs (as in its manifest; a plain dict, so it is JSON as it is), the
    stage's name ``.stage`` and its output folder ``.out``; ``.path()`` is the trained model file."""

    def __init__(self, stage: str, out: Path | None, outputs: dict[str, Any] | None = None) -> None:
        super().__init__(outputs or {})
        self.stage = stage
        self.out = out

    def path(self, key: str = "model") -> Path:
        """An output file of this stage (``res.path()`` is the trained model)."""
        if self.out is None or key not in self:
            raise CmpnasError(f"Stage '{self.stage}' has no output '{key}'.", f"use one of: {', '.join(self)}")
        return self.out / str(self[key])


def load_data(cfg: Config) -> DataBundle:
    return build_data(cfg.data)


def make_spec(
    mcfg: ModelConfig, data: DataBundle, name: str, compatible_with: str | None = None
) -> ModelSpec:
    return ModelSpec(
        backbone=mcfg.backbone,
        embed_dim=mcfg.embed_dim,
        num_classes=data.num_classes,
        classifier=mcfg.classifier,
        cosine_scale=mcfg.cosine_scale,
        margin=mcfg.margin,
        backbone_kwargs=dict(mcfg.backbone_kwargs),
        arch=mcfg.arch,
        in_chans=data.in_chans,
        input_size=data.image_size,
        mean=list(data.mean),
        std=list(data.std),
        compatible_with=compatible_with,
        name=name,
        class_names=[str(c) for c in data.class_names],
    )


def train_summary(result: TrainResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "epochs": round(result.epochs, 3),
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from_step,
        "gflops_per_second": None if result.gflops_per_second is None else round(result.gflops_per_second, 2),
        "precision": result.precision,
    }


def finish(
    out: Path,
    stage: str,
    model: EmbeddingModel,
    cfg_dump: dict,
    inputs: dict,
    result: TrainResult,
    started: float,
    extra_outputs: dict | None = None,
) -> StageResult:
    info = init_distributed()
    outputs: dict[str, Any] = {}
    if info.is_main:
        fp = save_model(model, out / MODEL_FILE)
        outputs = {
            "model": MODEL_FILE,
            "fingerprint": fp,
            "macs": count_macs(model, model.input_shape(1)),
            "params": sum(p.numel() for p in model.parameters()),
            "train": train_summary(result),
            **(extra_outputs or {}),
        }
        write_manifest(out, stage, cfg_dump, inputs, outputs, started)
    barrier(info)
    return StageResult(stage, out, outputs)


def write_config(out: Path, cfg: Config) -> None:
    """The resolved config next to a stage's outputs (called by the loop once a resume check has passed)."""
    write_text_atomic(out / "config.yaml", dump_config(cfg))


def check_gallery(gallery_path: str | Path, data: DataBundle) -> EmbeddingModel:
    gallery = load_model(gallery_path)
    if (gallery.spec.in_chans, gallery.spec.input_size) != (data.in_chans, data.image_size):
        raise CmpnasError(
            f"Gallery model expects {gallery.spec.in_chans}x{gallery.spec.input_size}px input but the data is "
            f"{data.in_chans}x{data.image_size}px.",
            "use the data config the gallery was trained with",
        )
    return gallery


def make_space(cfg: Config, data: DataBundle) -> Any:
    """The configured search space for this data's input shape."""
    return create_space(cfg.nas.space, in_chans=data.in_chans, input_size=data.image_size)


@dataclass
class NasSetup:
    """What every NAS stage starts from: the data, the checked gallery model, the space and the budget."""

    data: DataBundle
    gallery: EmbeddingModel
    space: Any
    budget: float
    gallery_macs: int


def nas_setup(cfg: Config, gallery_path: str | Path, data: DataBundle | None = None) -> NasSetup:
    data = data or load_data(cfg)
    gallery = check_gallery(gallery_path, data)
    space = make_space(cfg, data)
    budget, g_macs = space_budget(cfg, space, gallery)
    return NasSetup(data, gallery, space, budget, g_macs)


def space_budget(cfg: Config, space: Any, gallery: EmbeddingModel) -> tuple[float, int]:
    """(query MACs budget, gallery MACs); refuses a budget below the space's cheapest architecture."""
    g_macs = count_macs(gallery, gallery.input_shape(1))
    budget = budget_from(cfg.nas, g_macs)
    space.check_budget(budget, gallery.spec.embed_dim)
    return budget, g_macs


def supernet_identity(cfg: Config, data: DataBundle, gallery: EmbeddingModel) -> dict[str, Any]:
    return {
        "space": cfg.nas.space.model_dump(mode="json"),
        "in_chans": data.in_chans,
        "input_size": data.image_size,
        "embed_dim": gallery.spec.embed_dim,
        "num_classes": data.num_classes,
        "gallery_fingerprint": fingerprint(gallery),
        "train_data": data.train_identity(),
    }
