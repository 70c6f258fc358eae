"""The SPOS one-shot search space over ShuffleNetV2 choice blocks.

Layout: stem conv 3x3 -> stages of choice layers -> conv 1x1 to ``last_channels`` -> global average pool.
Every layer picks one of ``cfg.choices`` (Shuffle 3x3 / 5x5 / 7x7, Shuffle-Xception) and one mid-channel
scale from ``cfg.channel_scales``. An architecture is plain JSON::

    {"blocks": [choice index per layer], "scales": [mid-channel scale per layer]}

Blocks follow megvii's SPOS code. The first block of every stage has a projection branch (dw k x k with
the stage stride -> pw) next to the main branch, and the two outputs are concatenated, so the width can
change even when the stage stride is 1. The other blocks split the input in half with a fixed channel
shuffle; one half passes through and the other goes through the main branch.
Main branch: pw 1x1 -> dw k x k (stride) -> pw 1x1 (Shuffle k), or 3 x (dw 3x3 -> pw) (Xception).
``mid = stage_width // 2 * scale``, rounded to the nearest even number (at least 2).

Channel search shares weights the SPOS way. The supernet allocates every (layer, choice) block at the
largest mid width, and a path with a smaller scale uses the *first* ``mid`` channels: the pw-in weight
``W[:mid]``, the depthwise weight ``W[:mid]`` with ``groups=mid``, the pw-out weight ``W[:, :mid]``, and
BN over the first ``mid`` running statistics (updated in place through the slice).

MACs come from an analytic per-(layer, choice, scale) lookup table (the LUT). The tests check it against
the hook counter in :mod:`cmpnas.models.cost` on :func:`build` subnets.

Everything about the space lives in this package (a search never needs another module of the space):
``blocks`` (a layer's choice blocks, channel slicing, block MACs), ``networks`` (the supernet, the standalone
net of an architecture, a supernet path's weights as a standalone net), ``space`` (encoding, sampling and
the evolution's operators, the MAC lookup table, budgets, the supernet's path sampler) and ``latency`` (the
latency table: every block timed alone on the deployment runtime, a predictor kept apart from the space).
"""

from cmpnas.models.spaces.spos.blocks import (
    KERNELS,
    Arch,
    ChoiceBlock,
    ConvBN,
    LayerSpec,
    block_macs,
    mid_channels,
    split_shuffle,
)
from cmpnas.models.spaces.spos.networks import SposNet, Supernet, build, extract_subnet
from cmpnas.models.spaces.spos.space import SposSpace
from cmpnas.models.spaces.spos.stage_width import SposStageWidthSpace

__all__ = [
    "KERNELS",
    "Arch",
    "ChoiceBlock",
    "ConvBN",
    "LayerSpec",
    "SposNet",
    "SposSpace",
    "SposStageWidthSpace",
    "Supernet",
    "block_macs",
    "build",
    "extract_subnet",
    "mid_channels",
    "split_shuffle",
]
