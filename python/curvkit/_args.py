"""Scalar arguments as the native calls take them: integers within the C++ int range and the
documented bounds, real numbers, method names; each refused with a curvkit error naming it."""
from __future__ import annotations

import numbers
import operator

import numpy as np

from ._errors import ArgumentError, ArgumentTypeError


def real(value, name):
    """A real-number argument (Python or NumPy int or float of any width, not bool) as a float;
    ArgumentTypeError naming `name` for anything else (None, a string, a complex)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise ArgumentTypeError(f"argument '{name}' must be a real number, got {type(value).__name__}")
    return float(value)


def method_name(value, name="method"):
    """A method argument: a string, else ArgumentTypeError naming it."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"argument '{name}' must be a string, got {type(value).__name__}")
    return value


# The C++ int range: iteration caps and exponents beyond it would not convert (a pybind11
# signature dump) or would wrap.
INT_MAX = 2**31 - 1
# polar's step schedule is a list of (a, b, c) triples, one per step: a cap keeps it small.
MAX_STEPS = 10_000


def index(value, name, low=0, high=None):
    """An integer argument (Python or NumPy int, not bool) checked to lie in [low, high)."""
    if isinstance(value, bool):
        raise ArgumentTypeError(f"argument '{name}' must be an integer, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"argument '{name}' must be an integer, got {type(value).__name__}") from None
    if v < low or (high is not None and v >= high):
        bound = f"be in [{low}, {high - 1}]" if high is not None else f"be >= {low}"
        raise ArgumentError(f"argument '{name}' must {bound}, got {v}")
    return v


def max_iters(value):
    """An iteration cap: an integer in [1, 2**31 - 1]."""
    return index(value, "max_iters", 1, INT_MAX + 1)


def steps(value, low=0):
    """A step count: an integer in [low, MAX_STEPS]."""
    return index(value, "steps", low, MAX_STEPS + 1)
