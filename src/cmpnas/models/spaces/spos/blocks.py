"""The SPOS choice blocks and their channel slicing: what one layer of a path computes, and its MACs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmpnas.errors import CmpnasError

Arch = dict
KERNELS = {"shuffle3": 3, "shuffle5": 5, "shuffle7": 7, "xception": 3}


def mid_channels(stage_width: int, scale: float) -> int:
    """Mid width of a block: stage_width // 2 * scale, rounded to the nearest even number, at least 2."""
    raw = (stage_width // 2) * scale
    return max(2, int(raw / 2 + 0.5) * 2)


def out_size(size: int, stride: int) -> int:
    """Spatial size after an odd k x k conv with padding k // 2 (every conv in this space)."""
    return (size - 1) // stride + 1


@dataclass(frozen=True)
class LayerSpec:
    """Shape facts of one choice layer; everything the LUT and the blocks need."""

    index: int
    stage: int
    in_channels: int
    out_channels: int
    stride: int
    project: bool  # first block of a stage: projection branch instead of channel split
    in_size: int
    out_size: int
    mids: tuple[int, ...]  # mid width per channel scale (same order as cfg.channel_scales)

    @property
    def main_in(self) -> int:
        return self.in_channels if self.project else self.out_channels // 2

    @property
    def main_out(self) -> int:
        return self.out_channels - (self.in_channels if self.project else self.out_channels // 2)


def block_macs(spec: LayerSpec, choice: str, mid: int) -> int:
    """Conv MACs of one block, counted as the hook counter counts them (out elems x in/groups x k^2)."""
    a_in, a_out = spec.in_size**2, spec.out_size**2
    kernel = KERNELS[choice]
    if choice == "xception":
        main = a_out * spec.main_in * 9 + a_out * spec.main_in * mid  # dw 3x3 (strided) -> pw in->mid
        main += a_out * mid * 9 + a_out * mid * mid  # dw 3x3 -> pw mid->mid
        main += a_out * mid * 9 + a_out * mid * spec.main_out  # dw 3x3 -> pw mid->out
    else:
        main = a_in * spec.main_in * mid  # pw before the strided dw: input resolution
        main += a_out * mid * kernel * kernel
        main += a_out * mid * spec.main_out
    proj = 0
    if spec.project:
        proj = a_out * spec.in_channels * kernel * kernel + a_out * spec.in_channels * spec.in_channels
    return main + proj


def _sliced_batch_norm(bn: nn.BatchNorm2d, x: Tensor, channels: int) -> Tensor:
    """BN over the first ``channels`` features, updating those running statistics in place."""
    factor = 0.0
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean[:channels] if bn.running_mean is not None and track else None
    running_var = bn.running_var[:channels] if bn.running_var is not None and track else None
    weight = bn.weight[:channels] if bn.weight is not None else None
    bias = bn.bias[:channels] if bn.bias is not None else None
    return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor, bn.eps)


class ConvBN(nn.Module):
    """conv -> BN (-> ReLU). ``in_mid``/``out_mid`` mark the sides that carry the block's searchable mid
    width; such a conv can run on the first ``mid`` channels only (weight slicing, see module docstring)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        *,
        depthwise: bool = False,
        relu: bool = False,
        affine: bool = True,
        in_mid: bool = False,
        out_mid: bool = False,
    ) -> None:
        super().__init__()
        groups = cin if depthwise else 1
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, affine=affine)
        self.relu = relu
        self.depthwise = depthwise
        self.in_mid, self.out_mid = in_mid, out_mid
        self.mid_width = cout if out_mid else cin if in_mid else None

    def forward(self, x: Tensor, mid: int | None = None) -> Tensor:
        if self.mid_width is None or mid is None or mid == self.mid_width:
            y = self.bn(self.conv(x))
        else:
            y = self._sliced(x, mid)
        return F.relu(y) if self.relu else y

    def used_slice(self, mid: int | None) -> tuple[slice, ...]:
        """The part of the conv weight a path with this ``mid`` width uses (all of it at full width)."""
        if self.mid_width is None or mid is None or mid == self.mid_width:
            return (slice(None),)
        rows = slice(0, mid) if self.out_mid else slice(None)
        cols = slice(0, mid) if (self.in_mid and not self.depthwise) else slice(None)
        return (rows, cols)

    def _sliced(self, x: Tensor, mid: int) -> Tensor:
        if mid > self.mid_width:
            raise ValueError(f"mid {mid} exceeds the allocated width {self.mid_width}")
        weight = self.conv.weight
        out_c = mid if self.out_mid else weight.shape[0]
        if self.depthwise:
            weight, groups = weight[:out_c], out_c
        else:
            in_c = mid if self.in_mid else weight.shape[1]
            weight, groups = weight[:out_c, :in_c], 1
        y = F.conv2d(x, weight, None, self.conv.stride, self.conv.padding, 1, groups)
        return _sliced_batch_norm(self.bn, y, out_c)


def split_shuffle(x: Tensor) -> tuple[Tensor, Tensor]:
    """SPOS channel shuffle + split: even channels (pass-through) and odd channels (main branch).

    Shuffling c channels as (c/2, 2) -> transpose -> flatten puts the even channels first, so the shuffle
    and the split are two strided slices: two ONNX Slice ops instead of Reshape/Transpose/Reshape/Slice/Slice
    (fewer ops is what counts for the batch-1 latency of these small nets).
    """
    return x[:, 0::2], x[:, 1::2]


class ChoiceBlock(nn.Module):
    """One ShuffleNetV2 unit (Shuffle k x k or Shuffle-Xception) allocated at ``mid`` width."""

    def __init__(self, spec: LayerSpec, choice: str, mid: int, affine: bool = True) -> None:
        super().__init__()
        if choice not in KERNELS:
            raise CmpnasError(f"Unknown block choice '{choice}'.", f"use one of {', '.join(KERNELS)}")
        self.choice, self.mid, self.stride = choice, mid, spec.stride
        kernel = KERNELS[choice]
        cin, cout, s = spec.main_in, spec.main_out, spec.stride
        if choice == "xception":
            ops = [
                ConvBN(cin, cin, 3, s, depthwise=True, affine=affine),
                ConvBN(cin, mid, 1, relu=True, affine=affine, out_mid=True),
                ConvBN(mid, mid, 3, depthwise=True, affine=affine, in_mid=True, out_mid=True),
                ConvBN(mid, mid, 1, relu=True, affine=affine, in_mid=True, out_mid=True),
                ConvBN(mid, mid, 3, depthwise=True, affine=affine, in_mid=True, out_mid=True),
                ConvBN(mid, cout, 1, relu=True, affine=affine, in_mid=True),
            ]
        else:
            ops = [
                ConvBN(cin, mid, 1, relu=True, affine=affine, out_mid=True),
                ConvBN(mid, mid, kernel, s, depthwise=True, affine=affine, in_mid=True, out_mid=True),
                ConvBN(mid, cout, 1, relu=True, affine=affine, in_mid=True),
            ]
        self.main = nn.ModuleList(ops)
        self.proj: nn.ModuleList | None = None
        if spec.project:
            inp = spec.in_channels
            self.proj = nn.ModuleList(
                [
                    ConvBN(inp, inp, kernel, s, depthwise=True, affine=affine),
                    ConvBN(inp, inp, 1, relu=True, affine=affine),
                ]
            )

    def forward(self, x: Tensor, mid: int | None = None) -> Tensor:
        if self.proj is not None:
            passthrough = x
            for op in self.proj:
                passthrough = op(passthrough)
        else:
            passthrough, x = split_shuffle(x)
        for op in self.main:
            x = op(x, mid)
        return torch.cat([passthrough, x], 1)
