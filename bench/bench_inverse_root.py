"""Inverse p-th roots on CPU (and CUDA, the test_cuda_* cases): curvkit.matrix_inverse_root against
Distributed Shampoo's eigh root (float64 upcast) and Scalable Shampoo's coupled Newton, written in plain PyTorch
(bench/baselines/inverse_root.py), in one run. Inputs: float32 SPD with condition number
1e3. Each benchmark records its relative error against the float64 eigh reference.
Run: python -m pytest bench/bench_inverse_root.py --benchmark-only  (-k cuda on a GPU machine)
"""
import math

import numpy as np
import pytest
from _in_turn import after, in_turn

import curvkit

torch = pytest.importorskip("torch")
from baselines.inverse_root import coupled_newton_root, eigh_root, loop  # noqa: E402

CASES = [(32, 256), (8, 1024), (2, 2048)]
POWERS = [2, 4]


def _batch(count, n, seed=0, cond=1e3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    out = np.empty((count, n, n), dtype=dtype)
    for b in range(count):
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        A = (Q * np.logspace(0, -np.log10(cond), n)) @ Q.T
        out[b] = (A + A.T) / 2
    return torch.from_numpy(out)


def _error(X, A, p):
    w, V = torch.linalg.eigh(A.double())
    ref = (V * w.pow(-1.0 / p).unsqueeze(-2)) @ V.mT
    return float((torch.linalg.norm(X.double() - ref) / torch.linalg.norm(ref)).max())


@pytest.mark.parametrize("p", POWERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_eigh_baseline(benchmark, case, p):
    A = _batch(*case)
    benchmark.group = f"root-p{p}-float32-{case[0]}x{case[1]}"
    benchmark.extra_info.update(impl="torch eigh f64", rel_error=_error(eigh_root(A, p), A, p))
    benchmark.pedantic(lambda: eigh_root(A, p), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("p", POWERS)
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: f"{c[0]}x{c[1]}")
def test_newton_baseline(benchmark, case, p):
    A = _batch(*case)
    benchmark.group = f"root-p{p}-float32-{case[0]}x{case[1]}"
    X = torch.stack(loop(lambda a: coupled_newton_root(a, p)[0], list(A)))
    benchmark.extra_info.update(impl="torch newton", rel_error=_error(X, A, p))
    benchmark.pedantic(lambda: loop(coupled_newton_root, list(A), p), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", POWERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_curvkit(benchmark, case, p, method):
    A = _batch(*case)
    benchmark.group = f"root-p{p}-float32-{case[0]}x{case[1]}"
    X = curvkit.matrix_inverse_root(A, p, method=method)
    benchmark.extra_info.update(impl="curvkit" if method == "eigh" else "curvkit newton", rel_error=_error(X, A, p))
    benchmark.pedantic(lambda: curvkit.matrix_inverse_root(A, p, method=method), rounds=3, warmup_rounds=1)


# The target case in the interleaved setting: each root after a forward and backward GEMM of the
# MLP on PyTorch's threads, curvkit and the float64 eigh route in turn (_in_turn.py), 8 rounds.
@pytest.mark.parametrize("p", [4])
def test_in_turn_after_torch_work(benchmark, p):
    A, x, w = _batch(8, 1024), torch.randn(256, 784), torch.randn(784, 256)
    benchmark.group = f"root-p{p}-float32-in-turn-8x1024"

    def torch_work():
        return x.T @ (x @ w)

    in_turn(benchmark, {"curvkit": after(torch_work, curvkit.matrix_inverse_root, A, p),
                        "torch eigh f64": after(torch_work, eigh_root, A, p)}, rounds=8)


@pytest.mark.parametrize("impl", ["curvkit", "torch eigh f64"])
def test_float64_input(benchmark, impl):
    A = _batch(8, 1024, dtype=np.float64)
    benchmark.group = "root-p4-float64-8x1024"
    fn = (lambda: curvkit.matrix_inverse_root(A, 4)) if impl == "curvkit" else (lambda: eigh_root(A, 4))
    benchmark.extra_info.update(impl=impl, rel_error=_error(fn(), A, 4))
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


# The 88 factor blocks of one 4096 x 11008 weight at block size 1024: 4 x 11 blocks, each
# with a left factor of size 1024 and a right factor of 1024 (the last column block: 768).
def _ragged_blocks():
    sizes = [1024] * 44 + [1024] * 40 + [768] * 4
    rng = np.random.default_rng(0)
    blocks = []
    for n in sizes:
        G = rng.standard_normal((n, n // 4)).astype(np.float32)
        blocks.append(torch.from_numpy(G @ G.T / (n // 4) + 1e-3 * np.eye(n, dtype=np.float32)))
    return blocks


@pytest.mark.parametrize("impl", ["curvkit", "torch eigh f64 loop"])
def test_ragged_88_blocks(benchmark, impl):
    blocks = _ragged_blocks()
    benchmark.group = "root-p4-ragged-88-blocks"
    benchmark.extra_info.update(impl=impl)
    if impl == "curvkit":
        benchmark.pedantic(lambda: curvkit.matrix_inverse_root(blocks, 4), rounds=1, warmup_rounds=0)
    else:
        benchmark.pedantic(lambda: loop(eigh_root, blocks, 4), rounds=1, warmup_rounds=0)


# Warm-started refresh: Shampoo-like factors (an EMA, beta = 0.999, of sample covariances of
# 32 draws from a spectrum of condition 1e3) one update after the previous root; curvkit
# refines the previous eigenbasis (``basis=``). "mm" is the info's "products": n x n matrix
# products per matrix (a symmetric product, syrk/gemmt, counts 0.5).
def _drifting(count, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    before, after = np.empty((count, n, n), dtype), np.empty((count, n, n), dtype)
    for b in range(count):
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        C = (Q * np.logspace(0, -3, n)) @ Q.T
        G = np.linalg.cholesky(C) @ rng.standard_normal((n, 32))
        before[b], after[b] = C, 0.999 * C + 0.001 * G @ G.T / 32
    return before, torch.from_numpy(after)


@pytest.mark.parametrize("impl", ["curvkit", "curvkit newton", "curvkit eigh", "torch eigh f64"])
@pytest.mark.parametrize("p", POWERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", [(16, 256), (8, 512)], ids=lambda c: f"{c[0]}x{c[1]}")
def test_warm_refresh(benchmark, case, dtype, p, impl):
    before, A = _drifting(*case, dtype)
    benchmark.group = f"root-warm-p{p}-{np.dtype(dtype).name}-{case[0]}x{case[1]}"
    if impl == "curvkit":
        basis = curvkit.eigh(before)[1]
        V = basis.copy()
        X, info = curvkit.matrix_inverse_root(A, p, basis=torch.from_numpy(V), return_info=True)
        refined = ~info["fell_back"]  # the others were decomposed from scratch by LAPACK
        benchmark.extra_info["fell_back"] = int((~refined).sum())
        matmuls = float(np.mean(info["products"][refined]))
        args = lambda: ((A, p), {"basis": torch.from_numpy(basis.copy())})  # noqa: E731
        fn = curvkit.matrix_inverse_root
    elif impl == "curvkit newton":
        X, info = curvkit.matrix_inverse_root(A, p, method="newton", return_info=True)
        matmuls = float(np.mean(info["products"]))
        args, fn = lambda: ((A, p), {"method": "newton"}), curvkit.matrix_inverse_root  # noqa: E731
    elif impl == "curvkit eigh":
        X, matmuls = curvkit.matrix_inverse_root(A, p, method="eigh"), None
        args, fn = lambda: ((A, p), {"method": "eigh"}), curvkit.matrix_inverse_root  # noqa: E731
    else:
        X, matmuls = eigh_root(A, p), None
        args, fn = lambda: ((A, p), {}), eigh_root  # noqa: E731
    benchmark.extra_info.update(impl=impl, rel_error=_error(X, A, p))
    if matmuls is not None:
        benchmark.extra_info["matmuls"] = matmuls
    benchmark.pedantic(fn, setup=args, rounds=3, warmup_rounds=1)


# ---- CUDA: p = 4 roots of float32 batches (condition 1e3) against torch.linalg.eigh roots in
# float32 and in float64 (Distributed Shampoo's upcast); "curvkit" is method "auto" (Newton).
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and curvkit.has_cuda()),
                          reason="needs a GPU and a CUDA build of curvkit")
CUDA_CASES = [(256, 256), (64, 512), (64, 1024), (16, 2048)]


def _cuda_batch(count, n, cond=1e3, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(count, n, n, generator=g, device="cuda", dtype=torch.float64))
    A = (Q * torch.logspace(0, -math.log10(cond), n, dtype=torch.float64, device="cuda")) @ Q.mT
    return ((A + A.mT) / 2).float()


def _synchronized(fn, *args, **kwargs):
    def run():
        fn(*args, **kwargs)
        torch.cuda.synchronize()
    return run


_CUDA_IMPLS = {
    "curvkit": lambda A, p: curvkit.matrix_inverse_root(A, p),
    "curvkit eigh": lambda A, p: curvkit.matrix_inverse_root(A, p, method="eigh"),
    "torch eigh f32": lambda A, p: eigh_root(A, p, upcast=False),
    "torch eigh f64": lambda A, p: eigh_root(A, p),
}


@cuda
@pytest.mark.parametrize("impl", list(_CUDA_IMPLS))
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_cuda_root(benchmark, case, impl):
    A, p = _cuda_batch(*case), 4
    fn = _CUDA_IMPLS[impl]
    benchmark.group = f"cuda-root-p4-float32-{case[0]}x{case[1]}"
    benchmark.extra_info.update(impl=impl, rel_error=_error(fn(A, p), A, p))
    if impl == "curvkit":
        _, info = curvkit.matrix_inverse_root(A, p, return_info=True)
        benchmark.extra_info["iterations"] = float(info["iterations"].mean())
    benchmark.pedantic(_synchronized(fn, A, p), rounds=3, warmup_rounds=1)


@cuda
@pytest.mark.parametrize("impl", ["curvkit", "torch eigh f32 loop", "torch newton loop"])
def test_cuda_ragged_88_blocks(benchmark, impl):
    blocks = [b.cuda() for b in _ragged_blocks()]
    benchmark.group = "cuda-root-p4-ragged-88-blocks"
    benchmark.extra_info.update(impl=impl)
    fn = {"curvkit": lambda: curvkit.matrix_inverse_root(blocks, 4),
          "torch eigh f32 loop": lambda: loop(eigh_root, blocks, 4, 0.0, False),
          "torch newton loop": lambda: loop(coupled_newton_root, blocks, 4)}[impl]
    benchmark.pedantic(_synchronized(fn), rounds=3, warmup_rounds=1)
