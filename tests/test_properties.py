"""Property tests (hypothesis): the defining identities of polar, inverse roots and eigh on
random small inputs, and layout/dtype independence over random views. Each is bounded (small
sizes, a few dozen examples); the examples are derived from the test (derandomize) so a run is
reproducible, and nothing is written to disk (no example database)."""
import numpy as np
import pytest
from conftest import make, raw_bits, to_numpy, torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import curvkit
from curvkit import testing as reference
from curvkit.newton_schulz import schedule

SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

sizes = st.integers(1, 20)
seeds = st.integers(0, 2**32 - 1)
scales = st.sampled_from([1e-3, 1.0, 1e3])


def _with_spectrum(seed, batch, m, n, cond, scale):
    rng = np.random.default_rng(seed)
    r = min(m, n)
    return scale * np.stack([reference.matrix_with_spectrum(rng, m, n, np.geomspace(1, 1 / cond, r))
                             for _ in range(batch)])


def _spd(seed, batch, n, cond, scale):
    rng = np.random.default_rng(seed)
    return scale * np.stack([reference.spd_with_condition(rng, n, cond) for _ in range(batch)])


@settings(max_examples=40, **SETTINGS)
@given(seed=seeds, batch=st.integers(1, 3), m=sizes, n=sizes, cond=st.floats(1, 100), scale=scales,
       method=st.sampled_from(["standard", "gram"]))
def test_polar_express_orthogonalizes_well_conditioned_inputs(seed, batch, m, n, cond, scale, method):
    # 12 steps reach U V^T for condition numbers up to 1e3 (the docstring): X X^T = I on the short side
    G = _with_spectrum(seed, batch, m, n, cond, scale)
    X = curvkit.polar(G, 12, "polar_express", method=method)
    short = X @ np.swapaxes(X, -1, -2) if m <= n else np.swapaxes(X, -1, -2) @ X
    np.testing.assert_allclose(short, np.broadcast_to(np.eye(min(m, n)), short.shape), atol=1e-8)
    np.testing.assert_allclose(X, reference.polar_factor(G), atol=1e-8)


@settings(max_examples=40, **SETTINGS)
@given(seed=seeds, m=st.integers(2, 24), n=st.integers(2, 24), cond=st.floats(1, 10), scale=scales,
       method=st.sampled_from(["standard", "gram"]))
def test_polar_express_singular_values_stay_in_the_band_after_five_steps(seed, m, n, cond, scale, method):
    # the documented band of "polar_express" after 5 steps, [0.87, 1.12] (as in
    # test_singular_value_bands_after_five_steps), for spectra its schedule covers
    G = _with_spectrum(seed, 1, m, n, cond, scale)[0]
    X = curvkit.polar(G, 5, "polar_express", method=method)
    s = np.linalg.svd(X, compute_uv=False)
    assert 0.8703 - 2e-3 <= s.min() and s.max() <= 1.1236 + 2e-3
    table, norm_scale = schedule("polar_express", 5)
    np.testing.assert_allclose(X, reference.newton_schulz(G, table, norm_scale), atol=1e-12)


@settings(max_examples=50, **SETTINGS)
@given(seed=seeds, batch=st.integers(1, 3), n=st.integers(1, 16), log_cond=st.floats(0, 4),
       p=st.sampled_from([1, 2, 4, 8]), eps=st.sampled_from([0.0, 1e-6]), scale=scales,
       method=st.sampled_from(["eigh", "newton"]))
def test_inverse_root_to_the_p_times_the_ridged_matrix_is_the_identity(seed, batch, n, log_cond, p, eps, scale,
                                                                       method):
    A = _spd(seed, batch, n, 10**log_cond, scale)
    X = curvkit.matrix_inverse_root(A, p, eps=eps * scale, method=method)
    ridged = A + eps * scale * np.eye(n)
    product = np.linalg.matrix_power(X, p) @ ridged
    # relative to the ridged matrix's conditioning (the error of X^p is about u times it)
    w = np.linalg.eigvalsh(ridged)
    cond = w[..., -1] / w[..., 0]
    for k in range(batch):
        assert np.abs(product[k] - np.eye(n)).max() <= 1e-13 * n * max(cond[k], 10), k


@settings(max_examples=50, **SETTINGS)
@given(seed=seeds, batch=st.integers(1, 3), n=st.integers(1, 24), scale=scales,
       dtype=st.sampled_from(["float64", "float32"]))
def test_eigh_reconstructs_and_is_orthonormal(seed, batch, n, scale, dtype):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((batch, n, n))
    A = (scale * (B + np.swapaxes(B, -1, -2)) / 2).astype(dtype)
    w, V = curvkit.eigh(A)
    assert w.dtype == A.dtype and V.dtype == A.dtype
    w, V, A = w.astype(np.float64), V.astype(np.float64), A.astype(np.float64)
    u = np.finfo(dtype).eps
    norm = np.linalg.norm(A, 2, axis=(-2, -1))[..., None, None]
    assert (np.abs(V @ (w[..., None] * np.swapaxes(V, -1, -2)) - A) <= 20 * n * u * norm).all()
    np.testing.assert_allclose(np.swapaxes(V, -1, -2) @ V, np.broadcast_to(np.eye(n), (batch, n, n)), atol=20 * n * u)
    assert np.all(np.diff(w, axis=-1) >= 0)


def _frameworks():
    return ["numpy"] + (["torch"] if torch is not None else [])


@st.composite
def viewed_inputs(draw, symmetric):
    """(framework, dtype, NumPy values, a view of them on that framework): the view takes every
    k-th matrix of a batch and every s-th row/column, and may be transposed."""
    fw = draw(st.sampled_from(_frameworks()))
    dtype = draw(st.sampled_from(["float16", "float32", "float64"] + (["bfloat16"] if fw == "torch" else [])))
    seed = draw(seeds)
    batch, n = draw(st.integers(1, 3)), draw(st.integers(1, 10))
    m = n if symmetric else draw(st.integers(1, 10))
    steps = [draw(st.integers(1, 3)) for _ in range(3)]
    if symmetric:
        steps[2] = steps[1]  # a symmetric matrix's view takes the same rows as columns
    offsets = [draw(st.integers(0, s - 1)) for s in steps]
    transpose = draw(st.booleans())
    rng = np.random.default_rng(seed)
    values = _spd(seed, batch, n, 10.0, 1.0) if symmetric else rng.standard_normal((batch, m, n))
    big = np.full([d * s for d, s in zip(values.shape, steps)], np.nan)
    index = tuple(slice(o, None, s) for o, s in zip(offsets, steps))
    big[index] = values
    x = make(big, (fw, "cpu"), dtype)[index]
    if transpose:
        x = x.swapaxes(-1, -2)
    return fw, dtype, x


def _contiguous(x):
    return x.contiguous() if type(x).__module__.startswith("torch") else np.ascontiguousarray(x)


@settings(max_examples=50, **SETTINGS)
@given(case=viewed_inputs(symmetric=False), method=st.sampled_from(["standard", "gram"]))
def test_polar_of_a_random_view_equals_polar_of_its_contiguous_copy(case, method):
    fw, dtype, x = case
    got = curvkit.polar(x, 5, method=method)
    assert type(got) is type(x) and got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(raw_bits(got), raw_bits(curvkit.polar(_contiguous(x), 5, method=method)))


@settings(max_examples=40, **SETTINGS)
@given(case=viewed_inputs(symmetric=True), p=st.sampled_from([2, 4]), method=st.sampled_from(["eigh", "newton"]))
def test_inverse_root_and_eigh_of_a_random_view_equal_those_of_its_contiguous_copy(case, p, method):
    fw, dtype, x = case
    copy = _contiguous(x)
    got = curvkit.matrix_inverse_root(x, p, eps=1e-3, method=method)
    assert type(got) is type(x) and got.dtype == x.dtype
    expected = curvkit.matrix_inverse_root(copy, p, eps=1e-3, method=method)
    np.testing.assert_array_equal(raw_bits(got), raw_bits(expected))
    for a, b in zip(curvkit.eigh(x), curvkit.eigh(copy)):
        np.testing.assert_array_equal(raw_bits(a), raw_bits(b))
    S = curvkit.matrix_sqrt(x)
    np.testing.assert_array_equal(raw_bits(S), raw_bits(curvkit.matrix_sqrt(copy)))
    assert np.isfinite(to_numpy(got)).all()


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@settings(max_examples=25, **SETTINGS)
@given(case=viewed_inputs(symmetric=False))
def test_frameworks_agree_on_the_same_view(case):
    # the same values through NumPy and PyTorch (CPU) give the same bits
    fw, dtype, x = case
    assume(dtype != "bfloat16")  # NumPy has no bfloat16
    other = torch.from_numpy(np.asarray(x)) if fw == "numpy" else x.numpy()
    np.testing.assert_array_equal(raw_bits(curvkit.polar(x)), raw_bits(curvkit.polar(other)))


@settings(max_examples=30, **SETTINGS)
@given(seed=seeds, n=st.integers(2, 60), rank=st.integers(1, 6), method=st.sampled_from(["hutch++", "xtrace"]),
       scale=scales)
def test_deflated_trace_exact_below_the_sketch_rank(seed, n, rank, method, scale):
    # Hutch++ and XTrace are exact once the sketch holds the operator's range (rank < probes)
    rng = np.random.default_rng(seed)
    rank = min(rank, n - 1)
    b = rng.standard_normal((n, rank))
    a = scale * (b @ b.T)
    m = 3 * (rank + 2) if method == "hutch++" else 2 * (rank + 2)
    assume(m // (3 if method == "hutch++" else 2) <= n)
    est = curvkit.trace_estimate(a, None, m, method=method, seed=seed % 1000)
    assert abs(est - np.trace(a)) <= 1e-9 * np.trace(a)


@settings(max_examples=30, **SETTINGS)
@given(seed=seeds, n=st.integers(1, 50), m=st.integers(1, 40))
def test_hutchinson_exact_on_diagonal_operators_with_sign_probes(seed, n, m):
    # z_i^2 = 1: z^T D z = tr D and z * Dz = diag D for every Rademacher z
    d = np.random.default_rng(seed).standard_normal(n)
    assert curvkit.trace_estimate(np.diag(d), None, m, method="hutchinson") == pytest.approx(d.sum(), abs=1e-12 * n)
    np.testing.assert_allclose(curvkit.diag_estimate(np.diag(d), None, m), d, rtol=1e-14, atol=1e-14)


# ---- M-FAC

@settings(max_examples=30, **SETTINGS)
@given(seed=seeds, d=st.integers(1, 40), m=st.integers(1, 8), pushes=st.integers(0, 30),
       normalize=st.sampled_from(["capacity", "count"]), log_damp=st.floats(-3, 2),
       refactor_every=st.sampled_from([None, 1, 3, 10**6]))
def test_fisher_window_inverts_its_fisher(seed, d, m, pushes, normalize, log_damp, refactor_every):
    # F (F^-1 x) = x for the F of the last min(pushes, m) gradients, whatever the order of
    # pushes, the normalization and the refactor period; diag matches the dense inverse.
    rng = np.random.default_rng(seed)
    damp = 10.0 ** log_damp
    G = rng.standard_normal((pushes, d)) * np.exp(rng.uniform(-2, 2, size=(pushes, 1)))
    w = curvkit.FisherWindow(d, m, damp, dtype="float64", normalize=normalize, refactor_every=refactor_every)
    for g in G:
        w.push(g)
    held = G[max(0, pushes - m):]
    c = m if normalize == "capacity" else max(len(held), 1)
    F = reference.fisher_matrix(held, damp, scale=c) if len(held) else damp * np.eye(d)
    x = rng.standard_normal(d)
    y = w.ihvp(x)
    np.testing.assert_allclose(F @ y, x, rtol=1e-9, atol=1e-9 * np.abs(x).max())
    np.testing.assert_allclose(w.diag(), np.diag(np.linalg.inv(F)), rtol=1e-8)
    # The same gradients in another order give the same F.
    if len(held) > 1:
        v = curvkit.FisherWindow(d, m, damp, dtype="float64", normalize=normalize)
        for g in held[rng.permutation(len(held))]:
            v.push(g)
        np.testing.assert_allclose(v.ihvp(x), y, rtol=1e-9, atol=1e-9 * np.abs(y).max())


# ---- Sinkhorn

@settings(max_examples=25, **SETTINGS)
@given(seed=seeds, n=st.integers(1, 30), m=st.integers(1, 30), log_reg=st.floats(-2.5, 0),
       method=st.sampled_from(["log", "sns", "auto"]), shift=st.floats(-5, 5))
def test_sinkhorn_plan_meets_its_marginals_and_ignores_cost_shifts(seed, n, m, log_reg, method, shift):
    # The plan has the marginals to tol, and adding a constant to C (or a row/column constant)
    # leaves the optimal plan unchanged: only the potentials move. (Plain Sinkhorn needs
    # millions of iterations to 1e-11 at the smallest regs: those are SNS's.)
    if method == "log":
        log_reg = max(log_reg, -1.5)
    rng = np.random.default_rng(seed)
    a, b = rng.random(n) + 0.05, rng.random(m) + 0.05
    a, b = a / a.sum(), b / b.sum()
    C = rng.random((n, m))
    reg = 10.0 ** log_reg
    P, info = curvkit.sinkhorn(a, b, C, reg=reg, method=method, tol=1e-11, return_info=True)
    assert info["converged"]
    assert np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum() <= 1.01e-11
    shifted = C + shift + rng.random(n)[:, None]
    P2 = curvkit.sinkhorn(a, b, shifted, reg=reg, method=method, tol=1e-11)
    np.testing.assert_allclose(P2, P, atol=1e-8 * P.max())
