"""curvkit.probes against the float64 reference, its statistics, and its determinism."""
import math

import numpy as np
import pytest
import reference
from conftest import TOL, backend_dtypes, make, needs_torch, raw_bits, to_numpy

import curvkit

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
