"""curvkit.testing: the generators give what they promise, the Sinkhorn reference solves its
problem, the measures measure, and the module imports with NumPy alone."""
import subprocess
import sys

import numpy as np
import pytest

import curvkit
from curvkit import testing


def test_imports_without_torch_or_matplotlib():
    # a finder that refuses torch and matplotlib, as in a venv without them
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'matplotlib'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import curvkit.testing, curvkit.testing.anchors, curvkit.accuracy, curvkit.bench\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"  # (an editable build may print before)


@pytest.mark.parametrize("cond", [1e2, 1e8])
def test_spectra_and_condition(rng, cond):
    A = testing.spd_with_condition(rng, 40, cond)
    w = np.linalg.eigvalsh(A)
    assert np.allclose(A, A.T) and w[-1] == pytest.approx(1, rel=1e-12)
    assert w[-1] / w[0] == pytest.approx(cond, rel=1e-6 * cond)
    want = np.sort(rng.uniform(0, 2, 12))
    np.testing.assert_allclose(np.linalg.eigvalsh(testing.spd_with_spectrum(rng, want)), want, atol=1e-14)
    s = np.logspace(0, -3, 5)
    np.testing.assert_allclose(np.linalg.svd(testing.matrix_with_spectrum(rng, 9, 5, s), compute_uv=False), s,
                               rtol=1e-12)


def test_rank_deficient_and_shampoo_factors(rng):
    A = testing.rank_deficient_gram(rng, 30, 5, decay=0.5)
    w = np.linalg.eigvalsh(A)
    assert np.all(w[:-5] < 1e-13 * w[-1]) and np.all(w[-5:] > 1e-3 * w[-1])
    factors = testing.shampoo_factors(rng, 12, 8, steps=20, rank=3)
    L1, L20 = factors[0][0], factors[-1][0]
    assert np.linalg.matrix_rank(L1) == 8 and np.linalg.matrix_rank(L20) == 12  # a rank-8 gradient fills in
    assert np.all(np.linalg.eigvalsh(factors[-1][1]) > 0)


def test_xtrace_spectra_and_gradient_window(rng):
    assert [testing.xtrace_spectrum(name, 1000).size for name in testing.XTRACE_SPECTRA] == [1000] * 5
    assert testing.xtrace_spectrum("poly", 3).tolist() == [1.0, 0.25, 1 / 9]
    with pytest.raises(ValueError, match="name"):
        testing.xtrace_spectrum("nope")
    G, damp = testing.gradient_window(rng, 8, 64, kappa=1e5)
    assert np.mean(np.sum(G ** 2, axis=1)) / (8 * damp) == pytest.approx(1e5)


@pytest.mark.parametrize("kind", testing.OT_KINDS)
def test_ot_problems(kind):
    n = 36
    a, b, C = testing.ot_problem(kind, n, seed=4)
    assert a.shape == (n,) and b.shape == (n,) and C.shape == (n, n)
    assert a.sum() == pytest.approx(1) and b.sum() == pytest.approx(1) and a.min() > 0 and b.min() > 0
    assert C.min() >= 0 and np.all(np.isfinite(C))
    again = testing.ot_problem(kind, n, seed=4, dtype=np.float32)
    assert all(x.dtype == np.float32 for x in again) and np.allclose(again[2], C, rtol=1e-6)
    assert kind in testing.OT_DEFAULT_REG


def test_ot_problem_arguments():
    assert testing.ot_problem("assignment", 5, 7)[2].shape == (5, 7)
    assert testing.ot_problem("grid_l1", 784)[2].max() == 1.0
    with pytest.raises(ValueError, match="perfect square"):
        testing.ot_problem("grid_l2", 50)
    with pytest.raises(ValueError, match="kind"):
        testing.ot_problem("mnist", 4)
    with pytest.raises(ValueError, match="square"):
        testing.ot_problem("identity", 4, 5)


def test_sinkhorn_log_solves_the_entropic_problem():
    a, b, C = testing.ot_problem("synthetic2", 60, 40)
    reg = 0.02
    P, f, g, info = testing.sinkhorn_log(a, b, C, reg, tol=1e-12, return_info=True)
    assert testing.marginal_error(P, a, b) <= 1e-12 and info["iterations"] > 1
    # the plan is exp((f + g - C) / reg) and the duality gap of the entropic problem is zero
    np.testing.assert_allclose(P, np.exp((f[:, None] + g[None, :] - C) / reg), rtol=1e-12)
    primal = np.sum(C * P) + reg * np.sum(P * (np.log(P) - 1))
    dual = a @ f + b @ g - reg * np.sum(P)
    assert primal == pytest.approx(dual, rel=1e-9)


def test_sinkhorn_log_recovers_the_identity_and_reports_failure():
    a, b, C = testing.ot_problem("identity", 10, seed=2)
    P, _, _ = testing.sinkhorn_log(a, b, C, 1e-3)  # exp(-C / reg) alone would underflow to 0 here
    assert np.trace(P) > 0.95 and np.all(np.argmax(P, axis=1) == np.arange(10))
    with pytest.raises(curvkit.ConvergenceError, match="marginal error"):
        testing.sinkhorn_log(a, b, C, 1e-4, tol=1e-15, max_iter=3)
    with pytest.raises(ValueError, match="reg"):
        testing.sinkhorn_log(a, b, C, 0.0)


def test_measures():
    x, ref = np.array([[3.0, 0.0], [0.0, 4.0]]), np.array([[3.0, 0.0], [0.0, 4.5]])
    assert testing.rel_frobenius(x, ref) == pytest.approx(0.5 / np.hypot(3, 4.5))
    assert testing.rel_frobenius(np.ones(3), np.zeros(3)) == pytest.approx(np.sqrt(3))
    assert testing.max_residual(x, ref) == pytest.approx(0.5 / 4.5)
    assert testing.max_residual(x, ref, relative=False) == 0.5
    Q = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 7, 4)))[0]
    assert testing.orthogonality_error(Q) < 1e-15
    assert testing.orthogonality_error(np.swapaxes(Q, -1, -2)) < 1e-15  # wide: rows
    assert testing.orthogonality_error(Q * 1.1) == pytest.approx(0.21)
    P = np.array([[0.2, 0.3], [0.1, 0.4]])
    assert testing.marginal_error(P, [0.5, 0.5], [0.3, 0.7]) == pytest.approx(0.0, abs=1e-16)
    assert testing.marginal_error(P, [0.6, 0.4], [0.3, 0.7]) == pytest.approx(0.2)
    assert testing.tolerance("float32", "polar") == testing.TOL[("float32", "polar")]
    assert testing.tolerance(np.dtype("float64"), "sqrt") == 1e-12
    with pytest.raises(KeyError, match="no tolerance"):
        testing.tolerance("float64", "nope")
