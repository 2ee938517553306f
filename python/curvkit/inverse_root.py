"""Inverse p-th roots and eigendecompositions of symmetric matrices: the Shampoo / SOAP
preconditioner core, batched and over ragged lists of sizes in one call."""
from __future__ import annotations

import numpy as np

from . import _arrays, _core
from .newton_schulz import ConvergenceError

ROOT_METHODS = ("auto", "eigh", "newton")
_DEFAULT_TOL = {"float64": 1e-8, "float32": 1e-3}  # on ||X^p (A + eps I) - I||_max


def matrix_inverse_root(A, p, eps=0.0, method="auto", init=None, tol=None, max_iters=100, fallback=True,
                        return_info=False, basis=None):
    """X = (A + eps I)^(-1/p) for symmetric positive semidefinite A.

    Parameters
    ----------
    A : array (..., n, n), or a list of such arrays of different sizes
        NumPy, PyTorch (CPU or CUDA) or CuPy, all on one device; float64 computes in
        float64, other dtypes in float32. Only (A + A^T)/2 is used; clearly non-symmetric
        input, NaN or Inf raise ValueError. A list (e.g. the 88 factor blocks of 1024 and
        768 of a 4096 x 11008 weight) is processed in one call and gives a list: on CPU
        small matrices one per core; on CUDA the matrices are grouped by size, each group
        iterated as one batch with every matrix's convergence tracked on the device (the
        host looks every 4 steps), on the caller's current stream.
    p : int >= 1
        The root: 1 (inverse), 2, 4 (Shampoo), 8, ...
    eps : float >= 0
        Ridge added to A.
    method : "auto", "eigh" or "newton"
        "eigh": eigendecomposition, eigenvalues floored at 0 and shifted by eps, rebuilt with
        one symmetric product. A matrix whose shifted eigenvalues reach n * eps_dtype *
        lambda_max (numerically singular in its compute dtype: float32 at condition ~1e5
        for n = 128), or with a clearly negative eigenvalue, is reported as not converged;
        exact zeros get the pseudo-inverse root; with ``basis``, refined from a previous
        eigenbasis instead of decomposed from scratch. "newton": the coupled Newton iteration of (Scalable / Distributed)
        Shampoo, X_0 = z^{1/p} I, M_0 = z (A + eps I), z = (p+1)/(2 lambda_max estimate),
        M' = ((p+1) I - M)/p, X <- X M', M <- M'^p M, stopped at rounding level
        (max|M - I| <= 10 sqrt(n) unit roundoffs, or no longer falling once small) or when
        the error grows. On CUDA "eigh" is cuSOLVER's batched syev and "newton" runs on
        cuBLAS products (symmetric ones computed by their lower blocks). "auto": "eigh" on
        CPU (faster there at every size measured, bench/results/inverse_root_cpu.md),
        "newton" on CUDA (products are what GPUs do fastest; the square root's Newton–Schulz
        beat torch's eigh 1.3-8.4x on an H100, bench/results/gpu_h100.md), "eigh" wherever
        a ``basis`` is given.
    basis : array like A, optional
        The warm start for slowly changing matrices (Shampoo's factors between refreshes):
        eigenvectors (columns) of a nearby matrix, typically those this call left in it last
        time, refined **in place** into the eigenvectors of A (ascending eigenvalues). The
        refinement (Ogita & Aishima 2018: S = V^T A V, R = I - V^T V, V <- V (I + E) with
        E_ij = (s_ij + d_j r_ij) / (d_j - d_i)) squares the error each step with 3 matrix
        products; eigenvectors of nearly equal eigenvalues that mixed are separated exactly
        by small eigendecompositions. It stops at the accuracy of LAPACK's own eigenvectors
        (off-diagonal of S and R within 4 sqrt(n) unit roundoffs; the evaluation that would
        confirm it is skipped when the last correction was below rounding), so the result
        matches a cold eigh; a basis too far off (an identity or zeros on the first call,
        say) is replaced by a full decomposition ("fell_back" in the info). One EMA step
        (beta = 0.999) after the basis was computed it takes 2 steps in float32 (8.5
        products in all) and 4 in float64 (12.5), against 38-51 for a cold Newton root at
        equal accuracy (bench/results/inverse_root_cpu.md). Needs ``method`` "auto" or
        "eigh". On CUDA the refinement runs on the device (each matrix stopped on its own),
        except that a matrix whose nearly equal eigenvalues mixed is decomposed by cuSOLVER
        instead of separated in place. "iterations" in the info counts refinement steps,
        "products" the matrix products.
    init : array like A, optional
        A previous root to warm-start "newton" from (X_0 = init, M_0 = init^p (A + eps I)):
        it takes a few steps instead of tens, but keeps the part of init's error that does
        not commute with A, about the size of the drift since init (the uncoupled form,
        which would correct it, is unstable). The final residual check catches a warm
        start that ends above tol, which then falls back to eigh. Also what is kept when
        everything fails.
    tol : float, optional
        "newton" converged means ||X^p (A + eps I) - I||_max <= tol for the final X
        (computed, not tracked); default 1e-8 (float64), 1e-3 (float32). As this grows like
        condition * eps, float32 beyond condition ~1e5 falls back to float64 eigh. With ``return_info``, "eigh" also reports
        ||X^p (A + eps I) - I||_max (it grows like condition * eps even for exact roots, so
        it is information, not a criterion).
    max_iters : int
        Cap on Newton steps.
    fallback : bool
        A Newton failure is retried with eigh in float64 (and, if that fails and init is
        given, init is kept).
    return_info : bool
        Also return, per input, a dict of NumPy arrays over the batch: "converged",
        "iterations", "residual" (||X^p (A + eps I) - I||_max; -1 where not measured), "method" ("eigh"/"newton" per
        matrix), "fell_back", "kept_init", "products" (the n x n matrix products spent,
        fallbacks included; a symmetric one counts its share of a plain one, 0.5 on CPU; a
        LAPACK / cuSOLVER decomposition none, nor the residual eigh reports). Without it, a matrix that did not converge
        raises :class:`curvkit.ConvergenceError` (results are never NaN or Inf).

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> A = np.diag([16.0, 81.0])
    >>> curvkit.matrix_inverse_root(A, p=4)
    array([[0.5       , 0.        ],
           [0.        , 0.33333333]])
    >>> X, info = curvkit.matrix_inverse_root(A, p=4, method="newton", return_info=True)
    >>> bool(info["converged"]), int(info["iterations"]) < 20
    (True, True)
    >>> warm, info = curvkit.matrix_inverse_root(A * 1.01, p=4, method="newton", init=X, return_info=True)
    >>> int(info["iterations"]) <= 4
    True

    Refreshing a slowly drifting factor from its previous eigenbasis:

    >>> rng = np.random.default_rng(0)
    >>> G = rng.standard_normal((64, 256))
    >>> L = G @ G.T / 256
    >>> V = np.eye(64)                      # no basis yet: the first call decomposes from scratch
    >>> X, info = curvkit.matrix_inverse_root(L, p=4, eps=1e-6, basis=V, return_info=True)
    >>> bool(info["fell_back"])
    True
    >>> G = rng.standard_normal((64, 256))
    >>> L = 0.999 * L + 0.001 * (G @ G.T / 256)   # one EMA step later
    >>> X, info = curvkit.matrix_inverse_root(L, p=4, eps=1e-6, basis=V, return_info=True)
    >>> bool(info["fell_back"]), int(info["iterations"]) <= 4
    (False, True)
    >>> bool(np.allclose(X, curvkit.matrix_inverse_root(L, p=4, eps=1e-6, method="eigh")))
    True
    """
    single = not isinstance(A, (list, tuple))
    inputs = [A] if single else list(A)
    inits = _matching(init, single, len(inputs), "init")
    bases = _matching(basis, single, len(inputs), "basis")
    if method not in ROOT_METHODS:
        raise ValueError(f"argument 'method' must be one of {', '.join(map(repr, ROOT_METHODS))}, got {method!r}")
    p = _arrays.index(p, "p", 1)
    if not (isinstance(eps, (int, float)) and np.isfinite(eps) and eps >= 0):
        raise ValueError(f"argument 'eps' must be a finite number >= 0, got {eps!r}")
    prepared, outputs, prepared_inits = [], [], []
    for a, i0 in zip(inputs, inits):
        a = _square(a, "A")
        prepared.append(a)
        outputs.append(_arrays.empty(tuple(a.shape), _arrays.dtype_name(a.dtype), _arrays.framework_of(a),
                                     _arrays.device_of(a)))
        prepared_inits.append(None if i0 is None else _square(i0, "init"))
    if tol is None:  # the loosest default among the inputs' compute dtypes
        tol = max((_DEFAULT_TOL["float64" if _arrays.dtype_name(a.dtype) == "float64" else "float32"]
                   for a in prepared), default=_DEFAULT_TOL["float64"])
    on_cuda = bool(prepared) and _arrays.device_of(prepared[0])[0] == "cuda"
    if method == "auto":  # a basis asks for its refinement (eigh); otherwise by device
        method = "newton" if on_cuda and all(b is None for b in bases) else "eigh"
    prepared_bases = [_basis(b, a, written=True) for b, a in zip(bases, prepared)]
    status = _core.matrix_inverse_root(prepared, outputs, prepared_inits, prepared_bases, p, float(eps), method,
                                       _arrays.index(max_iters, "max_iters", 1), float(tol), bool(fallback),
                                       bool(return_info), _arrays.stream_of(prepared[0]) if prepared else 0,
                                       workspace=_arrays.workspace_of(prepared[0]) if prepared else None)
    infos = [{"converged": c, "iterations": it, "residual": r, "method": np.where(nw, "newton", "eigh"),
              "fell_back": fb, "kept_init": ki, "products": pr} for c, it, r, nw, fb, ki, pr in status]
    result = outputs[0] if single else outputs
    info = infos[0] if single else infos
    if return_info:
        return result, info
    failed = [k for k, i in enumerate(infos) if not i["converged"].all()]
    if failed:
        raise ConvergenceError(f"matrix_inverse_root: some matrices did not converge (input {failed[0]}); "
                               "pass return_info=True to inspect them instead of raising", info, result)
    return result


def eigh(A, basis=None, return_info=False):
    """Eigenvalues (ascending) and eigenvectors (columns) of symmetric A (..., n, n).

    Batched, or a list of arrays of different sizes in one call (small matrices one per
    core). float64 computes in float64, other dtypes in float32. Only (A + A^T)/2 is used.
    LAPACK on CPU, cuSOLVER's batched syev on CUDA; a failure raises
    :class:`curvkit.ConvergenceError`.

    ``basis`` (like A, or a list like A; not modified): eigenvectors of a nearby matrix to
    refine instead of decomposing from scratch, as in :func:`matrix_inverse_root` (3 matrix
    products a step, each squaring the error, to LAPACK's accuracy; a basis too far off is
    replaced by a full decomposition). With ``return_info``, also returns (per input) the
    refinement steps per matrix as a NumPy int32 array, -1 where decomposed from scratch.

    >>> import numpy as np, curvkit
    >>> w, V = curvkit.eigh(np.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> w
    array([1., 3.])
    >>> bool(np.allclose(V @ np.diag(w) @ V.T, [[2, 1], [1, 2]]))
    True
    >>> (w2, V2), steps = curvkit.eigh(np.array([[2.001, 1.0], [1.0, 2.0]]), basis=V, return_info=True)
    >>> bool(np.allclose(w2, np.linalg.eigvalsh([[2.001, 1.0], [1.0, 2.0]]), rtol=0, atol=1e-15)), int(steps)
    (True, 3)
    """
    single = not isinstance(A, (list, tuple))
    inputs = [_square(a, "A") for a in ([A] if single else A)]
    bases = [_basis(b, a) for b, a in zip(_matching(basis, single, len(inputs), "basis"), inputs)]
    values, vectors = [], []
    for a in inputs:
        fw, dev, dt = _arrays.framework_of(a), _arrays.device_of(a), _arrays.dtype_name(a.dtype)
        values.append(_arrays.empty(tuple(a.shape[:-1]), dt, fw, dev))
        vectors.append(_arrays.empty(tuple(a.shape), dt, fw, dev))
    status = _core.eigh(inputs, values, vectors, bases, _arrays.stream_of(inputs[0]) if inputs else 0,
                        workspace=_arrays.workspace_of(inputs[0]) if inputs else None)
    if not all(ok.all() for ok, _ in status):
        raise ConvergenceError("eigh: the decomposition failed for some matrices", {"converged": [ok for ok, _ in status]},
                               (values, vectors))
    result = (values[0], vectors[0]) if single else list(zip(values, vectors))
    if return_info:
        steps = [s for _, s in status]
        return result, (steps[0] if single else steps)
    return result


def _matching(x, single, count, name):
    """An optional per-input argument as a list: one array for an array A, a list for a list."""
    if x is None:
        return [None] * count
    xs = [x] if single else list(x)
    if len(xs) != count or single == isinstance(x, (list, tuple)):
        raise ValueError(f"argument '{name}' must match 'A': one array for an array, a list for a list")
    return xs


def _basis(b, a, written=False):
    """A warm-start basis on A's framework and device; C-contiguous when it is written in place."""
    if b is None:
        return None
    fw = _arrays.framework_of(b, "basis")
    if fw != _arrays.framework_of(a) or _arrays.device_of(b) != _arrays.device_of(a):
        raise ValueError("argument 'basis' must be on the same framework and device as 'A'")
    if fw == "torch":
        b = b.detach()
    if not written:
        return _arrays.contiguous(b)
    if not _core.array_info(b)["contiguous"]:
        raise ValueError("argument 'basis' must be C-contiguous (it is refined in place)")
    return b


def _square(a, name):
    fw = _arrays.framework_of(a, name)
    if fw == "torch":
        a = a.detach()
    if len(a.shape) < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"argument '{name}' must have shape (..., n, n), got {tuple(a.shape)}")
    if _arrays.dtype_name(a.dtype) not in _arrays.FLOAT_DTYPES:
        raise TypeError(f"argument '{name}' must have a float dtype, got {_arrays.dtype_name(a.dtype)}")
    return _arrays.contiguous(a)


def orthonormalize(Q, method="qr", steps=4):
    """Restore orthonormal columns of a perturbed or quantized basis Q (..., m, k), m >= k.

    "qr": Householder QR with R's diagonal made nonnegative, so the result is the
    Gram-Schmidt basis of Q (column j spans what columns 0..j span). "polar": ``steps``
    Bjorck passes Q <- 1.5 Q - 0.5 Q Q^T Q (4-bit Shampoo's rectification), run by
    curvkit's Newton–Schulz kernel without normalization; it moves Q to the nearest matrix
    with orthonormal columns and needs singular values in (0, sqrt(3)). Returns a new array
    (float64 computes in float64, others in float32). CPU and CUDA (cuSOLVER geqrf/orgqr,
    one call per matrix, for "qr").

    >>> import numpy as np, curvkit
    >>> Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 6)))
    >>> noisy = Q + 1e-3 * np.random.default_rng(1).standard_normal((6, 6))
    >>> for method in ("qr", "polar"):
    ...     R = curvkit.orthonormalize(noisy, method)
    ...     print(method, bool(np.allclose(R.T @ R, np.eye(6), atol=1e-12)))
    qr True
    polar True
    """
    if method not in ("qr", "polar"):
        raise ValueError(f"argument 'method' must be 'qr' or 'polar', got {method!r}")
    fw = _arrays.framework_of(Q, "Q")
    if fw == "torch":
        Q = Q.detach()
    if len(Q.shape) < 2:
        raise ValueError(f"argument 'Q' must have shape (..., m, k), got {tuple(Q.shape)}")
    if _arrays.dtype_name(Q.dtype) not in _arrays.FLOAT_DTYPES:
        raise TypeError(f"argument 'Q' must have a float dtype, got {_arrays.dtype_name(Q.dtype)}")
    if method == "qr":
        out = _arrays.convert(Q)  # a contiguous copy, orthonormalized in place
        ok = _core.orthonormalize_qr(out, _arrays.stream_of(out), workspace=_arrays.workspace_of(out))
        if not ok.all():
            raise ConvergenceError("orthonormalize: some bases are rank-deficient or non-finite",
                                   {"converged": ok}, out)
        return out
    steps = _arrays.index(steps, "steps", 1)
    Q = _arrays.contiguous(Q)
    out = _arrays.empty(tuple(Q.shape), _arrays.dtype_name(Q.dtype), fw, _arrays.device_of(Q))
    _core.polar([Q], [out], [(1.5, -0.5, 0.0)] * steps, 1.0, 0.0, "standard", 0, 1.0, 0.0,
                _arrays.stream_of(Q), normalize=False, workspace=_arrays.workspace_of(Q))
    return out


def eigenbasis_update(A, Q):
    """SOAP's refresh of an eigenbasis Q (..., n, k) of A (..., n, n) from the previous one.

    Estimates eigenvalues d_j = q_j^T A q_j, orders the columns by d descending, then takes
    one power step and re-orthonormalizes: Q_new = qr(A Q[:, perm]) (nonnegative R
    diagonal, so columns keep their signs). Returns (Q_new, d sorted descending, perm) with
    perm (int64, NumPy, also for CUDA input) such that new column j came from old column
    perm[j]: apply it to any state kept in the old basis (SOAP's second-moment estimate).
    CPU and CUDA (cuBLAS product, cuSOLVER QR).

    >>> import numpy as np, curvkit
    >>> A = np.diag([1.0, 5.0, 3.0])
    >>> Qn, d, perm = curvkit.eigenbasis_update(A, np.eye(3))
    >>> d, perm
    (array([5., 3., 1.]), array([1, 2, 0]))
    >>> bool(np.allclose(np.abs(Qn), np.eye(3)[:, perm]))
    True
    """
    A = _square(A, "A")
    fw = _arrays.framework_of(Q, "Q")
    Q = _arrays.contiguous(Q.detach() if fw == "torch" else Q)
    if len(Q.shape) != len(A.shape) or tuple(Q.shape[:-1]) != tuple(A.shape[:-1]):
        raise ValueError(f"argument 'Q' must have shape (..., n, k) matching A {tuple(A.shape)}, got {tuple(Q.shape)}")
    dt, dev = _arrays.dtype_name(Q.dtype), _arrays.device_of(Q)
    Q_new = _arrays.empty(tuple(Q.shape), dt, fw, dev)
    d = _arrays.empty(tuple(Q.shape[:-2]) + (Q.shape[-1],), dt, fw, dev)
    perm = np.empty(tuple(Q.shape[:-2]) + (Q.shape[-1],), dtype=np.int64)
    ok = _core.eigenbasis_update(A, Q, Q_new, d, perm, _arrays.stream_of(Q),
                                 workspace=_arrays.workspace_of(Q))
    if not ok.all():
        raise ConvergenceError("eigenbasis_update: A Q lost rank or became non-finite for some matrices",
                               {"converged": ok}, (Q_new, d, perm))
    return Q_new, d, perm
