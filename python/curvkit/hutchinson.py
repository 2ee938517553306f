"""Hutchinson family: reproducible random probe vectors for stochastic trace, diagonal and
spectrum estimators (AdaHessian, Sophia, HAWQ, Hutch++, XTrace)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import _args, _arrays, _core
from ._errors import ArgumentError, ArgumentTypeError, report_failure


def probes(shape: Union[int, Sequence[int]], kind: str = "rademacher", seed: int = 0, offset: int = 0,
           dtype: Any = None, like: Any = None, device: Any = None, out: Any = None) -> Any:
    """Random probe vectors from a counter-based generator, reproducible everywhere.

    Parameters
    ----------
    shape : int or tuple of int
        ``(n,)`` for one probe of length n, or ``(..., n, k)`` for k probes of length n as
        the columns of each matrix (ready for ``A @ Z``), batched over leading dimensions.
    kind : {"rademacher", "gaussian", "sphere"}
        Entries +1/-1 with equal probability; standard normal; or standard normal
        columns scaled to unit 2-norm (uniform on the sphere).
    seed : int in [0, 2**64)
        Key of the generator.
    offset : int >= 0
        Index of the first probe. Column j of batch b is probe number
        ``offset + b*k + j``; its entries depend only on (seed, probe number, entry
        index), so probes drawn in several calls with matching offsets equal those of
        one call, and a shorter probe is a prefix of a longer one.
    dtype : optional
        float16, bfloat16 (PyTorch only), float32 or float64, as a string or a
        framework dtype. Default: the dtype of ``like``, else float64.
    like : array, optional
        A NumPy array, PyTorch tensor or CuPy array: the result has its framework, its
        device and (unless ``dtype`` is given) its dtype.
    device : optional
        "cpu", "cuda", "cuda:N", a torch.device or a cupy.cuda.Device. Without ``like``,
        "cpu" gives NumPy, a torch.device gives PyTorch, and a CUDA string gives PyTorch
        if it has CUDA, else CuPy.
    out : array, optional
        Where to write the probes instead (C-contiguous, float dtype, of shape ``shape``);
        ``dtype``, ``like`` and ``device`` are then taken from it and must not be given.

    Returns
    -------
    array of the chosen framework, shape ``shape``, C-contiguous.

    Notes
    -----
    Philox4x32-10 keyed by ``seed``, counter (block, probe). Rademacher entry i is bit
    i % 128 of block i // 128 (set: +1). Gaussian entries 2m and 2m+1 are the Box-Muller
    pair of the two 64-bit uniforms of block m. Every entry is computed in float64 with
    portable arithmetic and rounded once (to nearest-even) to ``dtype``: float32
    probes are exactly the float64 probes rounded, and CPU and CUDA give the same bits
    for every kind and dtype. Sphere norms are summed in a fixed order, independent of
    the thread count. No host synchronization on CUDA; the work is queued on the
    framework's current stream.

    Examples
    --------
    >>> import curvkit
    >>> z = curvkit.probes((4, 3), seed=7)
    >>> z.shape, z.dtype.name
    ((4, 3), 'float64')
    >>> sorted(set(z.ravel().tolist()))
    [-1.0, 1.0]
    >>> import numpy as np
    >>> left = curvkit.probes((4, 1), seed=7)               # probe 0
    >>> right = curvkit.probes((4, 2), seed=7, offset=1)    # probes 1 and 2
    >>> bool((np.hstack([left, right]) == z).all())
    True
    >>> g = curvkit.probes((1000, 2), kind="sphere", dtype="float32")
    >>> np.allclose(np.linalg.norm(g, axis=0), 1.0, atol=1e-6)
    True
    """
    shape = _normalize_shape(shape)
    seed = _args.index(seed, "seed", 0, 2**64)
    offset = _args.index(offset, "offset", 0, 2**64)
    if out is None:
        framework, dev, dtype = _target(like, device, dtype)
        out = _arrays.empty(shape, dtype, framework, dev)
    elif like is not None or device is not None or dtype is not None:
        raise ArgumentTypeError("argument 'out' gives the framework, device and dtype: pass no 'like', 'device' "
                                "or 'dtype'")
    elif tuple(out.shape) != shape:
        raise ArgumentError(f"argument 'out' must have shape {shape}, got {tuple(out.shape)}")
    framework, dev = _arrays.framework_of(out, "out"), _arrays.device_of(out)
    workspace = None
    ws_size = _core.probes_workspace_size(list(shape), kind, dev[0] == "cuda")
    if ws_size:
        workspace = _arrays.empty((ws_size,), "float64", framework, dev)
    _core.probes(_arrays.detached(out, "out"), kind=kind, seed=seed, offset=offset, workspace=workspace,
                 stream=_arrays.current_stream(framework, dev))
    return out


# Probe numbers of probes_like: step * 2**24 + index, so (seed, step, index) names one probe
# for lists of up to 2**24 tensors and 2**40 steps.
_TENSORS_PER_STEP = 2**24


def probes_like(tensors: Sequence[Any], kind: str = "rademacher", seed: int = 0, step: int = 0) -> list:
    """One probe shaped like each tensor of a list (a model's parameters): the entries of probe
    number ``step * 2**24 + i`` for tensor i (as :func:`probes` numbers them), in its
    framework, device and dtype. Reproducible per (seed, step, tensor index) on any device
    and any split of the list; Hutchinson's estimators for AdaHessian and Sophia draw theirs
    this way, one call per step. The list is filled by one native call per device (about 5 us
    a tensor in Python, where one :func:`probes` call each took about 25).

    >>> import numpy as np, curvkit
    >>> W, b = np.zeros((3, 4)), np.zeros(4, dtype=np.float32)
    >>> zw, zb = curvkit.probes_like([W, b], seed=1, step=5)
    >>> zw.shape, zb.dtype.name
    ((3, 4), 'float32')
    >>> bool((curvkit.probes_like([b], seed=1, step=5)[0] == curvkit.probes((4,), seed=1, offset=5 * 2**24)).all())
    True
    """
    if isinstance(tensors, (str, bytes)) or hasattr(tensors, "shape") or not hasattr(tensors, "__len__"):
        raise ArgumentTypeError(f"argument 'tensors' must be a list of arrays, got {type(tensors).__name__}")
    if len(tensors) > _TENSORS_PER_STEP:
        raise ArgumentError(f"argument 'tensors' may hold at most {_TENSORS_PER_STEP} arrays, got {len(tensors)}")
    step = _args.index(step, "step", 0, 2**40)
    seed = _args.index(seed, "seed", 0, 2**64)
    out: list = []
    groups: dict[tuple, list[int]] = {}  # one native call per (framework, device) of the list
    for i, t in enumerate(tensors):
        framework, dev = _arrays.framework_of(t, "tensors"), _arrays.device_of(t, "tensors")
        dtype = _arrays.dtype_name(t.dtype)
        if dtype not in _arrays.FLOAT_DTYPES:
            raise ArgumentTypeError(f"argument 'tensors' holds an array of dtype {dtype} (entry {i}); probes are "
                                    f"float: one of {', '.join(_arrays.FLOAT_DTYPES)}")
        out.append(_arrays.empty(tuple(t.shape), dtype, framework, dev))
        groups.setdefault((framework, dev), []).append(i)
    for (framework, dev), members in groups.items():
        zs = [out[i] for i in members]
        workspace = None
        if dev[0] == "cuda":  # sphere probes normalize through device workspace, reused in turn
            if not _core.built_with_cuda():
                raise ArgumentError("argument 'tensors' holds CUDA arrays, but this curvkit build has no CUDA kernels")
            size = max(_core.probes_workspace_size([math.prod(z.shape)], kind, True) for z in zs)
            workspace = _arrays.empty((size,), "float64", framework, dev) if size else None
        _core.probes_flat(zs, kind=kind, seed=seed, offsets=[step * _TENSORS_PER_STEP + i for i in members],
                          workspace=workspace, stream=_arrays.current_stream(framework, dev))
    return out


def _normalize_shape(shape: Union[int, Sequence[int]]) -> tuple[int, ...]:
    if isinstance(shape, (tuple, list)):
        dims = tuple(_args.index(s, "shape", 0) for s in shape)
    else:
        dims = (_args.index(shape, "shape", 0),)
    if len(dims) == 0:
        raise ArgumentError("argument 'shape' must have at least one dimension: (n,) or (..., n, k)")
    total = 1
    for s in dims:
        total *= s
    if total >= 2**62:
        raise ArgumentError(f"argument 'shape' {dims} has {total} elements, more than curvkit indexes (2**62)")
    return dims


def _target(like: Any, device: Any, dtype: Any) -> tuple[str, tuple[str, int], str]:
    """(framework, (kind, index), canonical dtype) for a new array."""
    if like is not None:
        framework = _arrays.framework_of(like, "like")
        dev = _arrays.device_of(like) if device is None else _arrays.parse_device(device)
        if dtype is None:
            dtype = _arrays.dtype_name(like.dtype, "like")
            if dtype not in _arrays.FLOAT_DTYPES:
                raise ArgumentTypeError(f"argument 'like' has dtype {dtype}, which is not a float dtype; pass dtype=")
    else:
        dev = _arrays.parse_device(device)
        module = type(device).__module__.split(".", 1)[0]
        dtype_module = type(dtype).__module__.split(".", 1)[0]  # a torch.dtype asks for PyTorch
        if module in ("torch", "cupy"):
            framework = module
        elif dtype_module == "torch":
            framework = "torch"
        elif dev[0] == "cuda":
            framework = _arrays.cuda_framework()
        else:
            framework = "numpy"
    dtype = _arrays.dtype_name(dtype if dtype is not None else "float64")
    if dtype not in _arrays.FLOAT_DTYPES:
        raise ArgumentTypeError(f"argument 'dtype' must be one of {', '.join(_arrays.FLOAT_DTYPES)}, got '{dtype}'")
    _arrays.native_dtype(dtype, framework)  # bfloat16 needs PyTorch
    if dev[0] == "cuda" and not _core.built_with_cuda():
        raise ArgumentError("a CUDA device was asked for, but this curvkit build has no CUDA kernels")
    return framework, dev, dtype


# ---------------------------------------------------------------------------------------
# Estimators over a user matvec: trace, diagonal, extreme eigenvalues, spectral density.
# The loop that calls the matvec lives here; the linear algebra between calls is native.

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "xnystrace")
DIAG_METHODS = ("hutchinson", "diag++", "xdiag")
PROBE_KINDS = ("rademacher", "gaussian", "sphere")


class _Operator:
    """The user's operator: a callable on (n, k) blocks, or a dense (n, n) array. Draws probes in
    the operator's framework, device and dtype, applies the matvec, counts matvecs, and hands
    the products back in the compute dtype (float64 for float64, float32 otherwise)."""

    def __init__(self, matvec: Any, n: Any, dtype: Any, like: Any, kind: str, seed: int) -> None:
        if callable(matvec):
            self.apply = matvec
            if n is None:
                raise ArgumentTypeError("argument 'n' is required when 'matvec' is a callable")
        elif hasattr(matvec, "shape") and hasattr(matvec, "dtype"):
            _arrays.framework_of(matvec, "matvec")
            shape = tuple(matvec.shape)
            if len(shape) != 2 or shape[0] != shape[1]:
                raise ArgumentError(f"argument 'matvec' must be a callable or a square (n, n) array, got shape {shape}")
            n = shape[0] if n is None else n
            if n != shape[0]:
                raise ArgumentError(f"argument 'n' ({n}) does not match the array 'matvec' of shape {shape}")
            dense = _arrays.detached(matvec, "matvec")
            like = dense if like is None else like
            self.apply = lambda z: dense @ z
        else:
            raise ArgumentTypeError("argument 'matvec' must be a callable mapping (n, k) blocks to A @ block, or an "
                                    f"(n, n) array, got {type(matvec).__name__}")
        self.n = _args.index(n, "n", 1, 2**31)
        self.framework, self.device, self.dtype = _target(like, None, dtype)
        self.compute = "float64" if self.dtype == "float64" else "float32"
        self.kind = kind if isinstance(kind, str) else ""
        if self.kind not in PROBE_KINDS:
            raise ArgumentError(f"argument 'kind' must be one of {', '.join(map(repr, PROBE_KINDS))}, got {kind!r}")
        self.seed = _args.index(seed, "seed", 0, 2**64)
        self.offset = 0
        self.matvecs = 0
        # Products are scaled by 2**-exponent (chosen from the first block's largest entry) so
        # that the algebra between matvecs works near 1 whatever A's scale, from subnormal to
        # 1e300; results go back through unscale().
        self.exponent: Optional[int] = None
        self.stream = _arrays.current_stream(self.framework, self.device)

    @property
    def context(self) -> dict:
        """The stream and workspace allocator of the native calls on this operator's device."""
        return {"stream": self.stream, "workspace": _arrays.workspace_allocator(self.framework, self.device)}

    @property
    def cuda(self) -> bool:
        return self.device[0] == "cuda"

    def bookkeeping(self, shape: tuple, dtype: str = "float64") -> Any:
        """Zeros for the native calls' float64/int64 bookkeeping: NumPy on the CPU, else on the
        operator's device, so that CUDA steps never wait for the host."""
        if not self.cuda:
            return np.zeros(shape, dtype=dtype)
        if self.framework == "torch":
            import torch

            return torch.zeros(shape, dtype=getattr(torch, dtype), device=f"cuda:{self.device[1]}")
        import cupy

        with cupy.cuda.Device(self.device[1]):
            return cupy.zeros(shape, dtype=dtype)

    def to_device(self, x: np.ndarray) -> Any:
        """A float64 NumPy array as bookkeeping on the operator's device (itself on the CPU)."""
        if not self.cuda:
            return np.ascontiguousarray(x)
        out = self.bookkeeping(x.shape)
        if self.framework == "torch":
            import torch

            out.copy_(torch.from_numpy(np.ascontiguousarray(x)))
        else:
            out.set(np.ascontiguousarray(x))
        return out

    def empty(self, shape: tuple, dtype: Any = None) -> Any:
        return _arrays.empty(shape, dtype or self.compute, self.framework, self.device)

    def draw(self, k: int, unit: bool = False) -> Any:
        """k fresh probes (n, k) in the user's dtype, E[z z^T] = I (sphere probes have norm sqrt(n)),
        or with `unit` sphere probes of norm 1."""
        z = probes((self.n, k), kind=self.kind, seed=self.seed, offset=self.offset, dtype=self.dtype,
                   device=_device_object(self.framework, self.device))
        self.offset += k
        if self.kind == "sphere" and not unit:
            z *= math.sqrt(self.n)
        return z

    def __call__(self, z: Any, copy: bool = False) -> Any:
        """A z in the compute dtype, C-contiguous (a private copy when `copy`)."""
        k = int(z.shape[1])
        if _arrays.dtype_name(z.dtype) != self.dtype:
            z = _arrays.convert(z, self.dtype)
        y = self.apply(z)
        if not hasattr(y, "shape") or tuple(y.shape) != (self.n, k):
            got = tuple(y.shape) if hasattr(y, "shape") else type(y).__name__
            raise ArgumentError(f"argument 'matvec' must return an array of shape ({self.n}, {k}) for a block of "
                                f"{k} probes, got {got}")
        if _arrays.framework_of(y, "matvec output") != self.framework or _arrays.device_of(y) != self.device:
            raise ArgumentError("argument 'matvec' must return an array of the probes' framework and device "
                                f"({self.framework} on {self.device[0]})")
        self.matvecs += k
        y = _arrays.detached(y, "matvec output")
        largest = _largest(y, self.framework)
        if not math.isfinite(largest):  # before the sketch algebra turns it into a LAPACK failure
            raise ArgumentError("argument 'matvec' produced non-finite values (NaN or Inf) in its output")
        if self.exponent is None:
            exponent = math.frexp(largest)[1] if largest > 0 else 0
            self.exponent = exponent if abs(exponent) > 60 else 0
        if copy or self.exponent or _arrays.dtype_name(y.dtype) != self.compute:
            y = _arrays.convert(y, self.compute, name="matvec output")
            if self.exponent:
                _scale_by_power_of_two(y, -self.exponent)
            return y
        return _arrays.contiguous(y, "matvec output")

    def unscale(self, x: Any) -> Any:
        """A quantity linear in the scaled products, in the operator's own units."""
        if not self.exponent:
            return x
        if isinstance(x, float):
            return math.ldexp(x, self.exponent)
        if isinstance(x, np.ndarray):
            return np.ldexp(x, self.exponent)
        x = _arrays.convert(x, _arrays.dtype_name(x.dtype))
        _scale_by_power_of_two(x, self.exponent)
        return x

    def compute_copy(self, x: Any) -> Any:
        return _arrays.convert(x, self.compute)


def _largest(x: Any, framework: str) -> float:
    """max |x| as a float, NaN if x holds NaN (on CUDA: one host synchronization)."""
    if int(np.prod(tuple(x.shape))) == 0:
        return 0.0
    if framework == "torch":
        low, high = x.aminmax()
        return max(float(high), -float(low)) if not bool(high != high) else math.nan
    return max(float(x.max()), -float(x.min()))  # no temporary; NaN propagates


def _scale_by_power_of_two(x: Any, exponent: int) -> None:
    """x *= 2**exponent in place, in steps that stay within float32's range."""
    while exponent:
        step = max(-60, min(60, exponent))
        x *= math.ldexp(1.0, step)
        exponent -= step


def _device_object(framework: str, device: tuple) -> Any:
    if framework == "numpy":
        return "cpu"
    if framework == "torch":
        import torch

        return torch.device(device[0], device[1]) if device[0] == "cuda" else torch.device("cpu")
    import cupy

    return cupy.cuda.Device(device[1])


def _hstack(parts: list, op: _Operator, dtype: str) -> Any:
    """The columns of `parts` side by side, as one C-contiguous array of op's framework."""
    k = sum(int(p.shape[1]) for p in parts)
    out = op.empty((op.n, k), dtype)
    col = 0
    for p in parts:
        width = int(p.shape[1])
        out[:, col:col + width] = p if _arrays.dtype_name(p.dtype) == dtype else _arrays.convert(p, dtype)
        col += width
    return out


def _require_finite(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise ArgumentError(f"argument 'matvec' produced non-finite values (NaN or Inf) in the {what}")


def _budget(num_matvecs: Any, low: int) -> int:
    return _args.index(num_matvecs, "num_matvecs", low, 2**31)


def _tol(tol: Any) -> Optional[float]:
    if tol is None:
        return None
    t = _args.real(tol, "tol")
    if not t > 0 or not math.isfinite(t):
        raise ArgumentError(f"argument 'tol' must be a positive finite number, got {tol}")
    return t


def _finish(function: str, result: Any, info: dict, return_info: bool) -> Any:
    if return_info:
        return result, info
    if not info["converged"]:
        report_failure(function, f"{function}: the target standard error (tol) was not reached within the budget "
                       f"of {info['matvecs']} matvecs (standard error {np.max(info['std_error']):.3g})", info, result)
    return result


def _mean_and_error(estimates: np.ndarray) -> tuple[float, float]:
    m = estimates.size
    mean = float(np.mean(estimates))
    error = float(np.std(estimates, ddof=1) / math.sqrt(m)) if m > 1 else math.inf
    return mean, error


def trace_estimate(matvec: Any, n: Any, num_matvecs: int, method: str = "xtrace", kind: str = "rademacher",
                   seed: int = 0, dtype: Any = None, like: Any = None, tol: Optional[float] = None,
                   block_size: Optional[int] = None, return_info: bool = False) -> Any:
    """Stochastic estimate of tr(A) from products with A alone.

    Parameters
    ----------
    matvec : callable or array (n, n)
        ``matvec(Z)`` maps a block of probes Z (n, k), of the framework, device and dtype of
        ``like`` (NumPy float64 by default), to ``A @ Z`` of the same kind; it is called on
        blocks, never once per probe. A dense square array is used as ``A @ Z``. A is
        symmetric (positive semidefinite for "xnystrace").
    n : int
        The dimension (None for an array ``matvec``).
    num_matvecs : int
        The budget in products with A (columns of all blocks together), so that methods
        compare at equal cost: "hutchinson" uses m probes; "hutch++" m/3 to sketch, m/3 on the
        sketch and the rest as probes of the residual; "xtrace" m/2 probes (each used twice);
        "xnystrace" m probes.
    method : {"xtrace", "hutchinson", "hutch++", "xnystrace"}
        Hutchinson (Girard-Hutchinson); Hutch++ (Meyer et al. 2021); XTrace and XNysTrace
        (Epperly, Tropp & Webber 2024), exchangeable leave-one-out estimators that are exact
        for operators of rank below the number of probes and reach errors orders of magnitude
        below Hutchinson's on decaying spectra.
    kind : {"rademacher", "gaussian", "sphere"}
        Probe distribution (:func:`probes`; sphere probes are scaled to norm sqrt(n), and
        XTrace then uses Epperly et al.'s rescaled "improved" estimator).
    seed : int
        Probes are :func:`probes` numbers 0, 1, ... under this seed: reproducible everywhere.
    dtype, like : optional
        The probes' dtype and framework/device, as in :func:`probes`. float16/bfloat16
        matvec outputs are accumulated in float32.
    tol : float, optional
        Target standard error: probes are drawn in blocks until the estimate's standard
        error is at most ``tol`` or the budget is spent ("hutchinson", "xtrace", "xnystrace";
        for "hutch++" the residual probes are drawn this way). Missing it is reported by the
        failure policy (a ConvergenceWarning by default, see
        :func:`curvkit.set_failure_policy`) unless ``return_info``.
    block_size : int, optional
        Probes per block when ``tol`` is given (default 16 for Hutchinson, 8 for the first
        block of XTrace/XNysTrace, whose later blocks double the probes).
    return_info : bool
        Also return a dict: "std_error" (the standard error of the estimate; for XTrace and
        XNysTrace the spread of the leave-one-out estimates), "matvecs", "num_probes",
        "estimates" (the per-probe or leave-one-out values), "converged".

    Returns
    -------
    float, or (float, dict) with ``return_info``.

    Notes
    -----
    Every method also runs on CUDA probes and matvecs (the sketch QR on cuSOLVER, the
    products on cuBLAS; each block's estimates are read back to the host; XNysTrace's k x k
    Cholesky runs on the host after one copy).

    Bad input: a matvec output of the wrong shape, framework or device, or holding NaN or Inf
    (any dtype; a float16 product beyond 65504 is Inf), raises ArgumentError naming 'matvec';
    a non-PSD operator for "xnystrace" too. The products are rescaled by a power of two
    before the algebra, so operators from subnormal to 1e300 keep their precision.

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> rng = np.random.default_rng(0)
    >>> U, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    >>> A = (U * 0.7 ** np.arange(300)) @ U.T          # fast-decaying spectrum, trace 3.33
    >>> est = curvkit.trace_estimate(lambda Z: A @ Z, 300, num_matvecs=100)
    >>> bool(abs(est - np.trace(A)) < 1e-6)
    True
    >>> est, info = curvkit.trace_estimate(A, None, 200, method="hutchinson", return_info=True)
    >>> info["matvecs"], bool(abs(est - np.trace(A)) < 4 * info["std_error"])
    (200, True)
    """
    method = _args.method_name(method)
    if method not in TRACE_METHODS:
        raise ArgumentError(f"argument 'method' must be one of {', '.join(map(repr, TRACE_METHODS))}, got {method!r}")
    op = _Operator(matvec, n, dtype, like, kind, seed)
    budget = _budget(num_matvecs, {"hutchinson": 1, "hutch++": 3, "xtrace": 2, "xnystrace": 1}[method])
    tol = _tol(tol)
    if block_size is not None:
        block_size = _args.index(block_size, "block_size", 1, 2**31)
    if method == "hutchinson":
        estimates = _hutchinson_trace(op, budget, tol, block_size or 16)
        value, error = _mean_and_error(estimates)
    elif method == "hutch++":
        value, error, estimates = _hutchpp_trace(op, budget, tol, block_size or 16)
    else:
        estimates = _leave_one_out_trace(op, budget, tol, block_size or 8, method)
        value, error = _mean_and_error(estimates)
    value, error, estimates = op.unscale(value), op.unscale(error), op.unscale(estimates)
    info = {"std_error": error, "matvecs": op.matvecs, "num_probes": op.offset, "estimates": estimates,
            "converged": tol is None or error <= tol}
    return _finish("trace_estimate", value, info, return_info)


def _hutchinson_trace(op: _Operator, budget: int, tol: Optional[float], block: int) -> np.ndarray:
    parts: list[np.ndarray] = []
    while op.matvecs < budget:
        k = budget - op.matvecs if tol is None else min(block, budget - op.matvecs)
        z = op.draw(k)
        y = op(z)
        out = op.empty((k,), "float64")
        _core.column_dots(_arrays.contiguous(z, dtype=op.compute), y, out, **op.context)
        values = _arrays.to_host(out)
        _require_finite(values, "quadratic forms")
        parts.append(values)
        estimates = np.concatenate(parts)
        if tol is not None and estimates.size > 1 and op.unscale(_mean_and_error(estimates)[1]) <= tol:
            break
    return np.concatenate(parts)


def _hutchpp_trace(op: _Operator, budget: int, tol: Optional[float], block: int) -> tuple[float, float, np.ndarray]:
    k = min(budget // 3, op.n)  # a sketch of n columns already holds the whole trace
    s = op.draw(k)
    q = op(s, copy=True)
    r = op.empty((k, k))
    _core.sketch_qr(q, r, 0, **op.context)
    aq = op(q)
    head_out = op.empty((k,), "float64")
    _core.column_dots(q, aq, head_out, **op.context)
    head = _arrays.to_host(head_out)
    _require_finite(head, "sketch")
    parts: list[np.ndarray] = []
    while op.matvecs < budget:
        count = budget - op.matvecs if tol is None else min(block, budget - op.matvecs)
        g = op.compute_copy(op.draw(count))
        _core.project_out(q, g, **op.context)
        out = op.empty((count,), "float64")
        _core.column_dots(g, op(g), out, **op.context)
        values = _arrays.to_host(out)
        _require_finite(values, "residual quadratic forms")
        parts.append(values)
        residual = np.concatenate(parts)
        if tol is not None and residual.size > 1 and op.unscale(_mean_and_error(residual)[1]) <= tol:
            break
    mean, error = _mean_and_error(residual)
    return float(head.sum()) + mean, error, float(head.sum()) + residual


def _leave_one_out_trace(op: _Operator, budget: int, tol: Optional[float], first: int, method: str) -> np.ndarray:
    per_probe = 2 if method == "xtrace" else 1
    limit = min(budget // per_probe, op.n)
    if limit < 1:
        raise ArgumentError(f"argument 'num_matvecs' must allow at least one probe for {method}")
    omega = y = q = z = r = None
    k = 0
    while True:
        new = limit - k if tol is None else min(limit - k, first if k == 0 else k)
        w_new = op.compute_copy(op.draw(new))
        y_new = op(w_new)
        omega = w_new if omega is None else _hstack([omega, w_new], op, op.compute)
        y = y_new if y is None else _hstack([y, y_new], op, op.compute)
        k0, k = k, k + new
        if method == "xtrace":
            q = _hstack([y] if q is None else [q, y_new], op, op.compute)
            r_new = op.empty((k, k))
            if k0:
                r_new[:k0, :k0] = r
            r = r_new
            _core.sketch_qr(q, r, k0, **op.context)
            z_new = op(q[:, k0:k])
            z = z_new if z is None else _hstack([z, z_new], op, op.compute)
            out = op.empty((k,), "float64")
            _core.xtrace_estimates(omega, y, q, r, z, op.kind == "sphere", out, **op.context)
            estimates = _arrays.to_host(out)
        else:
            out = op.empty((k,), "float64")
            shift = 10 * float(np.finfo(op.compute).eps)
            positive = _core.xnystrace_estimates(omega, _arrays.convert(y), shift, out, **op.context)
            estimates = _arrays.to_host(out)
            if not positive:
                raise ArgumentError("argument 'matvec' is not positive semidefinite, or the probes are linearly "
                                    "dependent (Omega^T A Omega is not positive definite; sign probes can be for "
                                    "small n): xnystrace needs a PSD operator; use method='xtrace' or "
                                    "kind='gaussian'")
        _require_finite(estimates, "leave-one-out estimates")
        if k >= limit or (tol is not None and k > 1 and op.unscale(_mean_and_error(estimates)[1]) <= tol):
            return estimates


def diag_estimate(matvec: Any, n: Any, num_matvecs: int, method: str = "hutchinson", kind: str = "rademacher",
                  seed: int = 0, dtype: Any = None, like: Any = None, tol: Optional[float] = None,
                  block_size: Optional[int] = None, return_info: bool = False) -> Any:
    """Stochastic estimate of the diagonal of A from products with A alone.

    Parameters as in :func:`trace_estimate`; ``method``:
    "hutchinson" (the mean of z * Az over m probes; Bekas et al. 2007), "diag++" (an m/3-column
    sketch Q, diag(Q (AQ)^T) plus Hutchinson on the residual (I - QQ^T) A; Baston &
    Nakatsukasa 2022) or "xdiag" (m/2 probes, the exchangeable leave-one-out estimator of
    Epperly, Tropp & Webber 2024). ``tol`` (Hutchinson only) is a target for the largest
    per-entry standard error.

    Returns
    -------
    array (n,) of the probes' framework and device, in the compute dtype (float64 for float64
    probes, float32 otherwise); with ``return_info`` also a dict with "std_error" (n,),
    "matvecs", "num_probes", "converged". Bad input as in :func:`trace_estimate`; every
    method runs on CUDA too.

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> A = np.diag(np.arange(1.0, 6.0)) + 0.01
    >>> d = curvkit.diag_estimate(A, None, num_matvecs=400)
    >>> bool(np.abs(d - np.diag(A)).max() < 0.01)
    True
    >>> B = np.random.default_rng(0).standard_normal((50, 6))
    >>> A = B @ B.T                                             # rank 6
    >>> d = curvkit.diag_estimate(A, None, num_matvecs=16, method="xdiag")  # 8 probes: exact
    >>> bool(np.abs(d - np.diag(A)).max() < 1e-9)
    True
    """
    method = _args.method_name(method)
    if method not in DIAG_METHODS:
        raise ArgumentError(f"argument 'method' must be one of {', '.join(map(repr, DIAG_METHODS))}, got {method!r}")
    op = _Operator(matvec, n, dtype, like, kind, seed)
    budget = _budget(num_matvecs, {"hutchinson": 1, "diag++": 3, "xdiag": 2}[method])
    tol = _tol(tol)
    if tol is not None and method != "hutchinson":
        raise ArgumentError(f"argument 'tol' is supported by method 'hutchinson' only, not {method!r}")
    block = 16 if block_size is None else _args.index(block_size, "block_size", 1, 2**31)
    mean, m2 = op.empty((op.n,)), op.empty((op.n,))
    if method == "xdiag":
        k = min(budget // 2, op.n)
        omega = op.compute_copy(op.draw(k))
        q = op(omega, copy=True)
        r = op.empty((k, k))
        _core.sketch_qr(q, r, 0, **op.context)
        z = op(q)
        _core.xdiag_estimates(omega, q, r, z, mean, m2, **op.context)
        error = op.unscale(np.sqrt(np.maximum(_arrays.to_host(m2).astype(np.float64), 0.0)))
    else:
        count, q = 0, None
        base = None
        if method == "diag++":
            k = min(budget // 3, op.n)
            q = op(op.draw(k), copy=True)
            r = op.empty((k, k))
            _core.sketch_qr(q, r, 0, **op.context)
            base = op.empty((op.n,))
            _core.row_dots(q, op(q), base, stream=op.stream)
        while op.matvecs < budget:
            k = budget - op.matvecs if tol is None else min(block, budget - op.matvecs)
            g = op.draw(k)
            y = op(g, copy=q is not None)
            if q is not None:
                _core.project_out(q, y, **op.context)
            _core.accumulate_products(_arrays.contiguous(g, dtype=op.compute), y, count, mean, m2, stream=op.stream)
            count += k
            error = op.unscale(_diag_error(m2, count))
            if tol is not None and count > 1 and error.max() <= tol:
                break
        if base is not None:
            mean += base
    mean = op.unscale(mean)
    _require_finite(_arrays.to_host(mean), "diagonal estimate")
    info = {"std_error": error, "matvecs": op.matvecs, "num_probes": op.offset,
            "converged": tol is None or bool(error.max() <= tol)}
    return _finish("diag_estimate", mean, info, return_info)


def _diag_error(m2: Any, count: int) -> np.ndarray:
    if count < 2:
        return np.full(int(m2.shape[0]), math.inf)
    return np.sqrt(np.maximum(_arrays.to_host(m2).astype(np.float64), 0.0) / (count - 1) / count)


WHICH = ("largest", "smallest", "magnitude")


def top_eigenvalues(matvec: Any, n: Any, k: int = 1, which: str = "largest", method: str = "lanczos",
                    max_matvecs: Optional[int] = None, tol: Optional[float] = None, seed: int = 0,
                    dtype: Any = None, like: Any = None, reorthogonalize: Union[bool, str] = True,
                    return_vectors: bool = False, return_info: bool = False) -> Any:
    """The k extreme eigenvalues of a symmetric operator known through products with it.

    Parameters
    ----------
    matvec, n, dtype, like
        As in :func:`trace_estimate` (called here on one vector (n, 1) at a time).
    k : int
        How many eigenvalues.
    which : {"largest", "smallest", "magnitude"}
        The algebraically largest (descending), the smallest (ascending), or those of largest
        absolute value (by decreasing magnitude, signs kept).
    method : {"lanczos", "power"}
        Lanczos, or power
        iteration with deflation against the eigenvectors already found, as PyHessian does
        (``which="magnitude"`` only).
    max_matvecs : int, optional
        Budget (default min(n, 300) for Lanczos, 300 k for power iteration).
    tol : float, optional
        Lanczos stops when every wanted Ritz pair has residual |beta_j s_ji| <= tol * |theta|_max;
        power iteration when the Rayleigh quotient changes by at most tol relatively. Default
        1e-8 for float64, 1e-4 otherwise.
    seed : int
        The starting vector is sphere probe 0 (power: probe i for eigenvalue i) under this seed.
    reorthogonalize : {True, "full", "selective", False, "none"}
        Lanczos: full reorthogonalization against the whole basis (classical Gram–Schmidt
        twice, every step); selective (Parlett & Scott 1979: only against the Ritz vectors
        that have converged to sqrt(eps), cheaper for long runs); or none (the plain
        three-term recurrence: once the basis loses orthogonality, converged values come back
        as copies, "ghosts", which are counted once (Cullum & Willoughby); it takes more
        products than "full" for k > 1, and cannot tell a repeated eigenvalue from a ghost).
    return_vectors : bool
        Also return the eigenvectors (n, k) in the probes' framework (compute dtype).
    return_info : bool
        Also return {"converged", "matvecs", "residual" (k,), "steps"}. Without it a miss
        is reported by the failure policy (:func:`curvkit.set_failure_policy`).

    Returns
    -------
    NumPy float64 array (k,), then the vectors and/or info as asked; fewer values when the
    budget ends before k distinct ones are found (info["converged"] is then False).

    Notes
    -----
    A Krylov space holds each distinct eigenvalue once: after a breakdown with fewer than k
    Ritz values, Lanczos restarts from a fresh probe orthogonal to the space found (a zero
    operator gives k zeros); an eigenvalue repeated more often than the breakdowns reveal can
    still be reported fewer times. On CUDA the Lanczos steps queue without host
    synchronization; the coefficients are read back every 8 steps (every step with
    "selective", and in the last 8 + k of the budget) and each step since the last read-back
    is tested in turn, so the run ends at the step a check after every step would (the
    tridiagonal eigenproblems run on the host, LAPACK stev); power iteration reads two numbers
    back per step. Bad input as in :func:`trace_estimate` (NaN or Inf in a product raises
    ArgumentError naming 'matvec').

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> A = np.diag([-5.0, 1.0, 2.0, 3.0] + [0.1] * 96)
    >>> curvkit.top_eigenvalues(A, None, k=2, which="magnitude")
    array([-5.,  3.])
    >>> vals, vecs = curvkit.top_eigenvalues(A, None, k=1, return_vectors=True)
    >>> vals, bool(abs(abs(vecs[3, 0]) - 1) < 1e-8)
    (array([3.]), True)
    """
    method = _args.method_name(method)
    if method not in ("lanczos", "power"):
        raise ArgumentError(f"argument 'method' must be 'lanczos' or 'power', got {method!r}")
    which = _args.method_name(which, "which")
    if which not in WHICH:
        raise ArgumentError(f"argument 'which' must be one of {', '.join(map(repr, WHICH))}, got {which!r}")
    if method == "power" and which != "magnitude":
        raise ArgumentError("power iteration finds the eigenvalues of largest magnitude: pass which='magnitude' "
                            "or method='lanczos'")
    op = _Operator(matvec, n, dtype, like, "sphere", seed)
    k = _args.index(k, "k", 1, op.n + 1)
    default_budget = min(op.n, 300) if method == "lanczos" else 300 * k
    budget = default_budget if max_matvecs is None else _args.index(max_matvecs, "max_matvecs", 1, 2**31)
    tolerance = _tol(tol)
    if tolerance is None:
        tolerance = 1e-8 if op.compute == "float64" else 1e-4
    if method == "lanczos":
        mode = _reorthogonalization(reorthogonalize, allow_selective=True)
        values, vectors, info = _lanczos_top(op, k, which, min(budget, op.n), tolerance, mode)
    else:
        values, vectors, info = _power_top(op, k, budget, tolerance)
    result: Any = (values, vectors) if return_vectors else values
    if return_info:
        return (*result, info) if return_vectors else (values, info)
    if not info["converged"]:
        report_failure("top_eigenvalues", f"top_eigenvalues: not converged within {info['matvecs']} matvecs "
                       f"(largest residual {np.max(info['residual']):.3g})", info, result)
    return result


def _select(nodes: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "largest":
        return np.argsort(-nodes, kind="stable")[:k]
    if which == "smallest":
        return np.argsort(nodes, kind="stable")[:k]
    return np.argsort(-np.abs(nodes), kind="stable")[:k]


def _reorthogonalization(value: Any, allow_selective: bool) -> str:
    modes = {True: "full", False: "none", "full": "full", "none": "none"}
    if allow_selective:
        modes["selective"] = "selective"
    if not isinstance(value, (bool, str)) or value not in modes:
        raise ArgumentError(f"argument 'reorthogonalize' must be one of {', '.join(map(repr, modes))}, got {value!r}")
    return modes[value]


# On CUDA, Lanczos reads its coefficients back every few steps only (selective
# reorthogonalization: every step), so that the steps queue without waiting for the host.
_CUDA_CHECK_EVERY = 8


def _lanczos_top(op: _Operator, k: int, which: str, m: int, tol: float, mode: str) -> tuple:
    basis = op.empty((1, m + 1, op.n))
    alpha, beta = op.bookkeeping((1, m)), op.bookkeeping((1, m))
    lengths = op.bookkeeping((1,), "int64")
    start = op.compute_copy(op.draw(1, unit=True))
    basis[0, 0, :] = start[:, 0]
    w = start
    converged, steps, chosen, residual = False, 0, np.zeros(0, dtype=np.int64), np.full(k, np.inf)
    nodes, vecs = np.zeros((1, 0)), np.zeros((1, 0, 0))
    unit = float(np.finfo(op.compute).eps) / 2
    purge_level = math.sqrt(2 * unit)
    every = _check_every(op, mode)
    restart, j, checked = False, 0, 0
    while j < m and op.matvecs < m:
        w = op(w, copy=True)
        _core.lanczos_step(basis, w, alpha, beta, lengths, j, mode == "full", restart, **op.context)
        restart, j = False, j + 1
        # Near the end of the budget, a check after every step: products queued after a
        # breakdown do nothing, and would leave no room for the restart.
        if j % every and j < m and op.matvecs < m - every - k:
            continue
        alpha_h, beta_h = _arrays.to_host(alpha), _arrays.to_host(beta)
        reached = int(_arrays.to_host(lengths)[0])
        broke = beta_h[0, reached - 1] == 0.0  # the last step that ran broke down
        _require_finite(alpha_h[0, :reached], "Lanczos coefficients")
        if broke and reached < k and reached < m and op.matvecs < m:
            # An invariant subspace holding fewer than k eigenvalues (a repeated eigenvalue shows
            # once per Krylov space): go on from a new vector orthogonal to it.
            w = _restart_vector(op, basis, reached)
            restart, j, checked = True, reached, reached
            continue
        if not (mode == "selective" or reached >= k or broke or j >= m or op.matvecs >= m):
            continue
        # Each step since the last read-back in turn, as a check after every step would see
        # them: the first that meets the tolerance ends the run (later ones, without
        # reorthogonalization, may already hold ghost copies of the converged values).
        for steps in range(max(checked + 1, min(k, reached)), reached + 1):
            nodes, vecs = _ritz_pairs(alpha_h, beta_h, steps)
            _require_finite(nodes[0], "Lanczos coefficients")
            last = beta_h[0, steps - 1]
            scale = max(float(np.max(np.abs(nodes[0]))), np.finfo(np.float64).tiny)
            bounds = np.abs(last * vecs[0, steps - 1, :])
            candidates = (_distinct_ritz(nodes[0], vecs[0], bounds, beta_h[0, :steps - 1], unit)
                          if mode == "none" else np.arange(steps))
            chosen = candidates[_select(nodes[0, candidates], k, which)]
            residual = bounds[chosen]
            converged = bool(len(chosen) == k and np.all(residual <= tol * scale))
            if converged:
                break
        checked = reached
        if converged or broke:
            break
        j = steps  # on CUDA, steps queued after a breakdown did nothing
        if mode == "selective":
            # Parlett & Scott: the next vector loses orthogonality only towards Ritz vectors that
            # have converged (|beta_j s_ji| small); purge exactly those directions.
            good = np.nonzero(bounds <= purge_level * scale)[0]
            if good.size:
                ritz = op.empty((1, op.n, good.size))
                _core.basis_combination(basis, op.to_device(vecs[:, :, good]), steps, ritz, **op.context)
                _core.project_out(ritz[0], w, **op.context)
                following = basis[0, steps].reshape(op.n, 1)
                _, norm = _core.power_step(following, w, None, **op.context)
                beta[0, steps - 1] *= norm
                w = op.compute_copy(following)
    values = nodes[0, chosen]
    coefficients = op.to_device(vecs[:, :, chosen])
    vectors = op.empty((1, op.n, len(chosen)))
    _core.basis_combination(basis, coefficients, steps, vectors, **op.context)
    info = {"converged": converged, "matvecs": op.matvecs, "residual": op.unscale(residual), "steps": steps}
    return op.unscale(values), vectors[0], info


def _distinct_ritz(theta: np.ndarray, vectors: np.ndarray, bounds: np.ndarray, offdiagonal: np.ndarray,
                   unit: float) -> np.ndarray:
    """Indices of the Ritz pairs left once ghosts are merged. Without reorthogonalization a
    converged Ritz value comes back as copies once the basis has lost orthogonality (Paige
    1971; Cullum & Willoughby 1985), agreeing to a few u: [-9, -9, -9] for the three smallest
    of a spectrum [-9, -1, -0.995, ...]. Within each block of T (split where a restart set
    beta = 0: a value repeated across blocks is a repeated eigenvalue), values within
    100 u |theta|_max of their neighbour count once, kept as the pair of smallest bound. A
    copy still converging (float32, tol 1e-4) can stand apart by more, and a spurious value
    of the lost orthogonality can look converged: "full" or "selective" have neither."""
    starts = np.r_[0, np.flatnonzero(offdiagonal == 0.0) + 1]
    ends = np.r_[starts[1:], len(theta)]
    weight = np.stack([(vectors[a:b] ** 2).sum(axis=0) for a, b in zip(starts, ends)])
    block = np.argmax(weight, axis=0)  # stev solves the blocks apart: each vector lives in one
    gap = 100 * unit * max(float(np.max(np.abs(theta))), np.finfo(np.float64).tiny)
    kept = []
    for b in range(len(starts)):
        members = np.flatnonzero(block == b)
        members = members[np.argsort(theta[members], kind="stable")]
        cluster: list = []
        for i in members:
            if cluster and theta[i] - theta[cluster[-1]] > gap:
                kept.append(min(cluster, key=lambda c: bounds[c]))
                cluster = []
            cluster.append(i)
        if cluster:
            kept.append(min(cluster, key=lambda c: bounds[c]))
    return np.sort(np.array(kept, dtype=np.int64))


def _check_every(op: _Operator, mode: str) -> int:
    """Lanczos steps between read-backs of the coefficients (see _CUDA_CHECK_EVERY)."""
    return _CUDA_CHECK_EVERY if op.cuda and mode != "selective" else 1


def _ritz_pairs(alpha: np.ndarray, beta: np.ndarray, steps: int) -> tuple:
    """Eigenpairs of the leading steps x steps tridiagonal matrix of host coefficients (1, m)."""
    nodes, vecs = np.empty((1, steps)), np.empty((1, steps, steps))
    _core.tridiagonal_eigh(alpha, beta, np.array([steps], dtype=np.int64), steps, nodes, vecs)
    return nodes, vecs


def _restart_vector(op: _Operator, basis: Any, steps: int) -> Any:
    """A fresh sphere probe made orthogonal to basis[0, :steps] and normalized, stored as
    basis[0, steps] and returned as (n, 1)."""
    found = _arrays.contiguous(basis[0, :steps].T, "basis")
    w = op.compute_copy(op.draw(1, unit=True))
    following = basis[0, steps].reshape(op.n, 1)
    _core.power_step(following, w, found, **op.context)  # following <- (I - F F^T) w / norm, twice
    w = op.compute_copy(following)
    _core.power_step(following, w, found, **op.context)
    return op.compute_copy(following)


def _power_top(op: _Operator, k: int, budget: int, tol: float) -> tuple:
    found = None
    values, residual = [], []
    converged = True
    per_eigenvalue = max(1, budget // k)
    for _ in range(k):
        v = op.compute_copy(op.draw(1))
        _core.power_step(v, op.compute_copy(v), found, **op.context)  # deflate the start
        theta, ok, used = 0.0, False, 0
        while used < per_eigenvalue:
            w = op(v, copy=True)
            used += 1
            new, norm = _core.power_step(v, w, found, **op.context)
            if not math.isfinite(new):
                _require_finite(np.array([new]), "power iteration")
            change = abs(new - theta)
            theta = new
            if used > 1 and change <= tol * abs(theta) or norm == 0.0:
                ok = True
                break
        converged = converged and ok
        values.append(theta)
        residual.append(change)
        found = v if found is None else _hstack([found, v], op, op.compute)
    info = {"converged": converged, "matvecs": op.matvecs, "residual": op.unscale(np.array(residual)),
            "steps": op.matvecs}
    return op.unscale(np.array(values)), found, info


def spectral_density(matvec: Any, n: Any, num_probes: int = 1, steps: int = 100, seed: int = 0,
                     kind: str = "rademacher", dtype: Any = None, like: Any = None,
                     reorthogonalize: Union[bool, str] = True,
                     return_info: bool = False) -> Any:
    """Stochastic Lanczos quadrature: the spectral density of a symmetric operator as nodes
    and weights (Golub & Meurant; Ubaru, Chen & Saad 2017; PyHessian's `density`).

    All probes run Lanczos together, so each matvec call takes a block (n, num_probes).
    Probe b's ``steps``-point Gauss rule (nodes[b], weights[b]) integrates polynomials up to
    degree 2 steps - 1 against v_b^T f(A) v_b exactly (v_b the normalized probe); averaged
    over probes, sum_i weights[b, i] f(nodes[b, i]) estimates tr f(A) / n.

    Parameters
    ----------
    matvec, n, seed, dtype, like
        As in :func:`trace_estimate`.
    num_probes, steps : int
        Probes and Lanczos steps (at most n) per probe.
    kind : {"rademacher", "gaussian", "sphere"}
        Starting vectors (normalized; gaussian and sphere give the same directions).
    reorthogonalize : bool
        Full reorthogonalization (default), or the plain three-term recurrence.
    return_info : bool
        Also return {"lengths": the Krylov dimension each probe reached, "matvecs"}.

    Returns
    -------
    (nodes, weights): NumPy float64 arrays (num_probes, steps), nodes ascending, the weights
    of each probe summing to 1. A probe whose Krylov space closed after L < steps steps
    (an invariant subspace: its quadrature is then exact) has zero weights past L.

    On CUDA all probes' Lanczos steps run on the device (reorthogonalization by cuBLAS
    batched products); the coefficients are read back every 8 steps and the tridiagonal
    eigenproblems solved on the host once. Bad input as in :func:`trace_estimate`.

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> A = np.diag(np.r_[np.ones(50), 3 * np.ones(50)])
    >>> nodes, weights = curvkit.spectral_density(A, None, num_probes=4, steps=10)
    >>> np.allclose(weights.sum(axis=1), 1.0)
    True
    >>> bool(abs((weights * nodes).sum(axis=1).mean() - 2.0) < 0.2)   # tr(A)/n = 2
    True
    """
    op = _Operator(matvec, n, dtype, like, kind, seed)
    full = _reorthogonalization(reorthogonalize, allow_selective=False) == "full"
    p = _args.index(num_probes, "num_probes", 1, 2**20)
    steps = _args.index(steps, "steps", 1, op.n + 1)
    if op.kind == "gaussian":  # the directions of gaussian probes are those of sphere probes
        op.kind = "sphere"
    z = op.compute_copy(op.draw(p, unit=True))
    if op.kind == "rademacher":
        z *= 1.0 / math.sqrt(op.n)
    basis = op.empty((p, steps + 1, op.n))
    basis[:, 0, :] = z.T
    alpha, beta = op.bookkeeping((p, steps)), op.bookkeeping((p, steps))
    lengths = op.bookkeeping((p,), "int64")
    every = _CUDA_CHECK_EVERY if op.cuda else 1
    w = z
    for j in range(steps):
        w = op(w, copy=True)
        _core.lanczos_step(basis, w, alpha, beta, lengths, j, full, **op.context)
        if (j + 1) % every and j + 1 < steps:
            continue
        _require_finite(_arrays.to_host(alpha)[:, :j + 1], "Lanczos coefficients")
        if not np.any(_arrays.to_host(beta)[:, j] > 0):  # every probe reached an invariant subspace
            break
    nodes, vectors = np.empty((p, steps)), np.empty((p, steps, steps))
    _core.tridiagonal_eigh(alpha, beta, lengths, steps, nodes, vectors, stream=op.stream)
    weights = vectors[:, 0, :] ** 2
    nodes = op.unscale(nodes)
    if return_info:
        return nodes, weights, {"lengths": _arrays.to_host(lengths).copy(), "matvecs": op.matvecs}
    return nodes, weights


# ---------------------------------------------------------------------------------------
# Fused optimizer steps


def _step_lists(function: str, **lists: Any) -> tuple[dict[str, list], bool]:
    """Each named argument as a list (a single array is a list of one), torch tensors detached."""
    out: dict[str, list] = {}
    single = None
    for name, value in lists.items():
        items, is_single = _arrays.as_list(value)
        if single is None:
            single = is_single
        elif is_single != single:
            raise ArgumentError(f"{function}: argument '{name}' must match 'params': one array for an array, "
                                "a list for a list")
        out[name] = [_arrays.detached(x, name) for x in items]
    return out, bool(single)


def _betas(betas: Any) -> tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ArgumentTypeError("argument 'betas' must be a pair (beta1, beta2)") from None
    return _args.real(b1, "betas"), _args.real(b2, "betas")


def _group_size(shape: tuple, block_size: Optional[int]) -> int:
    if block_size is not None:
        return max(1, min(block_size, math.prod(shape) or 1))
    if len(shape) == 2:
        return max(1, shape[1])
    if len(shape) == 3:
        return max(1, shape[2])
    if len(shape) == 4:
        return max(1, shape[2] * shape[3])
    return 1


def adahessian_step_(params: Any, grads: Any, hessian_diag_samples: Any, exp_avg: Any, exp_avg_sq: Any,
                     step: int, lr: float = 0.15, betas: tuple = (0.9, 0.999), eps: float = 1e-4,
                     weight_decay: float = 0.0, hessian_power: float = 1.0,
                     block_size: Optional[int] = None, check_finite: bool = True) -> None:
    """AdaHessian's update (Yao et al. 2021) of every tensor of a list, in one native call.

    For each tensor, with h its Hessian-diagonal samples (z * Hz; for Rademacher z, |Hz| is
    the same, so Hz may be passed):

    - D = |h| averaged over each group: by tensor rank as AdaHessian does (none for 0-D and
      1-D, over the last dimension for 2-D and 3-D, over the two spatial dimensions for 4-D
      convolution kernels), or over contiguous blocks of ``block_size`` elements (the last
      block may be shorter);
    - exp_avg <- b1 exp_avg + (1 - b1) grad;  exp_avg_sq <- b2 exp_avg_sq + (1 - b2) D^2;
    - denom = sqrt(exp_avg_sq)^k / sqrt(1 - b2^step)^k + eps  (k = hessian_power);
    - param <- param - lr (exp_avg / (1 - b1^step) / denom + weight_decay param).

    float64 tensors follow exactly this order of operations (bit-for-bit equal to the
    per-tensor loop of tests/reference.py); other dtypes compute in float32. All tensors of
    one index share shape and dtype, are C-contiguous and on one device. ``step`` counts
    from 1. Nothing is returned: params, exp_avg and exp_avg_sq are updated in place.
    CPU: one OpenMP loop over all tensors; CUDA: a launch per 24 tensors of one dtype.

    Bad input: NaN or Inf in ``params``, ``grads`` or ``hessian_diag_samples`` (any dtype;
    float16 and bfloat16 as stored) raises :class:`curvkit.ArgumentError` naming the argument
    and the tensor's index in the list, and nothing is modified: a read-only pass over those
    three lists precedes the update (on CUDA it sets per-tensor flags, read back with one host
    synchronization per call). ``check_finite=False`` skips that pass (no host
    synchronization on CUDA, so the call can be captured in a CUDA graph); non-finite values
    then flow into the update. The optimizer states are not checked: they hold what earlier
    steps wrote. The pass costs a read of those three lists, about a quarter of the step's time
    on a memory-bound CPU (bench/results/hutchinson_cpu.md). Wrong dtypes, shapes, layouts,
    list lengths, overlapping outputs or mixed devices raise before anything is read.

    >>> import numpy as np, curvkit
    >>> p, g = np.ones((2, 3)), np.full((2, 3), 0.5)
    >>> h = np.array([[1.0, -2.0, 3.0], [0.0, 0.0, 3.0]])
    >>> m, v = np.zeros_like(p), np.zeros_like(p)
    >>> curvkit.adahessian_step_([p], [g], [h], [m], [v], step=1, lr=0.1)
    >>> v[:, 0]                                    # (1 - 0.999) * (row mean of |h|)^2
    array([0.004, 0.001])
    >>> g[1, 2] = np.nan
    >>> try:
    ...     curvkit.adahessian_step_([p], [g], [h], [m], [v], step=2)
    ... except curvkit.ArgumentError as error:
    ...     print(error)
    argument 'grads' contains NaN or Inf (tensor 0 of the list); nothing was updated
    >>> v[:, 0]                                    # unchanged
    array([0.004, 0.001])
    """
    lists, _ = _step_lists("adahessian_step_", params=params, grads=grads,
                           hessian_diag_samples=hessian_diag_samples, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    beta1, beta2 = _betas(betas)
    if block_size is not None:
        block_size = _args.index(block_size, "block_size", 1, 2**62)
    groups = [_group_size(tuple(p.shape), block_size) for p in lists["params"]]
    for name in ("params", "exp_avg", "exp_avg_sq"):
        _arrays.all_written_in_place(lists[name])
    stream, workspace = _arrays.call_context(lists["params"])
    native = dict(zip(lists, _arrays.exported(*lists.values())))  # params lead the call
    _core.adahessian_step(native["params"], native["grads"], native["hessian_diag_samples"], native["exp_avg"],
                          native["exp_avg_sq"], lr=_args.real(lr, "lr"), beta1=beta1, beta2=beta2,
                          eps=_args.real(eps, "eps"), weight_decay=_args.real(weight_decay, "weight_decay"),
                          hessian_power=_args.real(hessian_power, "hessian_power"),
                          step=_args.index(step, "step", 1, 2**62), group_sizes=groups,
                          check_finite=bool(check_finite), stream=stream, workspace=workspace)


def sophia_step_(params: Any, grads: Any, exp_avg: Any, hessian: Any, lr: float = 1e-4,
                 betas: tuple = (0.965, 0.99), rho: float = 0.04, weight_decay: float = 0.1,
                 batch_size: float = 5120, eps: float = 1e-15, hessian_estimate: Any = None,
                 return_win_rate: bool = False, check_finite: bool = True) -> Optional[float]:
    """Sophia's clipped update (Liu et al. 2023) of every tensor of a list, in one native call.

    For each tensor: when ``hessian_estimate`` is given (an update step: Sophia-G's g * g of
    sampled-label gradients, or Sophia-H's z * Hz), first
    hessian <- b2 hessian + (1 - b2) estimate; then

    - param <- param (1 - lr weight_decay);  exp_avg <- b1 exp_avg + (1 - b1) grad;
    - ratio = |exp_avg| / (rho batch_size hessian + eps);
    - param <- param - lr sign(exp_avg) min(ratio, 1).

    While hessian is 0 this is a sign-momentum step. float64 follows exactly this order
    (bit-for-bit equal to tests/reference.py); other dtypes compute in float32.

    Bad input: NaN or Inf in ``params``, ``grads`` or ``hessian_estimate`` (any dtype;
    float16 and bfloat16 as stored) raises :class:`curvkit.ArgumentError` naming the argument
    and the tensor's index in the list, and nothing is modified (a read-only pass precedes the
    update; on CUDA one host synchronization reads its per-tensor flags back).
    ``check_finite=False`` skips it (no synchronization on CUDA unless ``return_win_rate``).
    The states ``exp_avg`` and ``hessian`` are not checked: they hold what earlier steps wrote.

    Returns
    -------
    None, or with ``return_win_rate`` the fraction of entries whose step was not clipped
    (ratio < 1; Sophia's README advises 0.1-0.5). On CUDA that fraction needs a host
    synchronization.

    >>> import numpy as np, curvkit
    >>> p, g = np.zeros(4), np.array([1.0, -1.0, 0.0, 2.0])
    >>> m, h = np.zeros(4), np.zeros(4)
    >>> curvkit.sophia_step_(p, g, m, h, lr=0.5, weight_decay=0.0, return_win_rate=True)
    0.25
    >>> p                                      # h = 0: a sign step
    array([-0.5,  0.5,  0. , -0.5])
    >>> try:
    ...     curvkit.sophia_step_([p, p.copy()], [g, np.array([0, np.inf, 0, 0])], [m, m.copy()], [h, h.copy()])
    ... except curvkit.ArgumentError as error:
    ...     print(error)
    argument 'grads' contains NaN or Inf (tensor 1 of the list); nothing was updated
    >>> p                                      # unchanged
    array([-0.5,  0.5,  0. , -0.5])
    """
    if hessian_estimate is None:
        lists, _ = _step_lists("sophia_step_", params=params, grads=grads, exp_avg=exp_avg, hessian=hessian)
        lists["hessian_estimate"] = []
    else:
        lists, _ = _step_lists("sophia_step_", params=params, grads=grads, exp_avg=exp_avg, hessian=hessian,
                               hessian_estimate=hessian_estimate)
    beta1, beta2 = _betas(betas)
    for name in ("params", "exp_avg", "hessian"):
        _arrays.all_written_in_place(lists[name])
    stream, workspace = _arrays.call_context(lists["params"])
    native = dict(zip(lists, _arrays.exported(*lists.values())))  # params lead the call
    wins = _core.sophia_step(native["params"], native["grads"], native["exp_avg"], native["hessian"],
                             native["hessian_estimate"], lr=_args.real(lr, "lr"), beta1=beta1, beta2=beta2,
                             rho=_args.real(rho, "rho"), weight_decay=_args.real(weight_decay, "weight_decay"),
                             batch_size=_args.real(batch_size, "batch_size"), eps=_args.real(eps, "eps"),
                             count_wins=bool(return_win_rate), check_finite=bool(check_finite), stream=stream,
                             workspace=workspace)
    if not return_win_rate:
        return None
    total = sum(math.prod(tuple(p.shape)) for p in lists["params"])
    return wins / total if total else 0.0
