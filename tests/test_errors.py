"""Bad input gets a Python exception naming the argument, never a crash."""
import threading
import warnings

import numpy as np
import pytest
from conftest import needs_torch

import curvkit
from curvkit import _core


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kind="bernoulli"), ValueError, "'kind'"),
        (dict(seed=-1), ValueError, "'seed'"),
        (dict(seed=2**64), ValueError, "'seed'"),
        (dict(seed=1.5), TypeError, "'seed'"),
        (dict(seed=True), TypeError, "'seed'"),
        (dict(offset=-3), ValueError, "'offset'"),
        (dict(offset=2**64 - 2), ValueError, "'offset'"),  # 3 probes past 2^64
        (dict(dtype="int32"), TypeError, "'dtype'"),
        (dict(dtype="bfloat16"), TypeError, "bfloat16"),  # NumPy has none
        (dict(dtype=object()), TypeError, "'dtype'"),
        (dict(like=[1.0, 2.0]), TypeError, "'like'"),
        (dict(like=np.zeros(2, dtype=np.int64)), TypeError, "'like'"),
        (dict(device="tpu"), ValueError, "'device'"),
        (dict(device="cpu:1"), ValueError, "'device'"),
        (dict(like=np.zeros(2), device="cuda"), ValueError, "CUDA|CPU"),
    ],
)
def test_probes_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        curvkit.probes((4, 3), **kwargs)


@pytest.mark.parametrize("shape, error", [((-1, 3), ValueError), ((2.5,), TypeError), ((), ValueError),
                                          ("12", TypeError), ((2**40, 2**40), ValueError)])
def test_probes_shape_errors(shape, error):
    with pytest.raises(error, match="'shape'"):
        curvkit.probes(shape)


@pytest.mark.skipif(curvkit.has_cuda(), reason="checks the message of a build or machine without CUDA")
def test_request_for_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA"):
        curvkit.probes(3, device="cuda")


def test_native_layer_checks_outputs():
    with pytest.raises(ValueError, match="'out'.*read-only"):
        ro = np.zeros((4, 2))
        ro.flags.writeable = False
        _core.probes(ro, kind="gaussian", seed=0, offset=0, workspace=None, stream=0)
    with pytest.raises(ValueError, match="'out' must be C-contiguous"):
        _core.probes(np.zeros((4, 6))[:, ::2], kind="gaussian", seed=0, offset=0, workspace=None, stream=0)
    with pytest.raises(ValueError, match="'out' must have shape"):
        _core.probes(np.zeros(()), kind="gaussian", seed=0, offset=0, workspace=None, stream=0)
    with pytest.raises(TypeError, match="'out'.*int64"):
        _core.probes(np.zeros(4, dtype=np.int64), kind="rademacher", seed=0, offset=0, workspace=None, stream=0)
    with pytest.raises(TypeError, match="'out' must be an array"):
        _core.probes([0.0, 0.0], kind="rademacher", seed=0, offset=0, workspace=None, stream=0)
    with pytest.raises(ValueError, match="'kind'"):
        _core.probes(np.zeros(4), kind="uniform", seed=0, offset=0, workspace=None, stream=0)
    with pytest.raises(ValueError, match="'offset'"):
        _core.probes(np.zeros((3, 2)), kind="gaussian", seed=0, offset=2**64 - 1, workspace=None, stream=0)


def test_native_layer_type_errors_name_the_argument():
    with pytest.raises(TypeError, match="'src'.*complex128"):
        _core.convert(np.zeros(3, dtype=complex), np.zeros(3))
    with pytest.raises(TypeError, match="'out'.*bool"):
        _core.convert(np.zeros(3), np.zeros(3, dtype=bool))
    with pytest.raises(TypeError, match="'src'.*native byte order"):
        _core.convert(memoryview(np.zeros(3, dtype=">f8")), np.zeros(3))
    with pytest.raises(TypeError, match="'src' must be an array.*dict"):
        _core.convert({}, np.zeros(3))
    with pytest.raises(ValueError, match="'src' and 'out' must have the same shape, got \\(3,\\) and \\(4,\\)"):
        _core.convert(np.zeros(3), np.zeros(4))


def test_numpy_refusing_dlpack_falls_back_or_errors_cleanly():
    # Non-native byte order: NumPy's __dlpack__ raises BufferError, the buffer path reports it.
    with pytest.raises(TypeError, match="native byte order"):
        _core._testing.array_info(np.zeros(3, dtype=">f8"))
    # Object arrays come in through the buffer protocol and are refused by dtype.
    with pytest.raises(TypeError, match="'src' must have dtype float16"):
        _core.convert(np.array([None, 1], dtype=object), np.zeros(2))


@needs_torch
def test_torch_errors():
    import torch

    with pytest.raises(TypeError, match="'like'"):
        curvkit.probes(3, like=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="'device'"):
        curvkit.probes(3, device=torch.device("meta"))


def test_thread_setting_errors():
    with pytest.raises(ValueError, match="'n'"):
        curvkit.set_num_threads(0)
    with pytest.raises(TypeError, match="'n'"):
        curvkit.set_num_threads("2")


# ---- integer arguments bounded before they reach C++ (issue 14): no 2**40-entry schedule, no
# pybind11 signature dump, a curvkit error naming the argument


@pytest.mark.parametrize("call, name", [
    (lambda: curvkit.polar(np.ones((3, 4)), steps=2**40), "'steps'"),
    (lambda: curvkit.polar(np.ones((3, 4)), steps=10_001), "'steps'"),
    (lambda: curvkit.polar_update_(np.ones((3, 4)), np.ones((3, 4)), lr=0.1, steps=2**40), "'steps'"),
    (lambda: curvkit.orthonormalize(np.eye(4, 3), "polar", steps=2**40), "'steps'"),
    (lambda: curvkit.matrix_sqrt(np.eye(3), max_iters=2**40), "'max_iters'"),
    (lambda: curvkit.matrix_sqrt(np.eye(3), max_iters=2**31), "'max_iters'"),
    (lambda: curvkit.matrix_inv_sqrt(np.eye(3), max_iters=2**40), "'max_iters'"),
    (lambda: curvkit.matrix_sqrt_and_inv_sqrt(np.eye(3), max_iters=2**40), "'max_iters'"),
    (lambda: curvkit.solve_lyapunov(np.eye(3), np.eye(3), max_iters=2**40), "'max_iters'"),
    (lambda: curvkit.matrix_inverse_root(np.eye(3), p=4, max_iters=2**40), "'max_iters'"),
    (lambda: curvkit.matrix_inverse_root(np.eye(3), p=2**31), "'p'"),
    (lambda: curvkit.set_num_threads(2**40), "'n'"),
])
def test_integer_arguments_bounded(call, name):
    with pytest.raises(curvkit.ArgumentError, match=name) as e:
        call()
    assert "incompatible function arguments" not in str(e.value)


def test_integer_arguments_at_their_bounds():
    assert curvkit.polar(np.ones((3, 4)), steps=0).shape == (3, 4)
    _, info = curvkit.matrix_sqrt(np.eye(3), max_iters=2**31 - 1, return_info=True)
    assert info["converged"]
    X = curvkit.matrix_inverse_root(np.eye(3) * 4, p=2**31 - 1, method="eigh")
    np.testing.assert_allclose(X, np.eye(3) * 4 ** (-1 / (2**31 - 1)), rtol=1e-12)


@needs_torch
def test_torch_polar_steps_bounded():
    import torch

    import curvkit.torch as ct

    with pytest.raises(curvkit.ArgumentError, match="'steps'"):
        ct.polar(torch.ones(3, 4, dtype=torch.float64), steps=2**40)
    with pytest.raises(curvkit.ArgumentError, match="'steps'"):
        ct.polar_update_(torch.ones(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64), lr=0.1,
                         steps=2**40)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: curvkit.trace_estimate(np.eye(4), None, 0), ValueError, "'num_matvecs'"),
        (lambda: curvkit.trace_estimate(np.eye(4), None, 8, seed=-1), ValueError, "'seed'"),
        (lambda: curvkit.trace_estimate(np.eye(4), None, 8, tol=-1.0), ValueError, "'tol'"),
        (lambda: curvkit.trace_estimate(np.eye(4), None, 8, tol="x"), TypeError, "'tol'"),
        (lambda: curvkit.trace_estimate(np.eye(4), None, 8, method=3), TypeError, "'method'"),
        (lambda: curvkit.trace_estimate(np.eye(4), 5, 8), ValueError, "'n'"),
        (lambda: curvkit.trace_estimate(lambda z: z, None, 8), TypeError, "'n'"),
        (lambda: curvkit.trace_estimate(lambda z: z, 4, 8, dtype="int32"), TypeError, "'dtype'"),
        (lambda: curvkit.trace_estimate(lambda z: [1.0], 4, 8), ValueError, "'matvec'"),
        (lambda: curvkit.diag_estimate(np.eye(4), None, 8, block_size=0), ValueError, "'block_size'"),
        (lambda: curvkit.top_eigenvalues(np.eye(4), None, k=5), ValueError, "'k'"),
        (lambda: curvkit.top_eigenvalues(np.eye(4), None, which="left"), ValueError, "'which'"),
        (lambda: curvkit.top_eigenvalues(np.eye(4), None, max_matvecs=0), ValueError, "'max_matvecs'"),
        (lambda: curvkit.spectral_density(np.eye(4), None, num_probes=0), ValueError, "'num_probes'"),
        (lambda: curvkit.adahessian_step_([np.zeros(2)], [np.zeros(2)], [np.zeros(2)], [np.zeros(2)],
                                          [np.zeros(2)], step=1, betas=0.9), TypeError, "'betas'"),
        (lambda: curvkit.adahessian_step_([np.zeros(2)], [np.zeros(2)], [np.zeros(2)], [np.zeros(2)],
                                          [np.zeros(2)], step=1, lr=float("nan")), ValueError, "'lr'"),
        (lambda: curvkit.adahessian_step_(np.zeros(2), [np.zeros(2)], [np.zeros(2)], [np.zeros(2)],
                                          [np.zeros(2)], step=1), ValueError, "'grads'"),
        (lambda: curvkit.sophia_step_([np.zeros(2)], [np.zeros(2)], [np.zeros(2)], [np.zeros(2)], lr=None),
         TypeError, "'lr'"),
        (lambda: curvkit.sophia_step_([np.zeros(2, "int64")], [np.zeros(2)], [np.zeros(2)], [np.zeros(2)]),
         TypeError, "'params'"),
        (lambda: _core.sketch_qr(np.zeros((3, 4)), np.zeros((4, 4)), 0), ValueError, "more than the dimension"),
        (lambda: _core.lanczos_step(np.zeros((1, 3, 5)), np.zeros((5, 1)), np.zeros((1, 2)), np.zeros((1, 2)),
                                    np.zeros(1, dtype=np.int32), 0, True), TypeError, "'lengths'"),
    ],
)
def test_estimator_and_step_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- M-FAC

def _window_snapshot(w):
    return (w.size, w.count, w.slots, np.array(w.G), np.array(w.gram), np.array(w.factor))


def _same_snapshot(a, b):
    return a[:3] == b[:3] and all(np.array_equal(x, y) for x, y in zip(a[3:], b[3:]))


@pytest.mark.parametrize("bad, match", [(np.zeros(9), "'g' must have shape"),
                                        (np.zeros((10, 1)), "'g' must have shape"),
                                        (np.zeros(10, dtype=np.float32), "'g' must have the window's dtype"),
                                        (np.zeros(10, dtype=np.int64), "'g'"),
                                        (np.array([np.nan] + [1.0] * 9), "'g' contains NaN or Inf"),
                                        (np.array([1.0] * 9 + [np.inf]), "'g' contains NaN or Inf"),
                                        (np.full(10, 1e9), "'g' has .*too small"),
                                        ([1.0] * 10, "'g' must be")])
def test_fisher_window_refuses_bad_gradients_unchanged(bad, match):
    rng = np.random.default_rng(0)
    w = curvkit.FisherWindow(10, 3, 1e-3, dtype="float64")
    for g in rng.standard_normal((4, 10)):
        w.push(g)
    before = _window_snapshot(w)
    with pytest.raises((curvkit.CurvkitError, TypeError), match=match):
        w.push(bad)
    assert _same_snapshot(before, _window_snapshot(w))
    w.push(rng.standard_normal(10))  # still usable
    assert w.count == 5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(damp=0.0), ValueError, "'damp'"), (dict(damp=-1.0), ValueError, "'damp'"),
    (dict(damp=float("nan")), ValueError, "'damp'"), (dict(damp="1"), TypeError, "'damp'"),
    (dict(d=0), ValueError, "'d'"), (dict(m=0), ValueError, "'m'"), (dict(m=2.5), TypeError, "'m'"),
    (dict(normalize="mean"), ValueError, "'normalize'"), (dict(refactor_every=0), ValueError, "'refactor_every'"),
    (dict(dtype="int32"), TypeError, "'dtype'"), (dict(dtype="bfloat16"), TypeError, "bfloat16"),
    (dict(device="tpu"), ValueError, "'device'"),
])
def test_fisher_window_constructor_errors(kwargs, error, match):
    args = dict(d=10, m=3, damp=1e-3, dtype="float64")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        curvkit.FisherWindow(**args)


def test_fisher_window_vector_and_damp_errors():
    w = curvkit.FisherWindow(6, 2, 1e-2, dtype="float32")
    w.push(np.ones(6, dtype=np.float32))
    with pytest.raises(ValueError, match="'x' must have shape"):
        w.ihvp(np.ones(5, dtype=np.float32))
    with pytest.raises(TypeError, match="'x' must have the gradients' dtype float32"):
        w.ihvp(np.ones(6))
    with pytest.raises(ValueError, match="'out'"):
        w.ihvp(np.ones(6, dtype=np.float32), out=np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match="'out'"):
        w.diag(out=np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match="'damp'"):
        w.damp = 0
    assert w.damp == 1e-2


@needs_torch
def test_fisher_window_device_errors():
    import torch

    w = curvkit.FisherWindow(4, 2, 1e-2, dtype="float32", like=torch.zeros(1))
    with pytest.raises(ValueError, match="'g'"):
        w.push(torch.zeros(4, device="meta"))


@pytest.mark.skipif(curvkit.has_cuda(), reason="checks the message of a build or machine without CUDA")
def test_fisher_window_cuda_without_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        curvkit.FisherWindow(4, 2, 1e-2, device="cuda")


def test_fisher_static_errors():
    G = np.ones((3, 5))
    x = np.ones(5)
    with pytest.raises(ValueError, match="'damp'"):
        curvkit.fisher_ihvp(G, x, 0.0)
    with pytest.raises(ValueError, match="'damp'.*too small"):
        curvkit.fisher_ihvp(G * 1e8, x, 1e-8)
    with pytest.raises(ValueError, match="'G' must have shape"):
        curvkit.fisher_ihvp(np.ones(5), x, 1.0)
    with pytest.raises(ValueError, match="'x' must have shape"):
        curvkit.fisher_ihvp(G, np.ones(4), 1.0)
    with pytest.raises(TypeError, match="'x' must have the gradients' dtype"):
        curvkit.fisher_ihvp(G, x.astype(np.float32), 1.0)
    with pytest.raises(ValueError, match="'G' contains NaN"):
        curvkit.fisher_ihvp(np.full((3, 5), np.nan), x, 1.0)
    with pytest.raises(ValueError, match="'x' contains NaN"):
        curvkit.fisher_ihvp(G, np.full(5, np.inf), 1.0)
    with pytest.raises(ValueError, match="'block_size'"):
        curvkit.fisher_ihvp(G, x, 1.0, block_size=0)
    with pytest.raises(ValueError, match="'G' contains NaN"):
        curvkit.fisher_inverse_diag(np.full((3, 5), np.nan), 1.0, block_size=2)
    with pytest.raises(ValueError, match="'out'"):
        curvkit.fisher_inverse_diag(G, 1.0, out=np.ones(4))
    V = curvkit.fisher_inverse_factor(G, 1.0)
    with pytest.raises(ValueError, match="'rows' entry 1"):
        curvkit.fisher_inverse_entries(V, 1.0, [0, 5], [0, 0])
    with pytest.raises(ValueError, match="'cols' entry 0"):
        curvkit.fisher_inverse_entries(V, 1.0, [0], [-1])
    with pytest.raises(TypeError, match="'rows'"):
        curvkit.fisher_inverse_entries(V, 1.0, [0.5], [0])
    with pytest.raises(ValueError, match="'rows' and 'cols'"):
        curvkit.fisher_inverse_entries(V, 1.0, [0, 1], [0])
    with pytest.raises(TypeError, match="'V' must be float64"):
        curvkit.fisher_inverse_entries(G.astype(np.float32), 1.0, [0], [0])


def test_fisher_results_never_hand_on_nan_or_inf():
    w = curvkit.FisherWindow(4, 2, 1e-39, dtype="float32")  # x / damp overflows float32
    with pytest.raises(ValueError, match="not finite in float32"):
        w.ihvp(np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match="not finite in float32"):
        w.diag()
    v = curvkit.FisherWindow(4, 2, 1.0, dtype="float64")
    v.push(np.ones(4))
    with pytest.raises(ValueError, match="'x' holds NaN"):
        v.ihvp(np.array([1.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="not finite in float32"):
        curvkit.fisher_ihvp(np.zeros((2, 4), dtype=np.float32), np.ones(4, dtype=np.float32), 1e-39, block_size=2)


def test_sinkhorn_arguments():
    a, b, C = np.full(3, 1 / 3), np.full(4, 1 / 4), np.ones((3, 4))
    with pytest.raises(ValueError, match="'reg' must be a finite number >= 2.2e-308"):
        curvkit.sinkhorn(a, b, C, reg=0.0)
    with pytest.raises(ValueError, match="'tol'"):
        curvkit.sinkhorn(a, b, C, reg=0.1, tol=-1.0)
    with pytest.raises(ValueError, match="'a' and 'b' must have the same mass"):
        curvkit.sinkhorn(a, 2 * b, C, reg=0.1)
    with pytest.raises(ValueError, match="'a' must be finite and >= 0"):
        curvkit.sinkhorn(np.array([0.5, 0.6, -0.1]), b, C, reg=0.1)
    with pytest.raises(ValueError, match="'b' must be finite and >= 0"):
        curvkit.sinkhorn(a, np.array([np.nan, 0.5, 0.25, 0.25]), C, reg=0.1)
    with pytest.raises(ValueError, match="'C' must be finite"):
        curvkit.sinkhorn(a, b, np.full((3, 4), np.nan), reg=0.1)
    with pytest.raises(ValueError, match="'x' must be finite"):
        curvkit.sinkhorn(a, b, x=np.full((3, 2), np.inf), y=np.ones((4, 2)), reg=0.1)
    with pytest.raises(ValueError, match="'C' must have shape"):
        curvkit.sinkhorn(a, b, np.ones(12), reg=0.1)
    with pytest.raises(ValueError, match=r"'a' must have shape \(4,\)"):
        curvkit.sinkhorn(a, b, np.ones((4, 3)), reg=0.1)
    with pytest.raises(ValueError, match="'y' must have shape"):
        curvkit.sinkhorn(a, b, x=np.ones((3, 2)), y=np.ones((4, 3)), reg=0.1)
    with pytest.raises(ValueError, match="'a' must have shape"):
        curvkit.sinkhorn(np.full(5, 0.2), b, C, reg=0.1)
    with pytest.raises(ValueError, match="not both"):
        curvkit.sinkhorn(a, b, C, x=np.ones((3, 2)), y=np.ones((4, 2)), reg=0.1)
    with pytest.raises(ValueError, match="'cost' must be one of"):
        curvkit.sinkhorn(a, b, x=np.ones((3, 2)), y=np.ones((4, 2)), cost="cosine", reg=0.1)
    with pytest.raises(ValueError, match="'method' must be one of"):
        curvkit.sinkhorn(a, b, C, reg=0.1, method="greenkhorn")
    with pytest.raises(ValueError, match="'density' must be in"):
        curvkit.sinkhorn(a, b, C, reg=0.1, density=2.0)
    with pytest.raises(ValueError, match="'p' must be a finite number > 0"):
        curvkit.sinkhorn(a, b, x=np.ones((3, 2)), y=np.ones((4, 2)), cost="pnorm", p=0.0, reg=0.1)
    with pytest.raises(TypeError, match="'b' must have the dtype of 'a'"):
        curvkit._core.sinkhorn([a[None]], [b[None].astype(np.float32)], [C[None]], [None], [None],
                               [np.empty((1, 3))], [np.empty((1, 4))], [None], cost="matrix", p=2.0, reg=0.1,
                               method="log", tol=1e-9, max_iter=10, max_newton=1, density=0.0, float32_warmup=False,
                               warm_start=False, stream=0, workspace=None)
    with pytest.raises(ValueError, match="list item 1, problem 0"):
        curvkit.sinkhorn([a, a], [b, 2 * b], [C, C], reg=0.1)


INDEFINITE = np.diag([1.0, -1.0])  # no square root: a true miss in every method


def test_the_failure_policy_warns_by_default_and_raising_is_opt_in():
    assert curvkit.get_failure_policy() == "warn"
    with pytest.warns(curvkit.ConvergenceWarning, match=r"matrix_sqrt: 1 of 1 matrices did not converge") as w:
        S = curvkit.matrix_sqrt(INDEFINITE)
    assert w[0].filename == __file__  # points at the caller's line, not into curvkit
    np.testing.assert_allclose(S, np.diag([1.0, 0.0]))  # the floored root, finite
    with curvkit.failure_policy("raise"):
        assert curvkit.get_failure_policy() == "raise"
        with pytest.raises(curvkit.ConvergenceError) as e:
            curvkit.matrix_sqrt(INDEFINITE)
        assert not e.value.info["converged"] and np.isfinite(e.value.result).all()
    assert curvkit.get_failure_policy() == "warn"
    previous = curvkit.set_failure_policy("ignore")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            curvkit.matrix_sqrt(INDEFINITE)
            _, info = curvkit.matrix_sqrt(INDEFINITE, return_info=True)  # return_info: never a warning
    finally:
        assert curvkit.set_failure_policy(previous) == "ignore"
    with curvkit.failure_policy("raise"):
        _, info = curvkit.matrix_sqrt(INDEFINITE, return_info=True)  # nor an error
    assert not info["converged"]
    with pytest.raises(curvkit.ArgumentError, match="'policy' must be one of 'warn', 'raise', 'ignore'"):
        curvkit.set_failure_policy("strict")


def test_the_failure_policy_is_per_thread():
    seen = []
    with curvkit.failure_policy("raise"):
        thread = threading.Thread(target=lambda: seen.append(curvkit.get_failure_policy()))
        thread.start()
        thread.join()
    assert seen == ["warn"]
