"""Inherit-and-fine-tune: a candidate's path trains briefly on its own, from the supernet's weights, before the
one-shot evaluator scores it.

Weight sharing biases one-shot estimates: paths compete for the shared channels, and the narrow ones, whose
channels every path trains, come out ahead. A few steps of the path alone, on a copy of the supernet, remove part
of that bias at a cost per candidate that a short list can afford. The estimator is separate from the one-shot
one and from the space: it takes any evaluator with a ``supernet`` and any function that trains one path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cmpnas.nas.candidates import CandidateEvaluator
from cmpnas.nas.supernet import SupernetEmbedding


@dataclass
class FineTunedEvaluator:
    """Callable: arch -> the scores of ``base`` for the path after ``tune(copy of the supernet, arch)``."""

    base: CandidateEvaluator
    tune: Callable[[SupernetEmbedding, dict], None]

    def __call__(self, arch: dict) -> dict[str, Any]:
        shared = self.base.supernet
        own = copy.deepcopy(shared)
        self.tune(own, arch)
        self.base.supernet = own
        try:
            return self.base(arch)
        finally:
            self.base.supernet = shared
