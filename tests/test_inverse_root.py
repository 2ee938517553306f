"""Inverse p-th roots and eigh against float64 eigh references: conditioning sweeps, ridge,
rank deficiency, warm starts, ragged lists, failure policy."""
import numpy as np
import pytest
from conftest import KERNEL_BACKENDS, TOL, backend_dtypes, is_cuda, make, needs_torch, to_numpy

import curvkit
from curvkit import testing as reference


def root_reference(A, p, eps=0.0):
    w, V = np.linalg.eigh(np.asarray(A, dtype=np.float64))
    w = np.maximum(w, 0) + eps
    return (V * w[..., None, :] ** (-1.0 / p)) @ np.swapaxes(V, -1, -2)


def rel(x, y):
    return np.linalg.norm(x - y) / np.linalg.norm(y)


# TOL[(dtype, "root_" + method)]: relative error a method may add beyond its input's
# conditioning, measured over the sweeps below with margin (n = 64).
# "auto" is LAPACK's eigh on the CPU and the Newton iteration on CUDA.
AUTO = {"cpu": "eigh", "cuda": "newton"}
U64 = np.finfo(np.float64).eps / 2
U32 = np.finfo(np.float32).eps / 2


def float64_bound(method, p, cond, eps):
    """Error bound of a float64 root: the float64 input's own rounding moves the root by up
    to its relative condition number (about effective condition / p) times the unit
    roundoff, whatever the method (measured up to 0.5x that from condition 1e3 on; 4x
    allowed). A float64 reference is off by as much, hence reference.inverse_root, computed
    in extended precision."""
    effective = min(cond, 1 / eps) if eps else cond
    return max(TOL[("float64", "root_" + method)], 4 * U64 * effective / p)


def permuted_copies(rng, A, k):
    """A and k - 1 symmetric permutations P A P^T of it: different matrices in one batch whose
    roots are the same permutations of A's root (exactly), so one reference serves them all."""
    perms = [np.arange(A.shape[-1])] + [rng.permutation(A.shape[-1]) for _ in range(k - 1)]
    return np.stack([A[np.ix_(q, q)] for q in perms]), perms


@pytest.mark.skipif(not reference.EXTENDED, reason="needs an extended-precision np.longdouble")
@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("cond, eps", [(1e2, 0.0), (1e3, 0.0), (1e6, 0.0), (1e6, 1e-6), (1e10, 1e-6)])
@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float64_conditioning_sweep(backend, p, cond, eps, method, rng):
    A = reference.spd_with_condition(rng, 64, cond)
    batch, perms = permuted_copies(rng, A, 3)
    X, info = curvkit.matrix_inverse_root(make(batch, backend), p, eps=eps, method=method, return_info=True)
    assert info["converged"].all() and (info["method"] == method).all()
    expected = reference.inverse_root(A, p, eps)
    for x, q in zip(to_numpy(X), perms):
        assert rel(x, expected[np.ix_(q, q)]) <= float64_bound(method, p, cond, eps)


@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float32_up_to_condition_1e3(backend, p, method, rng):
    A = np.stack([reference.spd_with_condition(rng, 64, 1e3) for _ in range(3)]).astype(np.float32)
    X, info = curvkit.matrix_inverse_root(make(A, backend), p, method=method, return_info=True)
    assert str(X.dtype).endswith("float32") and info["converged"].all() and not info["fell_back"].any()
    assert rel(to_numpy(X), root_reference(A, p)) <= float32_bound(method, p, 1e3)


def float32_bound(method, p, cond):
    """Error bound of a float32 root of a float32 input: a method that is backward stable
    in float32 (error u ||A|| in A) moves the root by up to about cond / p times u, as the input's
    rounding does in float64_bound (LAPACK's float32 eigh: up to 2.2 u cond / p over 20 batches
    at condition 1e3; cuSOLVER's batched syev 3.4 at p = 2); 4x allowed."""
    return max(TOL[("float32", "root_" + method)], 4 * U32 * cond / p)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_newton_goes_on_when_its_first_step_grows_the_largest_entry(backend):
    # M_0 = z A holds eigenvalues up to (p + 1) / 2.5 while max|M_0 - I| may be below 1; the
    # first step then grows that entry (0.48 to over 0.58), which once ended the iteration and
    # sent 12 of these 40 matrices (p = 8, condition 1e2) to the eigh fallback.
    A = np.stack([reference.spd_with_condition(np.random.default_rng(seed), 64, 1e2) for seed in range(40)])
    X, info = curvkit.matrix_inverse_root(make(A, backend), 8, method="newton", return_info=True)
    assert (info["method"] == "newton").all() and info["converged"].all()
    expected = np.stack([reference.inverse_root(a, 8) for a in A]) if reference.EXTENDED else root_reference(A, 8)
    for x, e in zip(to_numpy(X), expected):
        assert rel(x, e) <= float64_bound("newton", 8, 1e2, 0.0)


def test_float32_beyond_its_range_falls_back_to_float64(rng):
    A = reference.spd_with_condition(rng, 64, 1e7).astype(np.float32)
    X, info = curvkit.matrix_inverse_root(A, 4, method="newton", return_info=True)
    assert info["fell_back"] and info["method"] == "eigh" and info["converged"]
    assert rel(X, root_reference(A, 4)) <= 1e-5  # float64 eigh, rounded to float32
    _, info = curvkit.matrix_inverse_root(A, 4, method="eigh", return_info=True)
    assert info["converged"] and info["unresolved"] > 0  # float32 eigh cannot resolve it, and says so


def test_a_float32_accumulated_rank_deficient_factor_is_floored_not_refused(rng):
    # Distributed Shampoo's pattern: a rank-32 factor, an EMA of outer products accumulated in
    # float32, rooted in float64. Rounding leaves eigenvalues below zero (-2.8e-8 of the largest
    # here, beyond the old sqrt(u) "clearly negative" line): floored, as the anchors do.
    A = reference.float32_accumulated_factor(rng).astype(np.float64)
    w, V = np.linalg.eigh((A + A.T) / 2)
    eps = 1e-12 * w[-1]
    X, info = curvkit.matrix_inverse_root(A, 4, eps=eps, return_info=True)
    assert info["converged"] and info["negative"] < -1.5e-8 and info["unresolved"] == 0
    want = (V * (np.maximum(w, 0) + eps) ** -0.25) @ V.T
    assert rel(X, want) <= 1e-8


def test_diagonal_identity_sizes_one_and_two(rng):
    for n in (1, 2, 5):
        d = rng.uniform(0.1, 10, n)
        for method in ("eigh", "newton"):
            X = curvkit.matrix_inverse_root(np.diag(d), 4, method=method)
            np.testing.assert_allclose(X, np.diag(d ** -0.25), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(curvkit.matrix_inverse_root(np.eye(7), 2), np.eye(7))


def test_rank_deficient_gram_matrices(rng):
    G = rng.standard_normal((32, 8))
    A = G @ G.T / 8  # rank 8 of 32
    X = curvkit.matrix_inverse_root(A, 4, eps=1e-3)
    np.testing.assert_allclose(X, root_reference(A, 4, 1e-3), rtol=1e-10, atol=1e-12)
    X, info = curvkit.matrix_inverse_root(A, 4, return_info=True)  # no ridge: the pseudo-inverse root
    w, V = np.linalg.eigh(A)
    kept = w > 1e-8 * w.max()
    np.testing.assert_allclose(X, (V[:, kept] * w[kept] ** -0.25) @ V[:, kept].T, rtol=1e-10, atol=1e-12)
    assert info["converged"] and info["unresolved"] == 24 and info["negative"] > -1e-12
    Z, info = curvkit.matrix_inverse_root(np.zeros((3, 3)), 2, eps=1e-4, return_info=True)
    np.testing.assert_allclose(Z, 100 * np.eye(3))
    assert info["converged"]


def test_warm_start(backend, rng):
    A = reference.spd_with_condition(rng, 48, 1e3)
    exact = root_reference(A, 4)
    X, info = curvkit.matrix_inverse_root(make(A, backend), 4, method="newton", init=make(exact, backend),
                                          return_info=True)
    assert info["iterations"] <= 2 and info["converged"] and not info["fell_back"]
    np.testing.assert_allclose(to_numpy(X), exact, rtol=0, atol=1e-12 * np.abs(exact).max())
    # after a drift, the answer equals a cold start's (the residual check sends an inexact
    # warm start to the fallback)
    D = rng.standard_normal((48, 48))
    A2 = make(A + 1e-3 * D @ D.T / 48, backend)
    warm = curvkit.matrix_inverse_root(A2, 4, method="newton", init=make(exact, backend))
    cold = curvkit.matrix_inverse_root(A2, 4, method="newton")
    assert rel(to_numpy(warm), to_numpy(cold)) < 1e-10


def drifting_factors(rng, n, steps, dtype, cond=1e3, beta=0.999, k=32):
    """Shampoo-like factors: an EMA of sample covariances G G^T / k of a fixed spectrum."""
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    C = (Q * np.logspace(0, -np.log10(cond), n)) @ Q.T
    chol = np.linalg.cholesky(C)
    A = C
    for _ in range(steps):
        G = chol @ rng.standard_normal((n, k))
        A = beta * A + (1 - beta) * G @ G.T / k
        yield A.astype(dtype)


@pytest.mark.parametrize("dtype, steps_max", [("float64", 5), ("float32", 3)])
@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_basis_warm_start_matches_a_cold_eigh_root(backend, dtype, steps_max, p, rng):
    # the refinement on every device: the same verdicts, roots and refined bases
    n = 96
    V = make(np.zeros((2, n, n)), backend, dtype)  # no basis yet: decomposed from scratch
    tol = TOL[(dtype, "root_eigh")]
    factors = [drifting_factors(np.random.default_rng(seed), n, 3, np.float64) for seed in rng.integers(0, 2**32, 2)]
    for t, pair in enumerate(zip(*factors)):
        A = np.stack(pair)
        X, info = curvkit.matrix_inverse_root(make(A, backend, dtype), p, eps=1e-6, basis=V, return_info=True)
        assert info["converged"].all() and (info["method"] == "eigh").all()
        assert (info["fell_back"] == (t == 0)).all()
        if t:
            assert ((1 <= info["iterations"]) & (info["iterations"] <= steps_max)).all()
            # an evaluation is A V, V^T A V and V^T V, a step V E, the end the rebuild; on CUDA a
            # symmetric product counts its share of a plain one, all of it below n = 768
            steps = info["iterations"]
            assert (info["products"] <= 3 * (steps + 1) + steps + 1).all()
        assert str(X.dtype).endswith(dtype) and rel(to_numpy(X), root_reference(A, p, 1e-6)) <= tol
        # the basis was refined in place: orthonormal eigenvectors of A, ascending
        Vn = to_numpy(V)
        w = np.einsum("bij,bik,bkj->bj", Vn, A, Vn)
        assert np.all(np.diff(w, axis=-1) >= 0)
        np.testing.assert_allclose(np.swapaxes(Vn, -1, -2) @ Vn, np.broadcast_to(np.eye(n), Vn.shape),
                                   atol=50 * np.finfo(dtype).eps)
    (w, Vs), info = curvkit.eigh(make(A, backend, dtype), basis=V, return_info=True)
    assert (info["iterations"] >= 0).all() and info["converged"].all()  # already refined: converges at once
    np.testing.assert_allclose(to_numpy(w), np.linalg.eigvalsh(A), rtol=0, atol=100 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("p", [2, 4])
def test_products_count_the_work_and_the_warm_refresh_saves_3x(dtype, p, rng):
    powers = {2: 1, 4: 2}[p]
    before, after = drifting_factors(rng, 128, 2, dtype)
    _, cold = curvkit.matrix_inverse_root(after, p, method="newton", return_info=True)
    assert cold["products"] == cold["iterations"] * (powers + 2) + powers + 1  # steps + residual check
    _, info = curvkit.matrix_inverse_root(after, p, method="eigh", return_info=True)
    assert info["products"] == 0.5  # the syrk after LAPACK
    V = curvkit.eigh(before)[1].copy()
    _, warm = curvkit.matrix_inverse_root(after, p, basis=V, return_info=True)
    assert not warm["fell_back"]
    # per step 2 products to evaluate S and R, 1 to correct; the confirming evaluation is
    # skipped when the last correction was below rounding
    k = warm["iterations"]
    assert warm["products"] in (3 * k + 0.5, 3 * k + 2.5)
    assert cold["products"] >= 3 * warm["products"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_basis_refinement_separates_mixed_nearly_equal_eigenvalues(dtype, rng):
    # two eigenvalues 1e-9 apart whose eigenvectors rotated by 0.7 rad since the basis was
    # taken: far outside first-order refinement, diagonalized exactly as a group instead
    n = 64
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.logspace(0, -2, n)
    lam[10] = lam[11] * (1 + 1e-9)
    V = curvkit.eigh((Q * lam) @ Q.T)[1].astype(dtype)
    V0 = V.copy()
    c, s = np.cos(0.7), np.sin(0.7)
    Q[:, [10, 11]] = Q[:, [10, 11]] @ np.array([[c, -s], [s, c]])
    lam = lam * (1 + 1e-4 * rng.standard_normal(n))
    A = ((Q * lam) @ Q.T).astype(dtype)
    (w, U), info = curvkit.eigh(A, basis=V, return_info=True)
    assert 1 <= info["iterations"] <= 4 and info["converged"]
    np.testing.assert_allclose(w, np.sort(lam), rtol=0, atol=30 * np.finfo(dtype).eps)
    residual = A.astype(np.float64) @ U - U * w
    assert np.abs(residual).max() <= 30 * np.finfo(dtype).eps
    np.testing.assert_array_equal(V, V0)  # eigh reads the basis, matrix_inverse_root refines it
    X = curvkit.matrix_inverse_root(A, 2, basis=V)
    assert rel(X, root_reference(A, 2)) <= TOL[("float64" if dtype == np.float64 else "float32", "root_eigh")]


def test_basis_too_far_off_falls_back_to_a_full_decomposition(rng):
    # a dense spectrum (relative gaps 1%) under a random drift of 1e-2 ||A||: eigenvectors
    # rotate too far for refinement; the answer is LAPACK's, reported as fell_back
    A = reference.spd_with_condition(rng, 128, 1e2)
    V = curvkit.eigh(A)[1]
    D = rng.standard_normal((128, 128))
    A2 = A + 1e-2 * (D + D.T) / np.linalg.norm(D + D.T, 2)
    X, info = curvkit.matrix_inverse_root(A2, 4, basis=V, return_info=True)
    assert info["fell_back"] and info["converged"]
    assert rel(X, root_reference(A2, 4)) <= TOL[("float64", "root_eigh")]
    np.testing.assert_allclose(V @ np.diag(np.linalg.eigvalsh(A2)) @ V.T, A2, atol=1e-12)
    (_, U), info = curvkit.eigh(A2, basis=np.eye(128), return_info=True)
    assert info["iterations"] == -1


def test_basis_lists_and_errors(rng):
    blocks = [reference.spd_with_condition(rng, n, 1e2) for n in (12, 7)]
    bases = [curvkit.eigh(b)[1] for b in blocks]
    roots, infos = curvkit.matrix_inverse_root([b * 1.001 for b in blocks], 4, basis=bases, return_info=True)
    assert all(not i["fell_back"] and i["iterations"] <= 2 for i in infos)
    for A, X in zip(blocks, roots):
        assert rel(X, root_reference(A * 1.001, 4)) < 1e-13
    A = blocks[0]
    with pytest.raises(ValueError, match="'basis' warm-starts method 'eigh'"):
        curvkit.matrix_inverse_root(A, 2, method="newton", basis=bases[0])
    with pytest.raises(ValueError, match="'basis'.*same shape|same shape.*'basis'"):
        curvkit.matrix_inverse_root(A, 2, basis=np.eye(5))
    with pytest.raises(ValueError, match="'basis' must be C-contiguous"):
        curvkit.matrix_inverse_root(A, 2, basis=np.asfortranarray(bases[0] + 0))
    with pytest.raises(ValueError, match="'basis' must match"):
        curvkit.matrix_inverse_root(A, 2, basis=bases)
    frozen = bases[0].copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="'basis'"):
        curvkit.matrix_inverse_root(A, 2, basis=frozen)


def test_keep_init_when_everything_fails(backend, rng):
    A = make(-np.eye(4), backend)  # negative definite: no root (not a rounding floor)
    init = 0.5 * np.eye(4)
    X, info = curvkit.matrix_inverse_root(A, 2, method="newton", init=make(init, backend), return_info=True)
    assert info["kept_init"] and not info["converged"]
    np.testing.assert_array_equal(to_numpy(X), init)


@pytest.mark.parametrize("dtypes", [("float64",), ("float64", "float32")], ids=["float64", "mixed"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ragged_list_in_one_call(backend, dtypes, rng):
    sizes = [1024 // 8, 768 // 8] * 4 + [5, 1]
    blocks = [reference.spd_with_condition(rng, n, 1e2) for n in sizes]
    kinds = [dtypes[i % len(dtypes)] for i in range(len(sizes))]
    roots, infos = curvkit.matrix_inverse_root([make(b, backend, d) for b, d in zip(blocks, kinds)], 4, eps=1e-6,
                                               return_info=True)
    assert len(roots) == len(blocks) and all(i["converged"] for i in infos)
    for A, X, d in zip(blocks, roots, kinds):
        assert tuple(X.shape) == A.shape and str(X.dtype).endswith(d)
        assert rel(to_numpy(X), root_reference(A, 4, 1e-6)) < (1e-12 if d == "float64" else 1e-4)
    stacked = np.stack([reference.spd_with_condition(rng, 16, 10) for _ in range(6)]).reshape(2, 3, 16, 16)
    X, info = curvkit.matrix_inverse_root(make(stacked, backend), 2, return_info=True)
    assert info["converged"].shape == (2, 3) and info["converged"].all()
    np.testing.assert_allclose(to_numpy(X), root_reference(stacked, 2), atol=1e-12)


def test_empty_matrices(backend):
    X, info = curvkit.matrix_inverse_root(make(np.zeros((3, 0, 0)), backend), 2, return_info=True)
    assert tuple(X.shape) == (3, 0, 0) and info["converged"].shape == (3,) and info["converged"].all()
    w, V = curvkit.eigh(make(np.zeros((2, 0, 0)), backend))
    assert tuple(w.shape) == (2, 0) and tuple(V.shape) == (2, 0, 0)
    assert tuple(curvkit.matrix_inverse_root(make(np.zeros((0, 4, 4)), backend), 2).shape) == (0, 4, 4)


def test_eigh(backend, rng):
    A = np.stack([reference.spd_with_condition(rng, 20, 1e3) - 0.1 * np.eye(20) for _ in range(3)])
    w, V = curvkit.eigh(make(A, backend))
    w, V = to_numpy(w), to_numpy(V)
    np.testing.assert_allclose(w, np.linalg.eigvalsh(A), atol=1e-14)
    np.testing.assert_allclose(V @ (w[..., None] * np.swapaxes(V, -1, -2)), A, atol=1e-13)
    pairs = curvkit.eigh([make(A[0], backend), make(A[1, :5, :5].copy(), backend, "float32")])
    assert [tuple(p[0].shape) for p in pairs] == [(20,), (5,)]
    np.testing.assert_allclose(to_numpy(pairs[1][0]), np.linalg.eigvalsh(A[1, :5, :5]), atol=1e-5)
    w32, V32 = curvkit.eigh(make(A[0], backend, "float32"))
    assert str(w32.dtype).endswith("float32") and np.allclose(to_numpy(w32), w[0], atol=1e-5)


@needs_torch
def test_torch_tensors():
    import torch

    A = torch.from_numpy(reference.spd_with_condition(np.random.default_rng(0), 32, 1e2))
    X = curvkit.matrix_inverse_root(A.float(), 4)
    assert isinstance(X, torch.Tensor) and X.dtype == torch.float32
    assert rel(X.double().numpy(), root_reference(A.numpy(), 4)) < 1e-5


@pytest.mark.parametrize(
    "A, kwargs, error, match",
    [
        (np.array([[1.0, 2.0], [0.0, 1.0]]), {}, ValueError, "'A' must be symmetric"),
        (np.array([[np.inf, 0.0], [0.0, 1.0]]), {}, ValueError, "NaN or Inf"),
        (np.ones((2, 3)), {}, ValueError, r"\(\.\.\., n, n\)"),
        (np.eye(2, dtype=np.int32), {}, TypeError, "'A'"),
        (np.eye(2), {"p": 0}, ValueError, "'p'"),
        (np.eye(2), {"p": 1.5}, TypeError, "'p'"),
        (np.eye(2), {"eps": -1.0}, ValueError, "'eps'"),
        (np.eye(2), {"method": "svd"}, ValueError, "'method'"),
        (np.eye(2), {"init": np.eye(3)}, ValueError, "same shape"),
        (np.eye(2), {"init": [np.eye(2)]}, ValueError, "'init' must match"),
    ],
)
def test_errors(A, kwargs, error, match):
    kwargs.setdefault("p", 2)
    with pytest.raises(error, match=match):
        curvkit.matrix_inverse_root(A, **kwargs)


@pytest.mark.parametrize("shape", [(6, 6), (40, 12), (3, 20, 20), (3, 40, 12)])
def test_orthonormalize_qr(backend, shape, rng):
    Q = rng.standard_normal(shape)
    R = to_numpy(curvkit.orthonormalize(make(Q, backend), "qr"))
    k = shape[-1]
    identity = np.broadcast_to(np.eye(k), R.shape[:-2] + (k, k))
    np.testing.assert_allclose(np.swapaxes(R, -1, -2) @ R, identity, atol=1e-13)
    q, r = np.linalg.qr(Q)
    expected = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]  # Gram-Schmidt basis
    np.testing.assert_allclose(R, expected, atol=1e-12)
    R32 = curvkit.orthonormalize(make(Q, backend, "float32"), "qr")
    assert str(R32.dtype).endswith("float32") and np.abs(to_numpy(R32) - expected).max() < 1e-5
    with pytest.warns(curvkit.ConvergenceWarning):
        curvkit.orthonormalize(make(np.ones((5, 3)), backend), "qr")  # rank 1
    with pytest.raises(ValueError, match="at least as many rows"):
        curvkit.orthonormalize(make(np.ones((3, 5)), backend), "qr")


def gram_schmidt_basis(X):
    """Q of X's QR in float64 with R's diagonal made nonnegative, and X's condition number."""
    q, r = np.linalg.qr(np.asarray(X, dtype=np.float64))
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :], np.linalg.cond(X).max()


def with_condition(rng, shape, kappa):
    """A (..., m, k) matrix with singular values spread from 1 to 1 / kappa in random directions."""
    m, k = shape[-2:]
    U = np.linalg.qr(rng.standard_normal(shape))[0]
    V = np.linalg.qr(rng.standard_normal(shape[:-2] + (k, k)))[0]
    return (U * np.geomspace(1, 1 / kappa, k)) @ V


def in_threads(threads, call):
    previous = curvkit.get_num_threads()
    curvkit.set_num_threads(threads)
    try:
        return call()
    finally:
        curvkit.set_num_threads(previous)


# Past 32 columns the QR runs in blocks of 32 reflectors on curvkit's team of threads, the next
# block factored while the rest is updated (csrc/core/team_qr.h): shapes of one, several and a
# partial last block, a batch (one matrix per thread), tall and square.
BLOCKED_QR_CASES = [((300, 100), 1e3), ((200, 200), 1e2), ((130, 64), 1e6), ((3, 100, 70), 1e3), ((96, 33), 1e1)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape, kappa", BLOCKED_QR_CASES)
def test_orthonormalize_qr_past_one_block_of_reflectors(threads, dtype, shape, kappa, rng):
    u = np.finfo(dtype).eps / 2
    if u * kappa > 1e-3:
        pytest.skip("beyond the dtype's precision")
    X = with_condition(rng, shape, kappa)
    expected, cond = gram_schmidt_basis(X)
    R = in_threads(threads, lambda: curvkit.orthonormalize(X.astype(dtype), "qr"))
    m, k = shape[-2:]
    identity = np.broadcast_to(np.eye(k), R.shape[:-2] + (k, k))
    # Householder QR: orthonormal to a fraction of m u whatever X is; the basis moves by X's
    # condition times u (its rounding to the dtype included). Measured: at most 0.12 m u and
    # 0.04 sqrt(m) u cond over these cases.
    assert np.abs(np.swapaxes(R, -1, -2) @ R.astype(np.float64) - identity).max() <= m * u / 2
    assert np.abs(R - expected).max() <= np.sqrt(m) * u * cond / 4
    # the team's threads take chunks as they come, but each chunk's columns are fixed: same bits
    np.testing.assert_array_equal(in_threads(threads, lambda: curvkit.orthonormalize(X.astype(dtype), "qr")), R)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_eigenbasis_update_of_large_factors_is_the_qr_of_the_sorted_power_step(threads, dtype, rng):
    # A 150^2 factor (threaded: products and QR on the team) beside two small ones (one per thread),
    # and a k < n basis: the refresh is the Gram-Schmidt basis of A Q with its columns sorted by
    # q_j^T A q_j, descending.
    u = np.finfo(dtype).eps / 2
    factors = [reference.spd_with_condition(rng, n, 1e2) for n in (150, 40, 40, 120)]
    bases = [np.linalg.qr(rng.standard_normal((n, k)))[0] for n, k in ((150, 150), (40, 40), (40, 40), (120, 90))]
    got = in_threads(threads, lambda: curvkit.eigenbasis_update([a.astype(dtype) for a in factors],
                                                                [q.astype(dtype) for q in bases]))
    for A, Q, (Qn, d, perm) in zip(factors, bases, got):
        A, Q = A.astype(dtype).astype(np.float64), Q.astype(dtype).astype(np.float64)  # as stored
        estimates = np.einsum("ij,ik,kj->j", Q, A, Q)
        order = np.argsort(-estimates, kind="stable")
        np.testing.assert_array_equal(perm, order)
        np.testing.assert_allclose(d, estimates[order], rtol=0, atol=16 * A.shape[0] * u * np.abs(estimates).max())
        expected, cond = gram_schmidt_basis((A @ Q)[:, order])
        assert np.abs(Qn - expected).max() <= np.sqrt(A.shape[0]) * u * cond / 4


@needs_torch
def test_eigenbasis_update_is_soaps_qr_refresh(rng):
    # SOAP's get_orthogonal_matrix_QR (curvkit.testing.anchors), whose QR leaves R's signs as
    # they come: the same order, the same columns up to sign.
    import torch

    from curvkit.testing.anchors import soap_qr_refresh

    A = reference.spd_with_condition(rng, 200, 1e3)
    Q = np.linalg.qr(np.linalg.eigh(A)[1] + 1e-2 * rng.standard_normal((200, 200)))[0]
    Qn, _, perm = curvkit.eigenbasis_update(A, Q)
    Qa, order = soap_qr_refresh(torch.from_numpy(A), torch.from_numpy(Q))
    np.testing.assert_array_equal(perm, order.numpy())
    signs = np.sign(np.sum(Qn * Qa.numpy(), axis=0))
    np.testing.assert_allclose(Qn, Qa.numpy() * signs, atol=1e-10)


def test_orthonormalize_polar_is_bjorck_to_the_nearest_orthonormal(rng):
    Q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    noisy = Q + 1e-2 * rng.standard_normal((30, 30))
    R = curvkit.orthonormalize(noisy, "polar", steps=4)
    np.testing.assert_allclose(R, reference.polar_factor(noisy), atol=1e-12)
    x0 = noisy / (np.linalg.norm(noisy) / np.sqrt(30))  # divided by its RMS singular value
    one_step, info = curvkit.orthonormalize(noisy, "polar", steps=1, return_info=True)
    np.testing.assert_allclose(one_step, 1.5 * x0 - 0.5 * x0 @ x0.T @ x0, atol=1e-13)
    assert not info["converged"]  # one step leaves about 1e-4 (float64 asks for 1.5e-8)
    tall = np.linalg.qr(rng.standard_normal((50, 8)))[0] * (1 + 1e-3 * rng.standard_normal(8))
    T = curvkit.orthonormalize(tall, "polar")
    np.testing.assert_allclose(T.T @ T, np.eye(8), atol=1e-12)
    noisy[3, 4] = np.nan
    with pytest.raises(ValueError, match="'Q' contains NaN or Inf"):
        curvkit.orthonormalize(noisy, "polar")


def test_eigenbasis_update_tracks_the_eigenbasis(rng):
    n = 24
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.geomspace(1, 1e-2, n)
    A = (V * eigenvalues) @ V.T
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    for _ in range(300):  # repeated refreshes are subspace iteration
        Q_old = Q
        Q, d, perm = curvkit.eigenbasis_update(A, Q)
        np.testing.assert_allclose(d, np.diag(Q_old.T @ A @ Q_old)[perm], atol=1e-13)
        assert np.all(np.diff(d) <= 0) and sorted(perm.tolist()) == list(range(n))
    np.testing.assert_allclose(np.diag(Q.T @ A @ Q), eigenvalues, rtol=1e-6)
    np.testing.assert_allclose(Q.T @ Q, np.eye(n), atol=1e-13)
    # batched, a k < n basis, and float32
    Qb, db, pb = curvkit.eigenbasis_update(np.stack([A, A]), np.stack([Q[:, :5], Q[:, :5]]).astype(np.float32))
    assert Qb.shape == (2, n, 5) and db.shape == (2, 5) and pb.dtype == np.int64 and Qb.dtype == np.float32
    np.testing.assert_allclose(db[0], eigenvalues[:5], rtol=1e-4)
    with pytest.raises(ValueError, match="'Q'"):
        curvkit.eigenbasis_update(A, np.eye(n + 1))


# ---- CUDA (torch CUDA tensors and CuPy arrays; skipped without a GPU)


@pytest.mark.parametrize("dtype, cond, bound",
                         [("float64", 1e2, 1e-10), ("float32", 1e2, 1e-3), ("float64", 1e6, 1e-9)])
def test_large_matrices_use_the_symmetric_product_on_cuda(cuda_backend, dtype, cond, bound, rng):
    # n >= 768 computes only the lower blocks of the symmetric products, whose mirrored results
    # are exactly symmetric (emulated at n = 200: same steps as plain products, error <= 2.3x)
    A = np.stack([reference.spd_with_condition(rng, 800, cond) for _ in range(2)])
    X, info = curvkit.matrix_inverse_root(make(A, cuda_backend, dtype), 4, return_info=True)
    assert (info["method"] == "newton").all() and info["converged"].all() and not info["fell_back"].any()
    assert rel(to_numpy(X), root_reference(A, 4)) <= bound


def test_each_matrix_stops_on_its_own(backend, rng):
    # easy, hard, singular (no ridge) and zero matrices in one batch: per-matrix verdicts
    easy = reference.spd_with_condition(rng, 32, 10)
    hard = reference.spd_with_condition(rng, 32, 1e6)
    G = rng.standard_normal((32, 4))
    A = np.stack([easy, hard, G @ G.T / 4, np.zeros((32, 32))])
    X, info = curvkit.matrix_inverse_root(make(A, backend), 2, method="newton", return_info=True)
    Xn = to_numpy(X)
    assert np.isfinite(Xn).all()
    assert info["converged"].tolist() == [True, True, True, True]  # the last two: pseudo-inverse roots
    assert info["iterations"][0] < info["iterations"][1]
    assert info["fell_back"].tolist() == [False, False, True, True]
    assert info["unresolved"].tolist() == [0, 0, 28, 32]
    for k in (0, 1):
        assert rel(Xn[k], root_reference(A[k], 2)) <= 1e-10 * (100 if k else 1)
    cpu, cpu_info = curvkit.matrix_inverse_root(A, 2, method="newton", return_info=True)
    assert cpu_info["converged"].tolist() == info["converged"].tolist()


def test_auto_half_precision_and_residual(backend, rng):
    A = reference.spd_with_condition(rng, 40, 1e2)
    X, info = curvkit.matrix_inverse_root(make(A, backend, "float16"), 2, return_info=True)
    assert info["method"] == AUTO[backend[1]] and info["converged"]
    assert str(X.dtype).endswith("float16") and rel(to_numpy(X), root_reference(A.astype(np.float16), 2)) < 1e-3
    _, info = curvkit.matrix_inverse_root(make(A, backend), 2, method="eigh", return_info=True)
    assert 0 < info["residual"] < 1e-12


@pytest.mark.parametrize("backend, dtype", backend_dtypes(["float16", "bfloat16"]))
def test_half_precision_bases(backend, dtype, rng):
    # float16 / bfloat16 computed in float32, returned in their own dtype
    A = reference.spd_with_condition(rng, 32, 10)
    ulp = TOL[(dtype, "ulp")]
    a = make(A, backend, dtype)
    w, V = curvkit.eigh(a)
    assert w.dtype == a.dtype and V.dtype == a.dtype
    np.testing.assert_allclose(to_numpy(w), np.linalg.eigvalsh(to_numpy(a)), rtol=ulp, atol=1e-6)
    Q, d, perm = curvkit.eigenbasis_update(a, V)
    assert Q.dtype == a.dtype and (perm == np.arange(32)[::-1]).all()
    np.testing.assert_allclose(to_numpy(d), to_numpy(w)[::-1], rtol=4 * ulp, atol=1e-3)


def test_basis_of_another_framework_and_polar_orthonormalize(backend, rng):
    A = reference.spd_with_condition(rng, 32, 10)
    if is_cuda(backend):
        with pytest.raises(ValueError, match="'A' and 'basis' must be on the same device"):
            curvkit.eigh(make(A, backend), basis=np.eye(32))
    else:  # arrays of two frameworks on the CPU may be mixed
        w, _ = curvkit.eigh(make(A, backend), basis=np.eye(32))
        np.testing.assert_allclose(to_numpy(w), np.linalg.eigvalsh(A), rtol=1e-12)
    Q, _ = np.linalg.qr(rng.standard_normal((2, 30, 30)))
    noisy = (Q + 1e-2 * rng.standard_normal((2, 30, 30))).astype(np.float32)
    R = curvkit.orthonormalize(make(noisy, backend), "polar", steps=4)
    np.testing.assert_allclose(to_numpy(R), curvkit.orthonormalize(noisy, "polar", steps=4), atol=2e-6)


def test_errors_on_every_backend(backend):
    bad = [(np.array([[1.0, 2.0], [0.0, 1.0]]), "'A' must be symmetric"), (np.array([[np.nan, 0], [0, 1.0]]), "NaN")]
    for A, match in bad:
        with pytest.raises(ValueError, match=match):
            curvkit.matrix_inverse_root(make(A, backend), 2)
        with pytest.raises(ValueError, match=match):
            curvkit.eigh(make(A, backend))
    with pytest.raises(ValueError, match="'init'"):
        curvkit.matrix_inverse_root(make(np.eye(2), backend), 2, method="newton",
                                    init=make(np.array([[1.0, np.inf], [np.inf, 1.0]]), backend))
    with pytest.raises(ValueError, match="'basis'"):  # a basis warm-starts eigh, not newton
        curvkit.matrix_inverse_root(make(np.eye(2), backend), 2, method="newton", basis=make(np.eye(2), backend))
    if is_cuda(backend):  # CPU arrays of two frameworks may be mixed; a device and the host may not
        with pytest.raises(ValueError, match="'A' and 'basis' must be on the same device"):
            curvkit.matrix_inverse_root(make(np.eye(2), backend), 2, basis=np.eye(2))
        with pytest.raises(ValueError, match="same device"):
            curvkit.matrix_inverse_root(make(np.eye(2), backend), 2, method="newton", init=np.eye(2))
        with pytest.raises(ValueError, match="same device"):
            curvkit.matrix_inverse_root([make(np.eye(2), backend), np.eye(2)], 2)


def test_follows_the_current_cuda_stream(cuda_backend, rng):
    # inputs produced on a side stream, work queued there: the same results as by default
    A = np.stack([reference.spd_with_condition(rng, 48, 1e2) for _ in range(3)])
    expected = to_numpy(curvkit.matrix_inverse_root(make(A, cuda_backend), 4))
    if cuda_backend[0] == "torch":
        import torch

        stream = torch.cuda.Stream()
        scope = torch.cuda.stream(stream)
    else:
        import cupy

        stream = scope = cupy.cuda.Stream(non_blocking=True)
    with scope:
        a = make(A, cuda_backend) * 2.0
        X = curvkit.matrix_inverse_root(a, 4)
        w, V = curvkit.eigh(a)
        _, d, perm = curvkit.eigenbasis_update(a, V)
        Q = curvkit.orthonormalize(V * 3.0, "qr")
        X, w, V, d, Q = (to_numpy(y) for y in (X, w, V, d, Q))
    stream.synchronize()
    np.testing.assert_allclose(X, expected / 2 ** 0.25, rtol=0, atol=1e-12 * np.abs(expected).max())
    np.testing.assert_allclose(V @ (w[..., None] * np.swapaxes(V, -1, -2)), 2 * A, atol=1e-13)
    np.testing.assert_allclose(d, w[:, ::-1], atol=1e-13)
    assert (perm == np.arange(48)[::-1]).all()
    np.testing.assert_allclose(np.abs(Q), np.abs(V), atol=1e-13)


def test_eigenbasis_update_refuses_a_non_finite_basis_by_name(backend, rng):
    n, k = 6, 4
    A = reference.spd_with_condition(rng, n, 10)
    Q = np.linalg.qr(rng.standard_normal((2, n, k)))[0]
    Q[1, 2, 1] = np.nan
    out = [make(np.zeros((2, n, k)), backend), make(np.zeros((2, k)), backend), np.zeros((2, k), dtype=np.int64)]
    with pytest.raises(curvkit.ArgumentError, match="'Q' contains NaN or Inf"):
        curvkit.eigenbasis_update(make(np.stack([A, A]), backend), make(Q, backend), out=out)
    assert not to_numpy(out[0]).any()  # refused before anything is written
    with pytest.raises(curvkit.ArgumentError, match="'Q' contains NaN or Inf"):
        curvkit.orthonormalize(make(Q, backend), "qr")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eigenbasis_update_of_ill_conditioned_float32_factors_is_reported_not_refused(backend, rng):
    # SOAP's factors reach condition 1e8: in float32 the small columns of A Q fall below its
    # resolution. The basis is still orthonormal and its leading columns accurate; "full_rank"
    # says what float32 could not resolve.
    conds = [1e2, 1e7, 9e7]
    A = np.stack([reference.spd_with_condition(rng, 96, c) for c in conds])
    Q = np.stack([np.linalg.eigh(a + 1e-3 * np.diag(rng.standard_normal(96)))[1] for a in A])
    (q32, d32, _), info = curvkit.eigenbasis_update(make(A, backend, "float32"), make(Q, backend, "float32"),
                                                    return_info=True)
    assert info["converged"].all() and info["full_rank"].tolist() == [True, False, False]
    q32 = to_numpy(q32)
    assert np.abs(np.swapaxes(q32, -1, -2) @ q32 - np.eye(96)).max() < 1e-5
    q64, d64, _ = curvkit.eigenbasis_update(A, Q, return_info=False)
    np.testing.assert_allclose(np.abs(q32[..., :8]), np.abs(q64[..., :8]), atol=1e-4)  # the large eigenvalues'
    np.testing.assert_allclose(to_numpy(d32), d64, rtol=1e-5, atol=1e-6 * np.abs(d64).max())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_eigenbasis_update_of_a_rank_deficient_factor_is_not_a_failure(backend, dtype, rng):
    # SOAP's first factors: one gradient's G G^T, rank 2 of 12. Q_new is orthonormal, its first
    # columns span A's range (the power step), the rest complete the basis.
    g = rng.standard_normal((12, 2))
    A = g @ g.T
    Q = np.linalg.qr(rng.standard_normal((12, 12)))[0]
    (q, d, perm), info = curvkit.eigenbasis_update(make(A, backend, dtype), make(Q, backend, dtype), return_info=True)
    q = to_numpy(q)
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert info["converged"] and not info["full_rank"] and np.abs(q.T @ q - np.eye(12)).max() < tol
    range_basis = np.linalg.qr(g)[0]
    np.testing.assert_allclose(np.linalg.svd(range_basis.T @ q[:, :2])[1], 1, atol=tol * 10)


def test_eigenbasis_update_agrees_with_numpy(backend, rng):
    n = 24
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (V * np.geomspace(1, 1e-2, n)) @ V.T
    Q = np.linalg.qr(rng.standard_normal((2, n, 7)))[0]
    A2 = np.stack([A, A])
    Qn, d, perm = curvkit.eigenbasis_update(make(A2, backend), make(Q, backend))
    Qc, dc, pc = curvkit.eigenbasis_update(A2, Q)
    assert isinstance(perm, np.ndarray) and perm.dtype == np.int64
    np.testing.assert_array_equal(perm, pc)
    np.testing.assert_allclose(to_numpy(d), dc, atol=1e-13)
    np.testing.assert_allclose(to_numpy(Qn), Qc, atol=1e-12)
    if is_cuda(backend):
        with pytest.raises(ValueError, match="same device"):
            curvkit.eigenbasis_update(A2, make(Q, backend))


def test_results_are_reproducible(backend, rng):
    # Sums across blocks (norms, ||E||_F^2 of the basis refinement) are added in a fixed order,
    # never by float atomics: the same input gives the same bits on every run.
    A = np.stack([reference.spd_with_condition(rng, 96, 1e3) for _ in range(2)])
    a = make(A, backend, "float64")
    V0 = np.linalg.qr(np.linalg.eigh(A)[1] + 1e-7 * rng.standard_normal(A.shape))[0]

    def run():
        V = make(V0, backend, "float64")  # refined in place
        X = curvkit.matrix_inverse_root(a, 4, eps=1e-6, basis=V)
        return [to_numpy(X), to_numpy(V), to_numpy(curvkit.matrix_inverse_root(a, 4, eps=1e-6, method="newton"))]

    for first, second in zip(run(), run()):
        np.testing.assert_array_equal(first, second)


@needs_torch
def test_a_factor_accumulated_in_float32_and_passed_as_float64_is_not_refused_as_asymmetric():
    import torch

    # An EMA of addmm_ steps in float32 is symmetric only up to its rounding (1.9e-8 here):
    # passed as float64, every symmetric-input function takes its symmetric part.
    gen = torch.Generator().manual_seed(0)
    A = torch.zeros(128, 128)
    for _ in range(50):
        g = torch.randn(128, 32, generator=gen)
        A.mul_(0.95).addmm_(g, g.T, alpha=0.05)
    A = A.double()
    assert 1e-10 < ((A - A.T).abs().max() / A.abs().max()).item() < 1e-6
    S = (A + A.T) / 2
    np.testing.assert_allclose(curvkit.matrix_inverse_root(A, 4).numpy(), curvkit.matrix_inverse_root(S, 4).numpy())
    np.testing.assert_allclose(curvkit.matrix_sqrt(A).numpy(), curvkit.matrix_sqrt(S).numpy())
    np.testing.assert_allclose(curvkit.eigh(A)[0].numpy(), curvkit.eigh(S)[0].numpy())
    Q = torch.linalg.qr(A)[0]
    for got, want in zip(curvkit.eigenbasis_update(A, Q), curvkit.eigenbasis_update(S, Q)):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want))
    B = A.clone()
    B[0, 1] += 1e-3 * A.abs().max()  # not rounding: refused by name
    with pytest.raises(curvkit.ArgumentError, match="'A' must be symmetric"):
        curvkit.matrix_inverse_root(B, 4)
