"""curvkit.probes against the float64 reference, its statistics, and its determinism."""
import math

import numpy as np
import pytest
from conftest import CUDA_BACKENDS, TOL, backend_dtypes, make, needs_torch, raw_bits, to_numpy, torch

import curvkit
from curvkit import testing as reference

KINDS = ["rademacher", "gaussian", "sphere"]
# TOL[(dtype, "probe")]: largest relative error against the float64 reference: one rounding to
# the dtype, plus a few float64 ulps from curvkit's portable log/sin/cos versus NumPy's.


def probes_on(backend, shape, **kw):
    fw, dev = backend
    if fw == "numpy":
        return curvkit.probes(shape, **kw)
    if fw == "torch":  # a torch or CuPy device object selects the framework
        import torch

        return curvkit.probes(shape, device=torch.device(dev), **kw)
    import cupy

    return curvkit.probes(shape, device=cupy.cuda.Device(0), **kw)


def test_philox_known_answers():
    # Random123's published known-answer vectors for Philox4x32-10.
    kat = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, expected in kat:
        assert curvkit._core._testing.philox4x32_10(ctr, key) == expected
        assert [int(v) for v in reference.philox4x32_10(*ctr, *key)] == expected


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (300,), (129, 1), (257, 3), (2, 3, 5, 4), (1000, 40)])
@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_matches_float64_reference(backend, dtype, kind, shape, rng):
    seed, offset = int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 2**40))
    expected = reference.probes(shape, kind, seed, offset)
    z = probes_on(backend, shape, kind=kind, seed=seed, offset=offset, dtype=dtype)
    assert tuple(z.shape) == shape
    got = to_numpy(z)
    if kind == "rademacher":
        np.testing.assert_array_equal(got, expected)
    else:
        rtol = TOL[(dtype, "probe")]
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_every_dtype_is_the_float64_probe_rounded_once(backend, dtype, kind):
    shape = (4099, 3)
    z64 = probes_on(backend, shape, kind=kind, seed=11, dtype="float64")
    z = probes_on(backend, shape, kind=kind, seed=11, dtype=dtype)
    # torch casts float64 to float16/bfloat16 through float32 (two roundings); NumPy and
    # the reference round once.
    if dtype == "bfloat16":
        expected = reference.round_to_bfloat16_bits(to_numpy(z64))
    else:
        expected = raw_bits(to_numpy(z64).astype(dtype))
    np.testing.assert_array_equal(raw_bits(z), expected)


def test_rademacher_values_and_balance(backend):
    z = to_numpy(probes_on(backend, (1_000_000,), seed=3, dtype="float32"))
    assert set(np.unique(z)) == {-1.0, 1.0}
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    # neighbouring entries uncorrelated (catches reuse of bits)
    assert abs(np.mean(z[1:] * z[:-1])) < 5 / math.sqrt(z.size)
    cols = to_numpy(probes_on(backend, (4096, 64), seed=3))
    gram = cols.T @ cols / cols.shape[0]
    off = gram[~np.eye(64, dtype=bool)]
    assert np.abs(off).max() < 5 / math.sqrt(cols.shape[0])


def _normal_cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_gaussian_moments_and_distribution(backend):
    z = to_numpy(probes_on(backend, (400_000,), kind="gaussian", seed=5))
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(z**4) - 3) < 5 * math.sqrt(96 / n)
    assert abs(np.mean(z[0::2] * z[1::2])) < 5 / math.sqrt(n / 2)  # Box-Muller pair independence
    sample = np.sort(z[:100_000])
    ks = np.max(np.abs(_normal_cdf(sample) - np.arange(1, sample.size + 1) / sample.size))
    assert ks < 1.95 / math.sqrt(sample.size)  # Kolmogorov-Smirnov at the 0.1% level


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_sphere_norms(backend, dtype):
    z = to_numpy(probes_on(backend, (50, 200), kind="sphere", seed=2, dtype=dtype))
    np.testing.assert_allclose(np.linalg.norm(z, axis=0), 1.0, atol=TOL[(dtype, "sphere_norm")])


def test_sphere_uniformity(backend):
    # On the 2-sphere one coordinate is uniform on [-1, 1] (Archimedes).
    x = to_numpy(probes_on(backend, (3, 100_000), kind="sphere", seed=9))[0]
    sample = np.sort(x)
    ks = np.max(np.abs((sample + 1) / 2 - np.arange(1, sample.size + 1) / sample.size))
    assert ks < 1.95 / math.sqrt(sample.size)


def test_sphere_norms_are_summed_in_the_documented_order():
    # the order is what makes CPU and CUDA agree bit for bit; (600 * 256 + 3) entries take
    # two levels of the CUDA tree reduction
    for shape in [(1, 1), (5, 2), (1000, 3), (256 * 5 + 77, 1), (256 * 600 + 3, 2)]:
        g = curvkit.probes(shape, "gaussian", seed=3, offset=11)
        s = curvkit.probes(shape, "sphere", seed=3, offset=11)
        np.testing.assert_array_equal(s, g / reference.sphere_norms_in_order(g), err_msg=str(shape))


@pytest.mark.parametrize("kind", KINDS)
def test_splitting_by_offset_gives_the_same_probes(backend, kind):
    whole = to_numpy(probes_on(backend, (300, 10), kind=kind, seed=42))
    left = to_numpy(probes_on(backend, (300, 4), kind=kind, seed=42))
    right = to_numpy(probes_on(backend, (300, 6), kind=kind, seed=42, offset=4))
    np.testing.assert_array_equal(np.hstack([left, right]), whole)
    batched = to_numpy(probes_on(backend, (5, 300, 2), kind=kind, seed=42))
    np.testing.assert_array_equal(batched, whole.reshape(300, 5, 2).transpose(1, 0, 2))
    single = to_numpy(probes_on(backend, (300,), kind=kind, seed=42, offset=7))
    np.testing.assert_array_equal(single, whole[:, 7])
    if kind != "sphere":  # a shorter probe is a prefix of a longer one
        longer = to_numpy(probes_on(backend, (1000,), kind=kind, seed=42, offset=7))
        np.testing.assert_array_equal(longer[:300], single)


@pytest.mark.parametrize("kind", KINDS)
def test_seeds_give_different_probes(kind):
    a, b = curvkit.probes((256, 4), kind, seed=1), curvkit.probes((256, 4), kind, seed=2)
    assert np.mean(a == b) < 0.6
    np.testing.assert_array_equal(a, curvkit.probes((256, 4), kind, seed=1))


@pytest.mark.parametrize("kind", KINDS)
def test_result_does_not_depend_on_thread_count(kind):
    before = curvkit.get_num_threads()
    try:
        curvkit.set_num_threads(1)
        one = curvkit.probes((70_000, 3), kind, seed=8)
        curvkit.set_num_threads(2)
        two = curvkit.probes((70_000, 3), kind, seed=8)
    finally:
        curvkit.set_num_threads(before)
    np.testing.assert_array_equal(one, two)


def test_edge_shapes_and_extreme_counters():
    for kind in KINDS:
        for shape in [(0,), (0, 3), (3, 0), (2, 0, 4)]:
            assert curvkit.probes(shape, kind).shape == shape
        s = curvkit.probes((1, 5), "sphere", seed=kind.__len__())
        assert set(np.unique(s)) <= {-1.0, 1.0}
    top = 2**64 - 3  # the last three probe numbers
    z = curvkit.probes((50, 3), "gaussian", seed=2**64 - 1, offset=top)
    np.testing.assert_allclose(z, reference.probes((50, 3), "gaussian", 2**64 - 1, top), rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_like_picks_framework_device_and_dtype(backend, dtype, kind):
    like = make(np.zeros(2), backend, dtype)
    z = curvkit.probes((8, 2), kind, like=like)
    assert type(z) is type(like) and z.dtype == like.dtype
    assert str(getattr(z, "device", "cpu")) == str(getattr(like, "device", "cpu"))


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_overrides_like(backend, kind):
    z = curvkit.probes((8, 2), kind, like=make(np.zeros(2), backend, "float32"), dtype="float64")
    assert to_numpy(z).dtype == np.float64 and z.dtype != make(np.zeros(2), backend, "float32").dtype


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_matches_cpu_bit_for_bit(backend, dtype, kind):
    # every device gives the same bits as the CPU of its framework (NumPy's for CuPy), and
    # every framework the same bits as NumPy where NumPy has the dtype
    fw = backend[0]
    cpus = [(fw, "cpu") if fw == "torch" else ("numpy", "cpu")] + ([("numpy", "cpu")] if dtype != "bfloat16" else [])
    for shape in [(1,), (1000,), (5000, 1), (1023, 7), (3, 700, 40), (2, 4096, 33), (256 * 600 + 3, 2)]:
        got = raw_bits(probes_on(backend, shape, kind=kind, seed=123, offset=99, dtype=dtype))
        for cpu in cpus:
            expected = probes_on(cpu, shape, kind=kind, seed=123, offset=99, dtype=dtype)
            np.testing.assert_array_equal(got, raw_bits(expected), err_msg=f"{shape} {cpu}")


@needs_torch
def test_torch_bfloat16_probes():
    import torch

    z = curvkit.probes((64, 2), "gaussian", like=torch.zeros(1, dtype=torch.bfloat16))
    assert z.dtype == torch.bfloat16
    expected = reference.round_to_bfloat16_bits(reference.probes((64, 2), "gaussian"))
    np.testing.assert_array_equal(raw_bits(z), expected)


def test_vectorized_cpu_kernel_equals_scalar_definition_bit_for_bit(rng):
    seed, offset = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**40))
    z = curvkit.probes((3001, 3), "gaussian", seed=seed, offset=offset)
    for i, j in zip(rng.integers(0, 3001, 300), rng.integers(0, 3, 300)):
        assert z[i, j] == curvkit._core._testing.gaussian_entry(seed, offset + int(j), int(i))


# ---------------------------------------------------------------------------------------
# Estimators: trace, diagonal, eigenvalues, spectral density

N_XTRACE = 1000  # the XTrace paper's test set (eepperly/XTrace tests/test_vectors.m)
SPECTRA = {name: reference.xtrace_spectrum(name, N_XTRACE) for name in reference.XTRACE_SPECTRA}


@pytest.fixture(scope="module")
def rotation():
    q, _ = np.linalg.qr(np.random.default_rng(2024).standard_normal((N_XTRACE, N_XTRACE)))
    return q


def with_spectrum(rotation, name):
    a = (rotation * SPECTRA[name]) @ rotation.T
    return (a + a.T) / 2


def mean_relative_error(a, method, m, trials=10, **kw):
    exact = np.trace(a)
    return float(np.mean([abs(curvkit.trace_estimate(a, None, m, method=method, seed=s, **kw) - exact) / exact
                          for s in range(trials)]))


@pytest.mark.parametrize("name, method, m, bound", [
    ("exp7", "xtrace", 70, 1e-5),       # the and matfree's thresholds
    ("step", "xtrace", 120, 1e-4),
    ("exp7", "xnystrace", 50, 1e-4),
    ("step", "xnystrace", 110, 1e-3),
])
def test_xtrace_spectra_thresholds(rotation, name, method, m, bound):
    assert mean_relative_error(with_spectrum(rotation, name), method, m) < bound


def test_deflation_gains_on_decay_not_on_flat(rotation):
    decay, flat = with_spectrum(rotation, "exp7"), with_spectrum(rotation, "flat")
    hutch = mean_relative_error(decay, "hutchinson", 120, trials=4)
    assert mean_relative_error(decay, "hutch++", 120, trials=4) < 1e-3 * hutch
    assert mean_relative_error(decay, "xtrace", 120, trials=4) < 1e-3 * hutch
    # A flat spectrum has nothing to deflate: sign probes make Hutchinson the best there
    # (the reference survey's simulation: 1.0e-3 against 1.9e-3 and 2.3e-3 at m = 120; the
    # gap needs the 10 trials to stand out of the noise).
    hutch_flat = mean_relative_error(flat, "hutchinson", 120)
    assert mean_relative_error(flat, "xtrace", 120) > hutch_flat
    assert mean_relative_error(flat, "hutch++", 120) > hutch_flat


def test_hutchinson_error_falls_as_inverse_sqrt_m(rotation):
    a = with_spectrum(rotation, "flat")
    # E|error| = sqrt(2/pi) sigma / sqrt(m) for the (near normal) mean of m probes, with the
    # Rademacher variance sigma^2 = 2 (|A|_F^2 - sum a_ii^2).
    sigma = math.sqrt(2 * (np.sum(a * a) - np.sum(np.diag(a) ** 2)))
    for m in (16, 256):
        errors = [abs(curvkit.trace_estimate(a, None, m, method="hutchinson", seed=s) - np.trace(a))
                  for s in range(60)]
        expected = math.sqrt(2 / math.pi) * sigma / math.sqrt(m)
        # 60 trials: the mean absolute error has relative spread sqrt((pi/2 - 1) / 60) = 0.1
        assert 0.6 * expected < np.mean(errors) < 1.4 * expected


@pytest.mark.parametrize("method, m", [("hutch++", 30), ("xtrace", 24), ("xnystrace", 12)])
def test_trace_exact_below_sketch_rank(rng, method, m):
    b = rng.standard_normal((300, 8))
    a = b @ b.T  # rank 8 < the sketch
    assert abs(curvkit.trace_estimate(a, None, m, method=method, seed=3) - np.trace(a)) < 1e-10 * np.trace(a)


@pytest.mark.parametrize("method, m", [("diag++", 30), ("xdiag", 24)])
def test_diag_exact_below_sketch_rank(rng, method, m):
    b = rng.standard_normal((300, 8))
    a = b @ b.T
    d = curvkit.diag_estimate(a, None, m, method=method, seed=3)
    np.testing.assert_allclose(d, np.diag(a), rtol=0, atol=1e-10 * np.abs(a).max())


def test_xtrace_matches_naive_leave_one_out(rng):
    n, k = 60, 6
    a = rng.standard_normal((n, n))
    a = a + a.T
    est, info = curvkit.trace_estimate(a, None, 2 * k, method="xtrace", seed=9, return_info=True)
    omega = curvkit.probes((n, k), seed=9)
    y = a @ omega
    naive = []
    for i in range(k):  # the definition: a basis of the other k - 1 sketch columns
        q, _ = np.linalg.qr(np.delete(y, i, axis=1))
        w = omega[:, i] - q @ (q.T @ omega[:, i])
        naive.append(np.trace(q.T @ a @ q) + w @ a @ w)
    np.testing.assert_allclose(info["estimates"], naive, rtol=1e-10, atol=1e-10)
    assert est == pytest.approx(np.mean(naive), rel=1e-12)


def test_xdiag_matches_naive_leave_one_out(rng):
    n, k = 50, 5
    a = rng.standard_normal((n, n))
    a = a + a.T
    d = curvkit.diag_estimate(a, None, 2 * k, method="xdiag", seed=4)
    omega = curvkit.probes((n, k), seed=4)
    y = a @ omega
    naive = []
    for i in range(k):
        q, _ = np.linalg.qr(np.delete(y, i, axis=1))
        resid = a @ omega[:, i] - q @ (q.T @ (a @ omega[:, i]))
        naive.append(np.einsum("ij,ji->i", q, q.T @ a) + omega[:, i] * resid)
    np.testing.assert_allclose(d, np.mean(naive, axis=0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_trace_unbiased_with_the_textbook_variance(rng, kind):
    n, m = 20, 20000
    a = rng.standard_normal((n, n))
    a = a + a.T
    est, info = curvkit.trace_estimate(a, None, m, method="hutchinson", kind=kind, seed=1, return_info=True)
    samples = info["estimates"]
    frob, diag = np.sum(a * a), np.sum(np.diag(a) ** 2)
    variance = 2 * (frob - diag) if kind == "rademacher" else 2 * frob
    assert abs(est - np.trace(a)) < 4 * math.sqrt(variance / m)
    # the sample variance's own standard deviation, from the sample fourth moment
    spread = math.sqrt((np.mean((samples - samples.mean()) ** 4) - samples.var() ** 2) / m)
    assert abs(samples.var(ddof=1) - variance) < 5 * spread


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_diag_unbiased_with_the_textbook_variance(rng, kind):
    n, m = 12, 20000
    a = rng.standard_normal((n, n))
    a = a + a.T
    d, info = curvkit.diag_estimate(a, None, m, kind=kind, seed=2, return_info=True)
    off = np.sum(a * a, axis=1) - np.diag(a) ** 2
    variance = off if kind == "rademacher" else np.diag(a) ** 2 + np.sum(a * a, axis=1)
    assert np.all(np.abs(d - np.diag(a)) < 4 * np.sqrt(variance / m))
    # std_error^2 * m is the per-probe sample variance; z_i^2 (z^T a_i)^2 has kurtosis below
    # 20 for these sizes, so the relative spread of the variance is below sqrt(19/m) = 3%.
    np.testing.assert_allclose(info["std_error"] ** 2 * m, variance, rtol=0.15)


@pytest.mark.parametrize("method, m, level, rate", [
    ("hutchinson", 40, 2, 0.9),    # nominal 0.95; 200 trials put 0.9 three deviations below
    ("hutch++", 42, 2, 0.9),
    ("xtrace", 40, 3, 0.85),       # the leave-one-out spread is an estimate (0.92 measured)
])
def test_error_estimate_covers_the_error(rng, method, m, level, rate):
    n = 200
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.arange(1, n + 1) ** -2.0
    a = (q * lam) @ q.T
    hits = 0
    for s in range(200):
        est, info = curvkit.trace_estimate(a, None, m, method=method, seed=s, return_info=True)
        hits += abs(est - lam.sum()) <= level * info["std_error"]
    assert hits / 200 >= rate


def test_xdiag_and_diagpp_on_spectra(rotation):
    for name, m, bound in (("exp7", 70, 1e-2), ("step", 120, 5e-2)):  # matfree's XDiag thresholds
        a = with_spectrum(rotation, name)
        errors = [np.abs(curvkit.diag_estimate(a, None, m, method="xdiag", seed=s) - np.diag(a)).max()
                  / np.abs(np.diag(a)).max() for s in range(10)]
        assert np.median(errors) < bound
    a = with_spectrum(rotation, "exp7")
    hutch = np.abs(curvkit.diag_estimate(a, None, 120) - np.diag(a)).max()
    assert np.abs(curvkit.diag_estimate(a, None, 120, method="diag++") - np.diag(a)).max() < 1e-3 * hutch


def test_tol_stops_early_and_reports(rng):
    a = np.diag(rng.random(400) + 1.0) + 0.001 * np.ones((400, 400))
    est, info = curvkit.trace_estimate(a, None, 4000, method="hutchinson", tol=0.5, return_info=True)
    assert info["converged"] and info["std_error"] <= 0.5 and info["matvecs"] < 4000
    assert abs(est - np.trace(a)) < 5 * 0.5
    q, _ = np.linalg.qr(rng.standard_normal((400, 400)))
    decaying = (q * 0.7 ** np.arange(400)) @ q.T
    est, info = curvkit.trace_estimate(decaying, None, 400, method="xtrace", tol=1e-6, return_info=True)
    assert info["converged"] and info["matvecs"] < 400 and info["std_error"] <= 1e-6
    assert abs(est - np.trace(decaying)) < 1e-5
    d, info = curvkit.diag_estimate(a, None, 4000, tol=0.05, return_info=True)
    assert info["converged"] and info["std_error"].max() <= 0.05 and info["matvecs"] < 4000
    with curvkit.failure_policy("raise"), pytest.raises(curvkit.ConvergenceError) as e:
        curvkit.trace_estimate(a, None, 20, method="hutchinson", tol=1e-9)
    assert e.value.info["matvecs"] == 20 and not e.value.info["converged"]


def test_estimates_reproducible_and_blocks_match(rng):
    a = rng.standard_normal((100, 100))
    a = a + a.T
    calls = []

    def matvec(z):
        calls.append(z.shape[1])
        return a @ z

    one = curvkit.trace_estimate(matvec, 100, 64, method="hutchinson", seed=5)
    assert calls == [64]
    blocks = curvkit.trace_estimate(matvec, 100, 64, method="hutchinson", seed=5, tol=1e-12, block_size=16,
                                    return_info=True)[0]
    assert calls[1:] == [16, 16, 16, 16]
    assert blocks == pytest.approx(one, rel=1e-13)
    assert curvkit.trace_estimate(a, None, 64, method="xtrace", seed=5) == \
        curvkit.trace_estimate(a, None, 64, method="xtrace", seed=5)


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_torch_operators_and_dtypes(rng, dtype):
    import torch

    n = 200
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = 0.7 ** np.arange(n)
    a64 = (q * lam) @ q.T
    a = torch.tensor(a64, dtype=getattr(torch, dtype))
    exact = lam.sum()
    like = torch.zeros(1, dtype=getattr(torch, dtype))
    est = curvkit.trace_estimate(lambda z: a @ z, n, 160, like=like)  # 0.7^80: below rounding
    # float32 carries 1e-7 relative rounding; bfloat16 (8 bits) products accumulate in float32
    bound = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 3e-2}[dtype]
    assert abs(est - exact) / exact < bound
    d = curvkit.diag_estimate(lambda z: a @ z, n, 160, method="xdiag", like=like)
    assert isinstance(d, torch.Tensor) and d.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert float((d.double() - torch.tensor(np.diag(a64))).abs().max()) < 50 * bound


def test_float32_numpy_operator(rng):
    b = rng.standard_normal((300, 5))
    a = (b @ b.T).astype("float32")
    est = curvkit.trace_estimate(a, None, 20, method="xtrace", dtype="float32")
    assert abs(est - np.trace(a.astype(np.float64))) / np.trace(a) < 1e-5


@pytest.mark.parametrize("reorthogonalize", ["full", "selective"])
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_lanczos_top_k(rng, which, reorthogonalize):
    n = 300
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.r_[-9.0, rng.uniform(-1, 4, n - 1)]  # a negative dominant eigenvalue
    a = (q * lam) @ q.T
    vals, vecs, info = curvkit.top_eigenvalues(a, None, k=3, which=which, return_vectors=True, return_info=True,
                                               reorthogonalize=reorthogonalize)
    order = {"largest": np.sort(lam)[::-1], "smallest": np.sort(lam),
             "magnitude": lam[np.argsort(-np.abs(lam))]}[which]
    np.testing.assert_allclose(vals, order[:3], rtol=1e-8, atol=1e-8)
    assert info["converged"]
    np.testing.assert_allclose(np.linalg.norm(a @ vecs - vecs * vals, axis=0), 0, atol=1e-5)


def test_lanczos_without_reorthogonalization_and_power(rng):
    n = 200
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.r_[-6.0, 5.0, rng.uniform(-1, 1, n - 2)]
    a = (q * lam) @ q.T
    vals = curvkit.top_eigenvalues(a, None, k=1, which="magnitude", reorthogonalize=False)
    np.testing.assert_allclose(vals, [-6.0], rtol=1e-8)
    power = curvkit.top_eigenvalues(a, None, k=2, which="magnitude", method="power", tol=1e-10, max_matvecs=4000)
    np.testing.assert_allclose(power, [-6.0, 5.0], rtol=1e-6)
    with pytest.warns(curvkit.ConvergenceWarning, match="not converged within"):
        curvkit.top_eigenvalues(a, None, k=1, max_matvecs=3)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_lanczos_without_reorthogonalization_counts_ghosts_once(rng, dtype):
    # Without reorthogonalization -9 and 7 come back as copies once converged (Paige): the
    # three smallest were reported as [-9, -9, -9] and the three largest as [7, 7, 6.5].
    n = 400
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.r_[-9.0, 7.0, 6.5, np.linspace(-1, 1, n - 3)]
    a = ((q * lam) @ q.T).astype(dtype)
    tol = 1e-8 if dtype == "float64" else 1e-4
    for which in ("largest", "smallest", "magnitude"):
        values, info = curvkit.top_eigenvalues(a, None, k=3, which=which, reorthogonalize="none", return_info=True)
        want = {"largest": np.sort(lam)[::-1], "smallest": np.sort(lam),
                "magnitude": lam[np.argsort(-np.abs(lam), kind="stable")]}[which][:3]
        assert info["converged"], which
        np.testing.assert_allclose(values, want, rtol=0, atol=10 * tol * 9)
    if dtype == "float64":
        # An exactly degenerate spectrum that the recurrence does not see break down: only
        # ghosts stand for a fourth value, so the run ends not converged, not with [5, 5, 1, 1].
        # (In float32 a copy still converging to tol 1e-4 stands apart from its value.)
        d = np.diag([5.0, 5.0, 5.0, 1.0] + [0.5] * 50)
        values, info = curvkit.top_eigenvalues(d, None, k=4, reorthogonalize="none", return_info=True)
        assert not info["converged"]
        np.testing.assert_allclose(values, [5.0, 1.0, 0.5], atol=1e-8)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_slq_gauss_quadrature(rng, reorthogonalize):
    n, steps = 120, 8
    b = rng.standard_normal((n, n))
    a = (b + b.T) / math.sqrt(2 * n)
    nodes, weights = curvkit.spectral_density(a, None, num_probes=3, steps=steps, seed=4,
                                              reorthogonalize=reorthogonalize)
    assert nodes.shape == weights.shape == (3, steps)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    v = curvkit.probes((n, 3), seed=4) / math.sqrt(n)
    for p in range(2 * steps):  # Gauss rule: exact for degrees below 2 steps
        exact = np.einsum("ij,ij->j", v, np.linalg.matrix_power(a, p) @ v)
        np.testing.assert_allclose((weights * nodes ** p).sum(axis=1), exact, rtol=1e-8, atol=1e-10)


def test_slq_density_of_a_known_spectrum(rng):
    n = 400
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.r_[rng.uniform(0.9, 1.1, 100), rng.uniform(2.9, 3.1, 300)]
    a = (q * lam) @ q.T
    nodes, weights, info = curvkit.spectral_density(a, None, num_probes=20, steps=30, return_info=True)
    low = (weights * (nodes < 2)).sum(axis=1).mean()
    # each probe's mass near 1 is |v_low|^2, of mean 1/4 and (Rademacher) spread below 0.03
    assert abs(low - 0.25) < 0.03
    assert info["matvecs"] == 20 * 30
    small = np.diag([1.0, 2.0, 2.0, 5.0])
    nodes, weights, info = curvkit.spectral_density(small, None, num_probes=2, steps=4, return_info=True)
    assert list(info["lengths"]) == [3, 3]  # three distinct eigenvalues: the Krylov space closes
    np.testing.assert_allclose(nodes[:, :3], [[1, 2, 5], [1, 2, 5]], atol=1e-12)
    np.testing.assert_allclose(weights, [[0.25, 0.5, 0.25, 0]] * 2, atol=1e-12)


@pytest.mark.parametrize("scale", [2.0 ** -1030, 2.0 ** -1000, 2.0 ** 1000])
def test_estimators_at_subnormal_and_huge_scales(rng, scale):
    # The products are rescaled by a power of two before the algebra: an operator scaled by
    # 2^e gives the results scaled by 2^e (to the subnormals' spacing at 2^-1030).
    b = rng.standard_normal((40, 40))
    a = b @ b.T / 40 + np.diag(np.arange(40.0))
    rel = 1e-9 if scale < 2.0 ** -1022 else 1e-13
    for method, m in (("hutchinson", 20), ("hutch++", 30), ("xtrace", 30), ("xnystrace", 20)):
        want = curvkit.trace_estimate(a, None, m, method=method, return_info=True)
        got = curvkit.trace_estimate(a * scale, None, m, method=method, return_info=True)
        assert got[0] == pytest.approx(want[0] * scale, rel=rel), method
        assert got[1]["std_error"] == pytest.approx(want[1]["std_error"] * scale, rel=1e-6), method
    for method, m in (("hutchinson", 20), ("diag++", 30), ("xdiag", 30)):
        want = curvkit.diag_estimate(a, None, m, method=method)
        np.testing.assert_allclose(curvkit.diag_estimate(a * scale, None, m, method=method) / scale, want, rtol=rel)
    want = curvkit.top_eigenvalues(a, None, k=3, which="magnitude")
    np.testing.assert_allclose(curvkit.top_eigenvalues(a * scale, None, k=3, which="magnitude") / scale, want,
                               rtol=1e-8)
    nodes, weights = curvkit.spectral_density(a, None, num_probes=2, steps=10)
    nodes_s, weights_s = curvkit.spectral_density(a * scale, None, num_probes=2, steps=10)
    np.testing.assert_allclose(nodes_s / scale, nodes, rtol=rel, atol=rel * np.abs(nodes).max())
    np.testing.assert_allclose(weights_s, weights, rtol=0, atol=1e-8)


@pytest.mark.parametrize("scale", [2.0 ** -62, 2.0 ** 62])
def test_float32_estimators_far_from_one(rng, scale):
    # Products beyond 2^60 are rescaled; float32 results are scaled back in the caller's arrays.
    b = rng.standard_normal((300, 300))
    a = (b @ b.T / 300).astype(np.float32)
    for method in ("hutch++", "xtrace", "xnystrace"):
        want = curvkit.trace_estimate(a, None, 60, method=method)
        assert curvkit.trace_estimate(a * np.float32(scale), None, 60, method=method) == pytest.approx(want * scale,
                                                                                                      rel=1e-6)
    want = curvkit.diag_estimate(a, None, 60, method="xdiag")
    np.testing.assert_allclose(curvkit.diag_estimate(a * np.float32(scale), None, 60, method="xdiag") / scale, want,
                               rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_lanczos_finds_repeated_eigenvalues_by_restarting():
    # One Krylov space holds each distinct eigenvalue once: k beyond them needs restarts, each
    # from a vector orthogonal to the spaces found.
    a = np.diag([5.0, 5.0, 5.0, 1.0])
    values, info = curvkit.top_eigenvalues(a, None, k=4, return_info=True)
    np.testing.assert_allclose(values, [5.0, 5.0, 5.0, 1.0], atol=1e-12)
    assert info["converged"]
    np.testing.assert_array_equal(curvkit.top_eigenvalues(np.zeros((3, 3)), None, k=3), [0.0, 0.0, 0.0])


def test_estimator_argument_errors():
    a = np.eye(10)
    with pytest.raises(curvkit.ArgumentError, match="method"):
        curvkit.trace_estimate(a, None, 10, method="nope")
    with pytest.raises(curvkit.ArgumentError, match="kind"):
        curvkit.trace_estimate(a, None, 10, kind="uniform")
    with pytest.raises(curvkit.ArgumentTypeError, match="matvec"):
        curvkit.trace_estimate(3.0, 10, 10)
    with pytest.raises(curvkit.ArgumentError, match="square"):
        curvkit.trace_estimate(np.ones((3, 4)), None, 10)
    with pytest.raises(curvkit.ArgumentError, match="shape"):
        curvkit.trace_estimate(lambda z: z[:5], 10, 10)
    with pytest.raises(curvkit.ArgumentError, match="non-finite"):
        curvkit.trace_estimate(lambda z: z * np.nan, 10, 10, method="hutchinson")
    with pytest.raises(curvkit.ArgumentError, match="non-finite"):
        curvkit.top_eigenvalues(lambda z: z * np.inf, 10)
    with pytest.raises(curvkit.ArgumentError, match="non-finite"):
        curvkit.spectral_density(lambda z: z * np.nan, 10, steps=3)
    with pytest.raises(curvkit.ArgumentError, match="non-finite"):
        curvkit.diag_estimate(lambda z: z * np.nan, 10, 10, method="xdiag")
    with pytest.raises(curvkit.ArgumentError, match="positive semidefinite"):
        curvkit.trace_estimate(-np.eye(10), None, 4, method="xnystrace")
    with pytest.raises(curvkit.ArgumentError, match="num_matvecs"):
        curvkit.trace_estimate(a, None, 2, method="hutch++")
    with pytest.raises(curvkit.ArgumentError, match="tol"):
        curvkit.diag_estimate(a, None, 10, method="xdiag", tol=0.1)
    with pytest.raises(curvkit.ArgumentError, match="magnitude"):
        curvkit.top_eigenvalues(a, None, method="power", which="largest")
    with pytest.raises(curvkit.ArgumentError, match="steps"):
        curvkit.spectral_density(a, None, steps=11)


# ---------------------------------------------------------------------------------------
# Fused AdaHessian and Sophia steps against the float64 reference optimizers

STEP_SHAPES = [(7,), (5, 3), (4, 3, 6), (6, 3, 3, 3), (2, 2, 2, 2, 2), (1,), (3, 0)]


def step_state(rng, shapes, scale=1.0):
    return [rng.standard_normal(s) * scale for s in shapes]


# Several tasks a tensor (16K elements each), eight groups summed at a time and the tails.
LARGE_STEP_SHAPES = [(300, 70), (20000,), (130, 2, 9, 9)]


@pytest.mark.parametrize("shapes", [STEP_SHAPES, LARGE_STEP_SHAPES], ids=["small", "large"])
@pytest.mark.parametrize("block_size", [None, 1, 4, 1000])
@pytest.mark.parametrize("hessian_power", [1.0, 0.5, 0.7])
def test_adahessian_bitwise_float64(rng, block_size, hessian_power, shapes):
    params, grads, m = step_state(rng, shapes), step_state(rng, shapes), step_state(rng, shapes)
    v = [np.abs(x) for x in step_state(rng, shapes)]
    ref = [[x.copy() for x in xs] for xs in (params, m, v)]
    for step in (1, 2, 5):
        h = step_state(rng, shapes)
        kw = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-4, weight_decay=0.01, hessian_power=hessian_power,
                  block_size=block_size)
        curvkit.adahessian_step_(params, grads, h, m, v, step=step, **kw)
        reference.adahessian_step(ref[0], grads, h, ref[1], ref[2], step, **kw)
    for got, want in zip(params + m + v, ref[0] + ref[1] + ref[2]):
        np.testing.assert_array_equal(raw_bits(got), raw_bits(want))


def test_adahessian_diagonal_quadratic_is_exact_with_one_probe():
    # For a diagonal Hessian, |z * Hz| = |diag(H)| whatever the signs z: one probe is exact.
    hdiag = np.array([1.0, -2.0, 3.0, 0.5])
    z = curvkit.probes((4,), seed=3)
    p, m, v = np.ones(4), np.zeros(4), np.zeros(4)
    curvkit.adahessian_step_([p], [np.zeros(4)], [z * (hdiag * z)], [m], [v], step=1, block_size=1)
    np.testing.assert_allclose(np.sqrt(v / (1 - 0.999)), np.abs(hdiag), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_adahessian_low_precision(rng, dtype):
    shapes = [(64, 32), (16, 8, 3, 3), (100,)]
    params, grads, h = step_state(rng, shapes), step_state(rng, shapes), step_state(rng, shapes)
    m, v = step_state(rng, shapes, 0.1), [np.abs(x) for x in step_state(rng, shapes)]
    low = [[x.astype(dtype) for x in xs] for xs in (params, grads, h, m, v)]
    ref = [[x.astype(dtype).astype(np.float64) for x in xs] for xs in (params, grads, h, m, v)]
    curvkit.adahessian_step_(*low, step=3, lr=0.01)
    reference.adahessian_step(*ref, step=3, lr=0.01)
    unit = TOL.get((dtype, "ulp"), 2.0 ** -24)
    for got, want in zip(low[0] + low[3] + low[4], ref[0] + ref[3] + ref[4]):
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=8 * unit, atol=8 * unit * np.abs(want).max())


@pytest.mark.parametrize("with_estimate", [False, True])
def test_sophia_bitwise_float64(rng, with_estimate):
    shapes = STEP_SHAPES
    params, grads = step_state(rng, shapes), step_state(rng, shapes)
    m = step_state(rng, shapes, 1e-3)
    hess = [np.abs(x) * 1e-3 for x in step_state(rng, shapes)]
    est = [np.abs(x) * 1e-3 for x in step_state(rng, shapes)] if with_estimate else None
    ref = [[x.copy() for x in xs] for xs in (params, m, hess)]
    kw = dict(lr=0.05, betas=(0.9, 0.95), rho=0.04, weight_decay=0.1, batch_size=64, eps=1e-15)
    rate = curvkit.sophia_step_(params, grads, m, hess, hessian_estimate=est, return_win_rate=True, **kw)
    wins = reference.sophia_step(ref[0], grads, ref[1], ref[2], estimates=est, **kw)
    assert rate == wins / sum(p.size for p in params)
    assert 0 < rate < 1
    for got, want in zip(params + m + hess, ref[0] + ref[1] + ref[2]):
        np.testing.assert_array_equal(raw_bits(got), raw_bits(want))


@needs_torch
def test_fused_steps_on_torch_lists_match_numpy_and_mark_writes(rng):
    # torch lists go to the native call as capsules from torch's C exporter: the same bits as
    # NumPy arrays, and the written tensors' version counters bumped (autograd cannot see a write
    # through DLPack), so a graph that saved a parameter refuses to backpropagate.
    params, grads, h, m = (step_state(rng, STEP_SHAPES) for _ in range(4))
    v = [np.abs(x) for x in step_state(rng, STEP_SHAPES)]
    tensors = [[torch.tensor(x) for x in xs] for xs in (params, grads, h, m, v)]
    leaf = tensors[0][0].requires_grad_()
    saved = (leaf * leaf).sum()
    curvkit.adahessian_step_(params, grads, h, m, v, step=2, lr=0.1)
    curvkit.adahessian_step_(*tensors, step=2, lr=0.1)
    for got, want in zip(tensors[0] + tensors[3] + tensors[4], params + m + v):
        np.testing.assert_array_equal(raw_bits(got.detach().numpy()), raw_bits(want))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    hess = [torch.tensor(np.abs(x)) for x in step_state(rng, STEP_SHAPES)]
    versions = [t._version for t in tensors[0] + tensors[3] + hess]
    curvkit.sophia_step_(tensors[0], tensors[1], tensors[3], hess, lr=0.05)
    assert all(t._version > k for t, k in zip(tensors[0] + tensors[3] + hess, versions))


def test_sophia_sign_step_and_saturation():
    p, g, m, h = np.zeros(5), np.array([1.0, -1.0, 0.0, 4.0, -4.0]), np.zeros(5), np.zeros(5)
    assert curvkit.sophia_step_(p, g, m, h, lr=1.0, betas=(0.0, 0.5), weight_decay=0.0,
                                return_win_rate=True) == pytest.approx(1 / 5)   # only m = 0 is unclipped
    np.testing.assert_array_equal(p, [-1.0, 1.0, 0.0, -1.0, 1.0])
    # |m| = rho bs h exactly: ratio 1, clipped; |m| below: the step is |m| / (rho bs h)
    p, m, h = np.zeros(2), np.zeros(2), np.array([1.0, 2.0])
    curvkit.sophia_step_(p, np.array([2.0, 2.0]), m, h, lr=1.0, betas=(0.0, 0.5), rho=1.0, batch_size=2.0,
                         weight_decay=0.0, eps=0.0)
    np.testing.assert_array_equal(p, [-1.0, -0.5])


@needs_torch
def test_fused_steps_on_torch_parameters(rng):
    import torch

    shapes = [(8, 4), (4,), (3, 2, 3, 3)]
    params = [torch.nn.Parameter(torch.tensor(x)) for x in step_state(rng, shapes)]
    grads, h = [torch.tensor(x) for x in step_state(rng, shapes)], [torch.tensor(x) for x in step_state(rng, shapes)]
    m, v = [torch.zeros(s, dtype=torch.float64) for s in shapes], [torch.zeros(s, dtype=torch.float64) for s in shapes]
    ref = [[p.detach().numpy().copy() for p in params], [x.numpy().copy() for x in m], [x.numpy().copy() for x in v]]
    curvkit.adahessian_step_(params, grads, h, m, v, step=1)
    reference.adahessian_step(ref[0], [x.numpy() for x in grads], [x.numpy() for x in h], ref[1], ref[2], 1)
    for got, want in zip(params, ref[0]):
        np.testing.assert_array_equal(got.detach().numpy(), want)


def test_fused_step_argument_errors():
    p = [np.zeros(3), np.zeros(4)]
    with pytest.raises(curvkit.ArgumentError, match="grads"):
        curvkit.adahessian_step_(p, [np.zeros(3)], p, p, p, step=1)
    with pytest.raises(curvkit.ArgumentError, match="same shape"):
        curvkit.sophia_step_([np.zeros(3)], [np.zeros(4)], [np.zeros(3)], [np.zeros(3)])
    with pytest.raises(curvkit.ArgumentError, match="C-contiguous"):
        curvkit.sophia_step_([np.zeros((3, 4)).T], [np.zeros((4, 3))], [np.zeros((4, 3))], [np.zeros((4, 3))])
    with pytest.raises(curvkit.ArgumentError, match="step"):
        curvkit.adahessian_step_([np.zeros(3)], [np.zeros(3)], [np.zeros(3)], [np.zeros(3)], [np.zeros(3)], step=0)
    shared = np.zeros(3)
    with pytest.raises(curvkit.ArgumentError, match="shares memory"):
        curvkit.sophia_step_([shared], [np.zeros(3)], [shared], [np.zeros(3)])
    with pytest.raises(curvkit.ArgumentTypeError, match="dtype"):
        curvkit.sophia_step_([np.zeros(3)], [np.zeros(3, "float32")], [np.zeros(3)], [np.zeros(3)])


# Tensor 1 is longer than a CPU task (16384 entries): its bad entry is the last one, in a later
# task than the writes of tensor 0 and of its own first entries.
NONFINITE_SHAPES = [(5, 3), (40000,), (4, 3, 3, 3)]


def _step_lists(rng, backend, dtype, names, bad=None, value=np.nan, tensor=1):
    lists = {}
    for name in names:
        values = [rng.standard_normal(s) for s in NONFINITE_SHAPES]
        if name in ("exp_avg_sq", "hessian"):
            values = [np.abs(v) for v in values]
        if name == bad:
            values[tensor].reshape(-1)[-1] = value
        lists[name] = [make(v, backend, dtype) for v in values]
    return lists


def _expect_refused_before_writing(step, lists, bad, written):
    """step() raises ArgumentError naming `bad` and tensor 1, and leaves the `written` lists' bits as they were."""
    before = {name: [raw_bits(x) for x in lists[name]] for name in written}
    with pytest.raises(curvkit.ArgumentError, match=f"argument '{bad}' contains NaN or Inf \\(tensor 1 of the list\\)"):
        step()
    for name, bits in before.items():
        for x, b in zip(lists[name], bits):
            np.testing.assert_array_equal(raw_bits(x), b, err_msg=f"{name} was written")


ADAHESSIAN_LISTS = ["params", "grads", "hessian_diag_samples", "exp_avg", "exp_avg_sq"]
SOPHIA_LISTS = ["params", "grads", "exp_avg", "hessian", "hessian_estimate"]


@pytest.mark.parametrize("value", [np.nan, -np.inf])
@pytest.mark.parametrize("bad", ["params", "grads", "hessian_diag_samples"])
@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_adahessian_refuses_nonfinite_before_writing(rng, backend, dtype, bad, value):
    lists = _step_lists(rng, backend, dtype, ADAHESSIAN_LISTS, bad, value)
    _expect_refused_before_writing(lambda: curvkit.adahessian_step_(**lists, step=3, lr=0.01), lists, bad,
                                   ("params", "exp_avg", "exp_avg_sq"))
    curvkit.adahessian_step_(**lists, step=3, lr=0.01, check_finite=False)  # the unchecked path runs on
    assert not np.isfinite(to_numpy(lists["params"][1])).all() or bad == "hessian_diag_samples"


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("bad", ["params", "grads", "hessian_estimate"])
@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_sophia_refuses_nonfinite_before_writing(rng, backend, dtype, bad, value):
    lists = _step_lists(rng, backend, dtype, SOPHIA_LISTS, bad, value)
    _expect_refused_before_writing(lambda: curvkit.sophia_step_(**lists, return_win_rate=True), lists, bad,
                                   ("params", "exp_avg", "hessian"))
    if bad != "hessian_estimate":  # without estimates, only params and grads are read from outside
        lists.pop("hessian_estimate")
        with pytest.raises(curvkit.ArgumentError, match=f"argument '{bad}'"):
            curvkit.sophia_step_(**lists)
    curvkit.sophia_step_(**lists, check_finite=False)


def test_nonfinite_reports_the_first_tensor_then_the_first_argument(rng):
    lists = _step_lists(rng, ("numpy", "cpu"), "float64", ADAHESSIAN_LISTS, "grads", np.inf, tensor=2)
    lists["hessian_diag_samples"][1][0] = np.nan
    lists["params"][1][-1] = np.nan
    with pytest.raises(curvkit.ArgumentError, match="'params' contains NaN or Inf \\(tensor 1 "):
        curvkit.adahessian_step_(**lists, step=1)
    lists["params"][1][-1] = 0.0
    with pytest.raises(curvkit.ArgumentError, match="'hessian_diag_samples' contains NaN or Inf \\(tensor 1 "):
        curvkit.adahessian_step_(**lists, step=1)
    lists["hessian_diag_samples"][1][0] = 0.0
    with pytest.raises(curvkit.ArgumentError, match="'grads' contains NaN or Inf \\(tensor 2 "):
        curvkit.adahessian_step_(**lists, step=1)
    # the states are not checked: what earlier steps wrote flows on
    lists["grads"][2][...] = 0.0
    lists["exp_avg"][0][0, 0] = np.nan
    curvkit.adahessian_step_(**lists, step=1)
    assert np.isnan(lists["params"][0][0, 0])


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_steps_on_cuda_match_the_cpu(rng, backend, dtype):
    cpu = _step_lists(rng, ("numpy", "cpu"), dtype, ADAHESSIAN_LISTS + ["hessian", "hessian_estimate"])
    gpu = {name: [make(x, backend) for x in xs] for name, xs in cpu.items()}
    for lists in (cpu, gpu):
        ada = {name: lists[name] for name in ADAHESSIAN_LISTS}
        curvkit.adahessian_step_(**ada, step=4, lr=0.01, hessian_power=0.5)
        rate = curvkit.sophia_step_(lists["params"], lists["grads"], lists["exp_avg"], lists["hessian"],
                                    hessian_estimate=lists["hessian_estimate"], return_win_rate=True)
        lists["rate"] = rate
    assert gpu.pop("rate") == cpu.pop("rate")
    for name in cpu:
        for x, y in zip(cpu[name], gpu[name]):
            if dtype == "float64":  # the same operations in the same order (no FMA on either side)
                np.testing.assert_array_equal(raw_bits(y), raw_bits(x))
            else:
                np.testing.assert_allclose(to_numpy(y), x, rtol=4 * TOL.get((dtype, "ulp"), 2.0 ** -24), atol=0)


# ---------------------------------------------------------------------------------------
# curvkit.torch: Hessian-vector products of a loss and per-layer traces


def _small_mlp():
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    w1 = torch.randn(5, 6, generator=gen, dtype=torch.float64).requires_grad_()
    b1 = torch.zeros(6, dtype=torch.float64).requires_grad_()
    w2 = torch.randn(6, 2, generator=gen, dtype=torch.float64).requires_grad_()
    params = [w1, b1, w2]

    def loss_of(a, b, c):
        return ((torch.tanh(x @ a + b) @ c - y) ** 2).mean()

    return params, loss_of


@needs_torch
def test_hessian_matvec_matches_the_dense_hessian():
    import torch

    import curvkit.torch as ct

    params, loss_of = _small_mlp()
    dense = torch.autograd.functional.hessian(loss_of, tuple(params))
    sizes = [p.numel() for p in params]
    h = torch.cat([torch.cat([dense[i][j].reshape(sizes[i], sizes[j]) for j in range(3)], dim=1)
                   for i in range(3)], dim=0)
    matvec = ct.hessian_matvec(lambda: loss_of(*params), params)
    z = torch.randn(sum(sizes), 7, dtype=torch.float64)
    torch.testing.assert_close(matvec(z), h @ z, rtol=1e-12, atol=1e-12)
    est, info = curvkit.trace_estimate(matvec, sum(sizes), 400, method="hutchinson", like=z, return_info=True)
    assert abs(est - float(torch.trace(h))) < 4 * info["std_error"]
    vals = curvkit.top_eigenvalues(matvec, sum(sizes), k=2, like=z)
    np.testing.assert_allclose(vals, np.sort(np.linalg.eigvalsh(h.numpy()))[::-1][:2], rtol=1e-8)


@needs_torch
def test_layer_traces_are_unbiased_per_layer():
    import torch

    import curvkit.torch as ct

    params, loss_of = _small_mlp()
    dense = torch.autograd.functional.hessian(loss_of, tuple(params))
    sizes = [p.numel() for p in params]
    h = torch.cat([torch.cat([dense[i][j].reshape(sizes[i], sizes[j]) for j in range(3)], dim=1)
                   for i in range(3)], dim=0).numpy()
    m = 400
    result = ct.layer_traces(lambda: loss_of(*params), params, num_matvecs=m, block_size=200, return_diagonals=True)
    offset = 0
    for r, p, size in zip(result, params, sizes):
        block = slice(offset, offset + size)
        offset += size
        assert abs(r["trace"] - np.trace(h[block, block])) < 4 * r["std_error"]
        # Rademacher: entry i of the diagonal estimate has variance sum_{j != i} h_ij^2 per probe
        spread = np.sqrt((np.sum(h[block] ** 2, axis=1) - np.diag(h)[block] ** 2) / m)
        assert r["diagonal"].shape == p.shape
        assert np.all(np.abs(r["diagonal"].numpy().ravel() - np.diag(h)[block]) < 5 * spread + 1e-12)


@pytest.mark.parametrize("case", ["well", "graded", "rank-deficient"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sketch_qr_extends_an_orthonormal_basis(rng, case, dtype):
    n, k, k0 = 3000, 24, 10
    y = rng.standard_normal((n, k))
    if case == "graded":  # CholeskyQR2 cannot take this one: the Householder fallback does
        y = y * np.logspace(0, -12, k)
    elif case == "rank-deficient":
        y[:, 5] = y[:, 2] + y[:, 3]
    y = y.astype(dtype)
    r = np.zeros((k, k), dtype)
    _core = curvkit._core
    first = np.ascontiguousarray(y[:, :k0])
    r0 = np.zeros((k0, k0), dtype)
    _core.sketch_qr(first, r0, 0)
    q = np.ascontiguousarray(np.hstack([first, y[:, k0:]]))
    r[:k0, :k0] = r0
    _core.sketch_qr(q, r, k0)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(q.T.astype(np.float64) @ q, np.eye(k), atol=200 * eps * k)
    # backward error of a Householder or CholeskyQR2 factorization: a small multiple of k eps
    assert np.linalg.norm(q.astype(np.float64) @ r - y) <= 20 * k * eps * np.linalg.norm(y.astype(np.float64))
    assert np.all(np.tril(r, -1) == 0)


def test_estimators_independent_of_the_thread_count(rng):
    n = 20000  # several row chunks
    d = rng.random(n)
    a = lambda z: d[:, None] * z + 1e-3 * z.sum(axis=0, keepdims=True)  # noqa: E731
    previous = curvkit.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            curvkit.set_num_threads(threads)
            results.append((curvkit.trace_estimate(a, n, 40, method="xtrace"),
                            curvkit.trace_estimate(a, n, 42, method="hutch++"),
                            curvkit.diag_estimate(a, n, 40, method="xdiag")))
    finally:
        curvkit.set_num_threads(previous)
    assert results[0][0] == results[1][0] and results[0][1] == results[1][1]
    np.testing.assert_array_equal(results[0][2], results[1][2])


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_estimators_match_the_cpu(rng, backend):
    n = 500
    b = rng.standard_normal((n, n))
    a = (b + b.T) / 2
    dense = make(a, backend)
    like = make(np.zeros(1), backend)
    for method, m in (("hutchinson", 64), ("hutch++", 60), ("xtrace", 60)):
        cpu = curvkit.trace_estimate(a, None, m, method=method, seed=3)
        gpu = curvkit.trace_estimate(lambda z: dense @ z, n, m, method=method, seed=3, like=like)
        assert gpu == pytest.approx(cpu, rel=1e-10)
    for method, m in (("hutchinson", 64), ("diag++", 60), ("xdiag", 60)):
        cpu = curvkit.diag_estimate(a, None, m, method=method, seed=3)
        gpu = curvkit.diag_estimate(lambda z: dense @ z, n, m, method=method, seed=3, like=like)
        np.testing.assert_allclose(to_numpy(gpu), cpu, rtol=1e-9, atol=1e-9 * np.abs(cpu).max())
    psd = make(a @ a.T / n, backend)
    cpu = curvkit.trace_estimate(a @ a.T / n, None, 40, method="xnystrace", seed=3, return_info=True)
    gpu = curvkit.trace_estimate(lambda z: psd @ z, n, 40, method="xnystrace", seed=3, like=like, return_info=True)
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-10)
    np.testing.assert_allclose(gpu[1]["estimates"], cpu[1]["estimates"], rtol=1e-9)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_lanczos_read_back_every_8_steps_stops_where_every_step_would(monkeypatch, rng, dtype):
    # CUDA's schedule (coefficients read back every 8 steps) on the CPU kernels: the same Ritz
    # values from the same number of steps as a check after every step. Steps queued past
    # convergence once added ghosts without reorthogonalization (on CUDA, [-9, -9, 7] where the
    # CPU found [-9, 7, 6.5]), and products queued after a breakdown left no budget for the restart.
    from curvkit import hutchinson
    n = 400
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = ((u * np.r_[-9.0, 7.0, 6.5, np.linspace(-1, 1, n - 3)]) @ u.T).astype(dtype)
    rep = np.diag([5.0, 5.0, 5.0, 1.0]).astype(dtype)
    runs = {}
    for every in (1, 8):
        monkeypatch.setattr(hutchinson, "_check_every", lambda op, mode, e=every: 1 if mode == "selective" else e)
        for which in ("largest", "smallest", "magnitude"):
            for mode in ("full", "selective", "none"):
                values, info = curvkit.top_eigenvalues(a, None, k=3, which=which, reorthogonalize=mode,
                                                       return_info=True)
                runs.setdefault((which, mode), []).append((values, info["steps"], info["converged"]))
        np.testing.assert_allclose(curvkit.top_eigenvalues(rep, None, k=4), [5, 5, 5, 1],
                                   rtol=1e-6 if dtype == "float32" else 1e-14)
    for (which, mode), ((values, steps, converged), (values8, steps8, converged8)) in runs.items():
        assert converged and converged8 and steps8 == steps, (which, mode)
        np.testing.assert_array_equal(values8, values)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cuda_lanczos_and_power_match_the_cpu(rng, backend, dtype):
    # Lanczos steps on the device (cuBLAS batched reorthogonalization), the tridiagonal
    # eigenproblem on the host; the same probes, so the same Krylov spaces as on the CPU.
    n = 400
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.r_[-9.0, 7.0, 6.5, np.linspace(-1, 1, n - 3)]
    a = (u * w) @ u.T
    dense = make(a.astype(dtype), backend)
    like = make(np.zeros(1, dtype=dtype), backend)
    tol = 1e-10 if dtype == "float64" else 1e-4
    for which in ("largest", "smallest", "magnitude"):
        for reorthogonalize in ("full", "selective", "none"):
            cpu = curvkit.top_eigenvalues(a.astype(dtype), None, k=3, which=which, reorthogonalize=reorthogonalize,
                                          return_info=True)
            gpu_values, gpu_vectors, info = curvkit.top_eigenvalues(
                lambda z: dense @ z, n, k=3, which=which, like=like, reorthogonalize=reorthogonalize,
                return_vectors=True, return_info=True)
            np.testing.assert_allclose(gpu_values, cpu[0], rtol=tol, atol=tol)
            assert info["converged"] == cpu[1]["converged"]
            v = to_numpy(gpu_vectors)
            if reorthogonalize == "none":  # lost orthogonality: ghost copies, their vectors mixed
                continue
            np.testing.assert_allclose(np.einsum("ij,ik,kj->j", v, a, v), gpu_values, rtol=10 * tol, atol=10 * tol)
    power = curvkit.top_eigenvalues(lambda z: dense @ z, n, k=2, which="magnitude", method="power", like=like,
                                    max_matvecs=3000)
    np.testing.assert_allclose(power, [-9.0, 7.0], rtol=1e-3 if dtype == "float32" else 1e-6)
    # repeated eigenvalues: restarts after a breakdown, on the device
    rep = make(np.diag([5.0, 5.0, 5.0, 1.0]).astype(dtype), backend)
    np.testing.assert_allclose(curvkit.top_eigenvalues(lambda z: rep @ z, 4, k=4, like=like), [5, 5, 5, 1],
                               atol=tol)
    for reorthogonalize in (True, False):
        cpu_nodes, cpu_weights = curvkit.spectral_density(a.astype(dtype), None, num_probes=5, steps=30, seed=2,
                                                          reorthogonalize=reorthogonalize)
        nodes, weights, info = curvkit.spectral_density(lambda z: dense @ z, n, num_probes=5, steps=30, seed=2,
                                                        like=like, reorthogonalize=reorthogonalize, return_info=True)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=10 * tol)
        # the first moment v^T A v is stable; without reorthogonalization the nodes are not
        # (lost orthogonality amplifies the products' rounding, which differs between BLAS)
        np.testing.assert_allclose((weights * nodes).sum(axis=1), (cpu_weights * cpu_nodes).sum(axis=1),
                                   rtol=0, atol=100 * tol)
        if reorthogonalize:
            np.testing.assert_allclose(nodes, cpu_nodes, rtol=0, atol=1e3 * tol)
            np.testing.assert_allclose(weights, cpu_weights, rtol=0, atol=1e3 * tol)
        assert (info["lengths"] == 30).all()


def test_probes_like_gives_one_reproducible_probe_per_tensor():
    tensors = [np.zeros((3, 4)), np.zeros(5, dtype=np.float32), np.zeros((2, 2, 2))]
    z = curvkit.probes_like(tensors, seed=3, step=7)
    assert [x.shape for x in z] == [(3, 4), (5,), (2, 2, 2)] and z[1].dtype == np.float32
    for i, (x, t) in enumerate(zip(z, tensors)):  # probe number step * 2**24 + i
        np.testing.assert_array_equal(x.ravel(), curvkit.probes((t.size,), seed=3, offset=7 * 2**24 + i))
    assert not np.array_equal(curvkit.probes_like(tensors, seed=3, step=8)[0], z[0])  # a new step, new probes
    with pytest.raises(curvkit.ArgumentTypeError, match="'tensors'"):
        curvkit.probes_like(np.zeros(3))
    with pytest.raises(curvkit.ArgumentError, match="'step'"):
        curvkit.probes_like(tensors, step=-1)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sphere"])
def test_probes_like_in_one_call_equals_one_probe_at_a_time(kind):
    # every framework of the list at once (one native call each), any layout and size of tensor
    tensors = [np.zeros((3, 4)).T, np.zeros(()), np.zeros((0, 5)), np.zeros(300, dtype=np.float32)]
    if torch is not None:
        tensors += [torch.zeros(7, 2, dtype=torch.bfloat16).T, torch.zeros(129)]
    z = curvkit.probes_like(tensors, kind=kind, seed=11, step=2)
    for i, (x, t) in enumerate(zip(z, tensors)):
        assert type(x) is type(t) and x.dtype == t.dtype and tuple(x.shape) == tuple(t.shape)
        alone = curvkit.probes((math.prod(t.shape),), kind, seed=11, offset=2 * 2**24 + i, like=t)
        assert raw_bits(x.reshape(-1)).tolist() == raw_bits(alone).tolist(), i
    with pytest.raises(curvkit.ArgumentTypeError, match=r"'tensors' holds an array of dtype int64 \(entry 1\)"):
        curvkit.probes_like([np.zeros(3), np.zeros(3, dtype=np.int64)])
    with pytest.raises(curvkit.ArgumentError, match="'kind'"):
        curvkit.probes_like([np.zeros(3)], kind="uniform")
    with pytest.raises(curvkit.ArgumentError, match="'offsets' must have one entry per output"):
        curvkit._core.probes_flat([np.zeros(3)], kind=kind, seed=0, offsets=[], workspace=None, stream=0)
    with pytest.raises(curvkit.ArgumentError, match="entry 1 is not"):
        curvkit._core.probes_flat([np.zeros(3), np.zeros((3, 2)).T], kind=kind, seed=0, offsets=[0, 1],
                                  workspace=None, stream=0)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("kind", ["rademacher", "sphere"])
def test_probes_like_on_cuda_gives_the_cpu_bits(backend, kind):
    # one call over the list, sphere's workspace reused from probe to probe on the stream
    shapes = [(300, 7), (5,), (4096,), ()]
    on_device = curvkit.probes_like([make(np.zeros(s), backend, "float32") for s in shapes], kind=kind, seed=5, step=1)
    on_host = curvkit.probes_like([np.zeros(s, dtype=np.float32) for s in shapes], kind=kind, seed=5, step=1)
    for x, y in zip(on_device, on_host):
        assert raw_bits(to_numpy(x)).tolist() == raw_bits(y).tolist()


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
def test_a_torch_dtype_gives_a_torch_tensor():
    z = curvkit.probes(5, dtype=torch.float32)
    assert isinstance(z, torch.Tensor) and z.dtype == torch.float32
    params = [torch.zeros(4, 3, dtype=torch.bfloat16), torch.zeros(3)]
    zs = curvkit.probes_like(params, kind="gaussian", seed=1)
    assert [(type(x), x.dtype, tuple(x.shape)) for x in zs] == [(torch.Tensor, p.dtype, tuple(p.shape)) for p in params]
