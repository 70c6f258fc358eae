"""docs/extending.md: every Python block runs as written (each adds one registry entry and checks it works)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cmpnas.compat import losses
from cmpnas.evaluation import protocols
from cmpnas.models import backbones, spaces

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
REGISTRIES = [losses.TERMS, backbones._FAMILIES, protocols.PROTOCOLS, spaces.SPACES]


def test_the_page_has_the_four_examples() -> None:
    assert len(BLOCKS) == 4
    for block in BLOCKS:  # "a 20-line example": the block, imports included, stays short
        assert len([line for line in block.splitlines() if line.strip()]) <= 32


@pytest.fixture
def clean_registries():
    before = [dict(r) for r in REGISTRIES]
    yield
    for registry, saved in zip(REGISTRIES, before, strict=True):
        registry.clear()
        registry.update(saved)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index: int, clean_registries: None) -> None:
    sizes = [len(r) for r in REGISTRIES]
    exec(compile(BLOCKS[index], f"{DOC.name}[block {index}]", "exec"), {"__name__": f"extending_{index}"})
    added = [len(r) - n for r, n in zip(REGISTRIES, sizes, strict=True)]
    assert sum(added) == 1, "each example adds exactly one registry line"
