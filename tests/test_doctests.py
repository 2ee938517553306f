"""The runnable examples in the docstrings run and give what they show. Every module of the
package is found by itself (a new family needs no edit here); public modules must have examples."""
import doctest
import importlib
import pkgutil

import pytest

import curvkit

MODULES = sorted(m.name for m in pkgutil.walk_packages(curvkit.__path__, "curvkit.")
                 if m.name not in ("curvkit._core", "curvkit.demo"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "curvkit.torch":
        pytest.importorskip("torch")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    if not name.split(".")[-1].startswith("_"):
        assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
