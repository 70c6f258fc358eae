"""The networks of the space: the weight-sharing supernet, the standalone net of one architecture, and the
standalone net that carries a supernet path's weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmpnas.models.spaces.spos.blocks import Arch, ChoiceBlock, ConvBN

if TYPE_CHECKING:
    from cmpnas.models.spaces.spos.space import SposSpace


def _pool(x: Tensor) -> Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class Stem(ConvBN):
    """conv 3x3 (stem_stride) in_chans -> stem_channels, BN, ReLU."""

    def __init__(self, space: SposSpace, affine: bool) -> None:
        cfg = space.cfg
        super().__init__(space.in_chans, cfg.stem_channels, 3, cfg.stem_stride, relu=True, affine=affine)


class Head(nn.Module):
    """conv 1x1 -> last_channels, BN, ReLU, global average pool -> [B, last_channels]."""

    def __init__(self, space: SposSpace, affine: bool) -> None:
        super().__init__()
        self.last = ConvBN(
            space.layers[-1].out_channels, space.cfg.last_channels, 1, relu=True, affine=affine
        )

    def forward(self, x: Tensor) -> Tensor:
        return _pool(self.last(x))


class Supernet(nn.Module):
    """Weight-sharing SPOS supernet; BN has ``affine=False`` everywhere (as SPOS), so a path's BN statistics
    can be re-estimated cheaply (BN recalibration) without learned scale/shift tied to other paths.

    Each (layer, choice) block is allocated at the layer's largest mid width; ``forward(x, arch)`` runs only
    the path's blocks, slicing the first ``mid`` channels for smaller scales.
    """

    def __init__(self, space: SposSpace) -> None:
        super().__init__()
        self.space = space
        cfg = space.cfg
        self.num_features = cfg.last_channels
        self.stem = Stem(space, affine=False)
        self.layers = nn.ModuleList(
            nn.ModuleList(ChoiceBlock(spec, choice, max(spec.mids), affine=False) for choice in space.choices)
            for spec in space.layers
        )
        self.head = Head(space, affine=False)

    def path_slices(self, arch: Arch) -> list[tuple[nn.Parameter, tuple[slice, ...]]]:
        """(parameter, the slice the path uses) for the sliced weights of ``arch``'s blocks; parameters not
        listed are either wholly used (stem, head) or off the path (their gradient is None)."""
        a = self.space.validate(arch)
        out = []
        for layer, (choice, scale) in enumerate(zip(a["blocks"], a["scales"], strict=True)):
            mid = self.space.mid(layer, scale)
            for op in self.layers[layer][choice].main:
                out.append((op.conv.weight, op.used_slice(mid)))
        return out

    def forward(self, x: Tensor, arch: Arch) -> Tensor:
        a = self.space.validate(arch)
        x = self.stem(x)
        for layer, (choice, scale) in enumerate(zip(a["blocks"], a["scales"], strict=True)):
            x = self.layers[layer][choice](x, self.space.mid(layer, scale))
        return self.head(x)


class SposNet(nn.Module):
    """A standalone subnet (ordinary affine BN): plain ops only, so it exports to ONNX."""

    def __init__(self, space: SposSpace, arch: Arch) -> None:
        super().__init__()
        cfg = space.cfg
        self.arch = space.validate(arch)
        self.num_features = cfg.last_channels
        self.stem = Stem(space, affine=True)
        self.blocks = nn.ModuleList(
            space.block(layer, choice, scale)
            for layer, (choice, scale) in enumerate(
                zip(self.arch["blocks"], self.arch["scales"], strict=True)
            )
        )
        self.head = Head(space, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(space: SposSpace, arch: Arch) -> SposNet:
    """The standalone network of ``arch`` (for retraining, counting MACs, export)."""
    return space.build(arch)


def extract_subnet(supernet: Supernet, arch: Arch) -> SposNet:
    """A standalone net carrying the supernet path's weights: the first ``mid`` channels of every shared
    tensor (the same slices the supernet's forward uses), BN running statistics included, and the affine
    BN parameters at identity. In eval mode it computes exactly ``supernet(x, arch)``; use it to export or
    fine-tune a searched path without retraining from scratch."""
    net = build(supernet.space, arch)
    pairs = [(net.stem, supernet.stem), (net.head, supernet.head)]
    pairs += [(net.blocks[i], supernet.layers[i][c]) for i, c in enumerate(net.arch["blocks"])]
    with torch.no_grad():
        for dst, src in pairs:
            src_state = src.state_dict()
            for name, tensor in dst.state_dict().items():
                if name in src_state:  # affine BN weight/bias exist only in dst: they keep their 1 / 0 init
                    tensor.copy_(src_state[name][tuple(slice(0, n) for n in tensor.shape)])
    return net
