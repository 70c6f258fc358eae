"""Forward-compatible transformation (FCT, Ramanujan et al., CVPR 2022; apple/ml-fct): map *stored* old
gallery embeddings into a new model's space from embeddings alone, for when the new gallery model could not be
trained compatible with the old one (or re-embedding the images is impossible).

The transformation is a small residual MLP ``h(v) = A v + MLP(v)`` fitted on pairs (old model's embedding, new
model's embedding) of the same training images with a cosine loss (both sides L2-normalised, as they are
searched). FCT also feeds side information from the old model; here the old embedding is the only input, so
the index needs nothing but its stored vectors. Saved as one ``.safetensors`` file with the two models'
fingerprints in its metadata: applying it to an index built by another model is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cmpnas.errors import CmpnasError
from cmpnas.io import atomic_path

FORMAT = "cmpnas.transformation.v1"


@dataclass
class TransformationSpec:
    old_fingerprint: str
    new_fingerprint: str
    dim: int
    hidden: int = 512


class EmbeddingTransformation(nn.Module):
    """``h(v) = A v + MLP(v)``: the linear part carries what a rotation can, the MLP the rest."""

    def __init__(self, spec: TransformationSpec) -> None:
        super().__init__()
        self.spec = spec
        d, h = spec.dim, spec.hidden
        self.linear = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, d))
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(d))
            self.mlp[-1].weight.zero_()  # start at the identity: the old space is the best first guess
            self.mlp[-1].bias.zero_()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = F.normalize(v, dim=1)
        return F.normalize(self.linear(v) + self.mlp(v), dim=1)

    @torch.inference_mode()
    def apply_numpy(self, vectors: np.ndarray, batch: int = 4096) -> np.ndarray:
        self.eval()
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        return torch.cat([self(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def fit_transformation(
    old: torch.Tensor,
    new: torch.Tensor,
    spec: TransformationSpec,
    *,
    epochs: int = 30,
    batch_size: int = 512,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[EmbeddingTransformation, dict[str, float]]:
    """Fit ``h`` on paired embeddings [N, D] (row i of both = the same image); returns it and the fit's
    mean cosine between ``h(old)`` and ``new`` before (identity) and after."""
    if old.shape != new.shape or old.ndim != 2:
        raise CmpnasError(
            f"Paired embeddings differ in shape: old {tuple(old.shape)}, new {tuple(new.shape)}.",
            "embed the same images with both models (same embedding dim)",
        )
    torch.manual_seed(seed)
    model = EmbeddingTransformation(spec)
    x, y = F.normalize(old.float(), dim=1), F.normalize(new.float(), dim=1)
    before = float((x * y).sum(1).mean())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, (len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = 1.0 - (model(x[idx]) * y[idx]).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.inference_mode():
        after = float((model(x) * y).sum(1).mean())
    return model, {"train_cosine_identity": before, "train_cosine": after}


def save_transformation(model: EmbeddingTransformation, path: str | Path) -> None:
    meta = {"format": FORMAT, "spec": json.dumps(asdict(model.spec), sort_keys=True)}
    with atomic_path(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)


def load_transformation(path: str | Path) -> EmbeddingTransformation:
    p = Path(path)
    if not p.is_file():
        raise CmpnasError(f"Transformation '{p}' does not exist.", "fit one with cmpnas train-transformation")
    try:
        from safetensors import safe_open

        with safe_open(str(p), "pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CmpnasError(f"Cannot read transformation '{p}' ({str(exc)[:120]}).", "fit it again") from None
    if meta.get("format") != FORMAT:
        raise CmpnasError(f"'{p}' is not a cmpnas transformation.", "fit one with cmpnas train-transformation")
    model = EmbeddingTransformation(TransformationSpec(**json.loads(meta["spec"])))
    model.load_state_dict(tensors)
    return model.eval()
