"""Atomic training checkpoints (model, optimizer, scheduler, RNG, step) for --resume."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": list(_py_state_to_list(random.getstate())),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "augment": generator.get_state(),
    }


def _py_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    generator.set_state(state["augment"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


_PAYLOAD_KEYS = ("identity", "step", "task", "optimizer", "scheduler", "rng")
_DELETE_OR_RESTORE = (
    "delete it to train this stage from scratch (cmpnas run: --force STAGE), or restore it; it is never "
    "overwritten while unreadable"
)


def load_checkpoint(path: Path, expected_identity: str) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise CmpnasError(
            f"Checkpoint '{path}' is unreadable ({type(exc).__name__}: truncated or corrupt).",
            _DELETE_OR_RESTORE,
        ) from None
    if not isinstance(payload, dict) or any(k not in payload for k in _PAYLOAD_KEYS):
        raise CmpnasError(
            f"Checkpoint '{path}' is unreadable (not a cmpnas training checkpoint).", _DELETE_OR_RESTORE
        )
    if payload.get("identity") != expected_identity:
        raise CmpnasError(
            f"Checkpoint '{path}' belongs to a different run (model or training config changed).",
            "resume with the same config, or use a new --out directory / drop --resume",
        )
    return payload
