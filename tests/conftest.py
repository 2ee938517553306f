"""Fixtures over the frameworks and devices present: NumPy always, PyTorch on CPU when
installed, PyTorch CUDA and CuPy when a GPU and a CUDA build of curvkit are there.
Everything else skips with its reason."""
import zlib

import numpy as np
import pytest

import curvkit

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


# The one tolerance table: (dtype, check) -> bound, the measured figures (with their margins)
# the test files used to keep in tables of their own. Checks:
#   "polar"         max abs distance of polar() from the float64 plain-product iteration after
#                   5 steps (half types compute in float32 and differ by input/output rounding)
#   "sqrt"          relative Frobenius error of matrix_sqrt against the extended reference;
#                   the inverse square root is allowed 10x that ("inv_sqrt")
#   "root_eigh",    relative error an inverse p-th root method may add beyond its input's
#   "root_newton"   conditioning (n = 64 sweeps)
#   "probe"         relative error of a gaussian/sphere probe against the float64 reference:
#                   one rounding to the dtype plus a few float64 ulps of curvkit's log/sin/cos
#   "sphere_norm"   distance of a sphere probe's column norm from 1
#   "ulp"           unit roundoff of the half types (eigenvalues computed in float32, rounded)
#   "mfac"          relative 2-norm error of an M-FAC product (fisher_ihvp, FisherWindow, diag,
#                   entries) against the dense float64 solve on the stored inputs, at small kappa:
#                   the result's rounding to its dtype (measured 0.4 u in float32 and bfloat16);
#   "mfac_kappa"    plus this times kappa = ||g||^2 / (c damp) (float64 rounding amplified by the
#                   cancellation in x - G^T w; measured <= 1.6e-15 kappa, m = 32, kappa to 1e7)
TOL = {
    ("float64", "polar"): 1e-11, ("float32", "polar"): 2e-5, ("float16", "polar"): 2e-3, ("bfloat16", "polar"): 1.6e-2,
    ("float64", "sqrt"): 1e-12, ("float32", "sqrt"): 1e-6, ("float16", "sqrt"): 2e-3, ("bfloat16", "sqrt"): 1.6e-2,
    ("float64", "inv_sqrt"): 1e-11, ("float32", "inv_sqrt"): 1e-5, ("float16", "inv_sqrt"): 2e-2,
    ("bfloat16", "inv_sqrt"): 1.6e-1,
    ("float64", "root_eigh"): 1e-13, ("float64", "root_newton"): 1e-10,
    ("float32", "root_eigh"): 1e-4, ("float32", "root_newton"): 1e-4,
    ("float64", "probe"): 1e-13, ("float32", "probe"): 2 ** -24 * 1.01, ("float16", "probe"): 2 ** -11 * 1.01,
    ("bfloat16", "probe"): 2 ** -8 * 1.01,
    ("float64", "sphere_norm"): 1e-14, ("float32", "sphere_norm"): 1e-6, ("float16", "sphere_norm"): 3e-3,
    ("bfloat16", "sphere_norm"): 3e-2,
    ("float16", "ulp"): 2.0 ** -11, ("bfloat16", "ulp"): 2.0 ** -8,
    ("float64", "mfac"): 1e-10, ("float32", "mfac"): 2.0 ** -24, ("float16", "mfac"): 2.0 ** -11,
    ("bfloat16", "mfac"): 2.0 ** -8, ("float64", "mfac_kappa"): 1e-14,
}

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
