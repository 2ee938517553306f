"""M-FAC family: inverse-(damped empirical Fisher)-vector products from m gradients.

``F = damp * I + (1/c) * sum_i g_i g_i^T`` over gradients g_i of dimension d (M-FAC's
empirical Fisher; c = m for the static functions). Everything goes through the Woodbury
identity with the m x m capacitance matrix ``C = c * damp * I + G G^T``, held in float64:

    F^-1 x = (x - G^T C^-1 G x) / damp.

Products with G accumulate in float64 whatever G's storage dtype, so x - G^T w does not cancel
to garbage at large ``kappa = ||g||^2 / (c * damp)`` (docs/mfac.md gives the error bound).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from . import _args, _arrays, _core
from ._errors import ArgumentError, ArgumentTypeError
from .hutchinson import _target

NORMALIZATIONS = ("capacity", "count")

# The device's reasons for refusing a push (csrc/mfac/mfac.h, WindowFault).
_FAULTS = {
    1: "argument 'g' contained NaN or Inf",
    2: "argument 'g' had ||g||^2 / (c * damp) above 1e12: 'damp' is too small for float64 to hold the "
       "capacitance matrix positive definite",
}


def _zero(a: Any) -> Any:
    a[...] = 0
    return a


def _readonly(a: Any) -> Any:
    """A view of a state array: NumPy's is marked read-only; PyTorch and CuPy have no such flag,
    so their views must not be written (the window would no longer match its factor)."""
    if isinstance(a, np.ndarray):
        v = a.view()
        v.flags.writeable = False
        return v
    if _arrays.framework_of(a) == "torch":
        return a.detach().view(a.shape)
    return a.view()


class _Window:
    """What the dense and the sparse windows share: the slots in age order, the Gram matrix and
    its factor (their arrays and the (size, oldest, count, ...) state set by the subclass), and
    the status word through which a CUDA window reports the pushes its device refused."""

    _m: int
    _damp: float
    _dtype: str
    _gram: Any
    _factor: Any
    _state: tuple[int, int, int, int]
    _status: Any
    _on_cuda: bool
    _pending: list[tuple[int, int, int, int]]  # CUDA: the state after each push since the last read
    _confirmed: tuple[int, int, int, int]  # CUDA: the state at the last read

    def _init_status(self, like: Any) -> None:
        self._status = _int_like(like, (2,), "int64")
        self._on_cuda = _arrays.device_of(like)[0] == "cuda"
        self._pending = []
        self._confirmed = (0, 0, 0, 0)

    def _pushed(self, state: tuple[int, int, int, int]) -> None:
        self._state = state
        if self._on_cuda:
            self._pending.append(state)

    def _settle(self, fault: int, accepted: int, finite: bool = True, what: str = "",
                breakdown_raises: bool = True) -> None:
        """The status word as read back (it is cleared on the device): a refused push rolls the
        state back to the pushes the device accepted before it, then raises; else a result
        read with it that is not finite raises."""
        if fault == 0:
            self._pending.clear()
            self._confirmed = self._state
            if not finite:
                raise ArgumentError(
                    f"the result of {what} is not finite in {self._dtype}: argument 'x' holds NaN or Inf, or "
                    f"|x| / damp (argument 'damp' = {self._damp}) overflows the dtype")
            return
        refused = len(self._pending) - accepted
        self._state = self._pending[accepted - 1] if accepted > 0 else self._confirmed
        self._pending.clear()
        self._confirmed = self._state
        if fault == 3:
            if not breakdown_raises:
                return
            raise ArgumentError(
                "a push refactored the capacitance matrix damp * c * I + G G^T and it was not positive definite in "
                "float64: 'damp' is too small for the gradients' norms; the window holds that gradient but its "
                "factor is stale: set a larger damp (which refactors) or reset() the window")
        reason = _FAULTS.get(fault, f"the device refused it (status {fault})")
        raise ArgumentError(f"push {accepted + 1} of the {accepted + refused} since the last check was refused on the "
                            f"device: {reason}; the window is as it was before that push (it and the {refused - 1} "
                            "pushes after it were not applied)")

    def check(self) -> None:
        """Raise now if the device refused a push since the last check (CUDA windows).

        On CUDA a push checks its gradient (finite, ``||g||^2 / (c * damp) <= 1e12``) on the
        device and never waits for it: a refused push leaves the window unchanged there (and
        so does every push after it until the refusal is reported). The refusal is raised at the
        next point that synchronizes anyway: :meth:`ihvp`, :meth:`diag`, setting :attr:`damp`,
        or this method, as ArgumentError, with :attr:`size` and :attr:`count` rolled back to the
        pushes that were applied. On the CPU a push raises at once and this does nothing.
        """
        self._settle(*self._read_status())

    def _read_status(self) -> tuple[int, int, bool]:
        if not self._on_cuda:
            return 0, 0, True
        stream, workspace = _arrays.call_context([self._status])
        return _core.fisher_window_status(self._status, stream=stream, workspace=workspace)

    @property
    def size(self) -> int:
        """Gradients held (at most m)."""
        return self._state[0]

    @property
    def count(self) -> int:
        """Gradients pushed since construction or the last ``reset``."""
        return self._state[2]

    @property
    def slots(self) -> list[int]:
        """Rows that hold gradients, oldest first."""
        size, oldest = self._state[0], self._state[1]
        return [(oldest + p) % self._m for p in range(size)]

    @property
    def gram(self) -> Any:
        """G G^T by slot, float64 (read-only view)."""
        return _readonly(self._gram)

    @property
    def factor(self) -> Any:
        """L, C = L L^T for C = c damp I + G G^T in age order; the leading size x size block (read-only)."""
        return _readonly(self._factor)


class FisherWindow(_Window):
    """A sliding window of the last m gradients and products with the inverse of its Fisher.

    ``F = damp * I + (1/c) * sum g_i g_i^T`` over the gradients in the window, with c = m
    (``normalize="capacity"``, M-FAC's choice: during warm-up the missing gradients count as
    zero) or c = the number of gradients held (``normalize="count"``: F is then the mean of
    the gradients so far, so the damping is not over-weighted during warm-up).

    The window's memory comes from the caller's framework and device: G (m, d) in ``dtype``,
    the Gram matrix G G^T (m, m, float64, by slot) and the Cholesky factor L of the
    capacitance matrix ``c * damp * I + G G^T`` (m, m, float64, rows in age order). They
    are exposed read-only as :attr:`G`, :attr:`gram` and :attr:`factor`.

    A push writes the gradient and its Gram row in one pass over G, takes the oldest gradient
    out of L by a rank-one update and appends the new one by a triangular solve: O(m d + m^2)
    per push, no O(m^3) refactorization (M-FAC refactors at every step). L is refactored from
    the Gram matrix (O(m^3), no pass over G) every ``refactor_every`` pushes (default m),
    which bounds drift, and on every push while c changes (``"count"`` during warm-up).
    :meth:`ihvp` makes two passes over G.

    Parameters
    ----------
    d : int >= 1
        Dimension of the gradients.
    m : int >= 1
        Capacity (number of gradients kept); any value, no multiple-of-32 or 1024 limit.
    damp : float > 0
        The damping lambda.
    dtype : {"float32", "bfloat16", "float16", "float64"}
        Storage dtype of G (and of the gradients and vectors passed in). Products with G
        accumulate in float64 and the m x m system is float64 whatever it is.
    like : array, optional
        The window's arrays take its framework and device.
    device : optional
        "cpu", "cuda", "cuda:N" or a framework device (as :func:`curvkit.probes`).
    normalize : {"capacity", "count"}
    refactor_every : int >= 1, optional
        Pushes between refactorizations of L from the Gram matrix (default m).

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> rng = np.random.default_rng(0)
    >>> w = curvkit.FisherWindow(d=100, m=8, damp=1e-3, dtype="float64")
    >>> grads = rng.standard_normal((20, 100))
    >>> for g in grads:
    ...     w.push(g)
    >>> w.size, w.count
    (8, 20)
    >>> x = rng.standard_normal(100)
    >>> F = 1e-3 * np.eye(100) + grads[-8:].T @ grads[-8:] / 8
    >>> bool(np.allclose(w.ihvp(x), np.linalg.solve(F, x), rtol=1e-10))
    True
    >>> bool(np.allclose(w.diag(), np.diag(np.linalg.inv(F)), rtol=1e-9))
    True
    >>> w.check()  # nothing pending: on the CPU a refused push raises from push itself

    On CUDA a push does not wait for the device: a gradient it refuses (NaN/Inf, or kappa
    above 1e12) is raised by the next :meth:`ihvp`, :meth:`diag` or :meth:`check` (see
    :meth:`check`).
    """

    def __init__(self, d: int, m: int, damp: float, dtype: Any = "float32", like: Any = None, device: Any = None,
                 normalize: str = "capacity", refactor_every: Optional[int] = None) -> None:
        self._d = _args.index(d, "d", 1, 2**62)
        self._m = _args.index(m, "m", 1, 2**31)
        self._damp = _positive(damp)
        if not isinstance(normalize, str) or normalize not in NORMALIZATIONS:
            raise ArgumentError(f"argument 'normalize' must be one of 'capacity', 'count', got {normalize!r}")
        self._normalize = normalize
        self._refactor_every = 0 if refactor_every is None else _args.index(refactor_every, "refactor_every", 1,
                                                                              2**62)
        framework, dev, dtype = _target(like, device, dtype)
        self._dtype = dtype
        self._G = _zero(_arrays.empty((self._m, self._d), dtype, framework, dev))
        self._gram = _zero(_arrays.empty((self._m, self._m), "float64", framework, dev))
        self._factor = _zero(_arrays.empty((self._m, self._m), "float64", framework, dev))
        self._state: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._init_status(self._G)

    # ---- state

    @property
    def d(self) -> int:
        """Dimension of the gradients."""
        return self._d

    @property
    def m(self) -> int:
        """Capacity."""
        return self._m

    @property
    def dtype(self) -> str:
        """Storage dtype of G."""
        return self._dtype

    @property
    def normalize(self) -> str:
        return self._normalize

    @property
    def G(self) -> Any:
        """The (m, d) gradient rows by slot (read-only view; see :attr:`slots` for their order)."""
        return _readonly(self._G)

    @property
    def damp(self) -> float:
        """The damping; setting it refactors L (O(m^3), no pass over G)."""
        return self._damp

    @damp.setter
    def damp(self, value: float) -> None:
        damp = _positive(value)
        # A factor that broke down in a push is what this refactorization repairs: not raised.
        self._settle(*self._read_status(), breakdown_raises=False)
        stream, workspace = _arrays.call_context([self._G])
        _core.fisher_window_refactor(self._G, self._gram, self._factor, self._state, damp=damp,
                                     normalize=self._normalize, refactor_every=self._refactor_every,
                                     status=self._status, stream=stream, workspace=workspace)
        self._damp = damp

    # ---- operations

    def push(self, g: Any) -> None:
        """Add gradient ``g`` (shape (d,), the window's dtype, device and framework), replacing
        the oldest when the window is full.

        A non-finite ``g``, or one with ``||g||^2 / (c * damp)`` above 1e12 (where float64 can
        no longer hold the capacitance matrix positive definite), is refused before anything is
        written: the window is unchanged. On the CPU that raises ArgumentError here. On CUDA the
        check runs on the device and the push never waits for the host: the refusal (and every
        push after it, also left out) is raised as ArgumentError by the next :meth:`ihvp`,
        :meth:`diag` or :meth:`check`, which roll :attr:`size` and :attr:`count` back to the
        pushes that were applied.
        """
        g = _arrays.prepare(g, "g")
        stream, workspace = _arrays.call_context([self._G])
        size, oldest, count, since = _core.fisher_window_push(
            self._G, self._gram, self._factor, self._state, damp=self._damp, normalize=self._normalize,
            refactor_every=self._refactor_every, status=self._status, g=g, stream=stream, workspace=workspace)
        self._pushed((size, oldest, count, since))

    def ihvp(self, x: Any, out: Any = None) -> Any:
        """``F^-1 x`` for x of shape (d,) or (d, k) (k vectors in one pass over G), in the
        window's dtype; returned in ``out`` when given (C-contiguous, shaped like x).

        A result that is not finite (x held NaN or Inf, or ``|x| / damp`` overflows the dtype)
        raises ArgumentError; on CUDA that check and the window's status (see :meth:`check`)
        come back in one read, and a refused push is raised here instead of a result."""
        x = _arrays.prepare(x, "x")
        result = _arrays.empty_like(x) if out is None else _arrays.written_in_place(_arrays.detached(out, "out"))
        stream, workspace = _arrays.call_context([self._G])
        self._settle(*_core.fisher_window_ihvp(
            self._G, self._gram, self._factor, self._state, damp=self._damp, normalize=self._normalize,
            refactor_every=self._refactor_every, status=self._status, x=x, out=result, stream=stream,
            workspace=workspace), what="ihvp")
        return out if out is not None else result

    def diag(self, out: Any = None) -> Any:
        """``diag(F^-1)``, shape (d,), the window's dtype: O(m^2 d) (a triangular solve over G)."""
        result = _arrays.empty_like(self._G, (self._d,)) if out is None else \
            _arrays.written_in_place(_arrays.detached(out, "out"))
        stream, workspace = _arrays.call_context([self._G])
        self._settle(*_core.fisher_window_diag(
            self._G, self._gram, self._factor, self._state, damp=self._damp, normalize=self._normalize,
            refactor_every=self._refactor_every, status=self._status, out=result, stream=stream,
            workspace=workspace), what="diag")
        return out if out is not None else result

    def reset(self) -> None:
        """Empty the window (its arrays are zeroed; a refusal not yet reported is dropped)."""
        for a in (self._G, self._gram, self._factor, self._status):
            _zero(a)
        self._state = self._confirmed = (0, 0, 0, 0)
        self._pending.clear()

    def __repr__(self) -> str:
        return (f"FisherWindow(d={self._d}, m={self._m}, damp={self._damp!r}, dtype={self._dtype!r}, "
                f"normalize={self._normalize!r}, size={self.size}, count={self.count})")


class SparseFisherWindow(_Window):
    """A compressed sliding window (EFCP): each gradient is added to an error-feedback buffer,
    the buffer's ``k`` largest magnitudes in every block of ``block_size`` coordinates (the
    last block partial; default one block of d) are kept as (int32 column, value) pairs, and
    the buffer keeps the rest (the rounding of the kept values included).

    F is the Fisher of the densified rows, ``damp * I + (1/c) sum_i s_i s_i^T``: its products
    equal those of a dense :class:`FisherWindow` holding the same rows (:meth:`densified`).
    Columns are absolute int32 indices (d < 2^31), so no block size overflows them. The m x m
    system is the dense window's (float64 Gram matrix and Cholesky factor, O(m^2) update per
    push); a push costs O(d log k + m nnz), a product O(m nnz k + d k). On CUDA the selection is
    a radix select per block of coordinates (one thread block each: choose ``block_size`` so
    that there are many blocks), refused pushes are reported as :meth:`FisherWindow.check`
    says, and the scatter of ``G^T w`` adds in float64 atomics (its last float64 bits vary from
    run to run, far below the storage rounding).

    Parameters are those of :class:`FisherWindow`, plus ``k`` (values kept per block, >= 1)
    and ``block_size`` (coordinates per selection block, default d).

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> rng = np.random.default_rng(0)
    >>> w = curvkit.SparseFisherWindow(d=1000, m=4, k=10, damp=1e-2, dtype="float64", block_size=250)
    >>> for g in rng.standard_normal((6, 1000)):
    ...     w.push(g)
    >>> w.values.shape, w.indices.dtype.name
    ((4, 40), 'int32')
    >>> S = w.densified()[w.slots]
    >>> x = rng.standard_normal(1000)
    >>> F = 1e-2 * np.eye(1000) + S.T @ S / 4
    >>> bool(np.allclose(w.ihvp(x), np.linalg.solve(F, x), rtol=1e-10))
    True
    """

    def __init__(self, d: int, m: int, k: int, damp: float, block_size: Optional[int] = None,
                 dtype: Any = "float32", like: Any = None, device: Any = None, normalize: str = "capacity",
                 refactor_every: Optional[int] = None) -> None:
        self._d = _args.index(d, "d", 1, 2**31)
        self._m = _args.index(m, "m", 1, 2**31)
        self._k = _args.index(k, "k", 1, 2**31)
        self._block = self._d if block_size is None else _args.index(block_size, "block_size", 1, 2**62)
        self._damp = _positive(damp)
        if not isinstance(normalize, str) or normalize not in NORMALIZATIONS:
            raise ArgumentError(f"argument 'normalize' must be one of 'capacity', 'count', got {normalize!r}")
        self._normalize = normalize
        self._refactor_every = 0 if refactor_every is None else _args.index(refactor_every, "refactor_every", 1,
                                                                              2**62)
        framework, dev, dtype = _target(like, device, dtype)
        self._dtype = dtype
        full, rest = divmod(self._d, self._block)
        nnz = full * min(self._k, self._block) + min(self._k, rest)
        self._values = _zero(_arrays.empty((self._m, nnz), dtype, framework, dev))
        self._indices = _int_like(self._values, (self._m, nnz), "int32")
        self._error = _zero(_arrays.empty((self._d,), "float64" if dtype == "float64" else "float32", framework,
                                          dev))
        self._gram = _zero(_arrays.empty((self._m, self._m), "float64", framework, dev))
        self._factor = _zero(_arrays.empty((self._m, self._m), "float64", framework, dev))
        self._state: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._init_status(self._values)

    @property
    def indices(self) -> Any:
        """(m, nnz) int32 columns of the stored values, by slot, ascending in each row (read-only)."""
        return _readonly(self._indices)

    @property
    def values(self) -> Any:
        """(m, nnz) stored values by slot (read-only)."""
        return _readonly(self._values)

    @property
    def error(self) -> Any:
        """The error-feedback buffer (d,) (read-only)."""
        return _readonly(self._error)

    def densified(self) -> Any:
        """The stored rows as a dense (m, d) NumPy float64 array, by slot (rows not yet filled are zero)."""
        from ._arrays import to_host

        rows = np.zeros((self._m, self._d))
        idx, val = to_host(self._indices), to_host(self._values).astype(np.float64)
        for s in self.slots:
            rows[s, idx[s]] = val[s]
        return rows

    def push(self, g: Any) -> None:
        """Add gradient g (shape (d,), the window's dtype) through the error-feedback buffer; a
        non-finite g (or kappa above 1e12) is refused with the window and the buffer unchanged:
        raised here on the CPU, by the next :meth:`ihvp` or :meth:`check` on CUDA (as
        :meth:`FisherWindow.push`)."""
        g = _arrays.prepare(g, "g")
        stream, workspace = _arrays.call_context([self._values])
        size, oldest, count, since = _core.fisher_sparse_window_push(
            self._indices, self._values, self._error, self._gram, self._factor, self._state, damp=self._damp,
            normalize=self._normalize, refactor_every=self._refactor_every, status=self._status,
            block_size=self._block, k=self._k, g=g, stream=stream, workspace=workspace)
        self._pushed((size, oldest, count, since))

    def ihvp(self, x: Any, out: Any = None) -> Any:
        """``F^-1 x`` for x of shape (d,) or (d, k), in the window's dtype (a non-finite result,
        or on CUDA a refused push, raises as :meth:`FisherWindow.ihvp`)."""
        x = _arrays.prepare(x, "x")
        result = _arrays.empty_like(x) if out is None else _arrays.written_in_place(_arrays.detached(out, "out"))
        stream, workspace = _arrays.call_context([self._values])
        self._settle(*_core.fisher_sparse_window_ihvp(
            self._indices, self._values, self._error, self._gram, self._factor, self._state, damp=self._damp,
            normalize=self._normalize, refactor_every=self._refactor_every, status=self._status, x=x, out=result,
            stream=stream, workspace=workspace), what="ihvp")
        return out if out is not None else result

    def reset(self) -> None:
        """Empty the window and the error-feedback buffer."""
        for a in (self._indices, self._values, self._error, self._gram, self._factor, self._status):
            _zero(a)
        self._state = self._confirmed = (0, 0, 0, 0)
        self._pending.clear()


def _int_like(a: Any, shape: tuple[int, ...], dtype: str) -> Any:
    """A zeroed integer array (dtype "int32" or "int64") with a's framework and device."""
    fw = _arrays.framework_of(a)
    if fw == "numpy":
        return np.zeros(shape, dtype=dtype)
    if fw == "torch":
        import torch

        return torch.zeros(shape, dtype=getattr(torch, dtype), device=a.device)
    import cupy

    with a.device:
        return cupy.zeros(shape, dtype=dtype)


def _positive(damp: Any) -> float:
    value = _args.real(damp, "damp")
    if not (np.isfinite(value) and value > 0):
        raise ArgumentError(f"argument 'damp' must be a finite number > 0, got {value!r}")
    return value


def _block(block_size: Any) -> Optional[int]:
    return None if block_size is None else _args.index(block_size, "block_size", 1, 2**62)


def fisher_ihvp(G: Any, x: Any, damp: float, block_size: Optional[int] = None, out: Any = None) -> Any:
    """``F^-1 x`` for ``F = damp * I + G^T G / m`` (M-FAC's static case: m gradients at once).

    Parameters
    ----------
    G : array (m, d)
        The gradients as rows (float32, bfloat16, float16 or float64).
    x : array (d,) or (d, k)
        Vectors, in G's dtype, framework and device.
    damp : float > 0
    block_size : int, optional
        Restrict F to contiguous blocks of ``block_size`` coordinates (the last one partial),
        ``F_b = damp I + G_b^T G_b / m`` (oBERT's and M-FAC's block pruners), blocks solved
        independently, dense B x B when B <= m and Woodbury otherwise: on the CPU in parallel,
        on CUDA in groups of blocks, each step one batched cuBLAS / cuSOLVER call.
    out : array, optional
        Where to write the result (shaped like x).

    Returns
    -------
    array like x. Computed in float64 (products with G accumulated in float64, the m x m
    system in float64), rounded once to x's dtype.

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> rng = np.random.default_rng(1)
    >>> G = rng.standard_normal((16, 50))
    >>> x = rng.standard_normal(50)
    >>> F = 1e-2 * np.eye(50) + G.T @ G / 16
    >>> bool(np.allclose(curvkit.fisher_ihvp(G, x, 1e-2), np.linalg.solve(F, x), rtol=1e-10))
    True
    >>> Fb = F.copy(); Fb[:32, 32:] = 0; Fb[32:, :32] = 0
    >>> bool(np.allclose(curvkit.fisher_ihvp(G, x, 1e-2, block_size=32), np.linalg.solve(Fb, x), rtol=1e-10))
    True
    """
    G = _arrays.prepare(G, "G")
    x = _arrays.prepare(x, "x")
    block = _block(block_size)
    damp = _args.real(damp, "damp")
    result = _arrays.empty_like(x) if out is None else _arrays.written_in_place(_arrays.detached(out, "out"))
    stream, workspace = _arrays.call_context([G])
    if block is None:
        _core.fisher_ihvp(G, x, result, damp=damp, stream=stream, workspace=workspace)
    else:
        _core.fisher_ihvp_blocks(G, x, result, damp=damp, block_size=block, stream=stream, workspace=workspace)
    return out if out is not None else result


def fisher_inverse_diag(G: Any, damp: float, block_size: Optional[int] = None, out: Any = None) -> Any:
    """``diag(F^-1)`` for ``F = damp * I + G^T G / m`` (the pruners' saliency denominator),
    shape (d,), G's dtype; blockwise with ``block_size`` as in :func:`fisher_ihvp`.

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> G = np.random.default_rng(2).standard_normal((8, 30))
    >>> F = 1e-1 * np.eye(30) + G.T @ G / 8
    >>> bool(np.allclose(curvkit.fisher_inverse_diag(G, 0.1), np.diag(np.linalg.inv(F)), rtol=1e-10))
    True
    """
    G = _arrays.prepare(G, "G")
    block = _block(block_size)
    damp = _args.real(damp, "damp")
    if len(G.shape) != 2:
        raise ArgumentError(f"argument 'G' must have shape (m, d), got {tuple(G.shape)}")
    result = _arrays.empty_like(G, (G.shape[1],)) if out is None else \
        _arrays.written_in_place(_arrays.detached(out, "out"))
    stream, workspace = _arrays.call_context([G])
    if block is None:
        _core.fisher_inverse_diag(G, result, damp=damp, stream=stream, workspace=workspace)
    else:
        _core.fisher_inverse_diag_blocks(G, result, damp=damp, block_size=block, stream=stream, workspace=workspace)
    return out if out is not None else result


def fisher_inverse_factor(G: Any, damp: float, out: Any = None) -> Any:
    """``V = L^-1 G`` (m, d, float64), with ``F^-1 = (I - V^T V) / damp`` for
    ``F = damp * I + G^T G / m`` and ``L L^T = m damp I + G G^T``. Costs O(m^2 d) once; then
    :func:`fisher_inverse_entries` reads any entry of F^-1 in O(m). float64 because
    ``1 - ||V[:, i]||^2`` cancels: in float32 V the diagonal would lose ``log10(kappa)`` digits.

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> G = np.random.default_rng(3).standard_normal((8, 30)).astype(np.float32)
    >>> V = curvkit.fisher_inverse_factor(G, 0.1)
    >>> V.shape, V.dtype.name
    ((8, 30), 'float64')
    """
    G = _arrays.prepare(G, "G")
    damp = _args.real(damp, "damp")
    result = _arrays.empty_like(G, dtype="float64") if out is None else \
        _arrays.written_in_place(_arrays.detached(out, "out"))
    stream, workspace = _arrays.call_context([G])
    _core.fisher_inverse_factor(G, result, damp=damp, stream=stream, workspace=workspace)
    return result


def fisher_inverse_entries(V: Any, damp: float, rows: Union[int, Sequence[int], Any],
                           cols: Union[int, Sequence[int], Any]) -> Any:
    """Entries ``F^-1[rows[e], cols[e]]`` from V of :func:`fisher_inverse_factor`, O(m) each.

    ``rows`` and ``cols``: integers or integer sequences/arrays of one length; the result is a
    float64 array of that shape (0-d for two integers) in V's framework and device.

    Examples
    --------
    >>> import numpy as np, curvkit
    >>> G = np.random.default_rng(4).standard_normal((8, 30))
    >>> V = curvkit.fisher_inverse_factor(G, 0.1)
    >>> Finv = np.linalg.inv(0.1 * np.eye(30) + G.T @ G / 8)
    >>> bool(np.allclose(curvkit.fisher_inverse_entries(V, 0.1, [0, 3, 7], [0, 5, 7]),
    ...                  Finv[[0, 3, 7], [0, 5, 7]], rtol=1e-10))
    True
    >>> bool(np.isclose(curvkit.fisher_inverse_entries(V, 0.1, 2, 9), Finv[2, 9], rtol=1e-10))
    True
    """
    V = _arrays.prepare(V, "V")
    damp = _args.real(damp, "damp")
    r = _indices(rows, "rows")
    c = _indices(cols, "cols")
    if r.shape != c.shape:
        raise ArgumentError(f"arguments 'rows' and 'cols' must have the same shape, got {r.shape} and {c.shape}")
    fw, dev = _arrays.framework_of(V, "V"), _arrays.device_of(V)
    r_dev, c_dev = _on(r.ravel(), fw, dev), _on(c.ravel(), fw, dev)
    result = _arrays.empty((r.size,), "float64", fw, dev)
    stream, workspace = _arrays.call_context([V])
    _core.fisher_inverse_entries(V, r_dev, c_dev, result, damp=damp, stream=stream, workspace=workspace)
    return result.reshape(r.shape)


def _indices(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        fw = _arrays.framework_of(value, name)
        if fw == "torch":
            value = value.detach().cpu().numpy()
        elif fw == "cupy":
            value = value.get()
        a = np.asarray(value)
    else:
        try:
            a = np.asarray(value)
        except Exception:  # pragma: no cover - exotic sequences
            raise ArgumentTypeError(f"argument '{name}' must be an integer or a sequence of integers") from None
    if a.dtype.kind not in "iu" and not (a.size == 0 and a.dtype.kind == "f"):
        raise ArgumentTypeError(f"argument '{name}' must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _on(a: np.ndarray, framework: str, device: tuple[str, int]) -> Any:
    a = np.ascontiguousarray(a)
    if framework == "numpy":
        return a
    if framework == "torch":
        import torch

        return torch.from_numpy(a).to(f"cuda:{device[1]}" if device[0] == "cuda" else "cpu")
    import cupy

    with cupy.cuda.Device(device[1]):
        return cupy.asarray(a)
