"""Float64 and extended-precision NumPy references for curvkit's kernels, written from the
definitions (not from curvkit's code): Philox4x32-10 and the probe constructions, correctly
rounded casts, polar factors and Newton-Schulz, spectral functions of SPD matrices, the
reference optimizer steps, dense Fisher solves and log-domain Sinkhorn."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._errors import ConvergenceError

MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 arrays holding 32-bit words (Salmon et al., SC 2011)."""
    c0, c1, c2, c3, k0, k1 = (np.asarray(v, dtype=np.uint64) for v in (c0, c1, c2, c3, k0, k1))
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    w0, w1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + w0) & MASK32, (k1 + w1) & MASK32
    return c0, c1, c2, c3


def _block(seed, probe, block):
    lo = lambda v: v & MASK32  # noqa: E731
    hi = lambda v: v >> np.uint64(32)  # noqa: E731
    seed = np.uint64(seed)
    return philox4x32_10(lo(block), hi(block), lo(probe), hi(probe), lo(seed), hi(seed))


def probes(shape, kind, seed=0, offset=0):
    """Probes exactly as curvkit.probes defines them, in float64 (NumPy's log/cos/sin)."""
    shape = tuple(shape)
    n, k = (shape[0], 1) if len(shape) == 1 else shape[-2:]
    batch = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    i = np.arange(n, dtype=np.uint64)[None, :, None]
    probe = (np.uint64(offset) + np.arange(batch * k, dtype=np.uint64).reshape(batch, 1, k))
    i, probe = np.broadcast_arrays(i, probe)
    if kind == "rademacher":
        words = _block(seed, probe, i // np.uint64(128))
        word = np.choose(((i % np.uint64(128)) // np.uint64(32)).astype(np.int64), words)
        out = np.where((word >> (i % np.uint64(32))) & np.uint64(1), 1.0, -1.0)
    else:
        v0, v1, v2, v3 = _block(seed, probe, i // np.uint64(2))
        a, b = v0 | (v1 << np.uint64(32)), v2 | (v3 << np.uint64(32))
        u = ((a >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53
        t = (b >> np.uint64(11)).astype(np.float64) * 2.0**-53
        radius = np.sqrt(-2.0 * np.log(u))
        cos, sin = cos_sin_2pi(t)
        out = np.where(i % np.uint64(2) == 0, radius * cos, radius * sin)
        if kind == "sphere":
            out = out / np.linalg.norm(out, axis=1, keepdims=True)
    return out.reshape(shape)


def sphere_norms_in_order(z):
    """Column 2-norms of gaussian probes z (n, k), summed in the order curvkit defines (see
    csrc/hutchinson/probe_math.h): chunks of 256 entries, in each 32 lane sums over the
    lane's pairs, an xor butterfly over lanes, then the aligned binary tree over chunks.
    Zero padding adds exact zeros, so it does not change any sum."""
    z = np.asarray(z, dtype=np.float64)
    n, k = z.shape
    chunks = -(-n // 256)
    squares = np.zeros((chunks * 256, k))
    squares[:n] = z * z
    squares = squares.reshape(chunks, 4, 32, 2, k)  # entry 256c + 2(l + 32t) + h
    lanes = np.zeros((chunks, 32, k))
    for t in range(4):
        for h in range(2):
            lanes = lanes + squares[:, t, :, h, :]
    for off in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[:, np.arange(32) ^ off, :]
    v = lanes[:, 0, :].copy()
    width = 1
    while width < chunks:
        i = np.arange(0, chunks - width, 2 * width)
        v[i] = v[i] + v[i + width]
        width *= 2
    return np.sqrt(v[0])


def cos_sin_2pi(t):
    """cos(2 pi t), sin(2 pi t) for t in [0, 1), accurate near their zeros: 4t = q + f is
    split exactly and only the quarter-turn remainder f is rounded into radians (NumPy's
    cos(2*np.pi*t) loses relative accuracy near the zeros, up to ~1e-11 here)."""
    r = 4.0 * t
    q = np.floor(r + 0.5)
    x = (r - q) * (np.pi / 2)
    c, s = np.cos(x), np.sin(x)
    quarter = q.astype(np.int64) % 4
    cos = np.choose(quarter, [c, -s, -c, s])
    sin = np.choose(quarter, [s, c, -s, -c])
    return cos, sin


def round_to_bfloat16_bits(x):
    """Bits of x (float64) rounded once, to nearest-even, to bfloat16."""
    bits = np.asarray(x, dtype=np.float64).view(np.uint64)
    sign = (bits >> np.uint64(48)) & np.uint64(0x8000)
    mag = np.abs(np.asarray(x, dtype=np.float64))
    # Scale into bfloat16's grid: ulp = 2^(max(e, -126) - 7); round half to even with rint.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        e = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
        ulp = np.exp2(np.maximum(e, -126) - 7)
        r = np.rint(mag / ulp) * ulp
        r = np.where((r >= 2.0**128) | np.isinf(mag), np.inf, r)
        r = np.where(np.isnan(mag), np.nan, r)
    r32 = r.astype(np.float32).view(np.uint32)  # exact: r has at most 8 significant bits
    out = (r32 >> np.uint32(16)).astype(np.uint64)
    out = np.where(np.isnan(mag), np.uint64(0x7FC0), out)
    return (out | sign).astype(np.uint16)


def polar_factor(G):
    """U V^T from the float64 SVD of each matrix in G (..., m, n)."""
    U, _, Vt = np.linalg.svd(np.asarray(G, dtype=np.float64), full_matrices=False)
    return U @ Vt


def newton_schulz(G, schedule, norm_scale=1.0, eps=1e-7):
    """The polar iteration with plain float64 products: X = G / ((s + eps) ||G||_F), then
    X <- a X + (b A + c A^2) X with A = X X^T on the short side, for (a, b, c) in schedule."""
    X = np.asarray(G, dtype=np.float64)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = np.swapaxes(X, -1, -2)
    norm = np.linalg.norm(X, axis=(-2, -1), keepdims=True)
    X = np.divide(X, (norm_scale + eps) * norm, out=np.zeros_like(X), where=norm > 0)
    for a, b, c in schedule:
        A = X @ np.swapaxes(X, -1, -2)
        X = a * X + (b * A + c * A @ A) @ X
    return np.swapaxes(X, -1, -2) if tall else X


# np.longdouble is x87 extended (64-bit significand) on x86 Linux and binary128 on some other
# platforms; where it is only a double, the extended references below cannot be trusted.
EXTENDED = np.finfo(np.longdouble).eps < 1e-18


def eigh_extended(A, iterations=2):
    """Eigenvalues and eigenvectors of a symmetric float64 matrix, in np.longdouble.

    float64 eigh leaves errors of order u * ||A|| / gap in the eigenvectors, which is the
    same size as a float64 kernel's own error on ill-conditioned inputs, so it cannot judge
    them. Ogita & Aishima's refinement (SIAM J. Sci. Comput. 40(4), 2018, Algorithm 1), run
    in extended precision, converges quadratically from the float64 pairs; eigenvalues
    closer than its cluster threshold keep a refined basis of their common subspace, which
    is all a spectral function that is smooth there needs."""
    assert EXTENDED, "np.longdouble is no wider than float64 here"
    A = np.asarray(A, dtype=np.float64)
    X = np.linalg.eigh(A)[1].astype(np.longdouble)
    Al = A.astype(np.longdouble)
    eye = np.eye(A.shape[-1], dtype=np.longdouble)
    norm_a = np.linalg.norm(A, 2)
    for step in range(iterations + 1):
        R = eye - X.T @ X
        S = X.T @ Al @ X
        S = (S + S.T) / 2  # keeps E + E^T = R, i.e. the update restores orthogonality
        w = np.diagonal(S) / (1 - np.diagonal(R))
        if step == iterations:
            return w, X
        off = S - np.diag(w)
        cluster = 2 * (np.linalg.norm(off.astype(np.float64), 2) + norm_a * np.linalg.norm(R.astype(np.float64), 2))
        gap = w[None, :] - w[:, None]
        separated = np.abs(gap) > cluster
        E = np.where(separated, (S + w[None, :] * R) / np.where(separated, gap, 1), R / 2)
        X = X + X @ E


def spd_functions(A, *functions):
    """f(A) for each f, of symmetric PSD A (..., n, n), from eigh_extended, in float64.
    Eigenvalues below zero (rounding of a PSD input) are clamped to zero first."""
    A = np.asarray(A, dtype=np.float64)
    out = [np.empty_like(A) for _ in functions]
    for index in np.ndindex(A.shape[:-2]):
        w, X = eigh_extended(A[index])
        w = np.maximum(w, 0)
        for f, o in zip(functions, out):
            o[index] = ((X * f(w)[None, :]) @ X.T).astype(np.float64)
    return out


def inverse_root(A, p, eps=0.0):
    """(A + eps I)^{-1/p} of symmetric PSD A, accurate beyond float64 (see eigh_extended)."""
    return spd_functions(A, lambda w: (w + eps) ** (-np.longdouble(1) / p))[0]


def sqrt_and_inv_sqrt(A):
    """(A^{1/2}, A^{-1/2}) of symmetric PSD A, accurate beyond float64 (see eigh_extended)."""
    return tuple(spd_functions(A, np.sqrt, lambda w: 1 / np.sqrt(w)))


# ---- Hutchinson family: the reference optimizers (float64, one tensor at a time, in place)

def adahessian_group_size(shape, block_size=None):
    """AdaHessian's spatial averaging as contiguous groups: by rank (none for 0-D/1-D, the last
    dimension for 2-D and 3-D, the two spatial dimensions of a 4-D kernel), or blocks."""
    size = int(np.prod(shape)) if len(shape) else 1
    if block_size is not None:
        return max(1, min(block_size, size))
    if len(shape) in (2, 3):
        return max(1, shape[-1])
    if len(shape) == 4:
        return max(1, shape[2] * shape[3])
    return 1


def group_mean_abs(h, group):
    """Mean of |h| over contiguous groups (the last one may be shorter), summed left to right
    (np.cumsum is sequential), broadcast back to h's shape."""
    a = np.abs(h).reshape(-1)
    out = np.empty_like(a)
    for start in range(0, a.size, group):
        seg = a[start:start + group]
        out[start:start + group] = np.cumsum(seg)[-1] / seg.size
    return out.reshape(h.shape)


def libm_power(x, k):
    """x ** k as the C library's pow gives it entry by entry (NumPy's exact shortcuts for
    k in {0, 0.5, 1, 2, -1}). NumPy's own ``**`` takes SVML's vector pow on AVX-512 hosts,
    which differs from pow in the last bit for about 5% of entries."""
    if k in (0.0, 0.5, 1.0, 2.0, -1.0):
        return x ** k
    return np.frompyfunc(math.pow, 2, 1)(x, k).astype(x.dtype)


def adahessian_step(params, grads, hessian, exp_avg, exp_avg_sq, step, lr=0.15, betas=(0.9, 0.999), eps=1e-4,
                    weight_decay=0.0, hessian_power=1.0, block_size=None):
    """AdaHessian (Yao et al. 2021; adahessian/image_classification/optim_adahessian.py) with the
    averaging of its instruction/ version, the per-tensor loop of the published optimizer."""
    beta1, beta2 = betas
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    sqrt_bias2_pow = math.sqrt(bias2) ** hessian_power
    for p, g, h, m, v in zip(params, grads, hessian, exp_avg, exp_avg_sq):
        d = group_mean_abs(h, adahessian_group_size(p.shape, block_size))
        m[...] = beta1 * m + (1 - beta1) * g
        v[...] = beta2 * v + (1 - beta2) * (d * d)
        denom = libm_power(np.sqrt(v), hessian_power) / sqrt_bias2_pow + eps
        p[...] = p - lr * (m / bias1 / denom + weight_decay * p)


def sophia_step(params, grads, exp_avg, hessian, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1,
                batch_size=5120, eps=1e-15, estimates=None):
    """Sophia (Liu et al. 2023; Sophia/sophia.py): the Hessian EMA on update steps, then the
    clipped step. Returns the number of unclipped entries."""
    beta1, beta2 = betas
    wins = 0
    for i, (p, g, m, h) in enumerate(zip(params, grads, exp_avg, hessian)):
        if estimates is not None:
            h[...] = beta2 * h + (1 - beta2) * estimates[i]
        p[...] = p * (1 - lr * weight_decay)
        m[...] = beta1 * m + (1 - beta1) * g
        ratio = np.abs(m) / (rho * batch_size * h + eps)
        wins += int(np.sum(ratio < 1))
        p[...] = p - lr * (np.sign(m) * np.minimum(ratio, 1.0))
    return wins


def fisher_matrix(G, damp, scale=None, block=None):
    """damp I + G^T G / scale (scale defaults to the rows of G) in float64; with `block`, the
    entries outside the diagonal blocks of `block` coordinates set to zero (the last block partial)."""
    G = np.asarray(G, dtype=np.float64)
    m, d = G.shape
    F = damp * np.eye(d) + G.T @ G / (scale if scale is not None else max(m, 1))
    if block is not None:
        ids = np.arange(d) // block
        F[ids[:, None] != ids[None, :]] = 0
    return F


def fisher_solve(G, x, damp, scale=None, block=None):
    """F^-1 x by a dense float64 solve (see fisher_matrix)."""
    return np.linalg.solve(fisher_matrix(G, damp, scale, block), np.asarray(x, dtype=np.float64))


def fisher_inverse(G, damp, scale=None, block=None):
    """The dense float64 inverse of F (see fisher_matrix)."""
    return np.linalg.inv(fisher_matrix(G, damp, scale, block))


# ---- Entropic optimal transport

def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def sinkhorn_log(a: Any, b: Any, C: Any, reg: float, tol: float = 1e-9, max_iter: int = 200_000,
                 return_info: bool = False) -> Any:
    """Entropic OT by log-domain Sinkhorn in float64: min <C, P> + reg sum P (log P - 1) subject
    to P 1 = a, P^T 1 = b.

    The potentials alternate exact updates f = reg (log a - LSE_j((g_j - C_ij) / reg)), then
    the same for g, so P = exp((f_i + g_j - C_ij) / reg) never over- or underflows as the
    kernel exp(-C / reg) would (Peyre & Cuturi, "Computational Optimal Transport", 2019,
    section 4.4). After each g update the column marginal is exact; iteration stops when the
    row marginal error ||P 1 - a||_1 is at most ``tol``.

    Parameters
    ----------
    a, b : array (n,), (m,)
        Positive marginals of equal total mass.
    C : array (n, m)
        Cost matrix.
    reg : float > 0
        Entropic regularization (1/eta in the SNS paper's notation).
    tol, max_iter :
        The stopping rule; not converging within ``max_iter`` iterations raises ConvergenceError.
        The error stalls at its float64 rounding floor, which grows as reg falls (1.5e-11 for the
        identity problem of 10 points at reg = 1e-3): a tol below the floor cannot be met.
    return_info : bool
        Also return {"iterations", "marginal_error"}.

    Returns
    -------
    (P, f, g): the plan (n, m) and the dual potentials (n,), (m,), all float64; with
    ``return_info`` a fourth item, the info dict.

    Examples
    --------
    >>> import numpy as np
    >>> from curvkit import testing
    >>> a, b, C = testing.ot_problem("assignment", 6, seed=1)
    >>> P, f, g = testing.sinkhorn_log(a, b, C, reg=0.05)
    >>> bool(testing.marginal_error(P, a, b) <= 1e-9)
    True
    """
    a64, b64, C64 = (np.asarray(v, dtype=np.float64) for v in (a, b, C))
    if not reg > 0:
        raise ValueError(f"reg must be > 0, got {reg}")
    log_a, log_b = np.log(a64), np.log(b64)
    f, g = np.zeros(C64.shape[0]), np.zeros(C64.shape[1])
    error = math.inf
    for iteration in range(1, max_iter + 1):
        f = reg * (log_a - _logsumexp((g[None, :] - C64) / reg, axis=1))
        g = reg * (log_b - _logsumexp((f[:, None] - C64) / reg, axis=0))
        P = np.exp((f[:, None] + g[None, :] - C64) / reg)
        error = float(np.sum(np.abs(P.sum(axis=1) - a64)))
        if error <= tol:
            info = {"iterations": iteration, "marginal_error": error}
            return (P, f, g, info) if return_info else (P, f, g)
    raise ConvergenceError(f"sinkhorn_log: marginal error {error:.3e} > tol {tol:.1e} after {max_iter} iterations",
                           {"iterations": max_iter, "marginal_error": error}, (P, f, g))
