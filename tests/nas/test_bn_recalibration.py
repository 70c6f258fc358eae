"""BN recalibration: cumulative per-batch statistics, determinism, restored state; calibration batches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cmpnas.errors import CmpnasError
from cmpnas.nas.bn_recalibration import make_calibration_batches, recalibrate_bn

EPS = 1e-5


def tiny_net() -> nn.Sequential:
    """An affine-free BN (as in the SPOS supernet), a 1x1 conv, an affine BN with a non-default momentum."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.BatchNorm2d(2, affine=False, eps=EPS),
        nn.Conv2d(2, 3, kernel_size=1),
        nn.BatchNorm2d(3, eps=EPS, momentum=0.3),
    )
    with torch.no_grad():  # non-trivial affine parameters so a wrong normalisation would show
        net[2].weight.uniform_(0.5, 2.0)
        net[2].bias.uniform_(-1.0, 1.0)
    return net


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased variance (used to normalise) and unbiased variance (kept as running_var)."""
    dims = (0, 2, 3)
    return x.mean(dims), x.var(dims, unbiased=False), x.var(dims, unbiased=True)


def expected_running_stats(
    net: nn.Sequential, batches: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """By hand, in float64: each BN's running stats = the plain average of its per-batch statistics."""
    conv = net[1]
    weight, bias = conv.weight.detach().double(), conv.bias.detach().double()
    per_batch: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    for x in batches:
        x = x.double()
        mean, var_biased, var_unbiased = batch_stats(x)
        per_batch[0].append((mean, var_unbiased))
        normalised = (x - mean[None, :, None, None]) / torch.sqrt(var_biased[None, :, None, None] + EPS)
        conv_out = torch.einsum("oc,nchw->nohw", weight[:, :, 0, 0], normalised) + bias[None, :, None, None]
        mean2, _, var2_unbiased = batch_stats(conv_out)
        per_batch[1].append((mean2, var2_unbiased))
    return [
        (torch.stack([m for m, _ in stats]).mean(0), torch.stack([v for _, v in stats]).mean(0))
        for stats in per_batch
    ]


def random_batches(sizes: list[int], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 4, 4, generator=generator) * 3 + 1 for n in sizes]


def spoil_running_stats(net: nn.Module, value: float) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(value)
            m.running_var.fill_(value)
            m.num_batches_tracked.fill_(1000)


def test_running_stats_are_the_average_of_per_batch_statistics():
    net = tiny_net()
    spoil_running_stats(net, 50.0)  # a stale supernet state must not leak into the estimate
    batches = random_batches([5, 3, 4])
    recalibrate_bn(net, batches)
    for bn, (mean, var) in zip([net[0], net[2]], expected_running_stats(net, batches), strict=True):
        torch.testing.assert_close(bn.running_mean, mean.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_var, var.float(), atol=1e-5, rtol=1e-5)
        assert int(bn.num_batches_tracked) == 3


def test_equal_batches_give_the_exact_mean_of_their_union():
    net = tiny_net()
    batches = random_batches([4, 4, 4])
    recalibrate_bn(net, batches)
    union = torch.cat(batches).double()
    torch.testing.assert_close(net[0].running_mean, union.mean((0, 2, 3)).float(), atol=1e-6, rtol=1e-6)
    # the variance is the mean of the per-batch unbiased variances, not the union's variance
    per_batch_var = torch.stack([b.double().var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(net[0].running_var, per_batch_var.float(), atol=1e-5, rtol=1e-5)


def test_recalibration_is_deterministic_whatever_the_previous_statistics():
    net = tiny_net()
    first, second = copy.deepcopy(net), copy.deepcopy(net)
    spoil_running_stats(first, 7.0)
    spoil_running_stats(second, -3.0)
    batches = random_batches([6, 6])
    recalibrate_bn(first, batches)
    recalibrate_bn(second, batches)
    for a, b in zip(first.buffers(), second.buffers(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0].running_mean, torch.zeros(2))


def test_momentum_and_training_flags_are_restored():
    net = tiny_net()
    net.eval()
    net[2].train()  # a mixed state must come back module by module
    flags = [m.training for m in net.modules()]
    recalibrate_bn(net, random_batches([4]))
    assert [m.training for m in net.modules()] == flags
    assert net[0].momentum == 0.1 and net[2].momentum == 0.3


def test_state_is_restored_when_the_forward_fails():
    net = tiny_net().eval()

    def broken(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        recalibrate_bn(net, random_batches([4]), forward=broken)
    assert not any(m.training for m in net.modules())
    assert net[0].momentum == 0.1 and net[2].momentum == 0.3


def test_batches_run_in_train_mode_without_gradients():
    net = tiny_net().eval()
    seen = []

    def forward(x):
        seen.append((net.training, torch.is_grad_enabled()))
        return net(x)

    recalibrate_bn(net, random_batches([3, 3]), forward=forward)
    assert seen == [(True, False), (True, False)]
    assert all(p.grad is None for p in net.parameters())


def test_custom_forward_is_used():
    batches = random_batches([4, 4])
    plain, doubled = tiny_net(), tiny_net()
    recalibrate_bn(plain, batches)
    recalibrate_bn(doubled, batches, forward=lambda x: doubled(2 * x))
    torch.testing.assert_close(doubled[0].running_mean, 2 * plain[0].running_mean)
    torch.testing.assert_close(doubled[0].running_var, 4 * plain[0].running_var)


def test_batches_from_a_callable_of_image_label_pairs():
    batches = random_batches([4, 2])
    reference, net = tiny_net(), tiny_net()
    recalibrate_bn(reference, batches)
    recalibrate_bn(net, lambda: ((x, torch.zeros(len(x))) for x in batches))
    for a, b in zip(reference.buffers(), net.buffers(), strict=True):
        assert torch.equal(a, b)


def test_no_batches_is_a_user_error():
    net = tiny_net()
    with pytest.raises(CmpnasError, match="no calibration batches"):
        recalibrate_bn(net, [])
    assert net[0].momentum == 0.1


def test_single_image_batch_on_a_flat_bn_is_a_user_error():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(CmpnasError, match="at least 2 images"):
        recalibrate_bn(net, [torch.randn(1, 4)])


def test_a_model_without_bn_is_left_alone():
    net = nn.Sequential(nn.Linear(4, 3))
    calls = []
    recalibrate_bn(net, [torch.randn(2, 4)], forward=calls.append)
    assert calls == []


def numbered_images(n: int) -> torch.Tensor:
    """Image i is filled with the value i, so a batch reveals which images it holds."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()


def image_ids(batches: list[torch.Tensor]) -> list[int]:
    return [int(v) for b in batches for v in b[:, 0, 0, 0]]


def test_calibration_batches_are_a_fixed_seeded_subset():
    images = numbered_images(30)
    batches = make_calibration_batches(images, n_images=10, batch_size=4, seed=3)
    again = make_calibration_batches(images, n_images=10, batch_size=4, seed=3)
    other = make_calibration_batches(images, n_images=10, batch_size=4, seed=4)
    assert image_ids(batches) == image_ids(again)
    assert image_ids(batches) != image_ids(other)
    ids = image_ids(batches)
    assert len(ids) == len(set(ids)) == 10 and set(ids) <= set(range(30))
    assert ids != list(range(10))  # a random subset, not the first images
    # near-equal sizes, none above batch_size: 10 images / 4 -> 3 batches
    assert [len(b) for b in batches] == [4, 3, 3]
    assert all(b.shape[1:] == images.shape[1:] for b in batches)


def test_calibration_never_leaves_a_single_image_batch():
    batches = make_calibration_batches(numbered_images(50), n_images=9, batch_size=4, seed=0)
    assert sorted(len(b) for b in batches) == [3, 3, 3]


def test_more_calibration_images_than_available_uses_all():
    batches = make_calibration_batches(numbered_images(5), n_images=100, batch_size=2, seed=0)
    assert sorted(image_ids(batches)) == list(range(5))


@pytest.mark.parametrize(
    ("images", "n_images", "batch_size"),
    [(torch.empty(0, 1, 2, 2), 4, 2), (numbered_images(4), 0, 2), (numbered_images(4), 2, 0), ([1, 2], 2, 2)],
)
def test_bad_calibration_arguments_are_user_errors(images, n_images, batch_size):
    with pytest.raises(CmpnasError):
        make_calibration_batches(images, n_images, batch_size, seed=0)
