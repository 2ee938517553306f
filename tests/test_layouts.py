"""Every public function of every family (probes take no array) on strided, transposed and
empty inputs, on every backend: a view gives the same bits as the same call on a contiguous
copy, and empty batches and 0 x 0 matrices come back with the right shapes."""
import numpy as np
import pytest
from conftest import make, raw_bits, to_numpy

import curvkit
from curvkit import testing as reference


def _fw(x):
    return type(x).__module__.split(".")[0]


def contiguous(x):
    if _fw(x) == "torch":
        return x.contiguous()
    if _fw(x) == "cupy":
        import cupy

        return cupy.ascontiguousarray(x)
    return np.ascontiguousarray(x)


def is_contiguous(x):
    if _fw(x) == "torch":
        return x.is_contiguous()
    return x.flags.c_contiguous


def _spd(rng, batch, n):
    return np.stack([reference.spd_with_condition(rng, n, 1e2) for _ in range(batch)])


def _general(rng, batch, m, n):
    return rng.standard_normal((batch, m, n))


def _basis(rng, batch, n, k):
    return np.linalg.qr(rng.standard_normal((batch, n, k)))[0]


def _polar_update(W, G):
    W = contiguous(W) if not is_contiguous(W) else W * 1  # a fresh parameter per call
    curvkit.polar_update_(W, G, lr=0.1, weight_decay=0.01)
    return W


# name -> (inputs(rng, batch, n): list of NumPy arrays; which arguments are symmetric (their
# views must stay symmetric); the call; the output shapes for the input shapes)
def _square(shapes):
    return [shapes[0]]


CASES = {
    "polar": (lambda rng, b, n: [_general(rng, b, n, n + 5)], [False], lambda G: [curvkit.polar(G)],
              lambda s: [s[0]]),
    "polar_gram": (lambda rng, b, n: [_general(rng, b, n + 5, n)], [False],
                   lambda G: [curvkit.polar(G, 5, "polar_express", method="gram")], lambda s: [s[0]]),
    "polar_update_": (lambda rng, b, n: [_general(rng, b, n, n + 5), _general(rng, b, n, n + 5)], [False, False],
                      lambda W, G: [_polar_update(W, G)], lambda s: [s[0]]),
    "matrix_sqrt": (lambda rng, b, n: [_spd(rng, b, n)], [True], lambda A: [curvkit.matrix_sqrt(A)], _square),
    "matrix_sqrt_newton_schulz": (lambda rng, b, n: [_spd(rng, b, n)], [True],
                                  lambda A: [curvkit.matrix_sqrt(A, method="newton_schulz")], _square),
    "matrix_inv_sqrt": (lambda rng, b, n: [_spd(rng, b, n)], [True], lambda A: [curvkit.matrix_inv_sqrt(A)], _square),
    "matrix_sqrt_and_inv_sqrt": (lambda rng, b, n: [_spd(rng, b, n)], [True],
                                 lambda A: list(curvkit.matrix_sqrt_and_inv_sqrt(A)), lambda s: [s[0], s[0]]),
    "solve_lyapunov": (lambda rng, b, n: [_spd(rng, b, n), _general(rng, b, n, n)], [True, False],
                       lambda S, C: [curvkit.solve_lyapunov(S, C)], _square),
    "matrix_inverse_root_eigh": (lambda rng, b, n: [_spd(rng, b, n)], [True],
                                 lambda A: [curvkit.matrix_inverse_root(A, 4, eps=1e-6, method="eigh")], _square),
    "matrix_inverse_root_newton": (lambda rng, b, n: [_spd(rng, b, n)], [True],
                                   lambda A: [curvkit.matrix_inverse_root(A, 4, eps=1e-6, method="newton")], _square),
    "eigh": (lambda rng, b, n: [_spd(rng, b, n) - 0.1 * np.eye(n)], [True], lambda A: list(curvkit.eigh(A)),
             lambda s: [s[0][:-1], s[0]]),
    "orthonormalize_qr": (lambda rng, b, n: [_general(rng, b, n + 5, n)], [False],
                          lambda Q: [curvkit.orthonormalize(Q, "qr")], _square),
    "orthonormalize_polar": (lambda rng, b, n: [_basis(rng, b, n + 5, n) + 1e-3 * _general(rng, b, n + 5, n)], [False],
                             lambda Q: [curvkit.orthonormalize(Q, "polar")], _square),
    "eigenbasis_update": (lambda rng, b, n: [_spd(rng, b, n), _basis(rng, b, n, n // 2)], [True, False],
                          lambda A, Q: list(curvkit.eigenbasis_update(A, Q)),
                          lambda s: [s[1], s[1][:-2] + s[1][-1:], s[1][:-2] + s[1][-1:]]),
}

def _views(x, symmetric, kind):
    """`kind` view of NumPy array x (batch, m, n), built on the backend as a view of a larger array."""
    b, m, n = x.shape
    if kind == "strided":  # every other row (and column, where it must stay symmetric)
        big = np.full((b, 2 * m, 2 * n if symmetric else n), np.nan)
        big[:, ::2, ::2 if symmetric else 1] = x
        return big, lambda y: y[:, ::2, ::2] if symmetric else y[:, ::2, :]
    if kind == "transposed":  # the values of x, in a transposed layout
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)), lambda y: y.swapaxes(-1, -2)
    if kind == "batch_strided":  # every other matrix of a batch
        big = np.full((2 * b, m, n), np.nan)
        big[::2] = x
        return big, lambda y: y[::2]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["strided", "transposed", "batch_strided"])
@pytest.mark.parametrize("name", list(CASES))
def test_views_give_the_bits_of_a_contiguous_copy(backend, name, kind, rng):
    inputs, symmetric, call, _ = CASES[name]
    arrays = inputs(rng, 3, 12)
    views = []
    for x, sym in zip(arrays, symmetric):
        base, view = _views(x, sym, kind)
        v = view(make(base, backend))
        assert not is_contiguous(v)
        views.append(v)
    copies = [contiguous(v) for v in views]
    got, expected = call(*views), call(*copies)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert tuple(g.shape) == tuple(e.shape)
        np.testing.assert_array_equal(raw_bits(g), raw_bits(e))
    for v, x in zip(views, arrays):  # inputs are left as they were
        np.testing.assert_array_equal(raw_bits(contiguous(v)), raw_bits(make(x, backend)))


@pytest.mark.parametrize("kind", ["strided", "transposed", "batch_strided"])
def test_polar_update_of_a_viewed_parameter(backend, kind, rng):
    W, G = _general(rng, 3, 12, 17), make(_general(rng, 3, 12, 17), backend)
    base, view = _views(W, False, kind)
    viewed = make(base, backend)
    param = view(viewed)
    copy = contiguous(param)
    curvkit.polar_update_(copy, G, lr=0.1, weight_decay=0.01)
    curvkit.polar_update_(param, G, lr=0.1, weight_decay=0.01)
    np.testing.assert_array_equal(raw_bits(contiguous(param)), raw_bits(copy))
    # only the viewed entries were written
    untouched = np.isnan(base)
    assert np.isnan(to_numpy(viewed)[untouched]).all()


@pytest.mark.parametrize("shape", [(0, 6), (3, 0)], ids=["empty_batch", "empty_matrices"])
@pytest.mark.parametrize("name", list(CASES))
def test_empty_batches_and_matrices(backend, name, shape, rng):
    # (0, n, n): a batch with no matrices; (3, 0, 0): matrices with no entries
    inputs, _, call, out_shapes = CASES[name]
    batch, n = shape
    arrays = [a[:, :0, :0] if n == 0 else a for a in inputs(rng, max(batch, 1), 6)]
    if batch == 0:
        arrays = [a[:0] for a in arrays]
    else:
        arrays = [np.zeros((batch, 0, 0)) for _ in arrays]
    got = call(*[make(np.ascontiguousarray(a), backend) for a in arrays])
    expected = out_shapes([a.shape for a in arrays])
    assert [tuple(g.shape) for g in got] == [tuple(e) for e in expected]
