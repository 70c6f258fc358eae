"""Backbone factory: every family builds and runs on 1x28x28; bad names, kwargs, pretrained: clear errors."""

from __future__ import annotations

import time
import urllib.error

import pytest
import torch
from torch import nn

from cmpnas.errors import CmpnasError
from cmpnas.models import backbones
from cmpnas.models.backbones import BasicBlock, available, create_backbone
from cmpnas.models.cost import count_macs
from cmpnas.models.embedding import EmbeddingModel, ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"widths": [8, 16], "depths": [1, 1], "strides": [1, 2]}


def first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet_small", TINY),
        ("cifar_resnet20", {}),
        ("timm:resnet18", {"small_input": True}),
        ("tv:mobilenet_v2", {"width_mult": 0.35}),
        ("tv:shufflenet_v2_x0_5", {}),
        ("tv:shufflenet_v2_x0_5", {"small_input": True}),
    ],
)
def test_registry_names_build_and_run_on_1x28x28(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    net, feat = create_backbone(name, in_chans=1, **kwargs)
    assert first_conv(net).in_channels == 1
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, feat)
    assert torch.isfinite(out).all()
    if kwargs.get("small_input"):
        assert first_conv(net).stride == (1, 1) and first_conv(net).kernel_size == (3, 3)
    # the same name works through the embedding model (head + classifier) with MACs counted
    model = EmbeddingModel(ModelSpec(backbone=name, backbone_kwargs=kwargs, embed_dim=8)).eval()
    with torch.no_grad():
        emb = model(torch.randn(3, 1, 28, 28))
    assert emb.shape == (3, 8)
    assert count_macs(model, model.input_shape(1)) > 0


def test_small_input_keeps_resolution_and_so_costs_more() -> None:
    plain, _ = create_backbone("timm:resnet18", in_chans=1)
    small, _ = create_backbone("timm:resnet18", in_chans=1, small_input=True)
    assert first_conv(plain).stride == (2, 2)
    macs_plain, macs_small = count_macs(plain, (1, 1, 28, 28)), count_macs(small, (1, 1, 28, 28))
    # the stem no longer halves the image: every later layer sees 4x the pixels (the stem itself is cheaper)
    assert 3 * macs_plain < macs_small < 5 * macs_plain


def test_tv_models_keep_their_stem_stride_without_small_input() -> None:
    net, feat = create_backbone("tv:mobilenet_v2", in_chans=1, width_mult=0.35)
    conv = first_conv(net)
    assert conv.in_channels == 1 and conv.stride == (2, 2)
    assert feat == 1280  # mobilenet_v2 keeps a 1280-wide last layer for width < 1


def final_map(net: nn.Module, size: int = 28) -> tuple[int, int]:
    """Height x width of the last feature map (the output of the last conv before global pooling)."""
    shapes: list[tuple[int, ...]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        for m in net.modules()
        if isinstance(m, nn.Conv2d)
    ]
    net.eval()
    with torch.no_grad():
        net(torch.randn(1, 1, size, size))
    for h in hooks:
        h.remove()
    return shapes[-1][2], shapes[-1][3]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("tv:mobilenet_v2", {"width_mult": 0.35}),
        ("tv:mobilenet_v2", {"width_mult": 0.15, "round_nearest": 4}),
        ("tv:shufflenet_v2_x0_5", {}),
    ],
)
def test_stem_stride_1_matches_the_search_space_final_map(name: str, kwargs: dict) -> None:
    """The SPOS space (stride-1 stem, four stride-2 stages) ends at 2x2 on 28 px; a stock ImageNet stem at 1x1."""
    from cmpnas.config import SpaceConfig
    from cmpnas.models.spaces import create_space

    space = create_space(SpaceConfig(), in_chans=1, input_size=28)
    searched = space.build({"blocks": [0] * space.num_layers, "scales": [1.0] * space.num_layers})
    assert final_map(searched) == (2, 2)
    stock, _ = create_backbone(name, in_chans=1, **kwargs)
    matched, _ = create_backbone(name, in_chans=1, stem_stride=1, **kwargs)
    assert final_map(stock) == (1, 1) and final_map(matched) == (2, 2)
    # only the first conv's stride changed: same kernel, same layers (ShuffleNetV2 keeps its maxpool)
    assert first_conv(matched).stride == (1, 1) and first_conv(matched).kernel_size == first_conv(stock).kernel_size
    assert [type(m) for m in matched.modules()] == [type(m) for m in stock.modules()]


def test_small_input_still_drops_the_shufflenet_maxpool() -> None:
    """small_input is unchanged by stem_stride: 3x3 stride-1 stem and no maxpool, so ShuffleNetV2 ends at 4x4."""
    net, _ = create_backbone("tv:shufflenet_v2_x0_5", in_chans=1, small_input=True)
    assert final_map(net) == (4, 4) and isinstance(net.maxpool, nn.Identity)
    with pytest.raises(CmpnasError, match="small_input and stem_stride"):
        create_backbone("tv:shufflenet_v2_x0_5", in_chans=1, small_input=True, stem_stride=1)


def test_cifar_resnet20_structure() -> None:
    net, feat = create_backbone("cifar_resnet20", in_chans=1)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9  # (20 - 2) / 6 = 3 blocks per stage, 3 stages
    assert [b.conv1.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    assert feat == 64


def test_available_lists_the_builtins_and_the_families() -> None:
    names = available()
    for n in ("resnet_small", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56"):
        assert n in names
    assert any(n.startswith("timm:") for n in names) and any(n.startswith("tv:") for n in names)


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("no_such_net", {}, "Unknown backbone 'no_such_net'"),
        ("timm:no_such_net", {}, "Unknown timm model"),
        ("tv:no_such_net", {}, "Unknown torchvision model"),
        ("spos", {}, "needs an architecture"),
        ("resnet_small", {"widths": [8, 16], "depths": [1], "strides": [1, 2]}, "same length"),
        ("resnet_small", {"widht": [8]}, "widht"),
        ("tv:mobilenet_v2", {"no_such_kwarg": 1}, "no_such_kwarg"),
        ("timm:resnet18", {"small_input": True, "no_such_kwarg": 1}, "no_such_kwarg"),
        ("tv:mobilenet_v2", {"small_input": True, "width_mult": 0.35}, None),  # fine: no error
    ],
)
def test_bad_names_and_kwargs_are_clear_errors(name: str, kwargs: dict, needle: str | None) -> None:
    if needle is None:
        create_backbone(name, in_chans=1, **kwargs)
        return
    with pytest.raises(CmpnasError, match=needle) as exc:
        create_backbone(name, in_chans=1, **kwargs)
    assert exc.value.fix


def test_unknown_backbone_message_names_the_choices() -> None:
    with pytest.raises(CmpnasError) as exc:
        create_backbone("resnet_smal")
    assert "resnet_small" in exc.value.fix and "cifar_resnet20" in exc.value.fix


def test_pretrained_timm_offline_fails_fast(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(CmpnasError, match="pretrained") as exc:
        create_backbone("timm:resnet18", in_chans=1, pretrained=True)
    assert time.perf_counter() - start < 5
    assert "pretrained: false" in exc.value.fix


def test_pretrained_download_failure_is_a_clear_error(monkeypatch) -> None:
    """A failing hub download (any exception type) becomes one CmpnasError; no network is touched here."""
    import timm
    import torchvision.models as tvm

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(timm, "create_model", no_network)
    monkeypatch.setattr(tvm, "get_model", no_network)
    for name in ("timm:resnet18", "tv:mobilenet_v2"):
        with pytest.raises(CmpnasError, match="Could not load pretrained weights") as exc:
            create_backbone(name, in_chans=1, pretrained=True)
        assert "URLError" in str(exc.value)


def test_pretrained_builtin_is_a_clear_error() -> None:
    with pytest.raises(CmpnasError, match="no pretrained weights"):
        create_backbone("resnet_small", pretrained=True, **TINY)


def test_pretrained_is_not_an_error_path_when_false(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    net, _ = create_backbone("timm:resnet18", in_chans=1, pretrained=False)
    assert isinstance(net, nn.Module)
    assert "resnet_small" in backbones._REGISTRY
