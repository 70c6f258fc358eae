"""Batch-level preprocessing shared by training, evaluation, export and serving.

Datasets return uint8 [C,H,W]; whole batches are converted, normalised and (for training) augmented
here in one vectorised step, which is much faster on CPU than per-image PIL transforms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cmpnas.errors import CmpnasError


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or 0..1 float) [B,C,H,W] -> normalised float32.

    A uint8 batch is always 0..255 (decided by its dtype, so a dark batch with every pixel <= 1 is still
    scaled); a float batch is taken as 0..1 unless its values show it is 0..255.
    """
    scale = x.dtype == torch.uint8
    x = x.float()
    if scale or x.max() > 1.5:
        x = x / 255.0
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True
) -> torch.Tensor:
    """Random translation (pad + crop, per image) and horizontal flip, vectorised over the batch."""
    b, _, h, w = x.shape
    if pad > 0:
        c = x.shape[1]
        padded = F.pad(x, (pad, pad, pad, pad))
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        rows = (dy.view(b, 1, 1, 1) + ar_h.view(1, 1, h, 1)).expand(b, c, h, padded.shape[3])
        x = torch.gather(padded, 2, rows)
        cols = (dx.view(b, 1, 1, 1) + ar_w.view(1, 1, 1, w)).expand(b, c, h, w)
        x = torch.gather(x, 3, cols)
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask.view(b, 1, 1, 1), x.flip(3), x)
    return x


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (16-bit PNG / TIFF: modes I;16*, I, F) scaled to 8-bit "L".

    Why: PIL's own ``convert("L")`` clips every value above 255, so a 16-bit image comes out white.
    I;16 is scaled by 1/257 (65535 -> 255); 32-bit "I" too when it holds values above 255 (else it is
    already 0..255); float "F" is read as 0..1 when its maximum is at most 1, else as 0..255. Every
    other mode (L, RGB, CMYK, P, ...) is returned unchanged: ``convert`` handles those correctly.
    """
    if img.mode not in _SIXTEEN_BIT_MODES and img.mode not in ("I", "F"):
        return img
    values = np.asarray(img, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if img.mode == "F":
        scale = 255.0 if peak <= 1.0 else 1.0
    else:
        scale = 1 / 257 if (img.mode in _SIXTEEN_BIT_MODES or peak > 255) else 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))  # 2-D uint8: "L"


def pil_to_uint8(img: Image.Image, in_chans: int, size: int) -> torch.Tensor:
    """PIL image -> uint8 [C,size,size]: convert mode (16-bit scaled, CMYK to RGB), resize shorter side,
    centre crop."""
    img = to_8bit(img).convert("L" if in_chans == 1 else "RGB")
    w, h = img.size
    if w == 0 or h == 0:
        raise CmpnasError("Image has zero width or height.", "send a real image")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 ``[N,C,H,W]`` in chunks, to bound the float copy."""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].float()
        resized = F.interpolate(
            block, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + chunk] = resized.round().clamp(0, 255).to(torch.uint8)
    return out
