"""Property tests of the public contract (hypothesis), one per public function: over dtype,
shape (empty and 1 x 1 included), layout (contiguous, strided or transposed views), magnitude
(subnormals to 1e300, so also values a half dtype turns into Inf or zero), framework (NumPy,
PyTorch CPU, through curvkit and curvkit.torch) and thread count. Each call either returns a
result of the caller's kind, finite and within its documented accuracy measured against the
input as stored, or raises a curvkit error naming the argument; any other exception, or NaN or
Inf handed on, fails."""
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import TOL, make, to_numpy, torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import curvkit
from curvkit import ArgumentError, ConvergenceError, CurvkitError
from curvkit import testing as reference
from curvkit.newton_schulz import schedule

# CURVKIT_CONTRACT_EXAMPLES=1000 for a longer search than CI's.
SETTINGS = dict(deadline=None, database=None, derandomize=True,
                max_examples=int(os.environ.get("CURVKIT_CONTRACT_EXAMPLES", "60")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# A magnitude beyond a half dtype's range becomes Inf on purpose (the call must then refuse it).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

FRAMEWORKS = ["numpy"] + (["torch"] if torch is not None else [])
MAGNITUDES = [1e-310, 1e-300, 1e-40, 1e-20, 1e-5, 1.0, 1e5, 1e20, 1e40, 1e300]
UNIT = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
# What curvkit computes in for each input dtype (float64 in float64, the others in float32).
COMPUTE_UNIT = {d: UNIT["float64"] if d == "float64" else UNIT["float32"] for d in UNIT}


@dataclass
class Case:
    framework: str
    dtype: str
    x: Any              # the argument: a possibly strided view of the caller's framework
    stored: np.ndarray  # its values as stored (float64): what the function actually sees
    threads: int

    @property
    def finite(self):
        return bool(np.isfinite(self.stored).all())


@st.composite
def cases(draw, kind, fw=None, dtype=None, shape=None):
    """An argument of `kind`: "general" (..., m, n), "spd" (..., n, n) with condition number
    <= 100, or "basis" (..., m, k), m >= k, near orthonormal columns. fw, dtype and shape
    (batch dims, m, n) follow another case's when given."""
    fw = fw or draw(st.sampled_from(FRAMEWORKS))
    dtype = dtype or draw(st.sampled_from(["float16", "float32", "float64"] + (["bfloat16"] if fw == "torch" else [])))
    if shape is None:
        batch = tuple(draw(st.lists(st.integers(0, 2), max_size=2)))
        n = draw(st.integers(0, 5))
        m = n if kind == "spd" else draw(st.integers(n if kind == "basis" else 0, 6))
    else:
        *batch, m, n = shape
        batch = tuple(batch)
    magnitude = draw(st.sampled_from(MAGNITUDES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    count = int(np.prod(batch, dtype=np.int64))
    if kind == "spd":
        cond = draw(st.sampled_from([1.0, 10.0, 100.0]))
        mats = [reference.spd_with_condition(rng, n, cond) if n else np.zeros((0, 0)) for _ in range(count)]
    elif kind == "basis":
        mats = [np.linalg.qr(rng.standard_normal((m, n)))[0] + 1e-3 * rng.standard_normal((m, n)) if n else
                np.zeros((m, 0)) for _ in range(count)]
    else:
        mats = [rng.standard_normal((m, n)) for _ in range(count)]
    values = np.array(mats, dtype=np.float64).reshape(batch + (m, n)) * magnitude
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    if layout == "strided":  # every second row and column of a larger array
        big = np.full(batch + (2 * m, 2 * n), np.nan)
        big[..., ::2, ::2] = values
        x = make(big, (fw, "cpu"), dtype)[..., ::2, ::2]
    elif layout == "transposed":
        x = make(np.ascontiguousarray(np.swapaxes(values, -1, -2)), (fw, "cpu"), dtype).swapaxes(-1, -2)
    else:
        x = make(values, (fw, "cpu"), dtype)
    return Case(fw, dtype, x, to_numpy(x), draw(st.integers(1, 2)))


def run(case, call):
    """(result, None) or (None, the curvkit error), with case.threads threads and the failure
    policy "raise" (a miss is a ConvergenceError to inspect); any other exception propagates
    and fails the test."""
    previous = curvkit.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # more threads than cores is allowed
        curvkit.set_num_threads(case.threads)
    try:
        with curvkit.failure_policy("raise"):
            return call(), None
    except CurvkitError as e:
        return None, e
    finally:
        curvkit.set_num_threads(previous)


def refused_by_name(error, *names):
    assert isinstance(error, ArgumentError), repr(error)
    assert any(f"argument '{name}'" in str(error) for name in names), str(error)


def same_kind(result, case, shape=None):
    assert type(result) is type(case.x), type(result)
    assert str(result.dtype).replace("torch.", "") == case.dtype
    assert tuple(result.shape) == (tuple(case.x.shape) if shape is None else shape)
    values = to_numpy(result)
    assert np.isfinite(values).all(), "NaN or Inf handed on"
    return values


def relative_error(got, want):
    """||got - want||_F / ||want||_F, safe from 1e-300 to 1e300."""
    scale = np.abs(want).max() if want.size else 0.0
    if scale == 0:
        return float(np.abs(got).max()) if got.size else 0.0
    return np.linalg.norm(got / scale - want / scale) / np.linalg.norm(want / scale)


def spd_function(a, f):
    """f(A) of each stored SPD matrix by float64 eigh of A / max|A| (scale-safe from subnormals
    to 1e300), for f(x) = x^power: at most cond * 1e-15 off, far inside the bounds below."""
    out = np.empty_like(a)
    for index in np.ndindex(a.shape[:-2]):
        scale = np.abs(a[index]).max() if a[index].size else 1.0
        if scale == 0:
            out[index] = 0.0
            continue
        w, v = np.linalg.eigh(a[index] / scale)
        out[index] = (v * f(np.maximum(w, 0))) @ v.T * f(scale)
    return out


def gram(q):
    """Q^T Q of each stored basis, scale-safe."""
    scale = np.abs(q).max(axis=(-2, -1), keepdims=True) if q.size else 1.0
    q = q / np.where(scale > 0, scale, 1)
    return np.swapaxes(q, -1, -2) @ q


LARGEST = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38, "float64": np.finfo(np.float64).max}
SMALLEST = {"float16": 2.0 ** -24, "bfloat16": 2.0 ** -133, "float32": 2.0 ** -149, "float64": 2.0 ** -1074}


def representable(x, dtype):
    """Whether every value of x (float64, Inf where it overflowed) fits the dtype's range."""
    return not x.size or bool(np.abs(x).max() <= LARGEST[dtype])


def rescale(x, multiply=(), divide=()):
    """x times the factors in `multiply` over those in `divide`, with no intermediate overflow or
    underflow (mantissas and exponents apart, one rounding at the end)."""
    mantissa, exponent = 1.0, 0
    for f, sign in [(f, 1) for f in multiply] + [(f, -1) for f in divide]:
        m, e = np.frexp(f)
        mantissa, exponent = mantissa * m ** sign, exponent + sign * int(e)
    with np.errstate(over="ignore"):
        return np.ldexp(np.asarray(x, dtype=np.float64) * mantissa, exponent)


def spd_condition(a):
    """Largest condition number over the batch of a stored SPD input (Inf if any is singular)."""
    if a.size == 0:
        return 1.0
    a = a.reshape((-1,) + a.shape[-2:])
    scale = np.abs(a).max(axis=(-2, -1), keepdims=True)
    w = np.linalg.eigvalsh(a / np.where(scale > 0, scale, 1))
    small, large = w[:, 0], w[:, -1]
    return float(np.max(np.where(small > 0, large / np.where(small > 0, small, 1), np.inf)))


def api(case, draw_torch):
    """curvkit, or curvkit.torch for a torch tensor when drawn."""
    if case.framework == "torch" and draw_torch:
        import curvkit.torch as ct
        return ct
    return curvkit


# ---- Newton–Schulz family


@settings(**SETTINGS)
@given(case=cases("general"), through_torch=st.booleans())
def test_polar(case, through_torch):
    got, error = run(case, lambda: api(case, through_torch).polar(case.x))
    if not case.finite:
        return refused_by_name(error, "G")
    assert error is None, error
    steps, norm_scale = schedule("muon", 5)
    amax = np.abs(case.stored).max() if case.stored.size else 1.0
    want = reference.newton_schulz(case.stored / (amax or 1.0), steps, norm_scale)
    np.testing.assert_allclose(same_kind(got, case), want, rtol=0, atol=TOL[(case.dtype, "polar")])


@settings(**SETTINGS)
@given(data=st.data(), through_torch=st.booleans())
def test_polar_update(data, through_torch):
    g = data.draw(cases("general"))
    w = data.draw(cases("general", g.framework, g.dtype, tuple(g.x.shape)))
    param = make(w.stored, (w.framework, "cpu"), w.dtype)  # a contiguous parameter, written in place
    before = to_numpy(param).copy()  # to_numpy of a float64 NumPy array is the array itself
    _, error = run(g, lambda: api(g, through_torch).polar_update_(param, g.x, lr=0.1, weight_decay=0.01))
    if not (g.finite and w.finite):
        return refused_by_name(error, "G", "param")
    assert error is None, error
    steps, norm_scale = schedule("muon", 5)
    amax = np.abs(g.stored).max() if g.stored.size else 1.0
    want = before * (1 - 0.1 * 0.01) - 0.1 * reference.newton_schulz(g.stored / (amax or 1.0), steps, norm_scale)
    got = same_kind(param, w)
    scale = np.abs(want).max() if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=0, atol=0.1 * TOL[(g.dtype, "polar")] + 4 * UNIT[g.dtype] * scale)


@settings(**SETTINGS)
@given(case=cases("spd"), which=st.sampled_from(["matrix_sqrt", "matrix_inv_sqrt", "matrix_sqrt_and_inv_sqrt"]),
       through_torch=st.booleans())
def test_square_roots(case, which, through_torch):
    got, error = run(case, lambda: getattr(api(case, through_torch), which)(case.x))
    if not case.finite:
        return refused_by_name(error, "A")
    cond = spd_condition(case.stored)
    want_sqrt = "inv" not in which or "and" in which
    want_inverse = "inv" in which
    if cond > 1e4:  # rounding to a half dtype (or a subnormal) left it (nearly) singular or indefinite
        assert error is None or isinstance(error, ConvergenceError), error
        return
    sqrt_ref = spd_function(case.stored, np.sqrt)
    inv_ref = spd_function(case.stored, lambda x: x ** -0.5)
    if want_inverse and not representable(inv_ref, case.dtype):  # the result does not fit the dtype
        assert isinstance(error, ConvergenceError), error
        return
    assert error is None, error
    results = list(got) if want_sqrt and want_inverse else [got]
    n = case.stored.shape[-1]
    # documented: ||S^2 - A|| / ||A|| <= tol = 1e-8 in float64, then one rounding to the dtype
    bound = 1e-8 * cond + 8 * np.sqrt(max(n, 1)) * UNIT[case.dtype] * cond
    for result, want in zip(results, ([sqrt_ref] if want_sqrt else []) + ([inv_ref] if want_inverse else [])):
        assert relative_error(same_kind(result, case), want) <= bound


@settings(**SETTINGS)
@given(data=st.data())
def test_solve_lyapunov(data):
    s = data.draw(cases("spd"))
    c = data.draw(cases("general", s.framework, s.dtype, tuple(s.x.shape)))
    got, error = run(s, lambda: curvkit.solve_lyapunov(s.x, c.x))
    if not s.finite:
        return refused_by_name(error, "S")
    if not c.finite:
        return refused_by_name(error, "C")
    cond = spd_condition(s.stored)
    if cond > 1e4 or (s.stored.size and not np.abs(s.stored).max(axis=(-2, -1)).all()):
        assert error is None or isinstance(error, ConvergenceError), error
        return
    # X = (C / S) X' in terms of S' = S / max|S|, C' = C / max|C| and S'X' + X'S' = C'
    s_scale, c_scale, scaled = [], [], []
    for index in np.ndindex(s.stored.shape[:-2]):
        ss = np.abs(s.stored[index]).max() if s.stored[index].size else 1.0
        cs = np.abs(c.stored[index]).max() if c.stored[index].size else 1.0
        w, v = np.linalg.eigh(s.stored[index] / ss)
        x = v @ ((v.T @ (c.stored[index] / (cs or 1.0)) @ v) / (w[:, None] + w[None, :])) @ v.T
        s_scale.append(ss)
        c_scale.append(cs)
        scaled.append(rescale(np.abs(x).max(), [cs], [ss]) if x.size and cs else 0.0)
    if not representable(np.array(scaled), s.dtype):  # X does not fit the dtype
        assert isinstance(error, ConvergenceError), error
        return
    assert error is None, error
    x = same_kind(got, c)
    for k, index in enumerate(np.ndindex(s.stored.shape[:-2])):
        if c_scale[k] == 0 or not x[index].size:
            assert not x[index].any()
            continue
        s1, x1, c1 = s.stored[index] / s_scale[k], rescale(x[index], [s_scale[k]], [c_scale[k]]), c.stored[index] / \
            c_scale[k]
        r = s1 @ x1 + x1 @ s1 - c1
        # X rounded to the dtype adds about 2 u ||S|| ||X|| <= u cond ||C|| to the residual, or
        # where X lies among the dtype's subnormals (or below), their spacing relative to X
        rounding = max(UNIT[s.dtype], SMALLEST[s.dtype] / scaled[k]) if scaled[k] > 0 else np.inf  # X underflows
        bound = (1e-8 + 8 * r.shape[-1] * rounding) * cond * np.linalg.norm(c1)
        assert np.linalg.norm(r) <= bound


# ---- inverse roots and eigenbases


@settings(**SETTINGS)
@given(case=cases("spd"), p=st.sampled_from([1, 2, 4]))
def test_matrix_inverse_root(case, p):
    got, error = run(case, lambda: curvkit.matrix_inverse_root(case.x, p))
    if not case.finite:
        return refused_by_name(error, "A")
    cond = spd_condition(case.stored)
    if cond > 1e4:
        assert error is None or isinstance(error, ConvergenceError), error
        return
    want = spd_function(case.stored, lambda x: x ** (-1 / p))
    if not representable(want, case.dtype):  # the result does not fit the dtype
        assert isinstance(error, ConvergenceError), error
        return
    assert error is None, error
    n = max(case.stored.shape[-1], 1)
    tol = 1e-8 if case.dtype == "float64" else 1e-3  # the default stopping tolerances
    assert relative_error(same_kind(got, case), want) <= 2 * tol + 8 * np.sqrt(n) * UNIT[case.dtype]


def orthonormality(q):
    return np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(q.shape[-1])).max() if q.size else 0.0


@settings(**SETTINGS)
@given(case=cases("spd"))
def test_eigh(case):
    got, error = run(case, lambda: curvkit.eigh(case.x))
    if not case.finite:
        return refused_by_name(error, "A")
    scale = np.abs(case.stored).max(axis=(-2, -1), keepdims=True) if case.stored.size else 1.0
    if case.stored.size and not representable(np.linalg.eigvalsh(case.stored / np.where(scale > 0, scale, 1)) *
                                              scale[..., 0], case.dtype):
        assert isinstance(error, ConvergenceError), error  # n max|A| beyond a float16 output's range
        return
    assert error is None, error
    n = case.stored.shape[-1]
    w = same_kind(got[0], case, tuple(case.x.shape[:-1]))
    v = same_kind(got[1], case)
    unit = 8 * max(n, 1) * max(UNIT[case.dtype], COMPUTE_UNIT[case.dtype])
    if case.stored.size:
        want = np.linalg.eigvalsh(case.stored)
        norm = np.broadcast_to(np.abs(want).max(axis=-1, keepdims=True), want.shape)
        # eigenvalues rounded to the dtype: relative u, or the spacing of its subnormals
        np.testing.assert_array_less(np.abs(w - want), unit * norm + UNIT[case.dtype] * np.abs(want) +
                                     SMALLEST[case.dtype])
    assert orthonormality(v) <= unit


@settings(**SETTINGS)
@given(data=st.data())
def test_eigenbasis_update(data):
    a = data.draw(cases("spd"))
    q = data.draw(cases("basis", a.framework, a.dtype, tuple(a.x.shape)))
    got, error = run(a, lambda: curvkit.eigenbasis_update(a.x, q.x))
    if not a.finite:
        return refused_by_name(error, "A")
    if not q.finite:
        return refused_by_name(error, "Q")
    if spd_condition(a.stored) > 1e4 or spd_condition(gram(q.stored)) > 1e4:
        assert error is None or isinstance(error, ConvergenceError), error
        return
    estimates = {}  # q_j^T A q_j, scale-safe (Inf where it overflows float64)
    for index in np.ndindex(a.stored.shape[:-2]):
        a_scale = np.abs(a.stored[index]).max() if a.stored[index].size else 1.0
        q_scale = np.abs(q.stored[index]).max() if q.stored[index].size else 1.0
        qn = q.stored[index] / (q_scale or 1.0)
        estimates[index] = rescale(np.einsum("ij,ik,kj->j", qn, a.stored[index] / (a_scale or 1.0), qn),
                                   [q_scale, q_scale, a_scale])
    if not all(representable(e, a.dtype) for e in estimates.values()):  # the estimates do not fit the dtype
        assert isinstance(error, ConvergenceError), error
        return
    assert error is None, error
    q_new, d, perm = got
    q_new = same_kind(q_new, q)
    d = same_kind(d, a, tuple(a.x.shape[:-1]))
    n = a.stored.shape[-1]
    assert orthonormality(q_new) <= 8 * max(n, 1) * max(UNIT[a.dtype], COMPUTE_UNIT[a.dtype])
    assert isinstance(perm, np.ndarray) and perm.dtype == np.int64
    for index in np.ndindex(a.stored.shape[:-2]):
        want = to_numpy(make(estimates[index], (a.framework, "cpu"), a.dtype))  # as the dtype stores them
        assert sorted(perm[index].tolist()) == list(range(n))
        scale = np.abs(want).max() if n else 0.0
        unit = 16 * max(n, 1) * max(UNIT[a.dtype], COMPUTE_UNIT[a.dtype])
        np.testing.assert_allclose(d[index], want[perm[index]], rtol=0, atol=unit * scale + SMALLEST[a.dtype])
        assert np.all(np.diff(d[index]) <= 0)


@settings(**SETTINGS)
@given(case=cases("basis"), method=st.sampled_from(["qr", "polar"]))
def test_orthonormalize(case, method):
    got, error = run(case, lambda: curvkit.orthonormalize(case.x, method))
    if not case.finite:
        return refused_by_name(error, "Q")
    if spd_condition(gram(case.stored)) > 1e4:  # rounding left it rank-deficient
        assert error is None or isinstance(error, ConvergenceError), error
        return
    assert error is None, error
    m = case.stored.shape[-2]
    # "qr": orthonormal to rounding; "polar": documented, sqrt(u) of the output dtype
    bound = 8 * max(m, 1) * max(UNIT[case.dtype], COMPUTE_UNIT[case.dtype]) if method == "qr" else \
        np.sqrt(UNIT[case.dtype])
    assert orthonormality(same_kind(got, case)) <= bound


# ---- probes


@settings(**SETTINGS)
@given(fw=st.sampled_from(FRAMEWORKS), dtype=st.sampled_from(["float16", "float32", "float64", "bfloat16"]),
       shape=st.lists(st.integers(0, 5), min_size=1, max_size=3), kind=st.sampled_from(["rademacher", "gaussian",
                                                                                         "sphere"]),
       seed=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**40), threads=st.integers(1, 2))
def test_probes(fw, dtype, shape, kind, seed, offset, threads):
    if dtype == "bfloat16" and fw == "numpy":
        dtype = "float32"
    like = make(np.zeros(1), (fw, "cpu"), dtype)
    case = Case(fw, dtype, like, np.zeros(1), threads)
    got, error = run(case, lambda: curvkit.probes(tuple(shape), kind, seed=seed, offset=offset, like=like))
    assert error is None, error
    values = same_kind(got, case, tuple(shape))
    want = reference.probes(tuple(shape), kind, seed, offset)
    np.testing.assert_allclose(values, want, rtol=TOL[(dtype, "probe")] if kind != "rademacher" else 0,
                               atol=1e-300)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_probes_refuse_a_strided_out_by_name(fw):
    out = make(np.zeros((4, 6)), (fw, "cpu"))[:, ::2]
    with pytest.raises(ArgumentError, match="'out'"):
        curvkit.probes((4, 3), out=out)


# ---- Sinkhorn family

@settings(**SETTINGS)
@given(case=cases("general"), method=st.sampled_from(["log", "sns", "auto"]))
def test_sinkhorn(case, method):
    # Costs of any magnitude, with reg a tenth of the largest: the same problem at every scale.
    amax = float(np.abs(case.stored).max()) if case.stored.size and case.finite else 1.0
    scale = amax if amax > 0 else 1.0
    reg = 0.1 * scale
    got, error = run(case, lambda: curvkit.sinkhorn(None, None, case.x, reg=reg, method=method, tol=1e-10))
    batch, (n, m) = case.stored.shape[:-2], case.stored.shape[-2:]
    if len(batch) > 1:
        return refused_by_name(error, "C")
    if not case.finite and case.stored.size:
        return refused_by_name(error, "C")
    if n == 0 or m == 0:
        return refused_by_name(error, "a", "b")
    if reg < np.finfo(np.float64).tiny:  # a subnormal reg
        return refused_by_name(error, "reg")
    assert error is None, error
    plans = same_kind(got, case).reshape((-1, n, m))
    for P, C in zip(plans, case.stored.reshape((-1, n, m))):
        want = reference.sinkhorn_log(np.full(n, 1 / n), np.full(m, 1 / m), C / scale, 0.1, tol=1e-12)[0]
        assert np.abs(P - want).max() <= TOL[(case.dtype, "ot_plan")] * want.max()


# ---- Hutchinson estimators over a dense operator (the stored SPD matrix)
#
# Each estimator takes the drawn array itself as its operator. A batch of matrices or n = 0 is
# refused by name ('matvec', 'n'); a product that overflows the dtype (a half dtype at large
# magnitudes) is refused as 'matvec' producing NaN or Inf. Accuracy is checked where it is
# exact up to rounding: Hutch++ and Diag++ whose sketch spans the whole space (3n matvecs),
# Lanczos run to n steps. The stochastic methods must return finite values of the documented
# kind; their statistics are tested in tests/test_hutchinson.py.


def operator_refused(case, error):
    """Whether the call was refused as it must be (True), or the test goes on (False)."""
    if case.stored.ndim != 2:
        refused_by_name(error, "matvec")
        return True
    if case.stored.shape[0] == 0:
        refused_by_name(error, "n")
        return True
    if isinstance(error, ArgumentError) and "argument 'matvec' produced non-finite" in str(error):
        # the products in the dtype overflowed (or the input held Inf): allowed where the
        # stored matrix times n entries reaches the dtype's largest value
        n = case.stored.shape[0]
        assert not case.finite or n * np.abs(case.stored).max() > LARGEST[case.dtype] / 8 or \
            n * np.abs(case.stored).max() ** 2 > np.finfo(np.float64).max / 8, str(error)
        return True
    if not case.finite:  # Inf in a half dtype's rounding: the products are NaN or Inf
        refused_by_name(error, "matvec")
        return True
    return False


def product_unit(case):
    """Relative rounding of one product A z in the dtype (the dtype's unit, or float32's)."""
    return max(UNIT[case.dtype], COMPUTE_UNIT[case.dtype])


def product_floor(case, n):
    """Absolute rounding of n products among the dtype's subnormals (and float32's)."""
    return 16 * n * max(SMALLEST[case.dtype], SMALLEST["float32" if case.dtype != "float64" else "float64"])


@settings(**SETTINGS)
@given(case=cases("spd"), method=st.sampled_from(["hutch++", "xtrace", "hutchinson", "xnystrace"]),
       kind=st.sampled_from(["rademacher", "gaussian", "sphere"]))
def test_trace_estimate(case, method, kind):
    n = case.stored.shape[-1] if case.stored.ndim == 2 else 1
    budget = {"hutch++": 3 * n, "xtrace": 2 * n, "hutchinson": n, "xnystrace": n}[method]
    got, error = run(case, lambda: curvkit.trace_estimate(case.x, None, budget, method=method, kind=kind,
                                                          return_info=True))
    if operator_refused(case, error):
        return
    if method == "xnystrace" and error is not None:  # rounded to the dtype, A may have lost definiteness
        return refused_by_name(error, "matvec")
    assert error is None, error
    value, info = got
    assert isinstance(value, float) and np.isfinite(value) and info["matvecs"] == budget
    if method == "hutch++":  # the sketch spans R^n: tr(Q^T A Q) = tr(A), nothing left to sample
        scale = np.abs(case.stored).max()
        assert abs(value - np.trace(case.stored)) <= 16 * n * n * product_unit(case) * scale + product_floor(case, n)


@settings(**SETTINGS)
@given(case=cases("spd"), method=st.sampled_from(["diag++", "xdiag", "hutchinson"]))
def test_diag_estimate(case, method):
    n = case.stored.shape[-1] if case.stored.ndim == 2 else 1
    budget = {"diag++": 3 * n, "xdiag": 2 * n, "hutchinson": n}[method]
    got, error = run(case, lambda: curvkit.diag_estimate(case.x, None, budget, method=method, kind="gaussian"))
    if operator_refused(case, error):
        return
    assert error is None, error
    compute = "float64" if case.dtype == "float64" else "float32"
    assert type(got) is type(case.x) and str(got.dtype).replace("torch.", "") == compute
    assert tuple(got.shape) == (n,)
    values = to_numpy(got)
    assert np.isfinite(values).all(), "NaN or Inf handed on"
    if method == "diag++":  # diag(Q (AQ)^T) with Q spanning R^n is diag(A)
        scale = np.abs(case.stored).max()
        np.testing.assert_allclose(values, np.diag(case.stored), rtol=0,
                                   atol=16 * n * n * product_unit(case) * scale + product_floor(case, n))


@settings(**SETTINGS)
@given(data=st.data(), which=st.sampled_from(["largest", "smallest", "magnitude"]))
def test_top_eigenvalues(data, which):
    case = data.draw(cases("spd"))
    n = case.stored.shape[-1] if case.stored.ndim == 2 else 1
    k = data.draw(st.integers(1, max(n, 1)))
    got, error = run(case, lambda: curvkit.top_eigenvalues(case.x, None, k=k, which=which, return_vectors=True))
    if operator_refused(case, error):
        return
    if isinstance(error, ConvergenceError):  # allowed where rounding to the dtype is above tol
        assert case.dtype in ("float16", "bfloat16"), error
        got = error.result
    else:
        assert error is None, error
    values, vectors = got
    assert isinstance(values, np.ndarray) and values.dtype == np.float64 and values.shape == (k,)
    assert type(vectors) is type(case.x) and tuple(vectors.shape) == (n, k)
    assert np.isfinite(values).all() and np.isfinite(to_numpy(vectors)).all(), "NaN or Inf handed on"
    w = np.linalg.eigvalsh(case.stored)  # n Lanczos steps: the whole spectrum, to rounding
    want = {"largest": w[::-1], "smallest": w, "magnitude": w[np.argsort(-np.abs(w), kind="stable")]}[which][:k]
    scale = np.abs(w).max()
    np.testing.assert_allclose(values, want, rtol=0, atol=16 * n * product_unit(case) * scale + product_floor(case, n))


@settings(**SETTINGS)
@given(case=cases("spd"), num_probes=st.integers(1, 3), reorthogonalize=st.booleans())
def test_spectral_density(case, num_probes, reorthogonalize):
    n = case.stored.shape[-1] if case.stored.ndim == 2 else 1
    got, error = run(case, lambda: curvkit.spectral_density(case.x, None, num_probes=num_probes, steps=max(n, 1),
                                                             reorthogonalize=reorthogonalize))
    if operator_refused(case, error):
        return
    assert error is None, error
    nodes, weights = got
    for a in (nodes, weights):
        assert isinstance(a, np.ndarray) and a.dtype == np.float64 and a.shape == (num_probes, n)
        assert np.isfinite(a).all(), "NaN or Inf handed on"
    unit = 16 * n * product_unit(case)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=unit)
    assert (weights >= 0).all()
    w = np.linalg.eigvalsh(case.stored)
    scale = np.abs(w).max() or 1.0
    assert (nodes >= w[0] - unit * scale - product_floor(case, n)).all()
    assert (nodes <= w[-1] + unit * scale + product_floor(case, n)).all()
    # the Gauss rule of probe b integrates x exactly: sum_i w_i nodes_i = z_b^T A z_b / z_b^T z_b
    z = reference.probes((n, num_probes), "rademacher", 0, 0)
    moments = np.einsum("ib,ij,jb->b", z, case.stored / scale, z) / n * scale
    np.testing.assert_allclose((weights * nodes).sum(axis=1), moments, rtol=0,
                               atol=unit * scale + product_floor(case, n))


# ---- M-FAC family
#
# F = damp I + R^T R / c over gradient rows R, with damp = 0.1 max|G|^2 (the same problem at
# every magnitude: kappa = ||g||^2 / (c damp) <= 10 d / c). The float64 reference is solved on
# R / max|G| and scaled back without overflow; the documented accuracy is the dtype's rounding of
# the result plus float64 rounding times kappa (docs/mfac.md).

def fisher_damp(g):
    """damp = 0.1 max|G|^2 for a finite stored G (1.0 when G is zero, empty or not finite), and
    that max."""
    amax = float(np.abs(g).max()) if g.size and np.isfinite(g).all() else 0.0
    return (0.1 * amax * amax if amax > 0 else 1.0), (amax if amax > 0 else 1.0)


def fisher_reference(rows, c, damp, amax, X=None, block=None):
    """(F^-1 X, diag(F^-1), F^-1) at their true scale, from the float64 solve on rows / amax."""
    d = rows.shape[1]
    r = rows / amax
    F = rescale(damp, [], [amax, amax]) * np.eye(d) + r.T @ r / max(c, 1)
    if block is not None:
        starts = np.arange(d) // block
        F = np.where(starts[:, None] == starts[None, :], F, 0.0)
    inverse = np.linalg.inv(F) if d else np.zeros((0, 0))
    diag = rescale(np.diag(inverse), [], [amax, amax])
    if X is None:
        return None, diag, rescale(inverse, [], [amax, amax])
    xs = float(np.abs(X).max()) if X.size else 0.0
    xs = xs if xs > 0 else 1.0
    return rescale(np.linalg.solve(F, X / xs) if d else X, [xs], [amax, amax]), diag, None


def check_fisher_result(got, case, want, shape=None):
    """got (the caller's kind) within the documented bound of want; or, where want does not fit
    the dtype, a curvkit error instead (the caller passes the error as got=None)."""
    values = same_kind(got, case, shape)
    scale = float(np.abs(want).max()) if want.size else 0.0
    bound = (4 * UNIT[case.dtype] + 1e-11) * scale + SMALLEST[case.dtype]
    assert np.all(np.abs(values - want) <= bound), float(np.abs(values - want).max() / max(scale, 1e-300))


def fits(want, dtype):
    """True / False where the result clearly fits the dtype's range or not, None at the edge."""
    top = float(np.abs(want).max()) if want.size else 0.0
    return True if top < 0.99 * LARGEST[dtype] else (False if top > 1.01 * LARGEST[dtype] else None)


def expect_fisher(got, error, case, want, shape=None):
    verdict = fits(want, case.dtype)
    if verdict is None:
        assert error is None or isinstance(error, CurvkitError), error
        if error is None:
            same_kind(got, case, shape)
        return
    if not verdict:  # |x| / damp beyond the dtype: refused, never handed on as Inf
        assert isinstance(error, CurvkitError), error
        return
    assert error is None, error
    check_fisher_result(got, case, want, shape)


def fisher_refusal(g, x, damp, *names_ok):
    """The argument names a call on G and x may be refused by, [] if none."""
    names = []
    if g.stored.ndim != 2:
        names.append("G")
    elif not g.finite:
        names.append("G")
    if x is not None and not x.finite:
        names.append("x")
    if not (np.isfinite(damp) and damp > 0):
        names.append("damp")
    return names + list(names_ok) if names else []


@settings(**SETTINGS)
@given(data=st.data(), block=st.sampled_from([None, 1, 2, 3, 7]), k=st.integers(0, 3))
def test_fisher_ihvp_and_diag(data, block, k):
    g = data.draw(cases("general"))
    d = g.stored.shape[-1]
    x = data.draw(cases("general", g.framework, g.dtype, (d, k)))
    damp, amax = fisher_damp(g.stored)
    got, error = run(g, lambda: curvkit.fisher_ihvp(g.x, x.x, damp, block_size=block))
    names = fisher_refusal(g, x, damp)
    if names:
        return refused_by_name(error, *names)
    want, _, _ = fisher_reference(g.stored, g.stored.shape[0], damp, amax, x.stored, block)
    expect_fisher(got, error, x, want)
    got, error = run(g, lambda: curvkit.fisher_inverse_diag(g.x, damp, block_size=block))
    _, want, _ = fisher_reference(g.stored, g.stored.shape[0], damp, amax, block=block)
    expect_fisher(got, error, g, want, (d,))


@settings(**SETTINGS)
@given(data=st.data(), count=st.integers(1, 4))
def test_fisher_inverse_entries(data, count):
    g = data.draw(cases("general"))
    damp, amax = fisher_damp(g.stored)
    got, error = run(g, lambda: curvkit.fisher_inverse_factor(g.x, damp))
    names = fisher_refusal(g, None, damp)
    if names:
        return refused_by_name(error, *names)
    assert error is None, error
    assert type(got) is type(g.x) and tuple(got.shape) == g.stored.shape
    m, d = g.stored.shape
    if d == 0:
        return
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    rows, cols = rng.integers(0, d, count), rng.integers(0, d, count)
    entries, error = run(g, lambda: curvkit.fisher_inverse_entries(got, damp, rows, cols))
    assert error is None, error
    _, _, inverse = fisher_reference(g.stored, m, damp, amax)
    assert type(entries) is type(g.x)
    values = to_numpy(entries)
    want = inverse[rows, cols]
    scale = float(np.abs(inverse).max())
    assert np.all(np.abs(values - want) <= 1e-11 * scale + SMALLEST["float64"])


def push_rows(window, g, rows_of, may_refuse):
    """Pushes each row of the stored case; a refused one must name 'g' and leave the window as
    it was. Returns whether every row was taken."""
    for i in range(g.stored.shape[0]):
        before = (window.size, window.count)
        _, error = run(g, lambda i=i: window.push(rows_of(i)))
        if error is None:
            continue
        assert may_refuse(i), error
        refused_by_name(error, "g")
        assert (window.size, window.count) == before


@settings(**SETTINGS)
@given(data=st.data(), capacity=st.integers(1, 3), normalize=st.sampled_from(["capacity", "count"]),
       k=st.integers(1, 2))
def test_fisher_window(data, capacity, normalize, k):
    g = data.draw(cases("general"))
    if g.stored.ndim != 2:
        return
    m, d = g.stored.shape
    x = data.draw(cases("general", g.framework, g.dtype, (d, k)))
    damp, amax = fisher_damp(g.stored[np.isfinite(g.stored).all(axis=1)] if m else g.stored)
    window, error = run(g, lambda: curvkit.FisherWindow(d, capacity, damp, dtype=g.dtype, like=g.x,
                                                        normalize=normalize))
    if d == 0:
        return refused_by_name(error, "d")
    if not (np.isfinite(damp) and damp > 0):
        return refused_by_name(error, "damp")
    assert error is None, error
    push_rows(window, g, lambda i: g.x[i], lambda i: not np.isfinite(g.stored[i]).all())
    taken = [i for i in range(m) if np.isfinite(g.stored[i]).all()][-capacity:]
    assert window.size == len(taken)
    rows = g.stored[taken] if taken else np.zeros((0, d))
    c = capacity if normalize == "capacity" else max(len(taken), 1)
    got, error = run(g, lambda: window.ihvp(x.x))
    if not x.finite:
        return refused_by_name(error, "x")
    want, diag, _ = fisher_reference(rows, c, damp, amax, x.stored)
    expect_fisher(got, error, x, want)
    got, error = run(g, lambda: window.diag())
    expect_fisher(got, error, g, diag, (d,))


@settings(**SETTINGS)
@given(data=st.data(), capacity=st.integers(1, 3), keep=st.integers(1, 3), block=st.sampled_from([None, 1, 2, 4]),
       normalize=st.sampled_from(["capacity", "count"]))
def test_sparse_fisher_window(data, capacity, keep, block, normalize):
    g = data.draw(cases("general"))
    if g.stored.ndim != 2:
        return
    m, d = g.stored.shape
    x = data.draw(cases("general", g.framework, g.dtype, (d, 1)))
    damp, amax = fisher_damp(g.stored[np.isfinite(g.stored).all(axis=1)] if m else g.stored)
    window, error = run(g, lambda: curvkit.SparseFisherWindow(d, capacity, keep, damp, block_size=block,
                                                              dtype=g.dtype, like=g.x, normalize=normalize))
    if d == 0:
        return refused_by_name(error, "d")
    if not (np.isfinite(damp) and damp > 0):
        return refused_by_name(error, "damp")
    assert error is None, error
    # The error feedback sums the rows: near the top of the dtype's range it may overflow.
    near_top = amax * max(m, 1) > 0.1 * LARGEST[g.dtype]
    push_rows(window, g, lambda i: g.x[i], lambda i: near_top or not np.isfinite(g.stored[i]).all())
    rows = window.densified()[window.slots] if window.size else np.zeros((0, d))
    c = capacity if normalize == "capacity" else max(window.size, 1)
    got, error = run(g, lambda: window.ihvp(x.x))
    if not x.finite:
        return refused_by_name(error, "x")
    scale = max(amax, float(np.abs(rows).max()) if rows.size else 0.0)
    want, _, _ = fisher_reference(rows, c, damp, scale, x.stored)
    expect_fisher(got, error, x, want)
