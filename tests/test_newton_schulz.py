"""curvkit.polar and polar_update_ against float64 references (SVD and a plain-product
iteration), over schedules, routes, shapes, dtypes and frameworks."""
import numpy as np
import pytest
from conftest import KERNEL_BACKENDS, TOL, backend_dtypes, backends, make, needs_torch, to_numpy

import curvkit
from curvkit import testing as reference
from curvkit.newton_schulz import schedule

# TOL[(dtype, "polar")]: distance from the float64 plain-product iteration after 5 steps. Sides
# above 64 reach the off-diagonal tiles of the CUDA mirror kernel (64 x 64 for 2-byte types).
METHODS = ["standard", "gram"]
SHAPES = [(32, 32), (24, 64), (64, 24), (3, 16, 40), (2, 2, 40, 16), (1, 7), (7, 1), (130, 200), (3, 100, 70)]


@pytest.mark.parametrize("coefficients, band", [("muon", (0.6818, 1.1344)), ("you", (0.9778, 1.0318)),
                                                ("polar_express", (0.8703, 1.1236))])
@pytest.mark.parametrize("method", METHODS)
def test_singular_value_bands_after_five_steps(coefficients, band, method):
    # Gaussian 256 x 1024 in float64: the bands the docstring states (Muon's is the published
    # [0.68, 1.13] of its scalar map).
    G = np.random.default_rng(0).standard_normal((256, 1024))
    X = curvkit.polar(G, 5, coefficients, method=method)
    s = np.linalg.svd(X, compute_uv=False)
    assert band[0] - 2e-3 <= s.min() and s.max() <= band[1] + 2e-3
    table, norm_scale = schedule(coefficients, 5)
    np.testing.assert_allclose(X, reference.newton_schulz(G, table, norm_scale), atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_matches_reference_iteration_per_dtype(backend, dtype, method, shape, rng):
    G = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3)
    table, norm_scale = schedule("you", 5)
    g = make(G, backend, dtype)
    X = curvkit.polar(g, 5, "you", method=method)
    assert type(X) is type(g) and X.dtype == g.dtype and tuple(X.shape) == shape
    expected = reference.newton_schulz(to_numpy(g), table, norm_scale)
    np.testing.assert_allclose(to_numpy(X), expected, atol=TOL[(dtype, "polar")])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(48, 48), (40, 100), (100, 40), (4, 30, 50)])
@pytest.mark.parametrize("cond", [1e1, 1e3])
def test_converges_to_svd_polar_factor_in_float64(method, shape, cond, rng):
    r = min(shape[-2:])
    G = np.stack([reference.matrix_with_spectrum(rng, *shape[-2:], np.logspace(0, -np.log10(cond), r))
                  for _ in range(int(np.prod(shape[:-2])))]).reshape(shape)
    X = curvkit.polar(G, 14, "polar_express", method=method)
    np.testing.assert_allclose(X, reference.polar_factor(G), atol=1e-10)


@pytest.mark.parametrize("coefficients, steps", [("muon", 5), ("polar_express", 5), ("polar_express", 10)])
@pytest.mark.parametrize("smallest", [1e-2, 1e-4, 1e-8])
def test_float32_routes_follow_the_float64_iteration_on_wide_spectra(coefficients, steps, smallest, rng):
    # Singular values from 1 down to `smallest`: how each one is mapped, compared along the
    # singular vectors. The Gram route squares the spectrum; its restarts keep it as close
    # to the float64 iteration as the standard route (documented bound 6e-5: measured 3.2e-5
    # to 5.2e-5 across OpenBLAS kernels, which round float32 sums in different orders).
    s = np.logspace(0, np.log10(smallest), 64)
    G = reference.matrix_with_spectrum(rng, 64, 512, s)
    U, _, Vt = np.linalg.svd(G, full_matrices=False)
    table, norm_scale = schedule(coefficients, steps)
    expected = np.diag(U.T @ reference.newton_schulz(G, table, norm_scale) @ Vt.T)
    for method in METHODS:
        X = curvkit.polar(G.astype(np.float32), steps, coefficients, method=method).astype(np.float64)
        np.testing.assert_allclose(np.diag(U.T @ X @ Vt.T), expected, atol=6e-5, err_msg=method)


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_zero_and_scale_invariance(method, rng):
    low_rank = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 90))
    X = curvkit.polar(low_rank, 14, "polar_express", method=method)
    s = np.linalg.svd(X, compute_uv=False)
    np.testing.assert_allclose(s[:3], 1.0, atol=1e-9)
    assert np.all(s[3:] < 1e-6)

    batch = np.stack([rng.standard_normal((20, 30)), np.zeros((20, 30)), rng.standard_normal((20, 30))])
    Xb = curvkit.polar(batch, 5, method=method)
    assert np.isfinite(Xb).all() and not Xb[1].any()
    np.testing.assert_array_equal(curvkit.polar(np.zeros((5, 8)), method=method), 0.0)

    G = rng.standard_normal((20, 30))
    reference_x = curvkit.polar(G, 5, method=method)
    for scale in (1e-300, 1e-30, 1e30, 1e300):
        np.testing.assert_allclose(curvkit.polar(G * scale, 5, method=method), reference_x, atol=1e-12)
    g32 = G.astype(np.float32)
    for scale in (1e-35, 1e35):  # near float32's range ends
        np.testing.assert_allclose(curvkit.polar(g32 * np.float32(scale), 5, method=method),
                                   curvkit.polar(g32, 5, method=method), atol=1e-5)


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_input_is_normalized_before_any_cast(dtype):
    import torch

    G = torch.randn(16, 48)
    G = G / G.abs().max() * 6e4  # up to float16's maximum: squaring in float16 would overflow
    X = curvkit.polar(G.to(getattr(torch, dtype)), 5)
    assert torch.isfinite(X).all()
    np.testing.assert_allclose(X.double().numpy(), curvkit.polar(G.double().numpy(), 5), atol=TOL[(dtype, "polar")])


def test_transpose_invariance_and_noncontiguous_input(rng):
    G = rng.standard_normal((30, 70))
    np.testing.assert_allclose(curvkit.polar(G.T), curvkit.polar(G).T, atol=1e-13)
    strided = rng.standard_normal((60, 140))[::2, ::2]
    np.testing.assert_allclose(curvkit.polar(strided), curvkit.polar(np.ascontiguousarray(strided)), atol=0)


def test_list_of_shapes_in_one_call_equals_separate_calls(backend, rng):
    shapes = [(64, 256), (256, 64), (3, 32, 32), (128, 128), (1, 5), (2, 0, 4)]
    Gs = [make(rng.standard_normal(s), backend, "float32") for s in shapes]
    together = curvkit.polar(Gs, 5, "polar_express")
    assert isinstance(together, list) and len(together) == len(shapes)
    for G, X in zip(Gs, together):
        assert tuple(X.shape) == tuple(G.shape) and type(X) is type(G)
        np.testing.assert_allclose(to_numpy(X), to_numpy(curvkit.polar(G, 5, "polar_express")), atol=1e-6)


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-14), (np.float32, 1e-6)])
def test_fused_update_per_dtype(dtype, atol, rng):
    G = rng.standard_normal((3, 20, 50))
    W = rng.standard_normal((3, 20, 50)).astype(dtype)
    expected = W * (1 - 0.02 * 0.1) - 0.02 * 1.5 * curvkit.polar(G.astype(dtype))
    curvkit.polar_update_(W, G.astype(dtype), lr=0.02, weight_decay=0.1, scale=1.5)
    np.testing.assert_allclose(W, expected, atol=atol)


def test_out_and_fused_update(rng):
    G = rng.standard_normal((3, 20, 50))
    out = np.empty_like(G)
    assert curvkit.polar(G, out=out) is out
    np.testing.assert_allclose(out, curvkit.polar(G), atol=0)
    W32 = rng.standard_normal((20, 50)).astype(np.float32)  # param and update of different dtypes
    expected = W32 - 0.1 * curvkit.polar(G[0]).astype(np.float32)
    curvkit.polar_update_(W32, G[0], lr=0.1)
    np.testing.assert_allclose(W32, expected, atol=1e-6)
    Ws = [rng.standard_normal((8, 16)), rng.standard_normal((16, 4))]
    copies = [w.copy() for w in Ws]
    curvkit.polar_update_(Ws, [rng.standard_normal((8, 16)), rng.standard_normal((16, 4))], lr=0.0)
    for w, c in zip(Ws, copies):
        np.testing.assert_array_equal(w, c)


@pytest.mark.parametrize("backend", backends("torch"))
def test_polar_update_writes_a_parameter_that_requires_grad(backend, rng):
    # Muon's use: the parameter of an nn.Module, which DLPack exports only once detached
    import torch

    device = backend[1]
    W = torch.nn.Parameter(torch.tensor(rng.standard_normal((8, 16)), device=device))
    G = torch.tensor(rng.standard_normal((8, 16)), device=device)
    expected = W.detach() * (1 - 0.1 * 0.01) - 0.1 * curvkit.polar(G)
    assert curvkit.polar_update_(W, G, lr=0.1, weight_decay=0.01) is W
    assert W.requires_grad and torch.allclose(W.detach(), expected, atol=1e-12)
    out = torch.empty(8, 16, dtype=torch.float64, device=device, requires_grad=True)
    assert curvkit.polar(G, out=out) is out and torch.equal(out.detach(), curvkit.polar(G))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_unchecked_nonfinite_matrix_gives_nan_and_leaves_the_others(backend, method, bad, rng):
    values = rng.standard_normal((3, 24, 40))
    clean = make(values, backend, "float32")
    values[1, 5, 7] = bad
    G = make(values, backend, "float32")
    with pytest.raises(ValueError, match="NaN or Inf"):
        curvkit.polar(G, method=method)
    X = to_numpy(curvkit.polar(G, method=method, check_finite=False))
    expected = to_numpy(curvkit.polar(clean, method=method))
    assert np.isnan(X[1]).all()
    np.testing.assert_array_equal(X[[0, 2]], expected[[0, 2]])
    W = make(np.ones((3, 24, 40)), backend, "float32")
    curvkit.polar_update_(W, G, lr=0.1, method=method, check_finite=False)
    W = to_numpy(W)
    assert np.isnan(W[1]).all() and np.isfinite(W[[0, 2]]).all()
    W = make(np.ones((3, 24, 40)), backend, "float32")  # a zero factor reads nothing (BLAS)
    curvkit.polar_update_(W, G, lr=0.0, weight_decay=0.5, method=method, check_finite=False)
    np.testing.assert_array_equal(to_numpy(W), np.ones((3, 24, 40)))
    X0 = to_numpy(curvkit.polar(G, steps=0, method=method, check_finite=False))  # NaN even unmixed
    assert np.isnan(X0[1]).all() and np.isfinite(X0[[0, 2]]).all()
    zero = np.zeros((2, 24, 40))
    zero[0, 3, 3] = np.nan  # a NaN among zeros (the largest magnitude would skip it)
    for steps in (0, 5):
        Z = to_numpy(curvkit.polar(make(zero, backend, "float32"), steps=steps, method=method, check_finite=False))
        assert np.isnan(Z[0]).all() and (Z[1] == 0).all()


@pytest.mark.parametrize("cuda_backend", backends("torch", "cuda"))
def test_unchecked_polar_is_captured_in_a_cuda_graph(cuda_backend, rng):
    # No host synchronization without the finite check: Muon's step can live in a CUDA graph,
    # workspaces included (PyTorch serves them from the graph's pool).
    import torch

    G = torch.randn(4, 256, 512, device="cuda")
    W = [torch.randn(256, 512, device="cuda"), torch.randn(128, 96, device="cuda", dtype=torch.bfloat16)]
    updates = [torch.randn_like(w) for w in W]
    out = torch.empty_like(G)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs asks
        curvkit.polar(G, out=out, check_finite=False)
        curvkit.polar_update_([w.clone() for w in W], updates, lr=1.0, check_finite=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        curvkit.polar(G, out=out, check_finite=False)
        curvkit.polar_update_(W, updates, lr=1.0, check_finite=False)
    before = [w.clone() for w in W]
    eager = [w.clone() for w in W]
    curvkit.polar_update_(eager, updates, lr=1.0)
    G.copy_(torch.randn_like(G))
    graph.replay()
    torch.cuda.synchronize()
    # the same kernels as an eager call, unless cuBLAS picks other algorithms under capture:
    # float32 within 1e-5, bfloat16 within a rounding of W (update entries are 0.05 to 0.1)
    torch.testing.assert_close(out, curvkit.polar(G), atol=1e-5, rtol=0)
    for w, w0, e, tol in zip(W, before, eager, (1e-5, 0.05)):
        assert (w.float() - w0.float()).abs().max() > 0.1
        torch.testing.assert_close(w.float(), e.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("cuda_backend", backends("cupy", "cuda"))
def test_unchecked_polar_is_captured_in_a_cupy_graph(cuda_backend, rng):
    # In a CuPy capture the workspaces are the graph's own memory nodes (cudaMallocAsync), not
    # blocks of CuPy's pool, which would hand the recorded addresses to other arrays later.
    import cupy

    if not hasattr(cupy.cuda.Stream, "begin_capture"):
        pytest.skip("needs CuPy with stream capture")
    G = cupy.asarray(rng.standard_normal((3, 64, 160)), dtype=cupy.float32)
    out = cupy.empty_like(G)
    cupy.cuda.Stream.null.synchronize()  # G was written on the legacy stream, which a non-blocking one ignores
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        curvkit.polar(G, out=out, check_finite=False)  # warm-up off the capture
        stream.begin_capture()
        curvkit.polar(G, out=out, check_finite=False)
        graph = stream.end_capture()
        G[...] = cupy.asarray(rng.standard_normal(G.shape), dtype=cupy.float32)
        graph.launch(stream)
        stream.synchronize()
        expected = curvkit.polar(G)
        stream.synchronize()  # the comparison below reads on the legacy stream
    cupy.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", backends("torch"))
def test_torch_custom_ops_compile_without_graph_breaks(backend, rng):
    import torch

    import curvkit.torch as ct

    device = backend[1]
    G = torch.tensor(rng.standard_normal((2, 24, 40)), dtype=torch.float32, device=device)
    W = [torch.tensor(rng.standard_normal(s), dtype=torch.float32, device=device) for s in [(24, 40), (16, 8)]]
    U = [torch.tensor(rng.standard_normal(w.shape), dtype=torch.float32, device=device) for w in W]
    schedule = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]  # a custom list travels through the op too

    def step(G, W, U):
        ct.polar_update_(W, U, lr=0.1, weight_decay=0.5, scale=[1.0, 2.0], coefficients="polar_express")
        return ct.polar(2 * G, steps=3, coefficients=schedule)

    eager_W = [w.clone() for w in W]
    expected = curvkit.polar(2 * G, steps=3, coefficients=schedule)
    curvkit.polar_update_(eager_W, U, lr=0.1, weight_decay=0.5, scale=[1.0, 2.0], coefficients="polar_express")
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fails on any graph break
    torch.testing.assert_close(compiled(G, W, U), expected, atol=0, rtol=0)
    for w, e in zip(W, eager_W):
        torch.testing.assert_close(w, e, atol=0, rtol=0)
    torch.library.opcheck(torch.ops.curvkit.polar.default, (G, 5, "muon", None, 1e-7, "auto", True))
    torch.library.opcheck(torch.ops.curvkit.polar_update_.default,
                          ([w.clone() for w in W], U, [0.1, 0.2], [0.0, 0.0], [1.0, 2.0], 5, "", [3.0, -3.2, 1.2], 1e-7,
                           "auto", True))
    torch._dynamo.reset()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 3), (0, 4, 4)])
def test_empty_inputs(shape):
    assert curvkit.polar(np.zeros(shape)).shape == shape


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((np.array([[1.0, np.nan], [0.0, 1.0]]),), {}, ValueError, "'G' contains NaN or Inf"),
        ((np.array([[1.0, np.inf]]),), {}, ValueError, "'G' contains NaN or Inf"),
        ((np.ones(4),), {}, ValueError, "'G' must have shape"),
        ((np.ones((2, 2), dtype=np.int32),), {}, TypeError, "'G'"),
        (([[1.0, 2.0]],), {}, TypeError, "'G'"),
        ((np.ones((2, 2)),), {"steps": -1}, ValueError, "'steps'"),
        ((np.ones((2, 2)),), {"coefficients": "fast"}, ValueError, "'coefficients'"),
        ((np.ones((2, 2)),), {"coefficients": [(1.0, 2.0)]}, ValueError, "'coefficients'"),
        ((np.ones((2, 2)),), {"coefficients": [(1.0, np.nan, 0.0)]}, ValueError, "'coefficients'"),
        ((np.ones((2, 2)),), {"method": "svd"}, ValueError, "'method'"),
        ((np.ones((2, 2)),), {"norm_eps": -1.0}, ValueError, "'norm_eps'"),
        ((np.ones((2, 2)),), {"out": np.empty((2, 3))}, ValueError, "same shape"),
        ((np.ones((2, 2)),), {"out": [np.empty((2, 2))]}, ValueError, "'out' must match"),
        ((np.ones((4, 4)),), {"out": np.empty((4, 8), dtype=np.int32)[:, ::2]}, TypeError, "'out'.*int32"),
    ],
)
def test_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        curvkit.polar(*args, **kwargs)


def test_results_are_reproducible(backend, rng):
    # Sums across blocks (norms, distances to I, residuals) are added in a fixed order, never by
    # float atomics: the same input gives the same bits on every run.
    G = make(rng.standard_normal((3, 300, 500)), backend, "float32")
    S = make(reference.spd_with_condition(rng, 200, 1e4), backend, "float64")
    C = make(rng.standard_normal((200, 200)), backend, "float64")

    def run():
        return [to_numpy(curvkit.polar(G)), to_numpy(curvkit.matrix_sqrt_and_inv_sqrt(S)[1]),
                to_numpy(curvkit.solve_lyapunov(S, C))]

    for first, second in zip(run(), run()):
        np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_polar_update_takes_per_parameter_factors_in_one_call(backend, rng):
    # Muon's per-shape scale max(1, m/n)^0.5, and per-group learning rates and decays
    shapes = [(64, 16), (16, 64), (64, 16), (32, 32)]
    Ws = [rng.standard_normal(s) for s in shapes]
    Gs = [rng.standard_normal(s) for s in shapes]
    lrs, decays = [0.02, 0.02, 0.01, 0.05], [0.0, 0.1, 0.1, 0.0]
    scales = [max(1, m / n) ** 0.5 for m, n in shapes]
    params = [make(w, backend) for w in Ws]
    curvkit.polar_update_(params, [make(g, backend) for g in Gs], lr=lrs, weight_decay=decays, scale=scales)
    for p, w, g, lr, wd, s in zip(params, Ws, Gs, lrs, decays, scales):
        single = make(w, backend)
        curvkit.polar_update_(single, make(g, backend), lr=lr, weight_decay=wd, scale=s)
        np.testing.assert_array_equal(to_numpy(p), to_numpy(single))  # as one call per parameter, bit for bit
        np.testing.assert_allclose(to_numpy(p), w * (1 - lr * wd) - lr * s * curvkit.polar(g), atol=1e-12)


def test_polar_update_per_parameter_factor_errors_name_the_argument():
    Ws, Gs = [np.eye(3), np.eye(3)], [np.eye(3), np.eye(3)]
    with pytest.raises(curvkit.ArgumentError, match="'scale' must have one entry per parameter \\(2\\), got 3"):
        curvkit.polar_update_(Ws, Gs, lr=0.1, scale=[1.0, 2.0, 3.0])
    with pytest.raises(curvkit.ArgumentTypeError, match="'lr' must be a real number"):
        curvkit.polar_update_(Ws, Gs, lr=[0.1, "x"])
    with pytest.raises(curvkit.ArgumentTypeError, match="'weight_decay' must be a real number or a sequence"):
        curvkit.polar_update_(Ws, Gs, lr=0.1, weight_decay="0.1")
    with pytest.raises(curvkit.ArgumentTypeError, match="'lr' must be a real number"):
        curvkit.polar_update_(np.eye(3), np.eye(3), lr=[0.1])  # one array: one number
    with pytest.raises(curvkit.ArgumentError, match="update factors must be finite"):
        curvkit.polar_update_(Ws, Gs, lr=[0.1, float("inf")])
