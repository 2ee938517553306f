"""Inverse p-th roots and eigendecompositions of symmetric matrices: the Shampoo / SOAP
preconditioner core, batched and over ragged lists of sizes in one call."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _args, _arrays, _core
from ._errors import ArgumentError
from ._errors import finish as _finish


def matrix_inverse_root(A: Any, p: int, eps: float = 0.0, method: str = "auto", init: Any = None,
                        basis: Any = None, tol: Optional[float] = None, max_iters: int = 100,
                        fallback: bool = True, out: Any = None, return_info: bool = False) -> Any:
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
        one symmetric product. The floor is the optimizer's policy: a factor accumulated in
        float32 is PSD only up to its accumulated rounding, which can reach 1e-3 of its
        largest eigenvalue (Distributed Shampoo shifts its spectrum likewise), so
        rank-deficient, ill-conditioned and rounding-indefinite inputs all give their
        floored root, converged. "negative" in the info is the most negative eigenvalue over
        the largest magnitude (0 if none); below -0.01 the input is indefinite and reported
        not converged. "unresolved" counts the eigenvalues (floored, plus eps) at or below
        n * unit roundoff * lambda_max, which the compute dtype does not resolve (float32
        beyond condition ~1e5 at n = 128): without ``eps`` they are zeros and get the
        pseudo-inverse root (Distributed Shampoo's pseudo-inverse threshold); with it, the
        root there is dominated by eps; pass float64 for more. With ``basis``, refined from a previous eigenbasis
        instead of decomposed from scratch. "newton": the coupled Newton iteration of
        (Scalable / Distributed) Shampoo, X_0 = z^{1/p} I, M_0 = z (A + eps I),
        z = (p+1)/(2 lambda_max estimate), M' = ((p+1) I - M)/p, X <- X M', M <- M'^p M, stopped at rounding level
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
        condition * eps, float32 beyond condition ~1e5 falls back to float64 eigh. With
        ``return_info``, "eigh" also reports ||X^p (A + eps I) - I||_max (it grows like
        condition * eps even for exact roots, so it is information, not a criterion).
    max_iters : int
        Cap on Newton steps, 1 to 2**31 - 1.
    fallback : bool
        A Newton failure is retried with eigh in float64 (and, if that fails and init is
        given, init is kept).
    out : array (or list of arrays), optional
        Where to write X (same shape, float dtype, C-contiguous, not overlapping the inputs).
    return_info : bool
        Also return, per input, a dict of NumPy arrays over the batch: "converged",
        "iterations", "residual" (||X^p (A + eps I) - I||_max; -1 where not measured), "method" ("eigh"/"newton" per
        matrix), "fell_back", "kept_init", "negative" and "unresolved" (eigh's, above; 0
        for newton), "products" (the n x n matrix products spent,
        fallbacks included; a symmetric one counts its share of a plain one, 0.5 on CPU; a
        LAPACK / cuSOLVER decomposition none, nor the residual eigh reports). Without it, a matrix that did not converge
        is reported by the failure policy (:func:`curvkit.set_failure_policy`: a
        ConvergenceWarning by default, ConvergenceError under "raise"); results are never
        NaN or Inf.

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
    inputs, single = _arrays.as_list(A)
    inputs = [_arrays.prepare(a, "A") for a in inputs]
    inits = [None if x is None else _arrays.prepare(x, "init")
             for x in _arrays.matching(init, single, len(inputs), "init")]
    bases = [None if b is None else _arrays.written_in_place(_arrays.detached(b, "basis"))
             for b in _arrays.matching(basis, single, len(inputs), "basis")]
    outputs = _arrays.outputs_for(out, inputs, single)
    stream, workspace = _arrays.call_context(inputs)
    p = _args.index(p, "p", 1, _args.INT_MAX + 1)
    infos = _core.matrix_inverse_root(*_arrays.exported(inputs, outputs, inits, bases), p=p,
                                      eps=_args.real(eps, "eps"), method=_args.method_name(method),
                                      max_iters=_args.max_iters(max_iters),
                                      tol=None if tol is None else _args.real(tol, "tol"), fallback=bool(fallback),
                                      compute_residual=bool(return_info), stream=stream, workspace=workspace)
    result = out if out is not None else (outputs[0] if single else outputs)
    return _finish("matrix_inverse_root", result, infos, single, return_info)


def eigh(A: Any, basis: Any = None, out: Any = None, return_info: bool = False) -> Any:
    """Eigenvalues (ascending) and eigenvectors (columns) of symmetric A (..., n, n).

    Batched, or a list of arrays of different sizes in one call (small matrices one per
    core). float64 computes in float64, other dtypes in float32. Only (A + A^T)/2 is used.
    LAPACK on CPU, cuSOLVER's batched syev on CUDA; a failure is reported by the failure
    policy (:func:`curvkit.set_failure_policy`).

    ``basis`` (like A, or a list like A; not modified): eigenvectors of a nearby matrix to
    refine instead of decomposing from scratch, as in :func:`matrix_inverse_root` (3 matrix
    products a step, each squaring the error, to LAPACK's accuracy; a basis too far off is
    replaced by a full decomposition). ``out``: a pair (w, V) to write, or for list input a
    pair of lists. With ``return_info``, also returns (per input) a dict of per-matrix arrays:
    "converged", and "iterations", the refinement steps (-1 where decomposed from scratch).

    >>> import numpy as np, curvkit
    >>> w, V = curvkit.eigh(np.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> w
    array([1., 3.])
    >>> bool(np.allclose(V @ np.diag(w) @ V.T, [[2, 1], [1, 2]]))
    True
    >>> (w2, V2), info = curvkit.eigh(np.array([[2.001, 1.0], [1.0, 2.0]]), basis=V, return_info=True)
    >>> bool(np.allclose(w2, np.linalg.eigvalsh([[2.001, 1.0], [1.0, 2.0]]), rtol=0, atol=1e-15))
    True
    >>> int(info["iterations"])
    3
    """
    inputs, single = _arrays.as_list(A)
    inputs = [_arrays.prepare(a, "A") for a in inputs]
    bases = [None if b is None else _arrays.prepare(b, "basis")
             for b in _arrays.matching(basis, single, len(inputs), "basis")]
    if out is None:
        values = [_arrays.empty_like(a, shape=tuple(a.shape[:-1])) for a in inputs]
        vectors = [_arrays.empty_like(a) for a in inputs]
    else:
        values, vectors = (_arrays.given_outputs(o, single) for o in _arrays.output_parts(out, 2, "a pair (w, V)"))
    stream, workspace = _arrays.call_context(inputs)
    infos = _core.eigh(inputs, values, vectors, bases, stream=stream, workspace=workspace)
    if out is not None:
        result = out
    else:
        result = (values[0], vectors[0]) if single else list(zip(values, vectors))
    return _finish("eigh", result, infos, single, return_info)


def orthonormalize(Q: Any, method: str = "qr", steps: int = 4, out: Any = None, return_info: bool = False) -> Any:
    """Restore orthonormal columns of a perturbed or quantized basis Q (..., m, k), m >= k.

    "qr": Householder QR with R's diagonal made nonnegative, so the result is the
    Gram-Schmidt basis of Q (column j spans what columns 0..j span). "polar": ``steps``
    Bjorck passes Q <- 1.5 Q - 0.5 Q Q^T Q (4-bit Shampoo's rectification), run by
    curvkit's Newton–Schulz kernel on Q divided by its RMS singular value ||Q||_F / sqrt(k)
    (so any scale of Q gives the same result); it moves Q to the nearest matrix with
    orthonormal columns when the scaled singular values lie in (0, sqrt(3)), converging
    quadratically near 1. Returns a new
    array (or writes ``out``; a list for list input); float64 computes in float64, others in
    float32. CPU ("qr": LAPACK's blocked Householder QR on curvkit's threads) and CUDA
    (cuSOLVER geqrf/orgqr, one call per matrix, for "qr").

    A matrix that fails is reported by the failure policy (:func:`curvkit.set_failure_policy`:
    a ConvergenceWarning by default, ConvergenceError with the result attached under
    "raise"), or with ``return_info`` is reported in the info dict's "converged" per matrix: for "qr",
    Q was rank-deficient; for "polar", the result is not orthonormal to
    max|Q^T Q - I| <= sqrt(u) of the output dtype (u its unit roundoff: 1.5e-8 float64,
    2.4e-4 float32, 0.022 float16, 0.063 bfloat16), which a rank-deficient Q, one too far
    from orthonormal for the steps given, or a non-finite result fails; "polar"'s info also
    has that "orthogonality" per matrix. NaN or Inf in Q raises :class:`curvkit.ArgumentError`.

    >>> import numpy as np, curvkit
    >>> Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 6)))
    >>> noisy = Q + 1e-3 * np.random.default_rng(1).standard_normal((6, 6))
    >>> for method in ("qr", "polar"):
    ...     R = curvkit.orthonormalize(noisy, method)
    ...     print(method, bool(np.allclose(R.T @ R, np.eye(6), atol=1e-12)))
    qr True
    polar True
    """
    inputs, single = _arrays.as_list(Q)
    inputs = [_arrays.detached(q, "Q") for q in inputs]
    if method == "qr":  # a contiguous copy of Q, orthonormalized in place
        outputs = _arrays.outputs_for(out, inputs, single, "out", "Q")
        for q, o in zip(inputs, outputs):
            _arrays.convert(q, out=o, name="Q")
        stream, workspace = _arrays.call_context(outputs)
        infos = _core.orthonormalize_qr(outputs, stream=stream, workspace=workspace)
    elif method == "polar":
        inputs = [_arrays.prepare(q, "Q") for q in inputs]
        outputs = _arrays.outputs_for(out, inputs, single, "out", "Q")
        stream, workspace = _arrays.call_context(inputs)
        infos = _core.orthonormalize_polar(inputs, outputs, steps=_args.steps(steps, 1), stream=stream,
                                           workspace=workspace)
    else:
        raise ArgumentError(f"argument 'method' must be one of 'qr', 'polar', got {method!r}")
    result = out if out is not None else (outputs[0] if single else outputs)
    return _finish("orthonormalize", result, infos, single, return_info)


def eigenbasis_update(A: Any, Q: Any, out: Any = None, return_info: bool = False) -> Any:
    """SOAP's refresh of an eigenbasis Q (..., n, k) of A (..., n, n) from the previous one.

    Estimates eigenvalues d_j = q_j^T A q_j, orders the columns by d descending, then takes
    one power step and re-orthonormalizes: Q_new = qr(A Q[:, perm]) (nonnegative R
    diagonal, so columns keep their signs). Returns (Q_new, d sorted descending, perm) with
    perm (int64, NumPy, also for CUDA input) such that new column j came from old column
    perm[j]: apply it to any state kept in the old basis (SOAP's second-moment estimate).
    CPU and CUDA (cuBLAS product, cuSOLVER QR). Lists of (A, Q) give a list of triples;
    ``out`` is a triple (Q_new, d, perm) to write (of lists, for list input). A
    rank-deficient A Q (a rank-one factor, early in training) is not a failure: Q_new is
    orthonormal all the same, its last columns completing the basis, as SOAP's own QR;
    "full_rank" in the info says whether the compute dtype resolved A Q (float16, bfloat16
    and float32 compute in float32, where SOAP's factors of condition 1e7-1e8 lose their
    small columns: pass float64 for those eigenvectors). A matrix whose factorization
    fails, or whose estimates overflow d's dtype (zeros then), is reported by the failure
    policy (:func:`curvkit.set_failure_policy`), or with ``return_info`` is reported in the info
    dict's "converged" (with "full_rank"). NaN or Inf in A or Q raises
    :class:`curvkit.ArgumentError`.

    >>> import numpy as np, curvkit
    >>> A = np.diag([1.0, 5.0, 3.0])
    >>> Qn, d, perm = curvkit.eigenbasis_update(A, np.eye(3))
    >>> d, perm
    (array([5., 3., 1.]), array([1, 2, 0]))
    >>> bool(np.allclose(np.abs(Qn), np.eye(3)[:, perm]))
    True
    """
    a_list, single = _arrays.as_list(A)
    a_list = [_arrays.prepare(a, "A") for a in a_list]
    q_list = [_arrays.prepare(q, "Q") for q in _arrays.matching(Q, single, 0, "Q")]
    if out is None:
        columns = [tuple(q.shape[:-2]) + (q.shape[-1],) for q in q_list]
        q_new = [_arrays.empty_like(q) for q in q_list]
        d = [_arrays.empty_like(q, shape=c) for q, c in zip(q_list, columns)]
        perm = [np.empty(c, dtype=np.int64) for c in columns]
    else:
        parts = _arrays.output_parts(out, 3, "a triple (Q, d, perm)")
        q_new, d, perm = (_arrays.given_outputs(o, single) for o in parts)
    stream, workspace = _arrays.call_context(a_list)
    infos = _core.eigenbasis_update(*_arrays.exported(a_list, q_list, q_new, d, perm), stream=stream,
                                    workspace=workspace)
    if out is not None:
        result = out
    else:
        result = (q_new[0], d[0], perm[0]) if single else list(zip(q_new, d, perm))
    return _finish("eigenbasis_update", result, infos, single, return_info)
