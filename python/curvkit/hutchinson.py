"""Hutchinson family: reproducible random probe vectors for stochastic trace, diagonal and
spectrum estimators (AdaHessian, Sophia, HAWQ, Hutch++, XTrace)."""
from __future__ import annotations

from typing import Any, Sequence, Union

from . import _args, _arrays, _core


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
        raise TypeError("argument 'out' gives the framework, device and dtype: pass no 'like', 'device' or 'dtype'")
    elif tuple(out.shape) != shape:
        raise ValueError(f"argument 'out' must have shape {shape}, got {tuple(out.shape)}")
    framework, dev = _arrays.framework_of(out, "out"), _arrays.device_of(out)
    workspace = None
    ws_size = _core.probes_workspace_size(list(shape), kind, dev[0] == "cuda")
    if ws_size:
        workspace = _arrays.empty((ws_size,), "float64", framework, dev)
    _core.probes(_arrays.detached(out, "out"), kind=kind, seed=seed, offset=offset, workspace=workspace,
                 stream=_arrays.current_stream(framework, dev))
    return out


def _normalize_shape(shape: Union[int, Sequence[int]]) -> tuple[int, ...]:
    if isinstance(shape, (tuple, list)):
        dims = tuple(_args.index(s, "shape", 0) for s in shape)
    else:
        dims = (_args.index(shape, "shape", 0),)
    if len(dims) == 0:
        raise ValueError("argument 'shape' must have at least one dimension: (n,) or (..., n, k)")
    total = 1
    for s in dims:
        total *= s
    if total >= 2**62:
        raise ValueError(f"argument 'shape' {dims} has {total} elements, more than curvkit indexes (2**62)")
    return dims


def _target(like: Any, device: Any, dtype: Any) -> tuple[str, tuple[str, int], str]:
    """(framework, (kind, index), canonical dtype) for a new array."""
    if like is not None:
        framework = _arrays.framework_of(like, "like")
        dev = _arrays.device_of(like) if device is None else _arrays.parse_device(device)
        if dtype is None:
            dtype = _arrays.dtype_name(like.dtype, "like")
            if dtype not in _arrays.FLOAT_DTYPES:
                raise TypeError(f"argument 'like' has dtype {dtype}, which is not a float dtype; pass dtype=")
    else:
        dev = _arrays.parse_device(device)
        module = type(device).__module__.split(".", 1)[0]
        if module in ("torch", "cupy"):
            framework = module
        elif dev[0] == "cuda":
            framework = _arrays.cuda_framework()
        else:
            framework = "numpy"
    dtype = _arrays.dtype_name(dtype if dtype is not None else "float64")
    if dtype not in _arrays.FLOAT_DTYPES:
        raise TypeError(f"argument 'dtype' must be one of {', '.join(_arrays.FLOAT_DTYPES)}, got '{dtype}'")
    _arrays.native_dtype(dtype, framework)  # bfloat16 needs PyTorch
    if dev[0] == "cuda" and not _core.built_with_cuda():
        raise ValueError("a CUDA device was asked for, but this curvkit build has no CUDA kernels")
    return framework, dev, dtype
