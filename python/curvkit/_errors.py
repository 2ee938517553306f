"""curvkit's exceptions. Every error curvkit raises on purpose is a :class:`CurvkitError`;
argument errors are also the built-in ``ValueError`` / ``TypeError`` they always were."""
from __future__ import annotations

from typing import Any


class CurvkitError(Exception):
    """Base of every error curvkit raises on purpose."""


class ArgumentError(CurvkitError, ValueError):
    """An argument has a wrong value, shape, layout or device; the message names it."""


class ArgumentTypeError(CurvkitError, TypeError):
    """An argument has a wrong type or dtype; the message names it."""


class CudaError(CurvkitError, RuntimeError):
    """A CUDA, cuBLAS or cuSOLVER call failed (file, line and the library's error string)."""


class ConvergenceError(CurvkitError, RuntimeError):
    """Some matrices of a call missed their tolerance, and ``return_info`` was not asked for.

    ``info`` holds the per-matrix diagnostics (a dict of NumPy arrays over the batch, or a
    list of them for list input) and ``result`` the outputs as computed: failed matrices
    hold their last finite iterate or zeros, never NaN or Inf.
    """

    def __init__(self, message: str, info: Any, result: Any) -> None:
        super().__init__(message)
        self.info = info
        self.result = result


def finish(function: str, result: Any, infos: list[dict], single: bool, return_info: bool) -> Any:
    """The failure policy, the same in every family: with ``return_info``, (result, info) (info a
    dict, or a list of dicts for list input); without it, the result, or a ConvergenceError
    naming the first matrix that did not converge, carrying that info and the result."""
    if return_info:
        return result, (infos[0] if single else infos)
    raise_unless_converged(function, infos, result, single)
    return result


def raise_unless_converged(function: str, infos: list[dict], result: Any, single: bool) -> None:
    """ConvergenceError unless every matrix of every input converged."""
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
        raise ConvergenceError(
            f"{function}: {failed_total} of {total} matrices did not converge (first at {where}{detail}); "
            "pass return_info=True to inspect them instead of raising",
            infos[0] if single else infos, result)
