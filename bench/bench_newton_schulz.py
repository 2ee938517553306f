"""Polar factor (Muon's orthogonalization): curvkit.polar against Muon's NS5 in plain PyTorch
(bench/baselines/newton_schulz.py), same coefficients, steps and dtype, in one run.
Run: python -m pytest bench/bench_newton_schulz.py --benchmark-only

Rates are each implementation's own flop count over its time (symmetric products count
their useful flops: r^2 c for X X^T), so curvkit's gain shows as fewer flops at a similar
rate; `gemm` times one plain X X^T product in torch for the machine's GEMM rate.
"""
import numpy as np
import pytest
from _in_turn import after, in_turn

import curvkit
from curvkit.newton_schulz import _GRAM_RESTART

torch = pytest.importorskip("torch")
from baselines.newton_schulz import muon_newton_schulz  # noqa: E402

STEPS = 5
CASES = [(1024, 4096), (8, 1024, 1024), (32, 256, 256), (2, 2048, 2048)]


def _dims(shape):
    batch = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    m, n = shape[-2:]
    return batch, min(m, n), max(m, n)


def baseline_flops(shape, steps):
    batch, r, c = _dims(shape)
    return batch * steps * (4 * r * r * c + 2 * r**3)


def standard_flops(shape, steps):
    batch, r, c = _dims(shape)
    return batch * steps * (3 * r * r * c + r**3)


def gram_flops(shape, steps, restart=_GRAM_RESTART):
    batch, r, c = _dims(shape)
    total, have_q = r * r * c, False
    for k in range(steps):
        total += r**3  # A^2
        if k + 1 == steps:
            break
        total += r**3 if have_q else 0  # P Q
        have_q = True
        if restart and (k + 1) % restart == 0:
            total += 3 * r * r * c  # X = Q X0, A = X X^T
            have_q = False
            continue
        total += 2 * r**3  # P^2, A P^2
    total += (r**3 if have_q else 0) + 2 * r * r * c
    return batch * total


def _route(shape):
    _, r, c = _dims(shape)
    return "gram" if c >= 2 * r else "standard"


def _name(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", CASES, ids=_name)
def test_baseline(benchmark, shape):
    benchmark.group = f"polar-float32-{_name(shape)}"
    benchmark.extra_info.update(impl="torch NS5", flops=baseline_flops(shape, STEPS))
    G = torch.randn(shape)
    benchmark(lambda: muon_newton_schulz(G, STEPS))


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("shape", CASES, ids=_name)
def test_curvkit(benchmark, shape, method):
    benchmark.group = f"polar-float32-{_name(shape)}"
    flops = standard_flops(shape, STEPS) if method == "standard" else gram_flops(shape, STEPS)
    impl = "curvkit" if method == _route(shape) else f"curvkit {method}"
    benchmark.extra_info.update(impl=impl, flops=flops)
    G = torch.randn(shape)
    benchmark(lambda: curvkit.polar(G, STEPS, method=method))


@pytest.mark.parametrize("shape", CASES, ids=_name)
def test_gemm_rate(benchmark, shape):
    benchmark.group = f"polar-float32-{_name(shape)}"
    batch, r, c = _dims(shape)
    benchmark.extra_info.update(impl="gemm (rate only)", flops=2 * batch * r * r * c)
    X = torch.randn(batch, r, c)
    benchmark(lambda: X @ X.mT)


# Interleaved with PyTorch work, as in a training loop: each timed call is a forward and
# backward GEMM of the MLP 784-256-256-10 (batch 256, PyTorch's pool) and then the
# orthogonalization of its three weight matrices, so each side pays for the other pool's threads
# (curvkit's products run on the OpenMP pool PyTorch uses too; OpenBLAS's would contend).
MLP_SHAPES = [(256, 784), (256, 256), (10, 256)]


def _orthogonalize(impl):
    grads = [torch.randn(shape) for shape in MLP_SHAPES]
    if impl == "curvkit":
        return lambda: curvkit.polar(grads, STEPS)
    return lambda: [muon_newton_schulz(g, STEPS) for g in grads]


@pytest.mark.parametrize("impl", ["curvkit", "torch NS5"])
def test_interleaved_with_torch(benchmark, impl):
    benchmark.group = "polar-float32-interleaved-mlp784"
    orthogonalize = _orthogonalize(impl)
    x, w = torch.randn(256, 784), torch.randn(784, 256)
    benchmark.extra_info.update(impl=impl)  # no rate: the time is the model's and the step's

    def step():
        x.T @ (x @ w)  # the model's own work, on PyTorch's threads
        orthogonalize()

    benchmark(step)


# The standalone targets in the interleaved setting: each call after a forward and backward GEMM
# of the MLP on PyTorch's threads, curvkit and NS5 in turn (_in_turn.py), 10 rounds.
@pytest.mark.parametrize("shape", CASES[:2], ids=_name)
def test_in_turn_after_torch_work(benchmark, shape):
    benchmark.group = f"polar-float32-in-turn-{_name(shape)}"
    G, x, w = torch.randn(shape), torch.randn(256, 784), torch.randn(784, 256)

    def torch_work():
        return x.T @ (x @ w)

    in_turn(benchmark, {"curvkit": after(torch_work, curvkit.polar, G, STEPS),
                        "torch NS5": after(torch_work, muon_newton_schulz, G, STEPS)}, rounds=10)


# The same beside NumPy's own OpenBLAS (a third pool: NumPy's wheel bundles its own): one
# 256^2 float64 product in NumPy, then the orthogonalization. NumPy's threads spin after it
# for as long as its OpenBLAS was told when NumPy loaded (OPENBLAS_THREAD_TIMEOUT; 0.1 s by
# default), taking a core from whatever runs next (docs/contracts.md, Threads).
@pytest.mark.parametrize("impl", ["curvkit", "torch NS5"])
def test_interleaved_with_numpy(benchmark, impl):
    benchmark.group = "polar-float32-interleaved-numpy-mlp784"
    orthogonalize = _orthogonalize(impl)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256)), rng.standard_normal((256, 256))
    benchmark.extra_info.update(impl=impl)

    def step():
        a @ b  # NumPy's BLAS, on NumPy's OpenBLAS threads
        orthogonalize()

    benchmark(step)


# Equal final accuracy: Muon's 5 steps against the fewest steps of a better schedule that
# reach the same singular-value band, on a spectrum spread from 1 to 0.1.
ACCURACY_SHAPE = (1024, 4096)


def _spread_input():
    rng = np.random.default_rng(0)
    m, n = ACCURACY_SHAPE
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((n, m)))
    return torch.from_numpy(((U * np.logspace(0, -1, m)) @ V.T).astype(np.float32))


def _deviation(X):
    s = np.linalg.svd(np.asarray(X, dtype=np.float64), compute_uv=False)
    return float(np.abs(s - 1).max())


@pytest.fixture(scope="module")
def accuracy_case():
    G = _spread_input()
    target = _deviation(muon_newton_schulz(G, STEPS).numpy())
    best = None
    for coefficients in ("you", "polar_express"):
        for steps in range(1, STEPS + 1):
            if _deviation(curvkit.polar(G, steps, coefficients).numpy()) <= target:
                if best is None or steps < best[1]:
                    best = (coefficients, steps)
                break
    return G, target, best


def test_equal_accuracy_baseline(benchmark, accuracy_case):
    G, target, _ = accuracy_case
    benchmark.group = "polar-float32-equal-accuracy-1024x4096"
    benchmark.extra_info.update(impl="torch NS5", flops=baseline_flops(ACCURACY_SHAPE, STEPS), max_dev=target)
    benchmark(lambda: muon_newton_schulz(G, STEPS))


def test_equal_accuracy_curvkit(benchmark, accuracy_case):
    G, target, (coefficients, steps) = accuracy_case
    benchmark.group = "polar-float32-equal-accuracy-1024x4096"
    benchmark.extra_info.update(impl="curvkit", flops=gram_flops(ACCURACY_SHAPE, steps), schedule=coefficients,
                                steps=steps, max_dev=_deviation(curvkit.polar(G, steps, coefficients).numpy()))
    benchmark(lambda: curvkit.polar(G, steps, coefficients))
    assert benchmark.extra_info["max_dev"] <= target


# ---- CUDA, bfloat16 as Muon runs it (run with -k cuda on a GPU machine). "gemm (rate only)"
# times one plain bf16 X X^T in torch: the device's achievable matmul rate, against which
# each implementation's own flop rate reads as a fraction of peak.
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and curvkit.has_cuda()),
                          reason="needs a GPU and a CUDA build of curvkit")
CUDA_CASES = [(4096, 4096), (32, 1024, 1024), (8, 2048, 2048), (1024, 4096), (32, 256, 256)]


def _synchronized(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@cuda
@pytest.mark.parametrize("impl", ["curvkit", "torch NS5", "gemm (rate only)"])
@pytest.mark.parametrize("shape", CUDA_CASES, ids=_name)
def test_cuda_bf16(benchmark, shape, impl):
    G = torch.randn(shape, device="cuda").bfloat16()
    benchmark.group = f"cuda-polar-bfloat16-{_name(shape)}"
    batch, r, c = _dims(shape)
    if impl == "curvkit":
        flops = standard_flops(shape, STEPS) if _route(shape) == "standard" else gram_flops(shape, STEPS)
        fn = lambda: curvkit.polar(G, STEPS)  # noqa: E731
    elif impl == "torch NS5":
        flops, fn = baseline_flops(shape, STEPS), lambda: muon_newton_schulz(G, STEPS)  # noqa: E731
    else:
        X = G.reshape(batch, *G.shape[-2:])
        flops, fn = 2 * batch * r * r * c, lambda: X @ X.mT  # noqa: E731
    benchmark.extra_info.update(impl=impl, flops=flops)
    benchmark.pedantic(_synchronized(fn), rounds=20, warmup_rounds=3)
