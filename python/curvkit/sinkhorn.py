"""Sinkhorn family: entropic optimal transport by log-domain Sinkhorn and
Sinkhorn-Newton-Sparse (SNS), batched, on cost matrices or point clouds."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _args, _arrays, _core
from ._errors import ArgumentError, ArgumentTypeError, finish

_POINT_COSTS = ("sqeuclidean", "euclidean", "l1", "pnorm")


def sinkhorn(a: Any, b: Any, C: Any = None, *, x: Any = None, y: Any = None, cost: str = "sqeuclidean",
             p: float = 2.0, reg: float, method: str = "auto", tol: float = 1e-9, max_iter: int = 10000,
             max_newton: int = 200, density: Optional[float] = None, float32_warmup: bool = False,
             init: Any = None, sparse_tol: Optional[float] = None, return_info: bool = False) -> Any:
    """Entropic optimal transport plan.

    Solves ``min_P <C, P> + reg * sum P (log P - 1)`` subject to ``P 1 = a`` and
    ``P^T 1 = b`` on its dual over the potentials ``(f, g)``, where
    ``P = exp((f_i + g_j - C_ij) / reg)``, to an L1 marginal error
    ``||P 1 - a||_1 + ||P^T 1 - b||_1 <= tol``.

    Parameters
    ----------
    a, b : array or None
        Marginals, shape ``(n,)`` and ``(m,)``, or ``(B, n)`` and ``(B, m)`` for a batch of
        B problems; nonnegative, finite, of equal mass (to a relative 1e-8 in float64, 1e-5
        in float32, 2e-3 in float16 and 1.6e-2 in bfloat16; b is then rescaled to a's mass). None: uniform ``1/n``.
        A list of problems of different sizes: lists for a, b and C (or x and y).
    C : array, optional
        Cost matrix ``(n, m)`` or ``(B, n, m)``, finite. Or give point clouds instead:
    x, y : array, optional
        Points ``(n, d)`` and ``(m, d)`` (or batched ``(B, n, d)``, ``(B, m, d)``); the
        cost of each pair is computed when needed, never stored.
    cost : {"sqeuclidean", "euclidean", "l1", "pnorm"}
        The ground cost of points: ``||x - y||^2``, ``||x - y||``, ``||x - y||_1``,
        ``||x - y||_p^p``.
    p : float > 0
        The exponent of "pnorm".
    reg : float > 0
        The entropic regularization epsilon (the SNS paper's eta is ``1 / reg``).
    method : {"auto", "log", "sns"}
        "log": log-domain Sinkhorn (fused log-sum-exp half-steps, no overflow at any
        reg). "sns": Sinkhorn-Newton-Sparse, 20 Sinkhorn iterations then Newton steps on
        the dual with a sparsified Hessian (CG on its Schur complement, line search).
        "auto": Sinkhorn, handing over to Newton once Sinkhorn's measured linear rate
        predicts more than 20 further iterations: about what the ~10 Newton steps that
        finish from there cost (a step is 1-3 iterations' work), the prediction being
        optimistic as Sinkhorn slows (docs/sinkhorn.md). A problem Sinkhorn solves in a
        few dozen iterations (a large reg) does not pay for Newton. CPU and CUDA run the
        same schedule.
    tol : float > 0
        On the L1 marginal error (absolute; the masses are usually 1).
    max_iter : int
        Sinkhorn iterations (an f and a g half-step each), warm-up included.
    max_newton : int
        Newton step attempts (SNS).
    density : float in (0, 1], optional
        Fraction of the plan's entries kept in the sparse Hessian (the largest, chosen by
        one global threshold). Default ``min(1, 10 / min(n, m))``, doubled after a poor step.
    float32_warmup : bool
        Run the Sinkhorn phase in float32 arithmetic (twice the SIMD width) until its error
        reaches float32's floor (1e-5 of the mass), then go on in float64.
    init : tuple (f, g), optional
        Potentials to start from (shaped like a and b), e.g. from a nearby problem.
    sparse_tol : float, optional
        Return the plan sparse, without forming it densely: the entries ``P_ij >= sparse_tol
        * mass`` as a ``scipy.sparse.csr_array`` (NumPy input; needs SciPy) or a
        coalesced ``torch.sparse_coo_tensor`` (PyTorch), in the input dtype, or a
        ``cupyx.scipy.sparse.csr_matrix`` (CuPy), on the input's device; SciPy and CuPy hold
        float16 inputs' plans in float32. One per problem (a list for a batch). At small reg an
        OT plan is nearly a permutation: n entries. The entries are computed from the returned
        potentials, so float16/bfloat16 ones carry those potentials' rounding (about ten times
        the dense plan's error): pass float32 inputs for an accurate sparse plan.
    return_info : bool
        Also return a dict of per-problem NumPy arrays (shape ``(B,)``, or ``()`` unbatched):
        "converged", "marginal_error", "iterations", "newton_steps", "cost" (``<C, P>``),
        "objective" (the regularized primal value, equal to the dual at the optimum), "method"
        (what ran: "log" or "sns"), "potentials_overflow" (a finite potential does not fit the
        dtype: then not converged, f and g written as zeros), and "f", "g" (the potentials,
        arrays like a and b; defined up to (f + c, g - c), and float16/bfloat16 ones are
        stored with the c that centres their ranges, so they fit whenever the costs do).

    Returns
    -------
    plan : array like C, ``(n, m)`` or ``(B, n, m)`` (a list for list input); with
    ``return_info``, ``(plan, info)``. A problem that misses tol is reported by the failure
    policy (:func:`curvkit.set_failure_policy`: a ConvergenceWarning by default,
    ConvergenceError carrying info and the plan under "raise") unless ``return_info`` is set.

    Notes
    -----
    Computed in float64 from the inputs' dtype (float16, bfloat16, float32 or float64),
    plan and potentials rounded once to it; the marginal error is that of the float64 plan.
    Problems of a batch or list are solved in parallel, each stopping on its own.

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> rng = np.random.default_rng(0)
    >>> C = rng.random((50, 40))
    >>> a, b = np.full(50, 1 / 50), np.full(40, 1 / 40)
    >>> P, info = curvkit.sinkhorn(a, b, C, reg=0.01, return_info=True)
    >>> bool(info["converged"]), float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum()) < 1e-9
    (True, True)
    >>> x, y = rng.random((30, 2)), rng.random((30, 2))
    >>> P = curvkit.sinkhorn(None, None, x=x, y=y, reg=1e-3)     # uniform marginals
    >>> P.shape
    (30, 30)
    >>> S = curvkit.sinkhorn(None, None, x=x, y=x + 1e-3, reg=1e-4, sparse_tol=1e-9)  # doctest: +SKIP
    >>> S.nnz                                 # the identity: one entry a row  # doctest: +SKIP
    30
    """
    plans, infos, single, calls = _solve(a, b, C, x, y, cost, p, reg, method, tol, max_iter, max_newton, density,
                                         float32_warmup, init, want_plan=sparse_tol is None)
    if sparse_tol is not None:
        threshold = _args.real(sparse_tol, "sparse_tol")
        plans = [_sparse_plans(call, cost, p, reg, threshold) for call in calls]
    return finish("sinkhorn", plans[0] if single else plans, infos, single, return_info)


def sinkhorn_cost(a: Any, b: Any, C: Any = None, *, x: Any = None, y: Any = None, cost: str = "sqeuclidean",
                  p: float = 2.0, reg: float, method: str = "auto", tol: float = 1e-9, max_iter: int = 10000,
                  max_newton: int = 200, density: Optional[float] = None, float32_warmup: bool = False,
                  init: Any = None, return_info: bool = False) -> Any:
    """The entropic OT loss ``<C, P> + reg * sum P (log P - 1)`` at the optimal plan, without
    storing the plan (memory O(n + m) beyond the inputs; none for point clouds).

    Arguments as :func:`sinkhorn`. Returns a float64 NumPy array of shape ``(B,)`` (``()``
    unbatched; a list for list input), plus the info dict with ``return_info``. For
    gradients with respect to a, b, C, x and y, use :func:`curvkit.torch.sinkhorn_cost`.

    >>> import numpy as np, curvkit
    >>> x = np.linspace(0, 1, 20)[:, None]
    >>> loss = curvkit.sinkhorn_cost(None, None, x=x, y=x + 0.5, reg=1e-3)
    >>> bool(abs(loss - 0.25) < 0.01)        # every point moves by 0.5
    True
    """
    _, infos, single, _ = _solve(a, b, C, x, y, cost, p, reg, method, tol, max_iter, max_newton, density,
                                 float32_warmup, init, want_plan=False)
    values = [np.asarray(info["objective"]) for info in infos]
    return finish("sinkhorn_cost", values[0] if single else values, infos, single, return_info)


def _solve(a, b, C, x, y, cost, p, reg, method, tol, max_iter, max_newton, density, float32_warmup, init,
           want_plan):
    points = C is None
    if points:
        if x is None or y is None:
            raise ArgumentError("give a cost matrix 'C' or the point clouds 'x' and 'y'")
        if cost not in _POINT_COSTS:
            raise ArgumentError(f"argument 'cost' must be one of {', '.join(repr(c) for c in _POINT_COSTS)}, "
                                f"got {cost!r}")
        main, single = _arrays.as_list(x)
        ys = _matching(y, single, len(main), "y", "x")
    else:
        if x is not None or y is not None:
            raise ArgumentError("give either 'C' or the point clouds 'x' and 'y', not both")
        main, single = _arrays.as_list(C)
        cost = "matrix"
    count = len(main)
    As, Bs = _matching(a, single, count, "a", "x" if points else "C"), _matching(b, single, count, "b",
                                                                                 "x" if points else "C")
    inits: list[Any] = [None] * count if init is None else _inits(init, single, count)
    reg = _args.real(reg, "reg")
    tol = _args.real(tol, "tol")
    p = _args.real(p, "p")
    max_iter = _args.index(max_iter, "max_iter")
    max_newton = _args.index(max_newton, "max_newton")
    density = 0.0 if density is None else _args.real(density, "density")
    av: list[Any] = []
    bv: list[Any] = []
    Cv: list[Any] = []
    xv: list[Any] = []
    yv: list[Any] = []
    fv: list[Any] = []
    gv: list[Any] = []
    pv: list[Any] = []
    shapes = []
    for k in range(count):
        name = "x" if points else "C"
        M = _arrays.prepare(main[k], name)
        batched = M.ndim == 3
        if M.ndim == 2:
            M = M.reshape((1,) + tuple(M.shape))
        elif M.ndim != 3:
            shape = "(n, d) or (B, n, d)" if points else "(n, m) or (B, n, m)"
            raise ArgumentError(f"argument '{name}' must have shape {shape}, got {tuple(main[k].shape)}")
        Y = None
        if points:
            Y = _arrays.prepare(ys[k], "y")
            Y = Y.reshape((1,) + tuple(Y.shape)) if Y.ndim == 2 else Y
            n, m = M.shape[1], Y.shape[1]
        else:
            n, m = M.shape[1], M.shape[2]
        B = M.shape[0]
        A = _marginal(As[k], M, B, n, batched, "a")
        Bm = _marginal(Bs[k], M, B, m, batched, "b")
        f, g = _arrays.empty_like(M, (B, n)), _arrays.empty_like(M, (B, m))
        if inits[k] is not None:
            f0, g0 = inits[k]
            f[...] = _marginal(f0, M, B, n, batched, "init[0]")
            g[...] = _marginal(g0, M, B, m, batched, "init[1]")
        plan = _arrays.empty_like(M, (B, n, m)) if want_plan else None
        av.append(A)
        bv.append(Bm)
        Cv.append(None if points else M)
        xv.append(M if points else None)
        yv.append(Y)
        fv.append(f)
        gv.append(g)
        pv.append(plan)
        shapes.append((batched, n, m))
    stream, workspace = _arrays.call_context(main)
    raw = _core.sinkhorn(av, bv, Cv, xv, yv, fv, gv, pv, cost=cost, p=p, reg=reg, method=method, tol=tol,
                         max_iter=max_iter, max_newton=max_newton, density=density, float32_warmup=float32_warmup,
                         warm_start=init is not None, stream=stream, workspace=workspace)
    plans, infos = [], []
    for k, (batched, n, m) in enumerate(shapes):
        info = raw[k] if batched else {key: value.reshape(()) for key, value in raw[k].items()}
        info["f"] = fv[k] if batched else fv[k].reshape((n,))
        info["g"] = gv[k] if batched else gv[k].reshape((m,))
        infos.append(info)
        if want_plan:
            plans.append(pv[k] if batched else pv[k].reshape((n, m)))
    calls = [(av[k], bv[k], Cv[k], xv[k], yv[k], fv[k], gv[k], shapes[k][0]) for k in range(count)]
    return plans, infos, single, calls


def _sparse_plans(call, cost, p, reg, sparse_tol):
    """The sparse plans of one batch's solved problems (a list for a batch), built where the
    problems live and returned on their device."""
    A, B, C, X, Y, F, G, batched = call
    fw = _arrays.framework_of(A)
    if fw == "numpy":
        try:
            import scipy.sparse as sparse
        except ImportError as e:  # pragma: no cover - SciPy is optional
            raise ArgumentTypeError("a sparse plan of NumPy arrays is a scipy.sparse.csr_array: install SciPy") from e
    n, m = A.shape[1], B.shape[1]
    stream, workspace = _arrays.call_context([A])
    out = []
    for index in range(A.shape[0]):
        mass = float(_arrays.to_host(A[index]).astype(np.float64).sum())
        indptr, indices, values = _core.sinkhorn_sparse_plan(
            A, B, C, X, Y, F, G, cost="matrix" if C is not None else cost, p=p, reg=reg, threshold=sparse_tol * mass,
            index=index, stream=stream, workspace=workspace)
        if fw == "numpy":  # SciPy's sparse arrays do not compute in float16: half inputs give float32
            dtype = A.dtype if A.dtype.itemsize >= 4 else np.float32
            out.append(sparse.csr_array((values.astype(dtype), indices, indptr), shape=(n, m)))
        elif fw == "cupy":
            import cupy
            import cupyx.scipy.sparse as cusparse

            with cupy.cuda.Device(A.device.id):
                # cupyx's CSR holds float32/float64 only: half inputs come back as float32
                dtype = A.dtype if A.dtype.itemsize >= 4 else cupy.float32
                parts = (cupy.asarray(values, dtype=dtype), cupy.asarray(indices, dtype=cupy.int32),
                         cupy.asarray(indptr, dtype=cupy.int32))
                out.append(cusparse.csr_matrix(parts, shape=(n, m)))
        else:
            import torch

            rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
            out.append(torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, indices])),
                                               torch.from_numpy(values).to(A.dtype), size=(n, m),
                                               is_coalesced=True, check_invariants=False).to(A.device))  # sorted
    return out if batched else out[0]


def _matching(v, single, count, name, input_name):
    if v is None:
        return [None] * count
    return _arrays.matching(v, single, count, name, input_name)


def _inits(init, single, count):
    if not (isinstance(init, (tuple, list)) and len(init) == 2):
        raise ArgumentTypeError("argument 'init' must be a pair (f, g)")
    fs = _arrays.matching(init[0], single, count, "init[0]", "a")
    gs = _arrays.matching(init[1], single, count, "init[1]", "b")
    return list(zip(fs, gs))


def _marginal(v, like, B, n, batched, name):
    """A marginal (or potential) as a (B, n) array of like's framework and dtype; None: uniform."""
    if v is None:
        out = _arrays.empty_like(like, (B, n))
        if n:  # no entries: the native call names the empty marginal
            out[...] = 1.0 / n
        return out
    if _arrays.framework_of(v, name) != _arrays.framework_of(like):
        raise ArgumentTypeError(f"argument '{name}' must be of the cost's framework "
                                f"({_arrays.framework_of(like)}), got {_arrays.framework_of(v, name)}")
    v = _arrays.prepare(v, name)
    expected = (B, n) if batched else (n,)
    if tuple(v.shape) != expected:
        raise ArgumentError(f"argument '{name}' must have shape {expected}, got {tuple(v.shape)}")
    if _arrays.dtype_name(v.dtype) != _arrays.dtype_name(like.dtype):
        v = _arrays.convert(v, _arrays.dtype_name(like.dtype), name=name)
    return v.reshape((B, n))
