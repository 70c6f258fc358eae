"""Architecture files: a plain ``{"blocks", "scales"}`` JSON or a ``search.json`` (its best arch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cmpnas.config import Config, ModelConfig
from cmpnas.errors import CmpnasError


def read_arch(path_or_arch: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(path_or_arch, dict):
        data = path_or_arch
    else:
        p = Path(path_or_arch)
        if not p.is_file():
            raise CmpnasError(
                f"Architecture file '{p}' does not exist.", "pass search.json from `cmpnas search`"
            )
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise CmpnasError(
                f"Architecture file '{p}' is not valid JSON ({exc}).", "pass search.json"
            ) from None
    if "best" in data and isinstance(data["best"], dict):
        data = data["best"]
    if "arch" in data and isinstance(data["arch"], dict):
        data = data["arch"]
    if not {"blocks", "scales"} <= set(data):
        raise CmpnasError(
            "Architecture JSON needs 'blocks' and 'scales' (or a search.json with 'best').",
            "pass the search.json written by `cmpnas search`",
        )
    return {"blocks": list(data["blocks"]), "scales": list(data["scales"])}


def query_config_for_arch(cfg: Config, arch: str | Path | dict[str, Any]) -> ModelConfig:
    """A query ModelConfig for a SPOS architecture of the config's space (embedding dim = gallery's)."""
    return ModelConfig(
        backbone="spos",
        backbone_kwargs={"space": cfg.nas.space.model_dump(mode="json"), "input_size": cfg.data.image_size},
        arch=read_arch(arch),
        embed_dim=cfg.gallery.embed_dim,
        classifier=cfg.query.classifier,
        cosine_scale=cfg.query.cosine_scale,
        margin=cfg.query.margin,
    )
