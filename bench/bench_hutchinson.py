"""Probe generation: curvkit.probes against torch.randint/randn and numpy.random at 1e7
entries, in one run. Run: python -m pytest bench/bench_hutchinson.py --benchmark-only

Each benchmark writes n entries once; bytes written / time is the GB/s reported (the
roofline is the machine's copy bandwidth: about 3.0 TB/s on an H100).
"""
import math

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


# ---------------------------------------------------------------------------------------
# Estimators and fused optimizer steps.
#   python -m pytest bench/bench_hutchinson.py --benchmark-only -k "adahessian or sophia or xtrace or layer"

from baselines.hutchinson import (  # noqa: E402
    adahessian_step_torch,
    hutchinson_layer_traces_loop,
    resnet18_cifar_shapes,
    sophia_step_torch,
    xtrace_per_probe,
)


def _largest_case(request):
    """The largest cases stay out of the smoke run (--benchmark-disable runs each test once)."""
    if request.config.getoption("benchmark_disable", False):
        pytest.skip("largest case: skipped in the smoke run")


def _optimizer_state(shapes, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    make = lambda s: torch.randn(s, generator=gen, dtype=dtype).to(device)  # noqa: E731
    return ([make(s) for s in shapes], [make(s) for s in shapes], [make(s) for s in shapes],
            [make(s) for s in shapes], [make(s).abs() for s in shapes])


def _synced(fn, device):
    def run():
        out = fn()
        _sync(device)
        return out
    return run


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["curvkit", "curvkit-unchecked", "torch-loop"])
def test_adahessian_resnet18(benchmark, request, impl, device):
    _largest_case(request)
    shapes = resnet18_cifar_shapes()
    params, grads, h, m, v = _optimizer_state(shapes, torch.float32, device=device)
    count = sum(p.numel() for p in params)
    benchmark.group = f"adahessian-resnet18-float32-{device}"
    # reads p, g, h, m, v and writes p, m, v: 8 float32 per entry
    benchmark.extra_info.update(impl=impl if impl != "torch-loop" else "torch", bytes=8 * 4 * count)
    if impl.startswith("curvkit"):  # unchecked: without the NaN/Inf pass (check_finite=False)
        check = impl == "curvkit"
        benchmark(_synced(lambda: curvkit.adahessian_step_(params, grads, h, m, v, step=10, lr=1e-3,
                                                           check_finite=check), device))
    else:
        benchmark(_synced(lambda: adahessian_step_torch(params, grads, h, m, v, step=10, lr=1e-3), device))


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["curvkit", "curvkit-unchecked", "torch-loop"])
def test_sophia_resnet18(benchmark, request, impl, device):
    _largest_case(request)
    shapes = resnet18_cifar_shapes()
    params, grads, _, m, hess = _optimizer_state(shapes, torch.float32, device=device)
    count = sum(p.numel() for p in params)
    benchmark.group = f"sophia-resnet18-float32-{device}"
    benchmark.extra_info.update(impl=impl if impl != "torch-loop" else "torch", bytes=6 * 4 * count)
    if impl.startswith("curvkit"):
        check = impl == "curvkit"
        benchmark(_synced(lambda: curvkit.sophia_step_(params, grads, m, hess, check_finite=check), device))
    else:
        benchmark(_synced(lambda: sophia_step_torch(params, grads, m, hess), device))


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [100_000, 1_000_000])
@pytest.mark.parametrize("impl", ["curvkit", "per-probe"])
def test_xtrace_cheap_operator(benchmark, request, n, impl, device):
    """XTrace overhead with a diagonal operator at equal matvecs (100): what is left is the
    estimator's own work (sketch QR, leave-one-out algebra, probe handling)."""
    if n > 100_000:
        _largest_case(request)
    d = (torch.linspace(1, 2, n, dtype=torch.float64) ** -2.0).to(device)
    m, k = 100, 50
    benchmark.group = f"xtrace-diagonal-n{n}-{device}"
    # about 2 n k^2 (QR) + 2 n k^2 (orgqr) + 3 x 2 n k^2 (Q^T Z, Q^T Omega, Z^T Omega) flops
    benchmark.extra_info.update(impl="curvkit" if impl == "curvkit" else "curvlinops-style", flops=10 * n * k * k)
    if impl == "curvkit":
        like = torch.empty(0, dtype=torch.float64, device=device)
        est = benchmark(lambda: curvkit.trace_estimate(lambda z: d[:, None] * z, n, m, like=like))
    else:
        gen = torch.Generator(device=device).manual_seed(0)
        est = benchmark(lambda: xtrace_per_probe(lambda v: d * v, n, m, gen, torch.float64, device))
    assert abs(est - float(d.sum())) / float(d.sum()) < 1e-2


def _mlp_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=gen)
    y = torch.randint(0, 10, (512,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 10))
    params = list(model.parameters())
    return (lambda: torch.nn.functional.cross_entropy(model(x), y)), params


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("impl", ["curvkit", "pyhessian-loop"])
def test_layer_traces_mlp(benchmark, impl):
    """Per-layer Hessian traces of a 3-layer MLP (7.0k parameters, 512 samples) from 64
    Rademacher probes: curvkit's batched HVPs (blocks of 32) against one HVP per probe."""
    import curvkit.torch as ct

    loss_fn, params = _mlp_problem()
    benchmark.group = "layer-traces-mlp-64-probes"
    benchmark.extra_info.update(impl="curvkit" if impl == "curvkit" else "pyhessian")
    if impl == "curvkit":
        result = benchmark(lambda: ct.layer_traces(loss_fn, params, num_matvecs=64))
        assert len(result) == len(params)
    else:
        gen = torch.Generator().manual_seed(0)
        benchmark(lambda: hutchinson_layer_traces_loop(loss_fn, params, 64, gen))


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
def test_adahessian_resnet18_bandwidth(benchmark, request):
    """The machine's ceiling for the same entries: c = a + 2 b over 11.17M float32 (read two,
    write one, torch's threads), reported as GB/s beside the fused step's."""
    _largest_case(request)
    count = sum(math.prod(s) for s in resnet18_cifar_shapes())
    a, b, c = torch.rand(count), torch.rand(count), torch.empty(count)
    benchmark.group = "adahessian-resnet18-float32-cpu"
    benchmark.extra_info.update(impl="triad", bytes=3 * 4 * count)
    benchmark(lambda: torch.add(a, b, alpha=2.0, out=c))
