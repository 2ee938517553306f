"""Probe generation: curvkit.probes against torch.randint/randn and numpy.random at 1e7
entries, in one run. Run: python -m pytest bench/bench_hutchinson.py --benchmark-only

Each benchmark writes n entries once; bytes written / time is the GB/s reported (the
roofline is the machine's copy bandwidth: about 3.0 TB/s on an H100).
"""
import numpy as np
import pytest
from baselines.probes import numpy_probes, torch_probes

import curvkit

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

N = 10_000_000
KINDS = ["rademacher", "gaussian", "sphere"]
DTYPES = ["float32", "float64"]
DEVICES = ["cpu"] + (["cuda"] if curvkit.has_cuda() and torch is not None and torch.cuda.is_available() else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _record(benchmark, impl, dtype):
    benchmark.extra_info.update(impl=impl, bytes=N * np.dtype(dtype).itemsize)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_curvkit(benchmark, kind, dtype, device):
    benchmark.group = f"{kind}-{dtype}-{device}"
    _record(benchmark, "curvkit", dtype)
    if device == "cpu":
        fn = lambda: curvkit.probes(N, kind, seed=1, dtype=dtype)  # noqa: E731
    else:
        like = torch.empty(0, dtype=getattr(torch, dtype), device="cuda")

        def fn():
            z = curvkit.probes(N, kind, seed=1, like=like)
            _sync(device)
            return z
    z = benchmark(fn)
    assert z.shape == (N,)


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_torch(benchmark, kind, dtype, device):
    benchmark.group = f"{kind}-{dtype}-{device}"
    _record(benchmark, "torch", dtype)
    gen = torch.Generator(device=device).manual_seed(1)

    def fn():
        z = torch_probes(N, kind, getattr(torch, dtype), device, gen)
        _sync(device)
        return z
    benchmark(fn)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_numpy(benchmark, kind, dtype):
    benchmark.group = f"{kind}-{dtype}-cpu"
    _record(benchmark, "numpy", dtype)
    rng = np.random.default_rng(1)
    benchmark(lambda: numpy_probes(N, kind, np.dtype(dtype), rng))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_fill_roofline(benchmark, kind, dtype, device):
    """Allocate and fill the same n entries with a constant: the write-bandwidth ceiling
    that any probe generator (which also allocates its result) can reach."""
    benchmark.group = f"{kind}-{dtype}-{device}"
    _record(benchmark, "fill", dtype)
    if device == "cpu":
        benchmark(lambda: np.full(N, 1.0, dtype=dtype))
    else:
        def fn():
            z = torch.full((N,), 1.0, dtype=getattr(torch, dtype), device=device)
            _sync(device)
            return z
        benchmark(fn)
