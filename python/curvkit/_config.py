"""What this build and machine can do, and the one thread setting."""
from __future__ import annotations

import sys

from . import _core


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

    >>> import curvkit
    >>> before = curvkit.get_num_threads()
    >>> curvkit.set_num_threads(1)
    >>> curvkit.get_num_threads()
    1
    >>> curvkit.set_num_threads(before)
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"argument 'n' must be an int, got {type(n).__name__}")
    _core.set_num_threads(n)


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
