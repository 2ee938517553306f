"""Newton–Schulz family: orthogonal polar factors of (batched, ragged) matrices, as Muon
and its successors use them to orthogonalize updates."""
from __future__ import annotations

import math
from typing import Any, Sequence, Union

import numpy as np

from . import _args, _arrays, _core
from ._errors import ArgumentError, ArgumentTypeError
from ._errors import finish as _finish

# Published coefficient schedules: (a, b, c) of p(x) = a x + b x^3 + c x^5 per step, and the
# factor on ||G||_F in the normalization.
MUON = (3.4445, -4.7750, 2.0315)  # Keller Jordan's Muon, every step
YOU = [  # per-step coefficients by Jiacheng You (as in Dion and HeavyBall)
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]
_POLAR_EXPRESS_RAW = [  # Amsel, Persson, Musco, Gower: "The Polar Express" (arXiv 2505.16932), Alg. 1
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
# The paper's safety factor 1.01 on every polynomial but the last, and on the normalization.
POLAR_EXPRESS = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]] + [_POLAR_EXPRESS_RAW[-1]]
SCHEDULES = {"muon": ([MUON], 1.0), "you": (YOU, 1.0), "polar_express": (POLAR_EXPRESS, 1.01)}
METHODS = ("auto", "standard", "gram")
_GRAM_MIN_ASPECT = 2  # auto: the Gram route when the long side is at least this times the short one
_GRAM_RESTART = 2     # Gram route: restart (X = Q X_0, A = X X^T) after every this many steps


Coefficients = Union[str, Sequence[Sequence[float]]]


def polar(G: Any, steps: int = 5, coefficients: Coefficients = "muon", norm_eps: float = 1e-7,
          method: str = "auto", out: Any = None, check_finite: bool = True) -> Any:
    """Orthogonal polar factor approximation U V^T of G = U S V^T by Newton–Schulz steps.

    Normalizes ``X = G / ((s + norm_eps) ||G||_F)`` (s = 1.01 for "polar_express", else 1) and
    applies ``steps`` odd quintics ``X <- a X + (b A + c A^2) X``, ``A = X X^T`` on the short
    side, exactly as Muon does, in fewer flops (symmetric products) and with no Python loop
    over matrices.

    Parameters
    ----------
    G : array (..., m, n), or a list of such arrays of different shapes
        NumPy, PyTorch or CuPy; float16, bfloat16, float32 or float64. Batched over leading
        dimensions; a list is processed in one call (no padding, no Python loop per matrix)
        and gives a list. float64 computes in float64, the others in float32.
    steps : int
        Number of iterations, 0 to 10000.
    coefficients : "muon", "you", "polar_express", or a sequence of (a, b, c)
        "muon": (3.4445, -4.7750, 2.0315) every step. "you": Jiacheng You's per-step set.
        "polar_express": the per-step optimal set of Amsel et al. (2025) with its safety
        factor. A schedule shorter than ``steps`` repeats its last triple.
    norm_eps : float
        Relative guard on the normalization (not a ridge, unlike the ``eps`` of the inverse
        roots). Unlike an absolute one, it keeps the result invariant to the scale of G down
        to the smallest normal numbers; G = 0 gives 0.
    method : "auto", "standard" or "gram"
        "standard" iterates on X (3 r^2 c + r^3 flops a step for r = min(m, n), c = max).
        "gram" iterates on the r x r Gram matrix (4 r^3 a step) and forms X = Q X_0 every 2
        steps (3 r^2 c), restarting from it: without restarts the squared spectrum loses
        the small singular values in float32 and Polar Express diverges; with them, float32
        stays within 6e-5 of the float64 iteration for spectra down to 1e-8, as does
        "standard" (measured over OpenBLAS's Haswell, Zen, Sandybridge, Prescott and SkylakeX
        kernels, whose float32 accumulation orders differ: 3.2e-5 to 5.2e-5). "auto" picks "gram"
        on CPU when max(m, n) >= 2 min(m, n), and
        "standard" on CUDA, where the Gram route's small products do not pay (measured on an
        H100, bf16 1024 x 4096: 4.4x slower, as it computes half inputs in float32).
        On CUDA, float16/bfloat16 iterates stay in their dtype with float32 accumulation
        (as Muon does), so results differ from the float64 iteration by about the dtype's
        rounding (measured max 5.7e-3 for bfloat16, 7e-4 for float16, 5 steps of "you").
    out : array or list of arrays, optional
        Where to write the result (same shape, any float dtype; any strides, a non-contiguous
        one is written through a contiguous copy).
    check_finite : bool
        True: input holding NaN or Inf raises ValueError; on CUDA this check is the call's one
        host synchronization (it waits for the input norms). False: no check and no
        synchronization, so the call can be captured in a CUDA graph; a matrix holding NaN
        or Inf then gives all-NaN output (and the others their results).

    Returns
    -------
    array, or list of arrays, like G (out if given).

    Notes
    -----
    Singular values of the result after 5 steps, for Gaussian 256 x 1024 inputs in float64
    (measured; tests/test_newton_schulz.py checks them): "muon" [0.68, 1.14], "you"
    [0.97, 1.04], "polar_express" [0.86, 1.13]. With enough steps of "polar_express" the
    result converges to U V^T (to 1e-10 in float64 for condition numbers up to 1e3 in 12
    steps). Input containing NaN or Inf raises ValueError (see check_finite). Non-contiguous
    input is copied (explicitly) to a contiguous buffer first.

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> G = np.random.default_rng(0).standard_normal((64, 256))
    >>> X = curvkit.polar(G, steps=12, coefficients="polar_express")
    >>> np.allclose(X @ X.T, np.eye(64), atol=1e-8)
    True
    >>> Xs = curvkit.polar([G, G[:32].T])          # a list of shapes in one call
    >>> [x.shape for x in Xs]
    [(64, 256), (256, 32)]
    >>> bad = G.copy(); bad[0, 0] = np.nan
    >>> bool(np.isnan(curvkit.polar(bad, check_finite=False)).all())  # no check, no host sync
    True
    """
    return _run(G, steps, coefficients, norm_eps, method, out, check_finite, alpha=None, beta=None)


Factor = Union[float, Sequence[float]]  # one number, or one per parameter


def polar_update_(param: Any, G: Any, lr: Factor, weight_decay: Factor = 0.0, scale: Factor = 1.0, steps: int = 5,
                  coefficients: Coefficients = "muon", norm_eps: float = 1e-7, method: str = "auto",
                  check_finite: bool = True) -> Any:
    """Muon's parameter update in place, fused into the last Newton–Schulz product:

    ``param <- param * (1 - lr * weight_decay) - lr * scale * polar(G)``

    ``param`` and ``G`` are arrays of the same shape (or lists of them); other arguments as
    in :func:`polar`. For lists, ``lr``, ``weight_decay`` and ``scale`` may each be one
    number or a sequence of one per parameter (Muon's per-shape scale
    ``max(1, rows / cols) ** 0.5``, per-group learning rates): still one call. NaN or Inf in
    ``param`` raises :class:`curvkit.ArgumentError`. Returns ``param``. With
    ``check_finite=False``, a G holding NaN or Inf makes its param NaN (except with
    ``lr * scale == 0``: as in BLAS, a zero factor does not read the update).

    >>> import numpy as np, curvkit
    >>> rng = np.random.default_rng(1)
    >>> W, G = rng.standard_normal((32, 64)), rng.standard_normal((32, 64))
    >>> expected = W * (1 - 0.1 * 0.01) - 0.1 * curvkit.polar(G)
    >>> _ = curvkit.polar_update_(W, G, lr=0.1, weight_decay=0.01)
    >>> np.allclose(W, expected)
    True
    >>> Ws = [rng.standard_normal((64, 16)), rng.standard_normal((16, 64))]
    >>> Gs = [rng.standard_normal((64, 16)), rng.standard_normal((16, 64))]
    >>> scales = [max(1, w.shape[0] / w.shape[1]) ** 0.5 for w in Ws]   # 2.0 and 1.0
    >>> expected = [w - 0.02 * s * curvkit.polar(g) for w, g, s in zip(Ws, Gs, scales)]
    >>> _ = curvkit.polar_update_(Ws, Gs, lr=0.02, scale=scales)
    >>> all(np.allclose(w, e) for w, e in zip(Ws, expected))
    True
    """
    if param is None:  # else polar's out=None path would return a new array and drop it
        raise ArgumentTypeError("argument 'param' must be an array (or a list of arrays) to update, got None")
    count = len(param) if isinstance(param, (list, tuple)) else None
    lrs = _per_parameter(lr, "lr", count)
    decays = _per_parameter(weight_decay, "weight_decay", count)
    scales = _per_parameter(scale, "scale", count)
    _run(G, steps, coefficients, norm_eps, method, param, check_finite,
         alpha=[-r * s for r, s in zip(lrs, scales)], beta=[1.0 - r * d for r, d in zip(lrs, decays)],
         out_name="param")
    return param


def _per_parameter(value, name, count):
    """A number for every parameter: one number, or (for a list of `count` parameters) a
    sequence of one each."""
    if count is None or isinstance(value, (int, float, np.integer, np.floating)) or getattr(value, "ndim", 1) == 0:
        return [_args.real(value, name)] * (count or 1)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ArgumentTypeError(f"argument '{name}' must be a real number or a sequence of one per parameter, "
                                f"got {type(value).__name__}")
    if len(value) != count:
        raise ArgumentError(f"argument '{name}' must have one entry per parameter ({count}), got {len(value)}")
    return [_args.real(v, name) for v in value]


def schedule(coefficients: Coefficients, steps: int) -> tuple[list[tuple[float, float, float]], float]:
    """(list of (a, b, c) for each step, normalization factor) for a schedule name or list."""
    steps = _args.steps(steps)
    if isinstance(coefficients, str):
        if coefficients not in SCHEDULES:
            raise ArgumentError(f"argument 'coefficients' must be one of {', '.join(map(repr, SCHEDULES))} "
                             f"or a sequence of (a, b, c), got {coefficients!r}")
        table, norm_scale = SCHEDULES[coefficients]
    else:
        try:
            rows = [[float(v) for v in abc] for abc in coefficients]
        except (TypeError, ValueError):
            raise ArgumentTypeError(
                "argument 'coefficients' must be a schedule name or a sequence of (a, b, c)") from None
        if not rows or any(len(abc) != 3 for abc in rows):
            raise ArgumentError("argument 'coefficients' must hold at least one (a, b, c) triple")
        table = [(a, b, c) for a, b, c in rows]
        norm_scale = 1.0
    return [table[min(k, len(table) - 1)] for k in range(steps)], norm_scale


def _run(G, steps, coefficients, norm_eps, method, out, check_finite, alpha, beta, out_name="out"):
    """out = beta out + alpha polar(G), alpha and beta one per input (None: 1 and 0)."""
    inputs, single = _arrays.as_list(G)
    inputs = [_arrays.prepare(g, "G") for g in inputs]
    outputs = _arrays.outputs_for(out, inputs, single, out_name, "G")
    # A strided or transposed output (a view of a parameter, say) is updated through a
    # contiguous copy: the kernels read and write C-contiguous memory.
    written = [_arrays.contiguous(o, out_name) for o in outputs]
    table, norm_scale = schedule(coefficients, steps)
    stream, workspace = _arrays.call_context(inputs)
    _core.polar(*_arrays.exported(inputs, written), steps=table, norm_scale=norm_scale,
                norm_eps=_args.real(norm_eps, "norm_eps"),
                method=_args.method_name(method),
                alpha=[1.0] * len(inputs) if alpha is None else alpha,
                beta=[0.0] * len(inputs) if beta is None else beta, normalize=True, check_finite=bool(check_finite),
                stream=stream,
                workspace=workspace, out_name=out_name)
    for o, w in zip(outputs, written):
        if w is not o:
            _arrays.convert(w, out=o, name=out_name)
    if out is not None:
        return out
    return outputs[0] if single else outputs


# ---------------------------------------------------------------------------------------
# Square roots of symmetric positive (semi)definite matrices

def matrix_sqrt(A: Any, method: str = "auto", tol: float = 1e-8, max_iters: int = 100, out: Any = None,
                return_info: bool = False, fallback: bool = True) -> Any:
    """Square root S of symmetric positive semidefinite A (..., n, n): S S = A, S symmetric.

    Parameters
    ----------
    A : array (..., n, n), or a list of such arrays
        NumPy, PyTorch or CuPy, any float dtype; a list gives a list (and a list of infos).
        Only (A + A^T)/2 is used; A further from symmetric than accumulated rounding
        explains (max|A - A^T| / max|A| above 1e-4 for float64 and float32, 3e-2 for half
        dtypes) is an ArgumentError, as is NaN or Inf.
    method : "auto", "newton_schulz", "pade" or "eigh"
        "auto": "eigh" on CPU, where it is 1.2-7x faster than Newton-Schulz at equal
        accuracy (bench/results/matrix_sqrt_cpu.md), "newton_schulz" on GPUs.
        "newton_schulz": the coupled iteration Y <- Y T, Z <- T Z, T = (3I - Z Y)/2 from
        Y = A/c, Z = I, c = min(||A||_F, ||A||_inf), stopped when ||I - Z Y||_F / sqrt(n)
        reaches rounding level and stops falling (12 steps at condition 1e2, 24 at 1e6, 36
        at 1e10, n = 200).
        "pade": the [5/5] Pade approximant of sqrt(1 - z) (Song et al., "Fast
        Differentiable Matrix Square Root", 2022), a fixed cost of 4 products and 2 Cholesky
        solves, accurate near the identity but only to ~1e-1 in general (measured: relative
        error 0.09 at n = 200, condition 1e2; 0.4 at 1e6); pass a looser ``tol`` to accept
        it. "eigh": LAPACK's symmetric eigensolver, negative eigenvalues floored at 0 (the
        optimizer's policy, as for :func:`matrix_inverse_root`: a factor accumulated in
        float32 is PSD only up to its rounding, up to 1e-3 of its largest eigenvalue);
        below -0.01 of the largest magnitude A is indefinite, not converged.
    tol : float
        Converged means ||S^2 - A||_F / ||A||_F <= tol (for "eigh", tol plus what the floor
        removed, ||A - A_+||_F / ||A||_F), and, for the inverse, A numerically nonsingular.
    max_iters : int
        Iteration cap for "newton_schulz", 1 to 2**31 - 1; the iteration also stops, not
        converged, after log(sqrt(n)/u)/log(1.5) + 10 steps (a singular A).
    out : array (or list of arrays), optional
        Where to write S (same shape, float dtype, C-contiguous).
    return_info : bool
        Also return a dict of per-matrix NumPy arrays shaped like the batch dimensions:
        "converged", "iterations", "residual" (||S^2 - A||_F / ||A||_F), "method" (the
        method that gave the result, "auto" resolved), "negative" (eigh's most negative
        eigenvalue over the largest magnitude, 0 if none or not computed) and "fell_back".
    fallback : bool
        A matrix that "newton_schulz" or "pade" failed (rounding-level negative
        eigenvalues make Newton–Schulz diverge; Pade misses tol away from the identity) is
        redone by "eigh" in float64, floored ("fell_back" and "method" in the info say
        so): on CPU natively, on CUDA through cuSOLVER's eigh (a host round trip per failed
        matrix).

    Failure policy (the same in every family, :func:`curvkit.set_failure_policy`): inputs
    an optimizer meets (singular, ill-conditioned, rounding-level indefinite, slightly
    asymmetric) converge. A matrix that still fails (clearly indefinite; or, for the
    inverse, singular) gives a :class:`curvkit.ConvergenceWarning` by default, a
    :class:`curvkit.ConvergenceError` carrying the info and the result under "raise", and
    nothing under "ignore" or with ``return_info``, where the caller reads
    ``info["converged"]``. Outputs are never NaN or Inf: a failed matrix holds its last
    (finite) iterate, its floored root, or zeros.

    Per dtype: float64, float32, float16 and bfloat16 inputs all compute in float64 (CPU and
    CUDA) and round once into the output's dtype; the singularity threshold of the inverse
    (n * 2^-53 * lambda_max) and the floor are the same for all, the asymmetry allowed is
    the dtype's (see A).
    An inverse root that overflows a float32 or half output (a tiny A) is zeros, not
    converged.

    Accuracy (relative error against float64 eigh, measured): float64 1e-13 up to
    condition 1e6, 4e-12 at 1e10; float32 input 1e-7 (the output rounding). On CPU all
    methods compute in float64 for every input dtype: float32 arithmetic would lose about
    n * eps32 (2e-6 at n = 256). Singular A: the square root converges with "eigh";
    "newton_schulz" does not (the coupled inverse grows without bound) and falls back to
    "eigh". CUDA arrays: "newton_schulz" only (computed in float64 for every dtype;
    convergence tracked per matrix on the device, the host looking every 4 steps), with
    the eigh fallback; "pade" and "eigh" raise ValueError there.

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> B = np.random.default_rng(0).standard_normal((50, 50))
    >>> A = B @ B.T + np.eye(50)
    >>> S = curvkit.matrix_sqrt(A)
    >>> np.allclose(S @ S, A)
    True
    >>> S, info = curvkit.matrix_sqrt(A, return_info=True)
    >>> str(info["method"]), bool(info["converged"])
    ('eigh', True)
    >>> S, info = curvkit.matrix_sqrt(A, method="pade", fallback=False, return_info=True)
    >>> bool(info["converged"]), float(info["residual"]) < 0.2
    (False, True)

    A factor accumulated in float32 is PSD only up to its rounding; its square root is the
    floored one, by every method:

    >>> G = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    >>> L = (G @ G.T).astype(np.float64) - 1e-4 * np.eye(64)     # rank 8, lambda_min < 0
    >>> S, info = curvkit.matrix_sqrt(L, method="newton_schulz", return_info=True)
    >>> bool(info["converged"]), str(info["method"]), bool(info["fell_back"])
    (True, 'eigh', True)
    """
    return _sqrt("matrix_sqrt", A, True, False, method, tol, max_iters, out, return_info, fallback)


def matrix_inv_sqrt(A: Any, method: str = "auto", tol: float = 1e-8, max_iters: int = 100, out: Any = None,
                    return_info: bool = False, fallback: bool = True) -> Any:
    """Inverse square root A^{-1/2} of symmetric positive definite A (..., n, n).

    Same arguments, methods and failure policy as :func:`matrix_sqrt` (the residual
    reported is that of the square root computed alongside). Relative error against
    float64 eigh is bounded by the problem's conditioning, about eps * cond(A) / 2
    (measured: 1.7e-11 at condition 1e6 in float64, as eigh itself). Singular A is
    reported as not converged.

    >>> import numpy as np, curvkit
    >>> A = np.diag([4.0, 9.0])
    >>> curvkit.matrix_inv_sqrt(A)
    array([[0.5       , 0.        ],
           [0.        , 0.33333333]])
    """
    return _sqrt("matrix_inv_sqrt", A, False, True, method, tol, max_iters, out, return_info, fallback)


def matrix_sqrt_and_inv_sqrt(A: Any, method: str = "auto", tol: float = 1e-8, max_iters: int = 100,
                             out: Any = None, return_info: bool = False, fallback: bool = True) -> Any:
    """(A^{1/2}, A^{-1/2}) from one computation (the coupled iteration yields both).

    See :func:`matrix_sqrt`; ``out`` is a pair (S, R), or for list input a pair of lists.

    >>> import numpy as np, curvkit
    >>> S, R = curvkit.matrix_sqrt_and_inv_sqrt(np.diag([4.0, 9.0]))
    >>> np.allclose(S @ R, np.eye(2))
    True
    """
    return _sqrt("matrix_sqrt_and_inv_sqrt", A, True, True, method, tol, max_iters, out, return_info, fallback)


def solve_lyapunov(S: Any, C: Any, max_iters: int = 100, out: Any = None, return_info: bool = False) -> Any:
    """X with S X + X S = C, for symmetric positive definite S (..., n, n) and any C.

    S and C may be lists of arrays (a list of X is returned); ``out`` is where X goes.

    The backward of the matrix square root (gradient w.r.t. A of a loss on S = A^{1/2}
    solves it with C = dL/dS). Solved by the matrix-sign iteration on [[S, C], [0, -S]]
    (Song et al. 2022) run to convergence rather than a fixed 8 steps: with B_0 = S/||S||_F,
    C_0 = C/||S||_F, B <- B(3I - B^2)/2, C <- (C(3I - B^2) - B(BC - CB))/2, X = C/2. CPU
    and CUDA (each matrix stopped on its own on the device), computed in float64. Failure
    policy as in :func:`matrix_sqrt`. On the CPU the info's "residual" is the true
    ||S X + X S - C||_F / ||C||_F of the X returned, and a matrix converges only when S is
    positive definite (an indefinite S is reported not converged) and the normwise backward
    error ||S X + X S - C|| / (2 ||S|| ||X|| + ||C||) is below sqrt(eps). NaN or Inf in C
    raises :class:`curvkit.ArgumentError`.

    >>> import numpy as np, curvkit
    >>> S = np.diag([1.0, 2.0]); C = np.array([[2.0, 3.0], [3.0, 8.0]])
    >>> curvkit.solve_lyapunov(S, C)
    array([[1., 1.],
           [1., 2.]])
    """
    s_list, single = _arrays.as_list(S)
    s_list = [_arrays.prepare(x, "S") for x in s_list]
    c_list = [_arrays.prepare(x, "C") for x in _arrays.matching(C, single, 0, "C", "S")]
    xs = _arrays.outputs_for(out, s_list, single, "out", "S")
    stream, workspace = _arrays.call_context(s_list)
    infos = _core.solve_lyapunov(s_list, c_list, xs, max_iters=_args.max_iters(max_iters),
                                 stream=stream, workspace=workspace)
    return _finish("solve_lyapunov", out if out is not None else (xs[0] if single else xs), infos, single,
                   return_info)


# Below this fraction of the largest eigenvalue magnitude a negative eigenvalue is not rounding
# (the native kIndefinite).
_INDEFINITE = 1e-2


def _sqrt(function, A, want_sqrt, want_inverse, method, tol, max_iters, out, return_info, fallback):
    inputs, single = _arrays.as_list(A)
    inputs = [_arrays.prepare(a, "A") for a in inputs]
    if want_sqrt and want_inverse:
        parts = [None, None] if out is None else _arrays.output_parts(out, 2, "a pair (S, R)")
        S, R = (_arrays.outputs_for(o, inputs, single) for o in parts)
    else:
        given = _arrays.outputs_for(out, inputs, single)
        S, R = (given, []) if want_sqrt else ([], given)
    stream, workspace = _arrays.call_context(inputs)
    infos = _core.matrix_sqrt(inputs, S, R, method=_args.method_name(method),
                              max_iters=_args.max_iters(max_iters), tol=_args.real(tol, "tol"),
                              fallback=bool(fallback), stream=stream, workspace=workspace)
    if fallback:  # the CPU falls back natively; CUDA here, through cuSOLVER's eigh
        for i, a in enumerate(inputs):
            if _arrays.device_of(a)[0] == "cuda":
                _redo_by_eigh(a, S[i] if S else None, R[i] if R else None, infos[i], float(tol))
    if out is not None:
        result = out
    else:
        pick = (lambda xs: xs[0]) if single else (lambda xs: xs)
        result = (pick(S), pick(R)) if want_sqrt and want_inverse else pick(S if want_sqrt else R)
    return _finish(function, result, infos, single, return_info)


def _redo_by_eigh(A, S, R, info, tol):
    """Redo, by eigh in float64 with the eigh route's floor, the matrices of A (..., n, n) that
    ``info`` marks failed, writing S = A_+^{1/2} and/or R = A_+^{-1/2} and updating ``info``
    in place. The CPU does this natively; on CUDA eigh is cuSOLVER's."""
    from .inverse_root import eigh

    converged = np.asarray(info["converged"])
    failed = [tuple(int(i) for i in ix) for ix in np.argwhere(~converged)] if converged.ndim else (
        [] if converged else [()])
    for index in failed:
        a = _arrays.convert(A[index], "float64")
        a = (a + a.swapaxes(-1, -2)) / 2
        (w, V), eigh_info = eigh(a, return_info=True)
        if not np.asarray(eigh_info["converged"]).all():
            continue
        n, w_min, w_max = a.shape[-1], float(w[0]), float(w[-1])
        scale = max(abs(w_min), abs(w_max))
        negative = w_min / scale if w_min < 0 and scale > 0 else 0.0
        info["negative"][index] = negative
        if negative < -_INDEFINITE:
            continue
        root = (w * (w > 0)) ** 0.5
        Vt = V.swapaxes(-1, -2)
        sqrt = (V * root) @ Vt
        a_norm = float((a * a).sum()) ** 0.5
        residual = float(((sqrt @ sqrt - a) ** 2).sum()) ** 0.5 / a_norm if a_norm > 0 else 0.0
        floored = float(((w * (w < 0)) ** 2).sum()) ** 0.5 / a_norm if a_norm > 0 else 0.0
        ok = residual <= tol + floored
        if S is not None:
            ok &= _store_finite(S, index, sqrt)
        if R is not None:
            singular = w_min <= n * 2.0 ** -53 * max(w_max, 0.0)
            ok &= not singular and _store_finite(R, index, (V / root) @ Vt)
        if ok:
            info["converged"][index], info["residual"][index] = True, residual
            info["method"][index], info["fell_back"][index] = "eigh", True


def _store_finite(out, index, value) -> bool:
    """out[index] = value; zeros instead where the output dtype overflowed (never Inf)."""
    out[index] = value
    if math.isfinite(float(abs(out[index]).max())):
        return True
    out[index] = 0
    return False
