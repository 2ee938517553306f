"""Fixtures over the frameworks and devices present: NumPy always, PyTorch on CPU when
installed, PyTorch CUDA and CuPy when a GPU and a CUDA build of curvkit are there.
Everything else skips with its reason."""
import zlib

import numpy as np
import pytest

import curvkit
from curvkit import testing

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None
try:
    import cupy
except Exception:  # pragma: no cover - no cupy, or cupy without a driver
    cupy = None


def _torch_cuda():
    return torch is not None and torch.cuda.is_available()


def _cupy_cuda():
    try:
        return cupy is not None and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


BACKENDS = [
    pytest.param(("numpy", "cpu"), id="numpy"),
    pytest.param(("torch", "cpu"), id="torch-cpu",
                 marks=pytest.mark.skipif(torch is None, reason="PyTorch is not installed")),
    pytest.param(("torch", "cuda"), id="torch-cuda",
                 marks=pytest.mark.skipif(not (_torch_cuda() and curvkit.has_cuda()),
                                          reason="needs PyTorch with CUDA and a CUDA build of curvkit")),
    pytest.param(("cupy", "cuda"), id="cupy",
                 marks=pytest.mark.skipif(not (_cupy_cuda() and curvkit.has_cuda()),
                                          reason="needs CuPy with a GPU and a CUDA build of curvkit")),
]
CUDA_BACKENDS = [p for p in BACKENDS if p.values[0][1] == "cuda"]
CPU_BACKENDS = [p for p in BACKENDS if p.values[0][1] == "cpu"]
# Numerical sweeps run once per kernel path: the CPU kernels through NumPy (PyTorch CPU tensors
# reach the same kernels), and every CUDA framework (each brings its own stream and allocator).
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[0] == ("numpy", "cpu") or p.values[0][1] == "cuda"]
DTYPES = ["float16", "float32", "float64", "bfloat16"]


def backends(framework=None, device=None):
    """The BACKENDS params of one framework and/or device (each keeps its skip mark)."""
    return [p for p in BACKENDS if framework in (None, p.values[0][0]) and device in (None, p.values[0][1])]


def backend_dtypes(dtypes=DTYPES, of=None):
    """(backend, dtype) params for @pytest.mark.parametrize("backend, dtype", ...): every backend
    (or those in `of`) with every dtype of `dtypes` that its framework has (bfloat16 only in
    PyTorch); the backend's skip mark comes along."""
    return [pytest.param(p.values[0], d, id=f"{p.id}-{d}", marks=p.marks)
            for p in (BACKENDS if of is None else of) for d in dtypes
            if d != "bfloat16" or p.values[0][0] == "torch"]


# The one tolerance table, (dtype, check) -> bound, lives in curvkit.testing (its checks are
# described there), shared with python -m curvkit.accuracy.
TOL = testing.TOL

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
needs_cuda = pytest.mark.skipif(not curvkit.has_cuda(), reason="needs a GPU and a CUDA build of curvkit")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=CUDA_BACKENDS or [pytest.param(None, marks=pytest.mark.skip(reason="no CUDA backend"))])
def cuda_backend(request):
    return request.param


def is_cuda(backend):
    return backend[1] == "cuda"


def make(values, backend, dtype=None):
    """values (NumPy) as an array of the backend's framework and device, in `dtype`."""
    fw, dev = backend
    values = np.asarray(values)
    if fw == "numpy":
        return values.astype(dtype or values.dtype)
    if fw == "torch":
        t = torch.from_numpy(values.copy(order="C")).to(dev)  # 0-d stays 0-d
        return t.to(getattr(torch, dtype)) if dtype else t
    return cupy.asarray(values, dtype=dtype or values.dtype)


def to_numpy(x):
    """float64 NumPy copy of any array (bfloat16 included)."""
    fw = type(x).__module__.split(".")[0]
    if fw == "torch":
        return x.detach().to("cpu", torch.float64).numpy()
    if fw == "cupy":
        return cupy.asnumpy(x).astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def raw_bits(x):
    """The stored bits of any array as a NumPy unsigned-integer array (exact comparisons)."""
    fw = type(x).__module__.split(".")[0]
    if fw == "torch":
        itemsize = x.element_size()
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
        return x.detach().cpu().contiguous().view(view).numpy().view(f"u{itemsize}")
    if fw == "cupy":
        x = cupy.asnumpy(x)
    x = np.ascontiguousarray(x)
    return x.view(f"u{x.dtype.itemsize}")


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name: fresh inputs per test, reproducible."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
