"""The runnable examples in the docstrings run and give what they show."""
import doctest
import importlib

import pytest

MODULES = ["curvkit._arrays", "curvkit._config", "curvkit.hutchinson", "curvkit.newton_schulz", "curvkit.torch", "curvkit.inverse_root"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "curvkit.torch":
        pytest.importorskip("torch")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
