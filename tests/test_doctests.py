"""Every docstring example of the package runs as written.

The modules are found by walking the installed `deepmetric` package, so a new module's
examples run without being listed anywhere. A module that imports an optional extra
(`deepmetric.serve.app` needs the `serve` extra) is skipped, naming the missing package,
when that extra is not installed.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import deepmetric

MODULES = sorted(
    ["deepmetric"]
    + [info.name for info in pkgutil.walk_packages(deepmetric.__path__, "deepmetric.")]
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_the_walk_finds_the_package_modules():
    assert {"deepmetric.losses.pair_triplet", "deepmetric.metrics.labels"} <= set(MODULES)
    assert "deepmetric.serve.app" in MODULES and "deepmetric.__main__" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] == "deepmetric":
            raise
        pytest.skip(f"{name} needs {error.name!r}, an optional extra that is not installed")
    result = doctest.testmod(module, optionflags=FLAGS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
