"""Test problems: matrices with a chosen spectrum or condition, Shampoo-like factor sequences,
the XTrace test spectra, gradient windows of a chosen kappa, and entropic OT problems. Pure
NumPy, float64 unless a dtype is asked for; every random draw comes from the given generator
or seed, so a problem is reproducible."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

Generator = np.random.Generator


def _rng(seed: Any) -> Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def matrix_with_spectrum(rng: Generator, m: int, n: int, singular_values: Any) -> np.ndarray:
    """Random m x n matrix with the given singular values (and random singular vectors).

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> G = testing.matrix_with_spectrum(np.random.default_rng(0), 5, 3, [3.0, 2.0, 1e-3])
    >>> np.round(np.linalg.svd(G, compute_uv=False), 6).tolist()
    [3.0, 2.0, 0.001]
    """
    r = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))
    V, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return (U * np.asarray(singular_values, dtype=np.float64)) @ V.T


def spd_with_condition(rng: Generator, n: int, cond: float, eps: float = 0.0) -> np.ndarray:
    """Random symmetric positive definite n x n with eigenvalues log-spaced from 1 to 1/cond
    (plus ``eps`` I).

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> A = testing.spd_with_condition(np.random.default_rng(0), 50, 1e6)
    >>> f"{np.linalg.cond(A):.3g}"
    '1e+06'
    """
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.logspace(0, -np.log10(cond), n)) @ Q.T + eps * np.eye(n)
    return (A + A.T) / 2


def spd_with_spectrum(rng: Generator, eigenvalues: Any) -> np.ndarray:
    """Random symmetric matrix Q diag(eigenvalues) Q^T with a Haar-distributed Q (PSD when the
    eigenvalues are nonnegative; zeros give a rank-deficient matrix).

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> A = testing.spd_with_spectrum(np.random.default_rng(0), [4.0, 1.0, 0.0])
    >>> np.round(np.linalg.eigvalsh(A), 12) + 0.0
    array([0., 1., 4.])
    """
    w = np.asarray(eigenvalues, dtype=np.float64)
    Q, R = np.linalg.qr(rng.standard_normal((w.size, w.size)))
    Q = Q * np.where(np.diagonal(R) < 0, -1.0, 1.0)  # Haar: fix the sign freedom of QR
    A = (Q * w) @ Q.T
    return (A + A.T) / 2


def rank_deficient_gram(rng: Generator, n: int, rank: int, decay: float = 1.0) -> np.ndarray:
    """G^T G / rank for ``rank`` random gradients G (rank x n) whose scales fall geometrically by
    ``decay`` per row: an n x n PSD matrix of exactly that rank, the shape of a Shampoo or SOAP
    factor after its first few steps (or of a wide layer's factor on every step).

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> A = testing.rank_deficient_gram(np.random.default_rng(0), 20, 4)
    >>> int(np.linalg.matrix_rank(A)), A.shape
    (4, (20, 20))
    """
    G = rng.standard_normal((rank, n)) * (decay ** np.arange(rank))[:, None]
    A = G.T @ G / max(rank, 1)
    return (A + A.T) / 2


def shampoo_factors(rng: Generator, m: int, n: int, steps: int, beta: float = 0.95, rank: int = 4,
                    noise: float = 0.1) -> list[tuple[np.ndarray, np.ndarray]]:
    """The factors L_t = beta L_{t-1} + (1 - beta) G_t G_t^T (m x m) and R_t = beta R_{t-1} +
    (1 - beta) G_t^T G_t (n x n) of a Shampoo-like EMA over ``steps`` gradients G_t (m x n).

    Each gradient is a slowly turning low-rank signal (``rank`` directions with decaying
    weights, rotated a little each step) plus ``noise`` times Gaussian noise, so the factors
    start rank-deficient, fill in, and become ill-conditioned as they would in training.
    Returns the list of (L_t, R_t), t = 1..steps.

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> factors = testing.shampoo_factors(np.random.default_rng(0), 8, 6, steps=3)
    >>> len(factors), factors[-1][0].shape, factors[-1][1].shape
    (3, (8, 8), (6, 6))
    >>> int(np.linalg.matrix_rank(factors[0][1])) <= 6
    True
    """
    U = np.linalg.qr(rng.standard_normal((m, rank)))[0]
    V = np.linalg.qr(rng.standard_normal((n, rank)))[0]
    weights = 10.0 ** -np.arange(rank)
    L, R = np.zeros((m, m)), np.zeros((n, n))
    out = []
    for _ in range(steps):
        U = np.linalg.qr(U + 0.05 * rng.standard_normal((m, rank)))[0]
        V = np.linalg.qr(V + 0.05 * rng.standard_normal((n, rank)))[0]
        G = (U * weights) @ V.T + noise * rng.standard_normal((m, n)) / np.sqrt(max(m, n))
        L = beta * L + (1 - beta) * (G @ G.T)
        R = beta * R + (1 - beta) * (G.T @ G)
        out.append(((L + L.T) / 2, (R + R.T) / 2))
    return out


def float32_accumulated_factor(rng: Generator, n: int = 256, rank: int = 32, steps: int = 300,
                               beta: float = 0.95) -> np.ndarray:
    """A Shampoo factor as Distributed Shampoo accumulates it: the EMA ``L = beta L + (1 - beta)
    g g^T`` of ``steps`` rank-``rank`` gradients of magnitudes 1e-2..1e2, in float32. Rank
    deficient, and PSD only up to its rounding: its float64 eigenvalues reach below zero (a few
    1e-8 of the largest), which the optimizer's floor must take. Returns float32 (n, n).

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> L = testing.float32_accumulated_factor(np.random.default_rng(0), 64, 8, steps=50)
    >>> L.dtype, bool(np.linalg.eigvalsh(L.astype(np.float64))[0] < 0)
    (dtype('float32'), True)
    """
    basis = rng.standard_normal((n, rank)).astype(np.float32)
    L = np.zeros((n, n), np.float32)
    for _ in range(steps):
        g = basis @ rng.standard_normal((rank, 8)).astype(np.float32) * np.float32(10 ** rng.uniform(-2, 2))
        L = np.float32(beta) * L + np.float32(1 - beta) * (g @ g.T)
    return L


XTRACE_SPECTRA = ("flat", "poly", "exp9", "exp7", "step")
"""The test spectra of the XTrace paper (Epperly, Tropp & Webber 2024; its tests/test_vectors.m)."""


def xtrace_spectrum(name: str, n: int = 1000) -> np.ndarray:
    """Eigenvalues of one XTrace test matrix: "flat" (linspace(1, 3)), "poly" (k^-2), "exp9"
    (0.9^k), "exp7" (0.7^k), or "step" (n/20 ones, the rest 1e-3).

    Examples
    --------
    >>> from curvkit import testing
    >>> testing.xtrace_spectrum("step", 60)[:4].tolist()
    [1.0, 1.0, 1.0, 0.001]
    """
    k = np.arange(n)
    spectra = {
        "flat": lambda: np.linspace(1, 3, n),
        "poly": lambda: (k + 1) ** -2.0,
        "exp9": lambda: 0.9 ** k,
        "exp7": lambda: 0.7 ** k,
        "step": lambda: np.r_[np.ones(n // 20), 1e-3 * np.ones(n - n // 20)],
    }
    if name not in spectra:
        raise ValueError(f"name must be one of {XTRACE_SPECTRA}, got {name!r}")
    return spectra[name]()


def gradient_window(rng: Generator, m: int, d: int, kappa: float = 1e3,
                    scale: Optional[float] = None) -> tuple[np.ndarray, float]:
    """m gradients (rows of G, m x d) of log-uniformly spread norms, and the damping ``damp``
    that gives them kappa = mean ||g||^2 / (scale damp) (scale defaults to m): the condition
    of an M-FAC product damp I + G^T G / scale grows with kappa.

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> G, damp = testing.gradient_window(np.random.default_rng(0), 4, 100, kappa=1e4)
    >>> f"{np.mean(np.sum(G ** 2, axis=1)) / (4 * damp):.0f}"
    '10000'
    """
    G = rng.standard_normal((m, d)) * np.exp(rng.uniform(-1, 1, size=(m, 1)))
    damp = float(np.mean(np.sum(G ** 2, axis=1)) / ((scale or m) * kappa))
    return G, damp


# ---- Entropic optimal transport (the reproducible sets of the SNS and RegOT papers)

OT_KINDS = ("assignment", "synthetic1", "synthetic2", "grid_l1", "grid_l2", "identity")
"""The kinds of :func:`ot_problem`."""

OT_DEFAULT_REG = {"assignment": 1 / 1200, "synthetic1": 1e-3, "synthetic2": 1e-3, "grid_l1": 1 / 1200,
                  "grid_l2": 1 / 1200, "identity": 1e-2}
"""The regularization each kind's source runs it at: eta = 1200 in the SNS paper (Tang et al.
2024, arXiv 2401.12253), 1e-3 in RegOT's synthetic sets; "identity" is this module's own."""


def _finish(a: np.ndarray, b: np.ndarray, C: np.ndarray, dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = a / a.sum(), b / b.sum()
    return a.astype(dtype), b.astype(dtype), C.astype(dtype)


def ot_assignment(n: int, m: Optional[int] = None, *, seed: Any = 0,
                  dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SNS paper's random assignment problem (and RegOT's Synthetic I, the same at reg
    1e-3): C ~ U[0, 1] (n x m), uniform marginals. Returns (a, b, C).

    Examples
    --------
    >>> from curvkit import testing
    >>> a, b, C = testing.ot_assignment(4, 3, seed=0)
    >>> a.shape, b.shape, C.shape, float(a.sum()), bool(C.min() >= 0 and C.max() <= 1)
    ((4,), (3,), (4, 3), 1.0, True)
    """
    m = n if m is None else m
    C = _rng(seed).uniform(0.0, 1.0, size=(n, m))
    return _finish(np.ones(n), np.ones(m), C, dtype)


def ot_synthetic2(n: int, m: Optional[int] = None, *, seed: Any = 0,
                  dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RegOT's Synthetic II: n and m points of a uniform grid on [0, 5]; a proportional to the
    Exp(1) density, b to the mixture 0.2 N(1, 0.2^2) + 0.8 N(3, 0.5^2); C = (x - y)^2 divided by
    its maximum. Deterministic (``seed`` is accepted for a uniform signature).

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> a, b, C = testing.ot_synthetic2(50)
    >>> float(C.max()), int(np.argmax(b)) in range(25, 35)
    (1.0, True)
    """
    m = n if m is None else m
    x, y = np.linspace(0, 5, n), np.linspace(0, 5, m)

    def normal(t: np.ndarray, mean: float, std: float) -> np.ndarray:
        return np.exp(-0.5 * ((t - mean) / std) ** 2) / std

    a = np.exp(-x)
    b = 0.2 * normal(y, 1.0, 0.2) + 0.8 * normal(y, 3.0, 0.5)
    C = (x[:, None] - y[None, :]) ** 2
    return _finish(a, b, C / C.max(), dtype)


def _blobs(rng: Generator, side: int, count: int = 3) -> np.ndarray:
    r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    p = np.zeros((side, side))
    for _ in range(count):
        center = rng.uniform(0.2, 0.8, size=2) * (side - 1)
        width = rng.uniform(0.05, 0.15) * side
        p += rng.uniform(0.5, 1.0) * np.exp(-((r - center[0]) ** 2 + (c - center[1]) ** 2) / (2 * width ** 2))
    p = p.reshape(-1) / p.sum()
    return (1 - 1e-3) * p + 1e-3 / p.size


def ot_grid(n: int = 784, *, cost: str = "l1", seed: Any = 0,
            dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SNS paper's MNIST-style grid problem with random blobs instead of digits: the pixels
    of a sqrt(n) x sqrt(n) grid (28 x 28 by default), C their L1 ("l1", the hard case) or
    squared Euclidean ("l2") distance divided by its maximum, and marginals
    (1 - 1e-3) p + 1e-3 / n for p a sum of three random Gaussian blobs.

    Examples
    --------
    >>> from curvkit import testing
    >>> a, b, C = testing.ot_grid(cost="l2", seed=3)
    >>> C.shape, float(C.max()), bool(a.min() >= 1e-3 / 784 * 0.99)
    ((784, 784), 1.0, True)
    """
    side = int(round(np.sqrt(n)))
    if side * side != n:
        raise ValueError(f"n must be a perfect square for a grid problem, got {n}")
    if cost not in ("l1", "l2"):
        raise ValueError(f"cost must be 'l1' or 'l2', got {cost!r}")
    rng = _rng(seed)
    pts = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2).astype(float)
    diff = pts[:, None, :] - pts[None, :, :]
    C = np.abs(diff).sum(-1) if cost == "l1" else (diff ** 2).sum(-1)
    return _finish(_blobs(rng, side), _blobs(rng, side), C / C.max(), dtype)


def ot_identity(n: int, *, dim: int = 2, noise: float = 1e-3, seed: Any = 0,
                dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Identity recovery: x ~ U[0, 1]^dim, y = x + ``noise`` N(0, I), C the squared Euclidean
    distance, uniform marginals; as reg falls the plan approaches I / n.

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> a, b, C = testing.ot_identity(5, seed=0)
    >>> bool(np.all(np.argmin(C, axis=1) == np.arange(5)))
    True
    """
    rng = _rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n, dim))
    y = x + noise * rng.standard_normal((n, dim))
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return _finish(np.ones(n), np.ones(n), C, dtype)


def ot_problem(kind: str, n: int, m: Optional[int] = None, *, seed: Any = 0,
               dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An entropic OT problem (a, b, C) by name: the marginals a (n,) and b (m,), each summing
    to 1, and the cost C (n, m), in ``dtype``. The regularization each source uses is
    ``OT_DEFAULT_REG[kind]``.

    kind : "assignment" (:func:`ot_assignment`), "synthetic1" (the same problem, RegOT's
    Synthetic I), "synthetic2" (:func:`ot_synthetic2`), "grid_l1" / "grid_l2" (:func:`ot_grid`;
    n a perfect square, m = n), "identity" (:func:`ot_identity`; m = n).

    Examples
    --------
    >>> from curvkit import testing
    >>> a, b, C = testing.ot_problem("synthetic2", 100, 80)
    >>> a.shape, b.shape, C.shape, testing.OT_DEFAULT_REG["synthetic2"]
    ((100,), (80,), (100, 80), 0.001)
    """
    if kind in ("assignment", "synthetic1"):
        return ot_assignment(n, m, seed=seed, dtype=dtype)
    if kind == "synthetic2":
        return ot_synthetic2(n, m, seed=seed, dtype=dtype)
    if kind in ("grid_l1", "grid_l2", "identity"):
        if m is not None and m != n:
            raise ValueError(f"kind {kind!r} is square: m must be None or n, got m={m}, n={n}")
        if kind == "identity":
            return ot_identity(n, seed=seed, dtype=dtype)
        return ot_grid(n, cost=kind[-2:], seed=seed, dtype=dtype)
    raise ValueError(f"kind must be one of {OT_KINDS}, got {kind!r}")
