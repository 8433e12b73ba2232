"""The README's code blocks and the docstring examples run as written."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
DOCTEST_MODULES = [
    "deepmetric.distances",
    "deepmetric.losses.pair_triplet",
    "deepmetric.samplers",
    "deepmetric.networks",
    "deepmetric.losses.softmax",
    "deepmetric.losses.proxy",
    "deepmetric.losses.additive_margin",
    "deepmetric.losses.distillation",
    "deepmetric.losses.structured",
    "deepmetric.metrics.evaluation",
]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
