"""Inverse p-th roots and eigh against float64 eigh references: conditioning sweeps, ridge,
rank deficiency, warm starts, ragged lists, failure policy."""
import numpy as np
import pytest

import curvkit
from conftest import needs_torch
import reference


def root_reference(A, p, eps=0.0):
    w, V = np.linalg.eigh(np.asarray(A, dtype=np.float64))
    w = np.maximum(w, 0) + eps
    return (V * w[..., None, :] ** (-1.0 / p)) @ np.swapaxes(V, -1, -2)


def rel(x, y):
    return np.linalg.norm(x - y) / np.linalg.norm(y)


# Relative error against the float64 reference, measured over the sweep below with margin
# (n = 64): per (compute dtype, method), for condition numbers up to the key.
TOL = {
    ("float64", "eigh"): 1e-13, ("float64", "newton"): 1e-10,
    ("float32", "eigh"): 1e-4, ("float32", "newton"): 1e-4,
}


@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("cond, eps", [(1e2, 0.0), (1e3, 0.0), (1e6, 0.0), (1e6, 1e-6), (1e10, 1e-6)])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_float64_conditioning_sweep(p, cond, eps, method, rng):
    A = reference.spd_with_condition(rng, 64, cond)
    X, info = curvkit.matrix_inverse_root(A, p, eps=eps, method=method, return_info=True)
    assert info["converged"]
    # from condition ~1e6 on, the inverse root's own conditioning (about cond / p) sets the
    # error of any method: allow 100x there
    effective = min(cond, 1 / eps) if eps else cond
    bound = TOL[("float64", method)] * (100 if effective >= 1e6 else 1)
    assert rel(X, root_reference(A, p, eps)) <= bound


@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_float32_up_to_condition_1e3(p, method, rng):
    A = reference.spd_with_condition(rng, 64, 1e3).astype(np.float32)
    X, info = curvkit.matrix_inverse_root(A, p, method=method, return_info=True)
    assert X.dtype == np.float32 and info["converged"]
    assert rel(X, root_reference(A, p)) <= TOL[("float32", method)]


def test_float32_beyond_its_range_falls_back_to_float64(rng):
    A = reference.spd_with_condition(rng, 64, 1e7).astype(np.float32)
    X, info = curvkit.matrix_inverse_root(A, 4, method="newton", return_info=True)
    assert info["fell_back"] and info["method"] == "eigh" and info["converged"]
    assert rel(X, root_reference(A, 4)) <= 1e-5  # float64 eigh, rounded to float32
    _, info = curvkit.matrix_inverse_root(A, 4, method="eigh", return_info=True)
    assert not info["converged"]  # float32 eigh cannot resolve it, and says so


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
    X, info = curvkit.matrix_inverse_root(A, 4, return_info=True)  # no ridge: no inverse root
    assert not info["converged"] and np.isfinite(X).all()
    with pytest.raises(curvkit.ConvergenceError):
        curvkit.matrix_inverse_root(A, 4)
    Z, info = curvkit.matrix_inverse_root(np.zeros((3, 3)), 2, eps=1e-4, return_info=True)
    np.testing.assert_allclose(Z, 100 * np.eye(3))
    assert info["converged"]


def test_warm_start(rng):
    A = reference.spd_with_condition(rng, 48, 1e3)
    exact = root_reference(A, 4)
    X, info = curvkit.matrix_inverse_root(A, 4, method="newton", init=exact, return_info=True)
    assert info["iterations"] <= 2 and info["converged"] and not info["fell_back"]
    np.testing.assert_allclose(X, exact, rtol=0, atol=1e-12 * np.abs(exact).max())
    # after a drift, the answer equals a cold start's (the residual check sends an inexact
    # warm start to the fallback)
    D = rng.standard_normal((48, 48))
    A2 = A + 1e-3 * D @ D.T / 48
    warm = curvkit.matrix_inverse_root(A2, 4, method="newton", init=exact)
    cold = curvkit.matrix_inverse_root(A2, 4, method="newton")
    assert rel(warm, cold) < 1e-10


def test_keep_init_when_everything_fails(rng):
    A = -np.eye(4)  # negative definite: no root
    init = 0.5 * np.eye(4)
    X, info = curvkit.matrix_inverse_root(A, 2, method="newton", init=init, return_info=True)
    assert info["kept_init"] and not info["converged"]
    np.testing.assert_array_equal(X, init)


def test_ragged_list_in_one_call(rng):
    sizes = [1024 // 8, 768 // 8] * 4 + [5]
    blocks = [reference.spd_with_condition(rng, n, 1e2) for n in sizes]
    roots, infos = curvkit.matrix_inverse_root(blocks, 4, eps=1e-6, return_info=True)
    assert len(roots) == len(blocks) and all(i["converged"] for i in infos)
    for A, X in zip(blocks, roots):
        assert X.shape == A.shape and rel(X, root_reference(A, 4, 1e-6)) < 1e-12
    stacked = np.stack([reference.spd_with_condition(rng, 16, 10) for _ in range(6)]).reshape(2, 3, 16, 16)
    X, info = curvkit.matrix_inverse_root(stacked, 2, return_info=True)
    assert info["converged"].shape == (2, 3)
    np.testing.assert_allclose(X, root_reference(stacked, 2), atol=1e-12)


def test_eigh(rng):
    A = np.stack([reference.spd_with_condition(rng, 20, 1e3) - 0.1 * np.eye(20) for _ in range(3)])
    w, V = curvkit.eigh(A)
    np.testing.assert_allclose(w, np.linalg.eigvalsh(A), atol=1e-14)
    np.testing.assert_allclose(V @ (w[..., None] * np.swapaxes(V, -1, -2)), A, atol=1e-13)
    pairs = curvkit.eigh([A[0], A[1, :5, :5].copy()])
    assert [p[0].shape for p in pairs] == [(20,), (5,)]
    w32, V32 = curvkit.eigh(A[0].astype(np.float32))
    assert w32.dtype == np.float32 and np.allclose(w32, w[0], atol=1e-5)


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
