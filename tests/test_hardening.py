"""Regressions found by a hardening sweep: silently wrong results and unhelpful errors."""
import numpy as np
import pytest
from conftest import KERNEL_BACKENDS, is_cuda, make, needs_torch, to_numpy, torch
from hypothesis import given, settings
from hypothesis import strategies as st

import curvkit as ck
from curvkit import ArgumentError, ArgumentTypeError, CurvkitError


def spd(n=6, seed=0):
    b = np.random.default_rng(seed).standard_normal((n, n))
    return b @ b.T + np.eye(n)


def sqrt_ref(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(w)) @ v.T


SCALES = [1e-310, 1e-300, 1e300]


# The magnitude cases run on every kernel path: NumPy (the CPU kernels) and the CUDA backends.
on_every_kernel = pytest.mark.parametrize("backend", KERNEL_BACKENDS)


@on_every_kernel
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("method", ["eigh", "newton_schulz"])
def test_matrix_sqrt_scale_invariant(scale, method, backend):
    if method == "eigh" and is_cuda(backend):
        pytest.skip("eigh square roots are CPU only")
    a = spd()
    s, info = ck.matrix_sqrt_and_inv_sqrt(make(a * scale, backend), method=method, return_info=True)
    assert info["converged"] and info["residual"] < 1e-13
    ref = sqrt_ref(a)
    rtol = 1e-12 if scale >= 1e-300 else 1e-10  # a subnormal input holds fewer bits
    np.testing.assert_allclose(to_numpy(s[0]) / np.sqrt(scale), ref, rtol=rtol, atol=rtol * np.abs(ref).max())
    inv = np.linalg.inv(ref)
    np.testing.assert_allclose(to_numpy(s[1]) * np.sqrt(scale), inv, rtol=rtol, atol=rtol * np.abs(inv).max())


@on_every_kernel
@pytest.mark.parametrize("scale", SCALES)
def test_polar_scale_invariant(scale, backend):
    g = np.random.default_rng(1).standard_normal((4, 6))
    ref = ck.polar(g)
    np.testing.assert_allclose(to_numpy(ck.polar(make(g * scale, backend))), ref, atol=1e-12)
    w = make(np.zeros_like(g), backend)
    ck.polar_update_(w, make(g * scale, backend), lr=1.0)
    np.testing.assert_allclose(to_numpy(w), -ref, atol=1e-12)


def lyapunov_residual(s, c, x):
    return np.linalg.norm(s @ x + x @ s - c) / np.linalg.norm(c)


@on_every_kernel
@pytest.mark.parametrize("n", [6, 64])
def test_lyapunov_indefinite_not_converged(n, backend):
    # one negative eigenvalue, its eigenvector spread over all n entries
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((n, n)))
    s = q @ np.diag(np.r_[-1.5, np.linspace(0.5, 4, n - 1)]) @ q.T
    c = np.random.default_rng(3).standard_normal((n, n))
    c = c + c.T
    x, info = ck.solve_lyapunov(make(s, backend), make(c, backend), return_info=True)
    assert not info["converged"]
    assert info["residual"] == pytest.approx(lyapunov_residual(s, c, to_numpy(x)), rel=1e-6)


@on_every_kernel
def test_lyapunov_singular_not_converged(backend):
    x, info = ck.solve_lyapunov(make(np.diag([0.0, 1, 2, 3]), backend), make(np.eye(4), backend), max_iters=60,
                                return_info=True)
    assert not info["converged"]


@on_every_kernel
@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_lyapunov_scale_invariant(scale, backend):
    s = spd(5, 4)
    c = np.random.default_rng(5).standard_normal((5, 5))
    x, info = ck.solve_lyapunov(make(s * scale, backend), make(c, backend), return_info=True)
    assert info["converged"] and info["residual"] < 1e-12
    assert lyapunov_residual(s, c, to_numpy(x) * scale) < 1e-12


@on_every_kernel
def test_lyapunov_zero_inputs(backend):
    s, c = spd(4), np.random.default_rng(5).standard_normal((4, 4))
    x, info = ck.solve_lyapunov(make(s, backend), make(np.zeros((4, 4)), backend), return_info=True)
    assert info["converged"] and info["residual"] == 0 and not to_numpy(x).any()
    x, info = ck.solve_lyapunov(make(np.zeros((4, 4)), backend), make(c, backend), return_info=True)
    assert not info["converged"] and info["residual"] == 1 and not to_numpy(x).any()


@on_every_kernel
def test_lyapunov_nan_in_c_names_c(backend):
    with pytest.raises(ArgumentError, match="'C' contains NaN or Inf"):
        ck.solve_lyapunov(make(spd(3), backend), make(np.full((3, 3), np.nan), backend))


@pytest.mark.parametrize("call", [
    lambda a, b: ck.polar([a, b], out=[b, a]),
    lambda a, b: ck.polar_update_([a, b], [b, a], lr=0.1),
    lambda a, b: ck.polar_update_([a, a], [b, b.copy()], lr=0.1),
    lambda a, b: ck.polar(a, out=a),
    lambda a, b: ck.matrix_sqrt_and_inv_sqrt(a @ a.T, out=(b, b)),
    lambda a, b: ck.solve_lyapunov(a @ a.T + np.eye(4), b, out=b),
    lambda a, b: ck.matrix_inverse_root(a @ a.T, 2, out=b, basis=b),
])
def test_overlapping_outputs_raise(call):
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    with pytest.raises(ArgumentError, match="shares memory"):
        call(a, b)


def test_polar_update_errors_name_param():
    g = np.ones((3, 3))
    with pytest.raises(ArgumentTypeError, match="'param'"):
        ck.polar_update_(None, g, lr=0.1)
    with pytest.raises(ArgumentTypeError, match="'param'"):
        ck.polar_update_(np.ones((3, 3), dtype=np.int64), g, lr=0.1)


@on_every_kernel
@pytest.mark.parametrize("scale", [1e300, 1e-300])
def test_qr_bases_scale_invariant(scale, backend):
    q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((6, 4)))
    np.testing.assert_allclose(to_numpy(ck.orthonormalize(make(q * scale, backend), "qr")),
                               q * np.sign(np.diag(q))[None] * np.sign(np.diag(q))[None], atol=1e-12)
    a = spd(6, 8)
    q0 = np.linalg.qr(np.random.default_rng(9).standard_normal((6, 6)))[0]
    qn, d, _ = ck.eigenbasis_update(make(a * scale, backend), make(q0, backend))
    qr, dr, _ = ck.eigenbasis_update(a, q0)
    np.testing.assert_allclose(to_numpy(qn), qr, atol=1e-12)
    np.testing.assert_allclose(to_numpy(d) / scale, dr, rtol=1e-12)


@on_every_kernel
@pytest.mark.parametrize("scale", [1e-310, 1e-300, 1e-3, 10.0, 1e300])
def test_polar_orthonormalize_is_scale_invariant(scale, backend):
    q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((9, 5)))
    r, info = ck.orthonormalize(make(q * scale, backend), "polar", return_info=True)
    assert info["converged"] and info["orthogonality"] < 1e-15
    # a subnormal Q has lost bits of its own: its nearest orthonormal matrix is that far from q
    np.testing.assert_allclose(to_numpy(r), q, atol=1e-13 if scale < 1e-307 else 1e-15)


@on_every_kernel
def test_polar_orthonormalize_checks_shape_and_reports_what_it_could_not_orthonormalize(backend):
    rng = np.random.default_rng(3)
    with pytest.raises(ArgumentError, match="'Q' must have at least as many rows as columns, got 3 x 5"):
        ck.orthonormalize(make(rng.standard_normal((3, 5)), backend), "polar")
    q, _ = np.linalg.qr(rng.standard_normal((9, 5)))
    good = q + 1e-3 * rng.standard_normal((9, 5))
    lost = q.copy()
    lost[:, 1] = lost[:, 0]  # rank 4: no orthonormal matrix is near
    stack = make(np.stack([good, lost]), backend)
    r, info = ck.orthonormalize(stack, "polar", return_info=True)
    assert info["converged"].tolist() == [True, False]
    measured = [np.abs(x.T @ x - np.eye(5)).max() for x in to_numpy(r)]
    np.testing.assert_allclose(info["orthogonality"], measured, rtol=1e-6, atol=1e-15)
    assert info["orthogonality"][1] > 0.1
    with pytest.warns(ck.ConvergenceWarning, match="1 of 2 matrices"):
        ck.orthonormalize(stack, "polar")
    _, info = ck.orthonormalize(make(good, backend), "polar", steps=1, return_info=True)  # too few for float64
    assert not info["converged"] and 1e-8 < info["orthogonality"] < 1e-4


@pytest.mark.parametrize("dtype, tol", [("float64", 1.5e-8), ("float32", 2.5e-4), ("float16", 0.023)])
def test_polar_orthonormalize_converges_to_the_precision_of_its_dtype(dtype, tol):
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((64, 32)))
    noisy = (q + 0.05 * rng.standard_normal((64, 32)) / 8).astype(dtype)  # 4-bit-like noise
    r, info = ck.orthonormalize(noisy, "polar", return_info=True)
    assert r.dtype == np.dtype(dtype) and info["converged"]
    rd = r.astype(np.float64)
    assert info["orthogonality"] == pytest.approx(np.abs(rd.T @ rd - np.eye(32)).max(), rel=1e-3, abs=1e-15)
    assert info["orthogonality"] <= tol


def test_inverse_root_huge_eps_converges():
    a = spd()
    x, info = ck.matrix_inverse_root(a, 2, eps=1e100, method="eigh", return_info=True)
    assert info["converged"]
    w, v = np.linalg.eigh(a)
    ref = (v * (w + 1e100) ** -0.5) @ v.T  # off the diagonal only rounding (1e-16 of the norm)
    np.testing.assert_allclose(x, ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max())


@pytest.mark.parametrize("kwargs, name", [({"eps": None}, "eps"), ({"eps": "a"}, "eps"), ({"tol": "a"}, "tol"),
                                          ({"method": None}, "method")])
def test_number_and_method_types(kwargs, name):
    with pytest.raises(ArgumentTypeError, match=f"'{name}'"):
        ck.matrix_inverse_root(spd(3), 2, **kwargs)


def test_numpy_scalars_accepted():
    a = spd(3)
    ck.matrix_inverse_root(a, 2, eps=np.float32(1e-7), tol=np.float32(1e-6), method="newton")
    ck.matrix_sqrt(a, tol=np.float32(1e-6))
    ck.polar_update_(np.ones((3, 3)), a, lr=np.float32(0.1), weight_decay=np.float16(0))


def test_torch_in_place_write_visible_to_autograd():
    torch = pytest.importorskip("torch")
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    p = w * 1.0
    y = (p * p).sum()  # saves p
    ck.polar_update_(p.detach(), torch.randn(4, 4, dtype=torch.float64), lr=0.1)
    with pytest.raises(RuntimeError, match="inplace"):
        y.backward()


MAGNITUDE = st.sampled_from([1e-310, 1e-305, 1e-300, 1e-150, 1e-20, 1.0, 1e20, 1e150, 1e300, 1e305])


@settings(max_examples=30, deadline=None)
@given(scale=MAGNITUDE, seed=st.integers(0, 2**16), n=st.integers(1, 5))
def test_magnitude_property(scale, seed, n):
    """Each call returns a result within its accuracy or raises a curvkit error naming an argument."""
    a = spd(n, seed)
    g = np.random.default_rng(seed).standard_normal((n, n + 1))
    subnormal = scale < 1e-300
    tol = 1e-9 if subnormal else 1e-11
    try:
        np.testing.assert_allclose(ck.polar(g * scale), ck.polar(g), atol=tol)
        s = ck.matrix_sqrt(a * scale)
        np.testing.assert_allclose(s / np.sqrt(scale), sqrt_ref(a), rtol=tol, atol=tol * np.sqrt(np.abs(a).max()))
        x = ck.matrix_inverse_root(a * scale, 2)
        inv = np.linalg.inv(sqrt_ref(a))
        np.testing.assert_allclose(x * np.sqrt(scale), inv, rtol=1e-7, atol=1e-7 * np.abs(inv).max())
        w, _ = ck.eigh(a * scale)
        np.testing.assert_allclose(w / scale, np.linalg.eigvalsh(a), rtol=tol, atol=tol * np.abs(a).max())
    except CurvkitError as e:
        assert "argument '" in str(e)


@needs_torch
def test_torch_wrappers_name_arguments_of_the_wrong_type():
    import curvkit.torch as ct

    for bad in (None, "A", np.eye(3)):
        with pytest.raises(ArgumentTypeError, match="'A' must be a torch.Tensor"):
            ct.matrix_sqrt(bad)
        with pytest.raises(ArgumentTypeError, match="'G' must be a torch.Tensor"):
            ct.polar(bad)
        with pytest.raises(ArgumentTypeError, match="'param' must be a torch.Tensor"):
            ct.polar_update_(bad, torch.zeros(2, 2), lr=0.1)


@needs_torch
def test_tensors_on_other_devices_are_refused_by_name():
    meta = torch.empty(3, 3, device="meta")
    with pytest.raises(ArgumentError, match="'A' must be a CPU or CUDA tensor, got a tensor on meta"):
        ck.matrix_sqrt(meta)
    with pytest.raises(ArgumentError, match="argument 'G' must be a CPU or CUDA tensor"):
        ck.polar(meta)


def test_big_endian_input_is_named():
    with pytest.raises(ArgumentTypeError, match="argument 'G' is not in native byte order"):
        ck.polar(np.ones((3, 4), dtype=">f8"))


def test_python_layer_argument_errors_are_curvkit_errors():
    # a list where an array is expected, a bad device, a bad schedule: curvkit's classes (which
    # are TypeError / ValueError too), naming the argument
    with pytest.raises(ArgumentTypeError, match="'A' must be a NumPy array, PyTorch tensor or CuPy array"):
        ck.eigh([[1.0, 0.0], [0.0, 1.0]][0])
    with pytest.raises(ArgumentError, match="'device'"):
        ck.probes(3, device="tpu")
    with pytest.raises(ArgumentError, match="'coefficients'"):
        ck.polar(np.eye(3), coefficients="nope")
    with pytest.raises(ArgumentError, match="'shape'"):
        ck.probes(())
