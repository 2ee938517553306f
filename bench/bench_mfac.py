"""M-FAC: curvkit against the published algorithms in plain PyTorch (bench/baselines/mfac.py),
side by side in one run. Run: python -m pytest bench/bench_mfac.py --benchmark-only

Sliding window, curvkit.FisherWindow against M-FAC's dynamic algorithm (its O(m^3) setup at
every gradient included):
  step-d{d}-m{m}   one optimizer step, push(g) then ihvp(g), float32 storage, a full window.
                   curvkit reads G three times (the push's Gram row, fused with the row write;
                   G x; G^T w): the rate is 3 m d 4 bytes / time against the machine's memory
                   bandwidth. The anchor makes three passes as well, plus its O(m^3) setup.
  update-m{m}      push alone at d = 64, where the m x m work dominates: curvkit's O(m^2)
                   Cholesky update against the anchor's O(m^3) refactorization.
Static and blockwise (pruning: m gradients at once, one call from G to the result):
  static-{ihvp,diag}-d{d}-m{m}     curvkit.fisher_ihvp / fisher_inverse_diag against M-FAC's
                   static algorithm (its O(m^2 d) recursion, then the product) and the plain
                   PyTorch Woodbury route in float32 (Gram matrix, Cholesky, two products).
  blocks-{ihvp,diag}-d{d}-B{B}-m{m}  block_size=B against oBERT's dense block inverse (one
                   Sherman-Morrison update of all blocks per gradient) and M-FAC's static
                   algorithm batched over the blocks.
  The rate column is m d 4 bytes (one read of G, the least any method must move) over the time,
  for every implementation alike.
MFAC_BENCH_THREADS=n sets curvkit's and PyTorch's threads (n = 1 for the figures of record
on the shared VM). Cases marked large (d = 1e6, d = 1e7, m = 4096) run only when timing
(skipped under --benchmark-disable, the CI smoke run); d = 1e7 also needs MFAC_BENCH_HUGE=1
(10 GB per window, one implementation at a time).
"""
import os

import numpy as np
import pytest
from baselines.mfac import MFACDynamic, MFACStatic, OBERTBlockInverse, torch_woodbury, torch_woodbury_diag

import curvkit

torch = pytest.importorskip("torch")

STEP_CASES = [(10_000, 64, False), (1_000_000, 256, True), (1_000_000, 1024, True), (10_000_000, 256, True)]
UPDATE_CASES = [(64, False), (256, False), (1024, False), (4096, True)]
DAMP_KAPPA = 1e4


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """MFAC_BENCH_THREADS=n runs curvkit and PyTorch on n threads each (on a shared VM one
    thread each is the stable comparison, as docs/bench.md's runs are)."""
    n = os.environ.get("MFAC_BENCH_THREADS")
    if not n:
        yield
        return
    before = (curvkit.get_num_threads(), torch.get_num_threads())
    curvkit.set_num_threads(int(n))
    torch.set_num_threads(int(n))
    yield
    curvkit.set_num_threads(before[0])
    torch.set_num_threads(before[1])


def _skip_large(request, large, d=0):
    if large and request.config.getoption("benchmark_disable"):
        pytest.skip("large case: timed runs only")
    if d >= 10_000_000 and not os.environ.get("MFAC_BENCH_HUGE"):
        pytest.skip("d = 1e7 holds a 10 GB window: set MFAC_BENCH_HUGE=1")


def _gradients(m, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=gen, dtype=torch.float32)


def _damp(d, m):
    return d / (m * DAMP_KAPPA)  # ||g||^2 ~ d: kappa ~ 1e4


def _rows(m, d, seed=0, device="cpu"):
    """m standard normal float32 rows of length d, one at a time (no m x d copy)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for _ in range(m):
        yield torch.randn(d, generator=gen, dtype=torch.float32, device=device)


def _filled_window(d, m, dtype=torch.float32, device="cpu"):
    w = curvkit.FisherWindow(d, m, _damp(d, m), dtype=dtype, like=torch.empty(0, device=device))
    for g in _rows(m, d, device=device):
        w.push(g.to(dtype))
    return w


def _filled_anchor(d, m, device="cpu"):
    a = MFACDynamic(d, m, _damp(d, m), dtype=torch.float32, device=device)  # the anchor has no bfloat16 path
    for i, g in enumerate(_rows(m, d, device=device)):
        a.G[i] = g
    torch.matmul(a.G, a.G.T, out=a.GG)
    a.setup()
    return a


@pytest.mark.parametrize("d, m, large", STEP_CASES, ids=[f"d{d}-m{m}" for d, m, _ in STEP_CASES])
@pytest.mark.parametrize("impl", ["curvkit", "anchor"])
def test_step(benchmark, request, impl, d, m, large):
    _skip_large(request, large, d)
    new = _gradients(4, d, seed=1)
    state = {"i": 0}
    if impl == "curvkit":
        w = _filled_window(d, m)

        def step():
            g = new[state["i"] % 4]
            state["i"] += 1
            w.push(g)
            return w.ihvp(g)
    else:
        a = _filled_anchor(d, m)

        def step():
            g = new[state["i"] % 4]
            state["i"] += 1
            a.push(g)
            return a.ihvp(g)
    benchmark.group = f"step-d{d}-m{m}"
    benchmark.extra_info.update(impl=impl, bytes=3 * m * d * 4)
    rounds = 3 if m * d >= 10**9 else 5
    out = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    assert out.shape == (d,) and bool(torch.isfinite(out).all())


CUDA_STEP_CASES = [(1_000_000, 256, "float32"), (1_000_000, 1024, "float32"), (100_000_000, 256, "bfloat16")]


@pytest.mark.skipif(not (torch.cuda.is_available() and curvkit.has_cuda()), reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("d, m, dtype", CUDA_STEP_CASES, ids=[f"d{d}-m{m}-{t}" for d, m, t in CUDA_STEP_CASES])
@pytest.mark.parametrize("impl", ["curvkit", "anchor"])
def test_step_cuda(benchmark, request, impl, d, m, dtype):
    """The step group on the GPU: curvkit stores G in `dtype` (bfloat16 at d = 1e8: 51 GB), the
    anchor in float32 (its only low-precision path); synchronized after each step."""
    _skip_large(request, True)
    storage = getattr(torch, dtype)
    new = [g.to(storage) for g in _rows(4, d, seed=1, device="cuda")]
    state = {"i": 0}
    obj = _filled_window(d, m, storage, "cuda") if impl == "curvkit" else _filled_anchor(d, m, "cuda")

    def step():
        g = new[state["i"] % 4]
        state["i"] += 1
        g = g if impl == "curvkit" else g.float()
        obj.push(g)
        out = obj.ihvp(g)
        torch.cuda.synchronize()
        return out

    benchmark.group = f"step-cuda-d{d}-m{m}-{dtype}"
    itemsize = 2 if (dtype == "bfloat16" and impl == "curvkit") else 4
    benchmark.extra_info.update(impl=impl, bytes=3 * m * d * itemsize)
    out = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert bool(torch.isfinite(out.float()).all())


@pytest.mark.parametrize("m, large", UPDATE_CASES, ids=[f"m{m}" for m, _ in UPDATE_CASES])
@pytest.mark.parametrize("impl", ["curvkit", "anchor"])
def test_update(benchmark, request, impl, m, large):
    _skip_large(request, large)
    d = 64
    new = _gradients(8, d, seed=1)
    state = {"i": 0}
    target = _filled_window(d, m) if impl == "curvkit" else _filled_anchor(d, m)

    def push():
        target.push(new[state["i"] % 8])
        state["i"] += 1

    benchmark.group = f"update-m{m}"
    # The anchor's setup: Cholesky (m^3/3), triangular inverse (m^3/3) and the products; curvkit's
    # push: two triangular solves and the row update (about 3 m^2), amortizing its refactor.
    benchmark.extra_info.update(impl=impl, flops=(2 * m ** 3 / 3 if impl == "anchor" else 3 * m ** 2))
    benchmark.pedantic(push, rounds=5 if m >= 1024 else 20, iterations=1, warmup_rounds=1)


def test_window_matches_anchor_float64():
    """The two implementations compute the same F^-1 x (float64, a full window)."""
    rng = np.random.default_rng(0)
    d, m = 300, 12
    G = torch.tensor(rng.standard_normal((3 * m, d)))
    damp = 1e-2
    w = curvkit.FisherWindow(d, m, damp, dtype=torch.float64)
    a = MFACDynamic(d, m, damp, dtype=torch.float64)
    for g in G:
        w.push(g)
        a.push(g)
    x = torch.tensor(rng.standard_normal(d))
    ours, theirs = w.ihvp(x), a.ihvp(x)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-10


# ---- Static and blockwise (pruning)

STATIC_CASES = [(100_000, 64, False), (1_000_000, 256, True)]
BLOCK_CASES = [(20_000, 50, 64, False), (1_000_000, 50, 64, True), (1_000_000, 128, 64, True)]


def _static_call(impl, what, G, x, damp, block=None):
    """One call from the gradients to the result, as each implementation does it."""
    if impl == "curvkit":
        if what == "ihvp":
            return lambda: curvkit.fisher_ihvp(G, x, damp, block_size=block)
        return lambda: curvkit.fisher_inverse_diag(G, damp, block_size=block)
    if impl == "mfac-static":
        if what == "ihvp":
            return lambda: MFACStatic(G, damp, block).mul(x)
        return lambda: MFACStatic(G, damp, block).diag()
    if impl == "torch-woodbury":
        return (lambda: torch_woodbury(G, x, damp)) if what == "ihvp" else (lambda: torch_woodbury_diag(G, damp))
    if impl == "obert":
        def build():
            inverse = OBERTBlockInverse(G.shape[1], G.shape[0], block, damp)
            for g in G:
                inverse.add_grad(g)
            return inverse
        return (lambda: build().mul(x)) if what == "ihvp" else (lambda: build().diag())
    raise AssertionError(impl)


@pytest.mark.parametrize("d, m, large", STATIC_CASES, ids=[f"d{d}-m{m}" for d, m, _ in STATIC_CASES])
@pytest.mark.parametrize("what", ["ihvp", "diag"])
@pytest.mark.parametrize("impl", ["curvkit", "mfac-static", "torch-woodbury"])
def test_static(benchmark, request, impl, what, d, m, large):
    _skip_large(request, large)
    G = _gradients(m, d)
    x = _gradients(1, d, seed=1)[0]
    damp = _damp(d, m)
    call = _static_call(impl, what, G, x, damp)
    benchmark.group = f"static-{what}-d{d}-m{m}"
    benchmark.extra_info.update(impl=impl, bytes=m * d * 4)
    rounds = 1 if (large and impl == "mfac-static") else 3
    out = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0 if large else 1)
    assert out.shape == (d,) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("d, B, m, large", BLOCK_CASES, ids=[f"d{d}-B{b}-m{m}" for d, b, m, _ in BLOCK_CASES])
@pytest.mark.parametrize("what", ["ihvp", "diag"])
@pytest.mark.parametrize("impl", ["curvkit", "obert", "mfac-static"])
def test_blocks(benchmark, request, impl, what, d, B, m, large):
    _skip_large(request, large)
    G = _gradients(m, d)
    x = _gradients(1, d, seed=1)[0]
    damp = _damp(B, m)  # ||g_b||^2 ~ B: kappa ~ 1e4 per block
    call = _static_call(impl, what, G, x, damp, B)
    benchmark.group = f"blocks-{what}-d{d}-B{B}-m{m}"
    benchmark.extra_info.update(impl=impl, bytes=m * d * 4)
    out = benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=0 if large else 1)
    assert out.shape == (d,) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("block", [None, 7, 40])
def test_static_anchors_match_float64(block):
    """The static and blockwise anchors compute curvkit's F^-1 x and diag(F^-1) (float64)."""
    rng = np.random.default_rng(1)
    m, d, damp = 12, 100, 1e-2
    G = torch.tensor(rng.standard_normal((m, d)))
    x = torch.tensor(rng.standard_normal(d))
    want = curvkit.fisher_ihvp(G, x, damp, block_size=block)
    want_diag = curvkit.fisher_inverse_diag(G, damp, block_size=block)
    anchors = [MFACStatic(G, damp, block)]
    if block is not None:
        obert = OBERTBlockInverse(d, m, block, damp, dtype=torch.float64)
        for g in G:
            obert.add_grad(g)
        anchors.append(obert)
    for a in anchors:
        assert float((a.mul(x) - want).norm() / want.norm()) < 1e-10
        assert float((a.diag() - want_diag).norm() / want_diag.norm()) < 1e-10
    if block is None:
        assert float((torch_woodbury(G, x, damp) - want).norm() / want.norm()) < 1e-10
        assert float((torch_woodbury_diag(G, damp) - want_diag).norm() / want_diag.norm()) < 1e-10


CUDA_BLOCK_CASES = [(10_000_000, 50, 64), (10_000_000, 128, 64)]


@pytest.mark.skipif(not (torch.cuda.is_available() and curvkit.has_cuda()), reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("d, B, m", CUDA_BLOCK_CASES, ids=[f"d{d}-B{b}-m{m}" for d, b, m in CUDA_BLOCK_CASES])
@pytest.mark.parametrize("what", ["ihvp", "diag"])
@pytest.mark.parametrize("impl", ["curvkit", "obert", "mfac-static"])
def test_blocks_cuda(benchmark, request, impl, what, d, B, m):
    """The blockwise group on the GPU (float32 G), synchronized after each call."""
    _skip_large(request, True)
    G = torch.randn(m, d, device="cuda")
    x = torch.randn(d, device="cuda")
    call = _static_call(impl, what, G, x, _damp(B, m), B)

    def synchronized():
        out = call()
        torch.cuda.synchronize()
        return out

    benchmark.group = f"blocks-cuda-{what}-d{d}-B{B}-m{m}"
    benchmark.extra_info.update(impl=impl, bytes=m * d * 4)
    out = benchmark.pedantic(synchronized, rounds=3, iterations=1, warmup_rounds=1)
    assert bool(torch.isfinite(out).all())


CUDA_SPARSE_CASES = [(100_000_000, 256, 32_768), (100_000_000, 256, 262_144)]


@pytest.mark.skipif(not (torch.cuda.is_available() and curvkit.has_cuda()), reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("d, m, block", CUDA_SPARSE_CASES, ids=[f"d{d}-m{m}-B{b}" for d, m, b in CUDA_SPARSE_CASES])
def test_sparse_step_cuda(benchmark, request, d, m, block):
    """A compressed window's step (push + ihvp of the new gradient), k = 1% of each selection
    block (EFCP's density), float32; the rate counts one read of the new gradient and of the
    stored rows (m nnz 8 bytes)."""
    _skip_large(request, True)
    k = max(1, block // 100)
    w = curvkit.SparseFisherWindow(d, m, k, damp=1e-4, block_size=block, like=torch.empty(0, device="cuda"))
    new = [torch.randn(d, device="cuda") for _ in range(2)]
    for i in range(m):
        w.push(new[i % 2])
    state = {"i": 0}

    def step():
        g = new[state["i"] % 2]
        state["i"] += 1
        w.push(g)
        out = w.ihvp(g)
        torch.cuda.synchronize()
        return out

    nnz = w.values.shape[1]
    benchmark.group = f"sparse-step-cuda-d{d}-m{m}-B{block}"
    benchmark.extra_info.update(impl="curvkit", bytes=4 * d + 8 * m * nnz)
    out = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert bool(torch.isfinite(out).all())
