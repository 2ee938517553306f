"""curvkit's exceptions. Every error curvkit raises on purpose is a :class:`CurvkitError`;
argument errors are also the built-in ``ValueError`` / ``TypeError`` they always were."""
from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
from typing import Any, Iterator


class CurvkitError(Exception):
    """Base of every error curvkit raises on purpose."""


class ArgumentError(CurvkitError, ValueError):
    """An argument has a wrong value, shape, layout or device; the message names it."""


class ArgumentTypeError(CurvkitError, TypeError):
    """An argument has a wrong type or dtype; the message names it."""


class CudaError(CurvkitError, RuntimeError):
    """A CUDA, cuBLAS or cuSOLVER call failed (file, line and the library's error string)."""


class ConvergenceError(CurvkitError, RuntimeError):
    """Some matrices of a call missed their tolerance under the failure policy "raise" (see
    :func:`curvkit.set_failure_policy`), and ``return_info`` was not asked for.

    ``info`` holds the per-matrix diagnostics (a dict of NumPy arrays over the batch, or a
    list of them for list input) and ``result`` the outputs as computed: failed matrices
    hold their last finite iterate or zeros, never NaN or Inf.
    """

    def __init__(self, message: str, info: Any, result: Any) -> None:
        super().__init__(message)
        self.info = info
        self.result = result


class ConvergenceWarning(RuntimeWarning):
    """Some matrices of a call missed their tolerance (the failure policy is "warn"); the
    message names the first, and ``return_info=True`` gives the per-matrix status."""


FAILURE_POLICIES = ("warn", "raise", "ignore")
_policy: contextvars.ContextVar[str] = contextvars.ContextVar("curvkit_failure_policy", default="warn")


def set_failure_policy(policy: str) -> str:
    """What a call without ``return_info`` does when some matrix misses its tolerance, for this
    thread (or asyncio task) from now on; returns the policy it replaces.

    - ``"warn"`` (the default): the result is returned (failed matrices hold their last finite
      iterate, or zeros; never NaN or Inf) and a :class:`curvkit.ConvergenceWarning` names the
      first failure. An optimizer keeps training; the warning shows in its log.
    - ``"raise"``: :class:`curvkit.ConvergenceError`, carrying the per-matrix info and the result.
    - ``"ignore"``: the result, silently.

    ``return_info=True`` never raises or warns: the caller reads ``info["converged"]``.
    Inputs that training meets in normal use (rank-deficient, ill-conditioned, rounding-level
    negative eigenvalues of an accumulated factor) are not misses: they converge, floored.

    >>> import numpy as np, curvkit
    >>> previous = curvkit.set_failure_policy("raise")
    >>> curvkit.matrix_sqrt(np.diag([1.0, -1.0]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    curvkit._errors.ConvergenceError: matrix_sqrt: 1 of 1 matrices did not converge ...
    >>> curvkit.set_failure_policy(previous)
    'raise'
    """
    if policy not in FAILURE_POLICIES:
        choices = ", ".join(map(repr, FAILURE_POLICIES))
        raise ArgumentError(f"argument 'policy' must be one of {choices}, got {policy!r}")
    previous = _policy.get()
    _policy.set(policy)
    return previous


def get_failure_policy() -> str:
    """The failure policy in force ("warn", "raise" or "ignore"); see :func:`set_failure_policy`."""
    return _policy.get()


@contextlib.contextmanager
def failure_policy(policy: str) -> Iterator[None]:
    """The failure policy for the calls inside a ``with`` block (see :func:`set_failure_policy`).

    >>> import numpy as np, curvkit
    >>> with curvkit.failure_policy("ignore"):
    ...     S = curvkit.matrix_sqrt(np.diag([1.0, -1.0]))    # indefinite: not converged, no warning
    >>> curvkit.get_failure_policy()
    'warn'
    """
    previous = set_failure_policy(policy)
    try:
        yield
    finally:
        _policy.set(previous)


def _caller_stacklevel() -> int:
    """stacklevel of the first frame outside curvkit, so that a warning points at the caller."""
    import os

    package = os.path.dirname(os.path.abspath(__file__))
    frame: Any = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def report_failure(function: str, message: str, info: Any, result: Any) -> None:
    """Apply the failure policy to one miss: raise, warn or nothing."""
    policy = _policy.get()
    if policy == "raise":
        raise ConvergenceError(f"{message}; pass return_info=True to inspect them instead", info, result)
    if policy == "warn":
        warnings.warn(f"{message} (see curvkit.set_failure_policy)", ConvergenceWarning,
                      stacklevel=_caller_stacklevel())


def finish(function: str, result: Any, infos: list[dict], single: bool, return_info: bool) -> Any:
    """The failure policy, the same in every family: with ``return_info``, (result, info) (info a
    dict, or a list of dicts for list input); without it, the result, after the policy (warn,
    raise or ignore) has dealt with any matrix that did not converge."""
    if return_info:
        return result, (infos[0] if single else infos)
    report_unconverged(function, infos, result, single)
    return result


def report_unconverged(function: str, infos: list[dict], result: Any, single: bool) -> None:
    """The policy's ConvergenceError or ConvergenceWarning unless every matrix of every input converged."""
    import numpy as np

    for position, info in enumerate(infos):
        converged = np.asarray(info["converged"])
        if converged.all():
            continue
        failed = [tuple(int(i) for i in idx) for idx in np.argwhere(~converged)] if converged.ndim else [()]
        where = f"batch index {failed[0]}" + ("" if single else f" of input {position}")
        detail = ""
        residual = float(np.asarray(info["residual"])[failed[0]]) if "residual" in info else -1.0
        if residual >= 0 or np.isnan(residual):  # negative: not computed
            detail = f", residual {residual:.2e}"
        total = sum(max(np.asarray(i["converged"]).size, 1) for i in infos)
        failed_total = sum(int((~np.asarray(i["converged"])).sum()) for i in infos)
        report_failure(function, f"{function}: {failed_total} of {total} matrices did not converge "
                       f"(first at {where}{detail})", infos[0] if single else infos, result)
        return
