"""Entropic OT anchors: POT's log-domain and stabilized Sinkhorn (the `ot` package, run as
installed) and its batched solver; the benchmark problems of the SNS paper and RegOT
(docs/sinkhorn.md). POT's iteration loops run in Python over NumPy, so a solve too slow to
finish in a benchmark round is timed over a fixed budget of iterations and scaled to the count
the same algorithm needs (log-domain Sinkhorn's iterates do not depend on the implementation)."""
import warnings

import numpy as np


def assignment_problem(n, seed=0):
    """The SNS paper's random assignment case: C ~ U[0, 1], uniform marginals."""
    rng = np.random.default_rng(seed)
    return np.full(n, 1 / n), np.full(n, 1 / n), rng.random((n, n))


def grid_problem(cost, side=28, seed=0):
    """MNIST-style: a side x side grid, L1 or squared-L2 cost divided by its max, marginals of
    random Gaussian blobs mixed with 1e-3 of the uniform."""
    rng = np.random.default_rng(seed)
    ij = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2).astype(float)
    diff = np.abs(ij[:, None, :] - ij[None, :, :])
    C = diff.sum(-1) if cost == "l1" else (diff ** 2).sum(-1)
    C /= C.max()

    def blobs():
        p = np.zeros(side * side)
        for _ in range(3):
            center, width = rng.random(2) * side, 1 + 3 * rng.random()
            p += np.exp(-((ij - center) ** 2).sum(-1) / (2 * width ** 2))
        p /= p.sum()
        return (1 - 1e-3) * p + 1e-3 / (side * side)

    return blobs(), blobs(), C


def pot_sinkhorn(a, b, C, reg, iterations, method="sinkhorn_log"):
    """POT's solver run for exactly `iterations` iterations (no early stop)."""
    import ot

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge": the budget is the point
        return ot.sinkhorn(a, b, C, reg, method=method, numItermax=iterations, stopThr=0.0)


def pot_batch(a, b, C, reg, tol, max_iter=100000):
    """POT's batched solver (ot.batch, log-domain Sinkhorn) on (B, n, m) NumPy arrays."""
    import ot

    return ot.batch.solve_batch(C, reg=reg, a=a, b=b, max_iter=max_iter, tol=tol, method="log_sinkhorn",
                                grad="detach").plan


def marginal_error(P, a, b):
    return float(np.abs(P.sum(-1) - a).sum() + np.abs(P.sum(-2) - b).sum())
