"""Backbone factory: one name -> (module, feature dim). Registry, not if-chains.

Names:
- built-ins: ``resnet_small`` (configurable ResNet for small images), ``cifar_resnet20/32/56`` (He et al.);
- ``timm:<name>``: any timm model (``num_classes=0`` gives pooled features);
- ``tv:<name>``: a torchvision classification model, its classifier removed;
- ``spos``: a standalone subnet of the SPOS search space (needs ``arch``).
``small_input=True`` (timm/tv kwargs) swaps the stride-2 stem for a stride-1 3x3 conv so 28x28 inputs
keep their resolution (stock ImageNet stems downsample 28 px to 1 px too early).
``stem_stride=S`` (tv kwarg) only sets the first conv's stride, keeping its kernel and every later layer
(ShuffleNetV2 keeps its maxpool): with S=1 the total downsampling equals the SPOS space's (stride-1 stem),
so a hand-designed model can be compared with a searched one at the same final feature-map size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmpnas.errors import CmpnasError
from cmpnas.models.spaces import space_backbone
from cmpnas.registry import Registry

BackboneFactory = Callable[..., tuple[nn.Module, int]]
FamilyFactory = Callable[..., tuple[nn.Module, int]]  # (model name, in_chans, pretrained, **kw)
_REGISTRY: Registry[BackboneFactory] = Registry("backbone")


def register(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: add a built-in backbone factory ``(in_chans, **backbone_kwargs) -> (module, F)``."""

    return _REGISTRY.register(name)


def available() -> list[str]:
    return sorted(_REGISTRY) + [f"{f}:<model>" for f in _FAMILIES]


class _StridedPointwise(nn.Conv2d):
    """1x1 conv with stride s computed as a 1x1 conv on the subsampled input (the same result and weights).

    Why: oneDNN's backward of a strided 1x1 conv with fewer than 8 input channels in channels_last
    crashes the process (segfault / double free) with torch 2.14.1 on AVX2 CPUs; the subsampled form
    uses another kernel. Wider inputs keep the plain conv.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias)


def _shortcut_conv(cin: int, cout: int, stride: int) -> nn.Conv2d:
    cls = _StridedPointwise if stride != 1 and cin < 8 else nn.Conv2d
    return cls(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_shortcut_conv(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet for small images: 3x3 stem (stride ``stem_stride``), stages of basic blocks, global pooling."""

    def __init__(
        self,
        in_chans: int = 1,
        widths: tuple[int, ...] = (64, 128, 256),
        depths: tuple[int, ...] = (1, 1, 1),
        strides: tuple[int, ...] = (1, 2, 2),
        stem_width: int | None = None,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if not (len(widths) == len(depths) == len(strides)):
            raise CmpnasError(
                "resnet_small: widths, depths and strides must have the same length.",
                "give one value per stage in backbone_kwargs",
            )
        stem_width = stem_width or widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(True),
        )
        layers: list[nn.Module] = []
        cin = stem_width
        for w, d, s in zip(widths, depths, strides, strict=True):
            for i in range(d):
                layers.append(BasicBlock(cin, w, s if i == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


@register("resnet_small")
def _resnet_small(in_chans: int, **kw: Any) -> tuple[nn.Module, int]:
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    net = SmallResNet(in_chans=in_chans, **kw)
    return net, net.num_features


def _cifar(depth: int) -> BackboneFactory:
    def make(in_chans: int, width: int = 16, **kw: Any) -> tuple[nn.Module, int]:
        n = (depth - 2) // 6
        net = SmallResNet(
            in_chans, (width, 2 * width, 4 * width), (n, n, n), (1, 2, 2), stem_width=width, **kw
        )
        return net, net.num_features

    return make


for _d in (20, 32, 56):
    register(f"cifar_resnet{_d}")(_cifar(_d))


def _pretrained_error(name: str, exc: Exception) -> CmpnasError:
    return CmpnasError(
        f"Could not load pretrained weights for '{name}' ({type(exc).__name__}: {str(exc)[:160]}).",
        "pretrained weights are downloaded from the model hub: connect to the internet (and unset HF_HUB_OFFLINE), "
        "or set pretrained: false",
    )


def _timm(
    name: str, in_chans: int, pretrained: bool, small_input: bool = False, **kw: Any
) -> tuple[nn.Module, int]:
    if pretrained and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise _pretrained_error(f"timm:{name}", RuntimeError("HF_HUB_OFFLINE=1"))
    import timm

    if not timm.is_model(name):
        raise CmpnasError(
            f"Unknown timm model '{name}'.", "pick a name from timm.list_models(), e.g. timm:resnet18"
        )
    try:
        net = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **kw)
    except TypeError as exc:
        raise CmpnasError(
            f"timm model '{name}' rejected backbone_kwargs: {exc}.", "remove the unknown kwargs"
        ) from None
    except Exception as exc:  # noqa: BLE001 - hub/network failures have many types
        if pretrained:
            raise _pretrained_error(f"timm:{name}", exc) from None
        raise
    if small_input:
        _small_input_stem(net, in_chans)
    return net, int(net.num_features)


def _small_input_stem(net: nn.Module, in_chans: int) -> None:
    """Replace a ResNet-style 7x7/s2 stem by 3x3/s1 (keeps the maxpool): the 'keep resolution' variant."""
    conv = getattr(net, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise CmpnasError(
            "small_input=True supports ResNet-style models with a 'conv1' stem only.",
            "drop small_input or use resnet_small",
        )
    net.conv1 = nn.Conv2d(in_chans, conv.out_channels, 3, 1, 1, bias=False)


def _torchvision(
    name: str,
    in_chans: int,
    pretrained: bool,
    small_input: bool = False,
    stem_stride: int | None = None,
    **kw: Any,
) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        raise CmpnasError(
            f"Unknown torchvision model '{name}'.", "pick one of torchvision.models.list_models()"
        )
    weights = "DEFAULT" if pretrained else None
    try:
        net = tvm.get_model(name, weights=weights, **kw)
    except TypeError as exc:
        raise CmpnasError(
            f"torchvision model '{name}' rejected backbone_kwargs: {exc}.", "remove them"
        ) from None
    except Exception as exc:  # noqa: BLE001
        if pretrained:
            raise _pretrained_error(f"tv:{name}", exc) from None
        raise
    feat_dim = _strip_tv_head(net)
    if stem_stride is not None:
        if small_input:
            raise CmpnasError(
                f"tv:{name}: small_input and stem_stride both change the stem.",
                "use one: small_input (3x3 stride-1 stem, ShuffleNetV2 without maxpool) or stem_stride",
            )
        _set_stem_stride(net, in_chans, stem_stride)
    else:
        _adapt_tv_stem(net, in_chans, small_input)
    return net, feat_dim


def _strip_tv_head(net: nn.Module) -> int:
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(net, attr, None)
        if head is None:
            continue
        linears = [m for m in head.modules()] if isinstance(head, nn.Module) else []
        lin = next((m for m in reversed(linears) if isinstance(m, nn.Linear)), None)
        if lin is None:
            continue
        setattr(net, attr, nn.Identity())
        return lin.in_features
    raise CmpnasError("Could not find the classifier of this torchvision model.", "use a timm: model instead")


def _first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Conv2d):
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            return parent, child, mod
    raise CmpnasError("model has no Conv2d stem", "use another backbone")


def _adapt_tv_stem(net: nn.Module, in_chans: int, small_input: bool) -> None:
    parent, child, conv = _first_conv(net)
    if conv.in_channels == in_chans and not small_input:
        return
    stride = 1 if small_input else conv.stride
    kernel = 3 if small_input else conv.kernel_size
    pad = 1 if small_input else conv.padding
    new = nn.Conv2d(in_chans, conv.out_channels, kernel, stride, pad, bias=conv.bias is not None)
    setattr(parent, child, new)
    if (
        small_input
        and isinstance(getattr(net, "maxpool", None), nn.Module)
        and "shufflenet" in type(net).__name__.lower()
    ):
        net.maxpool = nn.Identity()


def _set_stem_stride(net: nn.Module, in_chans: int, stride: int) -> None:
    """The first conv with another stride (and ``in_chans``); its kernel, padding, weights and every later
    layer stay, so the stem's downsampling changes by exactly the stride's factor."""
    if stride < 1:
        raise CmpnasError(f"stem_stride must be >= 1, got {stride}.", "use stem_stride: 1 or 2")
    _adapt_tv_stem(net, in_chans, small_input=False)
    _first_conv(net)[2].stride = (stride, stride)


def create_backbone(
    name: str, in_chans: int = 1, pretrained: bool = False, arch: dict | None = None, **kwargs: Any
) -> tuple[nn.Module, int]:
    """Build a backbone that maps [B, in_chans, H, W] to pooled features [B, F]; returns (module, F).

    ``family:model`` names go to the family's factory (``timm:``, ``tv:``); plain names to the registry.
    """
    family, sep, model_name = name.partition(":")
    if sep:
        if family not in _FAMILIES:
            raise CmpnasError(
                f"Unknown backbone family '{family}:' in '{name}'.",
                f"use one of {', '.join(f'{f}:<model>' for f in _FAMILIES)} or {', '.join(sorted(_REGISTRY))}",
            )
        return _FAMILIES[family](model_name, in_chans, pretrained, **kwargs)
    if pretrained:
        raise CmpnasError(f"Built-in backbone '{name}' has no pretrained weights.", "set pretrained: false")
    if name not in _REGISTRY:
        raise CmpnasError(
            f"Unknown backbone '{name}'.",
            f"use one of {', '.join(available())}",
        )
    if arch is not None:
        kwargs["arch"] = arch
    try:
        return _REGISTRY[name](in_chans=in_chans, **kwargs)
    except TypeError as exc:  # a misspelt backbone_kwargs key must not end in a traceback
        raise CmpnasError(f"Backbone '{name}' rejected backbone_kwargs: {exc}.", "fix those kwargs") from None


# Families of named models (``prefix:<model name>``): one line each.
_FAMILIES: Registry[FamilyFactory] = Registry("backbone family", {"timm": _timm, "tv": _torchvision})


def register_family(prefix: str, factory: FamilyFactory) -> None:
    """Add a family of named models: ``backbone: "<prefix>:<model name>"`` calls ``factory(name, in_chans,
    pretrained, **backbone_kwargs)``."""
    _FAMILIES.register(prefix, factory)


# A searched architecture of a registered search space is a backbone too.
register("spos")(space_backbone)
