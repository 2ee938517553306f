"""M-FAC family against dense float64 references: solve(damp I + G^T G / c, x)."""
import numpy as np
import pytest
from conftest import KERNEL_BACKENDS, TOL, backend_dtypes, is_cuda, make, needs_torch, to_numpy

import curvkit
from curvkit import ArgumentError
from curvkit.testing import fisher_inverse, fisher_matrix, fisher_solve
from curvkit.testing import gradient_window as gradients

F64 = TOL[("float64", "mfac")]


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def stored(values, backend, dtype):
    """values rounded to dtype as the backend's array, and the float64 values it holds."""
    a = make(values, backend, dtype)
    return a, to_numpy(a)


def window_bound(dtype, kappa):
    """The documented accuracy (docs/mfac.md): the dtype's rounding of the result plus float64
    rounding amplified by kappa, against the dense float64 solve on the stored inputs."""
    return TOL[(dtype, "mfac")] + TOL[("float64", "mfac_kappa")] * kappa


# ---------------------------------------------------------------------------------------
# Static

def test_static_ihvp_d4096_float64(rng):
    m, d = 128, 4096
    G, damp = gradients(rng, m, d, kappa=1e2)
    X = rng.standard_normal((d, 2))
    assert rel(curvkit.fisher_ihvp(G, X, damp), fisher_solve(G, X, damp)) < F64


@pytest.mark.parametrize("m, d", [(1, 7), (8, 64), (33, 100), (100, 257), (96, 1500), (1100, 24)])
def test_static_ihvp_diag_entries_float64(rng, m, d):
    G, damp = gradients(rng, m, d, kappa=1e2)
    x = rng.standard_normal(d)
    Finv = fisher_inverse(G, damp)
    assert rel(curvkit.fisher_ihvp(G, x, damp), Finv @ x) < F64
    X = rng.standard_normal((d, 3))
    assert rel(curvkit.fisher_ihvp(G, X, damp), Finv @ X) < F64
    assert rel(curvkit.fisher_inverse_diag(G, damp), np.diag(Finv)) < F64
    V = curvkit.fisher_inverse_factor(G, damp)
    rows = rng.integers(0, d, size=20)
    cols = np.concatenate([rows[:10], rng.integers(0, d, size=10)])
    assert rel(curvkit.fisher_inverse_entries(V, damp, rows, cols), Finv[rows, cols]) < F64
    assert np.isclose(float(curvkit.fisher_inverse_entries(V, damp, 0, d - 1)), Finv[0, d - 1], rtol=F64,
                      atol=F64 * abs(Finv).max())


@pytest.mark.parametrize("backend, dtype", backend_dtypes(["float32", "float64", "bfloat16"], of=KERNEL_BACKENDS)
                         + backend_dtypes(["bfloat16"]))
def test_static_backends_dtypes(backend, dtype, rng):
    m, d = 12, 300
    G, damp = gradients(rng, m, d)
    Gs, G64 = stored(G, backend, dtype)
    xs, x64 = stored(rng.standard_normal((d, 2)), backend, dtype)
    got = curvkit.fisher_ihvp(Gs, xs, damp)
    assert type(got) is type(Gs) and tuple(got.shape) == (d, 2)
    assert rel(to_numpy(got), fisher_solve(G64, x64, damp)) < window_bound(dtype, 1e3)
    diag = curvkit.fisher_inverse_diag(Gs, damp)
    assert rel(to_numpy(diag), np.diag(fisher_inverse(G64, damp))) < window_bound(dtype, 1e3)
    blocks = curvkit.fisher_ihvp(Gs, xs, damp, block_size=128)  # a last partial block of 44
    assert rel(to_numpy(blocks), fisher_solve(G64, x64, damp, block=128)) < window_bound(dtype, 1e3)
    diag = curvkit.fisher_inverse_diag(Gs, damp, block_size=128)
    assert rel(to_numpy(diag), np.diag(fisher_inverse(G64, damp, block=128))) < window_bound(dtype, 1e3)


def test_static_out_and_empty(rng):
    G, damp = gradients(rng, 5, 40)
    x = rng.standard_normal(40)
    out = np.empty(40)
    assert curvkit.fisher_ihvp(G, x, damp, out=out) is out
    assert rel(out, fisher_solve(G, x, damp)) < F64
    # No gradients: F = damp I.
    assert np.allclose(curvkit.fisher_ihvp(np.zeros((0, 40)), x, 0.5), x / 0.5, rtol=1e-15)
    assert np.allclose(curvkit.fisher_inverse_diag(np.zeros((0, 40)), 0.5), 2.0)


# ---------------------------------------------------------------------------------------
# Blockwise

@pytest.mark.parametrize("m, d, block", [(16, 100, 8), (16, 100, 30), (4, 90, 64), (8, 64, 64), (8, 50, 200),
                                         (1, 33, 32)])
def test_blockwise_float64(rng, m, d, block):
    G, damp = gradients(rng, m, d, kappa=1e2)
    X = rng.standard_normal((d, 2))
    Finv = fisher_inverse(G, damp, block=block)
    assert rel(curvkit.fisher_ihvp(G, X, damp, block_size=block), Finv @ X) < F64
    assert rel(curvkit.fisher_ihvp(G, X[:, 0], damp, block_size=block), Finv @ X[:, 0]) < F64
    assert rel(curvkit.fisher_inverse_diag(G, damp, block_size=block), np.diag(Finv)) < F64


def test_blockwise_equals_separate_calls(rng):
    """Each block is the static problem on its columns (batched = sequential)."""
    G, damp = gradients(rng, 10, 70)
    x = rng.standard_normal(70)
    whole = curvkit.fisher_ihvp(G, x, damp, block_size=32)
    for j0 in range(0, 70, 32):
        part = curvkit.fisher_ihvp(np.ascontiguousarray(G[:, j0:j0 + 32]), x[j0:j0 + 32].copy(), damp)
        assert rel(whole[j0:j0 + 32], part) < F64


# ---------------------------------------------------------------------------------------
# Sliding window

def fill(window, rows, backend=("numpy", "cpu"), dtype="float64"):
    for g in rows:
        window.push(make(g, backend, dtype))


@pytest.mark.parametrize("normalize", ["capacity", "count"])
@pytest.mark.parametrize("m, d", [(1, 10), (5, 40), (33, 200), (64, 1000)])
def test_window_equals_dense_of_last_m(rng, m, d, normalize):
    G, damp = gradients(rng, 3 * m + 2, d, kappa=1e2, scale=m)
    w = curvkit.FisherWindow(d, m, damp, dtype="float64", normalize=normalize)
    X = rng.standard_normal((d, 2))
    fill(w, G)
    assert (w.size, w.count) == (m, 3 * m + 2)
    last = G[-m:]
    assert rel(w.ihvp(X), fisher_solve(last, X, damp)) < F64
    assert rel(w.ihvp(X[:, 1]), fisher_solve(last, X[:, 1], damp)) < F64
    assert rel(w.diag(), np.diag(fisher_inverse(last, damp))) < F64
    # The state: rows by slot, oldest first, the Gram matrix and the factor of the capacitance.
    assert np.array_equal(to_numpy(w.G)[w.slots], last)
    K = to_numpy(w.gram)[np.ix_(w.slots, w.slots)]
    assert np.allclose(K, last @ last.T, rtol=1e-13, atol=1e-13 * abs(K).max())
    L = to_numpy(w.factor)
    assert np.allclose(L @ L.T, m * damp * np.eye(m) + K, rtol=1e-11, atol=1e-11 * abs(K).max())


@pytest.mark.parametrize("normalize", ["capacity", "count"])
def test_window_warm_up(rng, normalize):
    m, d = 20, 150
    G, damp = gradients(rng, m, d, kappa=1e2)
    w = curvkit.FisherWindow(d, m, damp, dtype="float64", normalize=normalize)
    x = rng.standard_normal(d)
    assert np.allclose(w.ihvp(x), x / damp, rtol=1e-15)  # empty: F = damp I
    for n in range(1, m):
        w.push(G[n - 1])
        scale = m if normalize == "capacity" else n
        assert rel(w.ihvp(x), fisher_solve(G[:n], x, damp, scale=scale)) < F64, n
    assert rel(w.diag(), np.diag(fisher_inverse(G[:m - 1], damp, scale=m if normalize == "capacity" else m - 1))) \
        < F64


def test_window_update_path_without_refactor(rng):
    """10 m pushes through the O(m^2) update alone (no periodic refactor) stay within the bound."""
    m, d = 24, 300
    G, damp = gradients(rng, 10 * m, d, kappa=1e3)
    w = curvkit.FisherWindow(d, m, damp, dtype="float64", refactor_every=10**9)
    x = rng.standard_normal(d)
    fill(w, G)
    assert rel(w.ihvp(x), fisher_solve(G[-m:], x, damp)) < F64
    assert rel(w.ihvp(G[-1]), fisher_solve(G[-m:], G[-1], damp)) < F64


def test_window_large_capacity(rng):
    """m > 1024 and not a multiple of 32 (the anchors' CUDA kernel limit)."""
    m, d = 1030, 12
    G, damp = gradients(rng, m + 40, d, kappa=10)
    w = curvkit.FisherWindow(d, m, damp, dtype="float64")
    fill(w, G)
    x = rng.standard_normal(d)
    assert rel(w.ihvp(x), fisher_solve(G[-m:], x, damp, scale=m)) < F64


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("d", [10_000, 70_000])
def test_window_results_do_not_depend_on_the_thread_count(rng, dtype, d):
    """Large enough for both threads: at d = 1e4 the passes over G split one column chunk's rows
    (the product with x) and its columns (G^T w) between them; at 7e4 they take a chunk each."""
    m = 16
    G, damp = gradients(rng, m + 3, d, kappa=1e2)
    x = rng.standard_normal(d).astype(dtype)
    previous = curvkit.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            curvkit.set_num_threads(threads)
            w = curvkit.FisherWindow(d, m, damp, dtype=dtype)
            fill(w, G, dtype=dtype)
            results.append((w.ihvp(x), np.array(w.gram), w.diag()))
    finally:
        curvkit.set_num_threads(previous)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)
    # Woodbury in float64 on the stored rows (a dense d x d solve would not fit)
    last, x64 = G[-m:].astype(dtype).astype(np.float64), x.astype(np.float64)
    want = (x64 - last.T @ np.linalg.solve(m * damp * np.eye(m) + last @ last.T, last @ x64)) / damp
    assert rel(results[0][0], want) < (F64 if dtype == "float64" else window_bound(dtype, 1e2))


@pytest.mark.parametrize("backend, dtype", backend_dtypes(["float32", "bfloat16"], of=KERNEL_BACKENDS)
                         + backend_dtypes(["bfloat16"]))
@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e5, 1e6, 1e7])
def test_window_kappa_sweep(backend, dtype, kappa, rng):
    """Low-precision storage: x in span(G) (the newest gradient, the optimizer's case) and x
    orthogonal to it stay at the dtype's rounding of the result up to kappa = 1e7, against the
    float64 solve on the stored values. The anchors' float32 arithmetic does not (checked)."""
    m, d = 16, 400
    G, damp = gradients(rng, 2 * m, d, kappa=kappa)
    Gs, G64 = stored(G, backend, dtype)
    w = curvkit.FisherWindow(d, m, damp, dtype=dtype, like=Gs)
    for i in range(2 * m):
        w.push(Gs[i])
    last = G64[-m:]
    Q, _ = np.linalg.qr(last.T)
    z = rng.standard_normal(d)
    xo, xo64 = stored(z - Q @ (Q.T @ z), backend, dtype)
    bound = window_bound(dtype, kappa)
    for x, x64 in [(Gs[2 * m - 1], last[-1]), (xo, xo64)]:
        ref = fisher_solve(last, x64, damp)
        assert rel(to_numpy(w.ihvp(x)), ref) < bound
        assert rel(to_numpy(curvkit.fisher_ihvp(Gs[m:], x, damp)), ref) < bound
    if kappa >= 1e5 and dtype == "float32":
        # M-FAC's algorithm in float32 arithmetic (its dynamic setup and products) misses it.
        g32, x32 = last.astype(np.float32), last[-1].astype(np.float32)
        C = m * np.float32(damp) * np.eye(m, dtype=np.float32) + g32 @ g32.T
        anchor = (x32 - g32.T @ np.linalg.solve(C, g32 @ x32)) / np.float32(damp)
        assert rel(anchor, fisher_solve(last, last[-1], damp)) > 10 * bound


@needs_torch
def test_window_torch_tensors(rng):
    import torch

    m, d = 6, 50
    G, damp = gradients(rng, 2 * m, d)
    w = curvkit.FisherWindow(d, m, damp, dtype=torch.float64, device=torch.device("cpu"))
    assert w.G.dtype == torch.float64 and w.dtype == "float64"
    grads = torch.tensor(G, requires_grad=True)
    for g in grads:
        w.push(g)  # detached for the native call
    x = torch.tensor(rng.standard_normal(d))
    got = w.ihvp(x)
    assert isinstance(got, torch.Tensor)
    assert rel(got.numpy(), fisher_solve(G[-m:], x.numpy(), damp)) < F64


def test_window_reset_damp_and_readonly_state(rng):
    m, d = 4, 30
    G, damp = gradients(rng, 6, d)
    w = curvkit.FisherWindow(d, m, damp, dtype="float64")
    fill(w, G)
    x = rng.standard_normal(d)
    w.damp = 2 * damp  # refactors
    assert rel(w.ihvp(x), fisher_solve(G[-m:], x, 2 * damp, scale=m)) < F64
    out = np.empty(d)
    assert w.ihvp(x, out=out) is out
    with pytest.raises(ValueError):
        w.G[0, 0] = 1.0
    with pytest.raises(ValueError):
        w.factor[0, 0] = 1.0
    w.reset()
    assert (w.size, w.count, w.slots) == (0, 0, [])
    assert np.allclose(w.ihvp(x), x / (2 * damp), rtol=1e-15)
    fill(w, G[:2])
    assert rel(w.ihvp(x), fisher_solve(G[:2], x, 2 * damp, scale=m)) < F64
    assert "FisherWindow(d=30, m=4" in repr(w)


def test_window_dense_matrix_check(rng):
    """diag() against the dense inverse's diagonal at low precision storage."""
    m, d = 10, 120
    G, damp = gradients(rng, m, d, kappa=1e5)
    w = curvkit.FisherWindow(d, m, damp, dtype="float32")
    Gs = G.astype(np.float32)
    for g in Gs:
        w.push(g)
    ref = np.diag(np.linalg.inv(fisher_matrix(Gs.astype(np.float64), damp)))
    assert rel(w.diag(), ref) < window_bound("float32", 1e5)


# ---------------------------------------------------------------------------------------
# Compressed (EFCP) windows

@pytest.mark.parametrize("normalize", ["capacity", "count"])
@pytest.mark.parametrize("d, m, k, block", [(300, 5, 7, None), (1000, 6, 4, 96), (70_000, 3, 5, 40_000),
                                            (50, 4, 60, 20)])
def test_sparse_window_equals_dense_of_densified(rng, d, m, k, block, normalize):
    """Block sizes past 32767 (the anchors' int16 indices wrap there), a last partial block, k
    larger than a block: the products equal the dense solve on the densified rows."""
    damp = 1e-2
    w = curvkit.SparseFisherWindow(d, m, k, damp, block_size=block, dtype="float64", normalize=normalize)
    G = rng.standard_normal((3 * m + 1, d))
    for g in G:
        w.push(g)
    S = w.densified()[w.slots]
    nnz = w.values.shape[1]
    assert (S != 0).sum(axis=1).max() <= nnz
    X = rng.standard_normal((d, 2))
    # F is damp I outside the rows' support: the dense solve there is on the support's columns.
    support = np.flatnonzero(np.any(S != 0, axis=0))
    ref = X / damp
    scale = m if normalize == "capacity" else min(w.count, m)
    ref[support] = fisher_solve(S[:, support], X[support], damp, scale=scale)
    assert rel(w.ihvp(X), ref) < F64
    assert rel(w.ihvp(X[:, 0]), ref[:, 0]) < F64
    dense = curvkit.FisherWindow(d, m, damp, dtype="float64", normalize=normalize)
    for s in S:
        dense.push(s)
    if normalize == "capacity" or w.count == w.size:
        assert rel(dense.ihvp(X), w.ihvp(X)) < F64


def test_sparse_window_selection_and_error_feedback(rng):
    d, k, block = 1000, 6, 300
    w = curvkit.SparseFisherWindow(d, 2, k, 1e-2, block_size=block, dtype="float64")
    w.push(rng.standard_normal(d))
    e_before = np.array(w.error)
    g = rng.standard_normal(d)
    w.push(g)
    acc = e_before + g
    slot = w.slots[-1]
    idx, val = np.array(w.indices[slot]), np.array(w.values[slot])
    assert idx.dtype == np.int32 and np.all(np.diff(idx) > 0)
    for b0 in range(0, d, block):
        in_block = idx[(idx >= b0) & (idx < b0 + block)]
        assert len(in_block) == min(k, min(d, b0 + block) - b0)
        top = np.argsort(-np.abs(acc[b0:b0 + block]), kind="stable")[:len(in_block)] + b0
        assert set(in_block) == set(top)
    assert np.array_equal(val, acc[idx])
    dense_row = np.zeros(d)
    dense_row[idx] = val
    assert np.array_equal(np.array(w.error) + dense_row, acc)  # nothing lost


@needs_torch
def test_sparse_window_bfloat16_and_float32(rng):
    import torch

    d, m, k = 2000, 4, 50
    for dtype in (torch.float32, torch.bfloat16):
        w = curvkit.SparseFisherWindow(d, m, k, 1e-1, block_size=500, dtype=dtype, like=torch.zeros(1))
        G = torch.tensor(rng.standard_normal((2 * m, d))).to(dtype)
        for g in G:
            w.push(g)
        assert w.indices.dtype == torch.int32 and w.error.dtype == torch.float32
        S = w.densified()[w.slots]
        x = G[-1]
        ref = fisher_solve(S, x.double().numpy(), 1e-1, scale=m)
        name = str(dtype).replace("torch.", "")
        assert rel(w.ihvp(x).double().numpy(), ref) < window_bound(name, 1e3)


def test_sparse_window_refuses_bad_gradients_unchanged(rng):
    w = curvkit.SparseFisherWindow(40, 3, 4, 1e-2, dtype="float64")
    for g in rng.standard_normal((4, 40)):
        w.push(g)
    before = [np.array(a) for a in (w.indices, w.values, w.error, w.gram, w.factor)] + [w.slots, w.count]
    bad = rng.standard_normal(40)
    bad[7] = np.nan
    with pytest.raises(ValueError, match="'g' contains NaN"):
        w.push(bad)
    with pytest.raises(ValueError, match="'g' must have shape"):
        w.push(np.zeros(39))
    with pytest.raises(TypeError, match="'g' must have the window's dtype"):
        w.push(np.zeros(40, dtype=np.float32))
    after = [np.array(a) for a in (w.indices, w.values, w.error, w.gram, w.factor)] + [w.slots, w.count]
    assert all(np.array_equal(a, b) for a, b in zip(before[:5], after[:5])) and before[5:] == after[5:]
    w.reset()
    assert w.size == 0 and not np.array(w.error).any()


# ---------------------------------------------------------------------------------------
# Every kernel path (CPU, and CUDA where there is one): refusals, result checks, blockwise
# routes and compressed windows

def refuse_push(window, g, backend):
    """Push a gradient the window must refuse: raised by the push on the CPU; on CUDA the push
    does not wait for the device and the next check raises."""
    if is_cuda(backend):
        window.push(g)
        with pytest.raises(ArgumentError, match="refused on the device"):
            window.check()
    else:
        with pytest.raises(ArgumentError, match="argument 'g'"):
            window.push(g)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_refused_push_leaves_the_window_as_it_was(backend, sparse, rng):
    m, d, damp = 4, 60, 1e-1
    G = rng.standard_normal((6, d))
    new = (lambda: curvkit.SparseFisherWindow(d, m, 8, damp, block_size=20, dtype="float64",
                                              like=make(np.zeros(1), backend))) if sparse else \
        (lambda: curvkit.FisherWindow(d, m, damp, dtype="float64", like=make(np.zeros(1), backend)))
    w, reference = new(), new()
    for g in G[:5]:
        w.push(make(g, backend))
        reference.push(make(g, backend))
    bad = G[5].copy()
    bad[3] = np.nan
    refuse_push(w, make(bad, backend), backend)
    huge = G[5] * 1e8  # ||g||^2 / (m damp) ~ 1e18 > 1e12
    refuse_push(w, make(huge, backend), backend)
    assert (w.size, w.count, w.slots) == (reference.size, reference.count, reference.slots)
    x = make(rng.standard_normal(d), backend)
    assert rel(to_numpy(w.ihvp(x)), to_numpy(reference.ihvp(x))) < F64
    if is_cuda(backend):
        # A refusal is also reported by the next product, with the pushes after it dropped.
        w.push(make(bad, backend))
        w.push(make(G[0], backend))
        with pytest.raises(ArgumentError, match="push 1 of the 2 since the last check"):
            w.ihvp(x)
        assert (w.size, w.count) == (reference.size, reference.count)
        assert rel(to_numpy(w.ihvp(x)), to_numpy(reference.ihvp(x))) < F64
    w.push(make(G[0], backend))  # the window goes on
    reference.push(make(G[0], backend))
    assert rel(to_numpy(w.ihvp(x)), to_numpy(reference.ihvp(x))) < F64


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_results_beyond_the_dtype_are_refused(backend, rng):
    d = 20
    G = make(rng.standard_normal((3, d)), backend, "float32")
    x = make(np.full(d, 1e36), backend, "float32")
    with pytest.raises(ArgumentError, match="not finite in float32"):
        curvkit.fisher_ihvp(G, x, 1e-4)
    with pytest.raises(ArgumentError, match="not finite in float32"):
        curvkit.fisher_ihvp(G, x, 1e-4, block_size=8)
    w = curvkit.FisherWindow(d, 2, 1e-4, dtype="float32", like=G)
    w.push(G[0])
    with pytest.raises(ArgumentError, match="not finite in float32"):
        w.ihvp(x)
    assert w.size == 1  # the window itself is fine
    assert np.isfinite(to_numpy(w.ihvp(G[1]))).all()


@pytest.mark.parametrize("backend, dtype", backend_dtypes(["float32", "float64"], of=KERNEL_BACKENDS))
@pytest.mark.parametrize("m, d, block", [(16, 100, 8), (16, 100, 16), (4, 90, 30), (6, 1000, 96), (5, 7, 50)])
def test_blockwise_routes_backends(backend, dtype, m, d, block, rng):
    """Both routes (dense B x B when B <= m, Woodbury when B > m), a last partial block, and on
    CUDA blocks batched in groups."""
    G, damp = gradients(rng, m, d, kappa=1e2)
    Gs, G64 = stored(G, backend, dtype)
    xs, x64 = stored(rng.standard_normal((d, 3)), backend, dtype)
    bound = window_bound(dtype, 1e2)
    got = curvkit.fisher_ihvp(Gs, xs, damp, block_size=block)
    assert rel(to_numpy(got), fisher_solve(G64, x64, damp, block=block)) < bound
    got = curvkit.fisher_ihvp(Gs, xs[:, 0], damp, block_size=block)
    assert rel(to_numpy(got), fisher_solve(G64, x64[:, 0], damp, block=block)) < bound
    diag = curvkit.fisher_inverse_diag(Gs, damp, block_size=block)
    assert rel(to_numpy(diag), np.diag(fisher_inverse(G64, damp, block=block))) < bound
    empty = curvkit.fisher_ihvp(Gs, make(np.zeros((d, 0)), backend, dtype), damp, block_size=block)
    assert tuple(empty.shape) == (d, 0)


def top_k_reference(acc, k, block):
    """The columns a compressed window keeps from acc: the k largest |acc| per block, ties to the
    smaller index, ascending."""
    chosen = []
    for b0 in range(0, len(acc), block):
        part = np.abs(acc[b0:b0 + block])
        order = np.lexsort((np.arange(len(part)), -part))[:min(k, len(part))]
        chosen.extend(sorted(order + b0))
    return np.array(chosen)


@pytest.mark.parametrize("backend, dtype", backend_dtypes(["float32", "float64", "bfloat16"], of=KERNEL_BACKENDS)
                         + backend_dtypes(["bfloat16"]))
@pytest.mark.parametrize("d, k, block", [(500, 7, None), (1000, 3, 96), (40_000, 5, 33_000), (64, 40, 16)])
def test_sparse_window_backends(backend, dtype, d, k, block, rng):
    """Selection (ties included: repeated magnitudes), error feedback and products on every
    kernel path, against the NumPy selection and the dense solve on the densified rows."""
    m, damp = 3, 1e-1
    w = curvkit.SparseFisherWindow(d, m, k, damp, block_size=block, dtype=dtype, like=make(np.zeros(1), backend))
    G = np.round(rng.standard_normal((2 * m, d)), 1)  # many equal magnitudes
    error = np.zeros(d)
    for g in G:
        gs, g64 = stored(g, backend, dtype)
        acc = error + g64
        w.push(gs)
        slot = w.slots[-1]
        idx = to_numpy(w.indices[slot]).astype(np.int64)
        assert np.array_equal(idx, top_k_reference(acc, k, block or d))
        error = to_numpy(w.error)
        kept = np.zeros(d)
        kept[idx] = to_numpy(w.values[slot])
        assert np.allclose(error + kept, acc, rtol=0, atol=4 * np.abs(acc).max() * TOL[(dtype, "mfac")])
    S = w.densified()[w.slots]
    xs, x64 = stored(rng.standard_normal((d, 2)), backend, dtype)
    # float64 Woodbury on the densified rows (a dense d x d solve would not fit at d = 40000)
    ref = (x64 - S.T @ np.linalg.solve(m * damp * np.eye(len(S)) + S @ S.T, S @ x64)) / damp
    assert rel(to_numpy(w.ihvp(xs)), ref) < window_bound(dtype, 1e3)
