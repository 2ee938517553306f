"""What this build and machine can do, and the one thread setting."""
from __future__ import annotations

import os
import sys
import warnings

from . import _args, _core


def has_cuda():
    """True when curvkit was built with CUDA kernels and a CUDA device is usable here.

    >>> import curvkit
    >>> isinstance(curvkit.has_cuda(), bool)
    True
    """
    return _core.built_with_cuda() and _core.cuda_device_count() > 0


def get_num_threads():
    """Threads used by curvkit's CPU kernels and by its OpenBLAS.

    Defaults to the cores this process may run on (its CPU affinity), or to the
    environment variable CURVKIT_NUM_THREADS when set.
    """
    return _core.num_threads()


def set_num_threads(n):
    """Set the threads of curvkit's CPU kernels and of its OpenBLAS together.

    One setting governs both pools; curvkit does not touch the settings of PyTorch or
    NumPy, so when running beside them give each its share of the cores.

    ``n`` must lie in [1, 1024] (ArgumentError otherwise); OpenBLAS itself uses at most
    its build's limit (64 threads for scipy-openblas32: see ``config()["blas_threads"]``).
    More threads than the cores this process may run on only slow calls down, so that
    warns (RuntimeWarning). It is safe to call while other threads run curvkit: each call
    reads the setting once when it starts.

    >>> import curvkit
    >>> before = curvkit.get_num_threads()
    >>> curvkit.set_num_threads(1)
    >>> curvkit.get_num_threads()
    1
    >>> curvkit.set_num_threads(before)
    """
    n = _args.index(n, "n", 1, _core.MAX_THREADS + 1)
    cores = _available_cores()
    if n > cores:
        warnings.warn(f"curvkit.set_num_threads({n}): more threads than the {cores} cores this process may run on",
                      RuntimeWarning, stacklevel=2)
    _core.set_num_threads(n)


def _available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def config():
    """Build and machine description as a dict of strings (see show_config)."""
    info = dict(_core.build_info())
    info["python"] = sys.version.split()[0]
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    for name in ("torch", "cupy"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = module.__version__
    return info


def show_config(file=None):
    """Print the build and machine description: version, compiler, BLAS, threads, CUDA
    version, architectures and devices.

    >>> import curvkit, io
    >>> buf = io.StringIO()
    >>> curvkit.show_config(file=buf)
    >>> "blas" in buf.getvalue() and "threads" in buf.getvalue()
    True
    """
    info = config()
    width = max(len(k) for k in info)
    print("curvkit configuration", file=file)
    for key in sorted(info):
        print(f"  {key.ljust(width)} : {info[key]}", file=file)
