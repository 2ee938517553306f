"""Error measures and the one per-dtype tolerance table curvkit's tests use."""
from __future__ import annotations

from typing import Any

import numpy as np


def _f64(x: Any) -> np.ndarray:
    """float64 NumPy copy of a NumPy array, a PyTorch tensor (bfloat16 included) or a CuPy array."""
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        return x.detach().to("cpu").double().numpy()
    if module == "cupy":
        return np.asarray(x.get(), dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def rel_frobenius(x: Any, reference: Any) -> float:
    """||x - reference||_F / ||reference||_F over all entries (batches included), in float64;
    the absolute error when the reference is zero.

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> testing.rel_frobenius(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-3]))  # doctest: +ELLIPSIS
    0.000447...
    """
    x64, ref = _f64(x), _f64(reference)
    norm = float(np.linalg.norm(ref))
    error = float(np.linalg.norm(x64 - ref))
    return error / norm if norm > 0 else error


def max_residual(x: Any, reference: Any, relative: bool = True) -> float:
    """max |x - reference| over all entries, divided by max |reference| when ``relative``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> testing.max_residual(np.array([1.0, 4.1]), np.array([1.0, 4.0]))  # doctest: +ELLIPSIS
    0.0249...
    """
    x64, ref = _f64(x), _f64(reference)
    error = float(np.max(np.abs(x64 - ref), initial=0.0))
    scale = float(np.max(np.abs(ref), initial=0.0))
    return error / scale if relative and scale > 0 else error


def orthogonality_error(Q: Any) -> float:
    """max |Q^T Q - I| of the short side's Gram matrix (the largest over a batch): 0 for
    orthonormal columns (rows, for a wide Q).

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> Q = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 3)))[0]
    >>> testing.orthogonality_error(Q) < 1e-15, testing.orthogonality_error(2 * Q)
    (True, 3.0)
    """
    q = _f64(Q)
    if q.shape[-2] < q.shape[-1]:
        q = np.swapaxes(q, -1, -2)
    gram = np.swapaxes(q, -1, -2) @ q
    return float(np.max(np.abs(gram - np.eye(q.shape[-1])), initial=0.0))


def marginal_error(P: Any, a: Any, b: Any) -> float:
    """||P 1 - a||_1 + ||P^T 1 - b||_1 of a transport plan P (n, m) for marginals a, b.

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> round(testing.marginal_error(np.full((2, 2), 0.25), [0.5, 0.5], [0.6, 0.4]), 12)
    0.2
    """
    p = _f64(P)
    return float(np.sum(np.abs(p.sum(axis=-1) - _f64(a))) + np.sum(np.abs(p.sum(axis=-2) - _f64(b))))


UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
"""u of each dtype: half the distance from 1 to the next number."""

# (dtype, check) -> bound: the measured figures (with their margins). Checks:
#   "polar"         max abs distance of polar() from the float64 plain-product iteration after
#                   5 steps (half types compute in float32 and differ by input/output rounding)
#   "sqrt"          relative Frobenius error of matrix_sqrt against the extended reference;
#                   the inverse square root is allowed 10x that ("inv_sqrt")
#   "root_eigh",    relative error an inverse p-th root method may add beyond its input's
#   "root_newton"   conditioning (n = 64 sweeps)
#   "probe"         relative error of a gaussian/sphere probe against the float64 reference:
#                   one rounding to the dtype plus a few float64 ulps of curvkit's log/sin/cos
#   "sphere_norm"   distance of a sphere probe's column norm from 1
#   "ulp"           unit roundoff of the half types (eigenvalues computed in float32, rounded)
#   "mfac"          relative 2-norm error of an M-FAC product (fisher_ihvp, FisherWindow, diag,
#                   entries) against the dense float64 solve on the stored inputs, at small kappa:
#                   the result's rounding to its dtype (measured 0.4 u in float32 and bfloat16);
#   "mfac_kappa"    plus this times kappa = ||g||^2 / (c damp) (float64 rounding amplified by the
#                   cancellation in x - G^T w; measured <= 1.6e-15 kappa, m = 32, kappa to 1e7)
#   "ot_plan"       max |P - P_ref| / max P_ref of an entropic OT plan solved to marginal error
#                   1e-11 against the float64 log-domain reference on the stored inputs: the solve
#                   is float64 for every dtype, so beyond float64 only the plan's one rounding
TOL = {
    ("float64", "polar"): 1e-11, ("float32", "polar"): 2e-5, ("float16", "polar"): 2e-3, ("bfloat16", "polar"): 1.6e-2,
    ("float64", "sqrt"): 1e-12, ("float32", "sqrt"): 1e-6, ("float16", "sqrt"): 2e-3, ("bfloat16", "sqrt"): 1.6e-2,
    ("float64", "inv_sqrt"): 1e-11, ("float32", "inv_sqrt"): 1e-5, ("float16", "inv_sqrt"): 2e-2,
    ("bfloat16", "inv_sqrt"): 1.6e-1,
    ("float64", "root_eigh"): 1e-13, ("float64", "root_newton"): 1e-10,
    ("float32", "root_eigh"): 1e-4, ("float32", "root_newton"): 1e-4,
    ("float64", "probe"): 1e-13, ("float32", "probe"): 2 ** -24 * 1.01, ("float16", "probe"): 2 ** -11 * 1.01,
    ("bfloat16", "probe"): 2 ** -8 * 1.01,
    ("float64", "sphere_norm"): 1e-14, ("float32", "sphere_norm"): 1e-6, ("float16", "sphere_norm"): 3e-3,
    ("bfloat16", "sphere_norm"): 3e-2,
    ("float16", "ulp"): 2.0 ** -11, ("bfloat16", "ulp"): 2.0 ** -8,
    ("float64", "mfac"): 1e-10, ("float32", "mfac"): 2.0 ** -24, ("float16", "mfac"): 2.0 ** -11,
    ("bfloat16", "mfac"): 2.0 ** -8, ("float64", "mfac_kappa"): 1e-14,
    ("float64", "ot_plan"): 1e-8, ("float32", "ot_plan"): 1e-6, ("float16", "ot_plan"): 2e-3,
    ("bfloat16", "ot_plan"): 1.6e-2,
}
"""The one tolerance table, (dtype, check) -> bound; the checks are described in the source."""


def tolerance(dtype: Any, check: str) -> float:
    """The bound TOL[(dtype, check)], for a dtype given by name, NumPy dtype or torch dtype.

    Examples
    --------
    >>> from curvkit import testing
    >>> testing.tolerance("float32", "sqrt")
    1e-06
    """
    name = str(dtype).rsplit(".", 1)[-1]
    try:
        return TOL[(name, check)]
    except KeyError:
        raise KeyError(f"no tolerance for dtype {name!r} and check {check!r}") from None
