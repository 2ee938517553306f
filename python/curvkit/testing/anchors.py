"""The anchors: the published algorithms curvkit is measured against, written here in plain
PyTorch (and NumPy) from their papers and reference code, for side-by-side timing and accuracy
(``python -m curvkit.bench``, ``python -m curvkit.accuracy``, bench/). torch is imported by
each function, so this module imports without it; calling a torch anchor needs torch.

Newton-Schulz
    :func:`muon_newton_schulz`: Muon's ``zeropower_via_newtonschulz5`` (Keller Jordan): normalize
    by the Frobenius norm + 1e-7, transpose tall inputs, then ``A = X X^T; B = b A + c A^2;
    X = a X + B X`` with (a, b, c) = (3.4445, -4.7750, 2.0315); here in the input's dtype (Muon
    itself casts to bfloat16) so both sides compute alike.
Matrix square roots
    :func:`eigh_sqrt`: the eigendecomposition route (upcast to float64, eigenvalues floored at
    0, rebuilt V diag(w^p) V^T), as Distributed Shampoo computes matrix roots; ``upcast=False``
    decomposes in the input's dtype.
Inverse p-th roots (Distributed Shampoo, Shi et al. 2023, arXiv 2309.06497; Scalable Shampoo,
Anil et al. 2020, arXiv 2002.09018)
    :func:`eigh_root`: Distributed Shampoo's eigendecomposition root (float64 upcast, eps ridge,
    eigenvalues shifted when the smallest is below eps, Q diag(L^{-1/p}) Q^T); ``upcast=False``
    decomposes in the input's dtype (the faster torch.linalg.eigh route on GPUs).
    :func:`coupled_newton_root`: the coupled Newton iteration (z = (p+1)/(2||A||_F), X_0 =
    z^{1/p} I, M_0 = z A, M' = (1 - alpha) I + alpha M with alpha = -1/p, X <- X M',
    M <- M'^p M, until ||M - I||_max <= 1e-6 or 100 iterations). :func:`loop` runs either over
    a list of blocks in Python, as the anchors do.
Eigenbasis refresh (SOAP, Vyas et al. 2024, arXiv 2409.11321)
    :func:`soap_qr_refresh`: SOAP's ``get_orthogonal_matrix_QR``: the estimates diag(Q^T A Q),
    Q's columns sorted by them, descending, then one power step and a QR, Q <- qr(A Q).Q.
Probes
    AdaHessian draws Rademacher probes as ``2 * randint_like(p, high=2) - 1`` (its
    optim_adahessian.py); Gaussian probes are ``randn``; sphere probes are ``randn`` divided by
    the column norms (:func:`torch_probes`, :func:`numpy_probes`).
Hutchinson estimators and optimizer steps
    :func:`adahessian_step_torch` (adahessian/image_classification/optim_adahessian.py, with the
    spatial averaging of its instruction/ version) and :func:`sophia_step_torch`
    (Sophia/sophia.py): the per-tensor Python loops of the published optimizers.
    :func:`xtrace_per_probe`: XTrace as curvlinops' trace/epperly2024xtrace.py organizes it, one
    matvec per probe in a Python loop, then torch QR and the leave-one-out algebra (written from
    Epperly, Tropp & Webber 2024). :func:`hutchinson_layer_traces_loop`: PyHessian's Hutchinson
    trace loop, one probe (one Hessian-vector product) per iteration.
M-FAC
    :class:`MFACDynamic`: M-FAC's dynamic algorithm (the sliding-window inverse-Fisher product
    of M-FAC's optimizer, copied unchanged into EFCP and the ISTA optimizers). A ring buffer G
    (m x d) and its Gram matrix G G^T. Each new gradient overwrites row ``last`` and its Gram
    row and column (one product), then setup() rebuilds everything from the Gram matrix in
    O(m^3): A = G G^T / damp + m I factored without pivoting (A is SPD, so that LU is
    diag(sqrt q) times the Cholesky factor), D = the strict upper part of that U plus its
    diagonal less m, q = diag(U), and B = (I - T)^-1 / damp with T[i, j] = -D[j, i] / q[j]. A
    product: y = G x / damp, the forward recursion y_i -= sum_{k<i} D[k, i] y_k / q_k,
    result = x / damp - G^T (B^T (y / q)). Everything in the storage dtype, as the anchor does.
Entropic OT
    :func:`pot_sinkhorn`: POT's ``ot.sinkhorn`` (``method="sinkhorn_log"`` or
    ``"sinkhorn_stabilized"``) run for a fixed number of iterations, and :func:`pot_batch`: its
    batched solver ``ot.batch.solve_batch`` (log-domain Sinkhorn). These call POT as installed
    (``pip install pot``): its iteration loop runs in Python over NumPy.

Examples
--------
>>> import numpy as np
>>> from curvkit.testing import anchors
>>> rng = np.random.default_rng(0)
>>> z = anchors.numpy_probes(1000, "rademacher", np.float64, rng)
>>> sorted(set(z.tolist()))
[-1.0, 1.0]
>>> len(anchors.resnet18_cifar_shapes())
62
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


# ---- Newton-Schulz

def muon_newton_schulz(G: Any, steps: int = 5, coefficients: Optional[Sequence[tuple[float, float, float]]] = None
                       ) -> Any:
    """Muon's Newton-Schulz iteration on a torch tensor G (..., m, n). ``coefficients``: None
    for Muon's triple every step, or a list of (a, b, c) per step."""
    schedule = list(coefficients or [MUON_COEFFICIENTS] * steps)
    X = G
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in schedule[:steps]:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


# ---- Matrix square roots and inverse roots

def eigh_sqrt(A: Any, power: float = 0.5, upcast: bool = True) -> Any:
    """A^power of a symmetric PSD torch tensor by eigh (float64 when ``upcast``), eigenvalues
    floored at 0."""
    w, V = _torch().linalg.eigh(A.double() if upcast else A)
    return ((V * w.clamp(min=0).pow(power).unsqueeze(-2)) @ V.mT).to(A.dtype)


def eigh_root(A: Any, p: int, eps: float = 0.0, upcast: bool = True) -> Any:
    """Distributed Shampoo's (A + eps I)^(-1/p) of a symmetric PSD torch tensor by eigh."""
    torch = _torch()
    A64 = A.double() if upcast else A
    n = A.shape[-1]
    L, Q = torch.linalg.eigh(A64 + eps * torch.eye(n, dtype=A64.dtype, device=A.device))
    lam_min = L.min()
    if lam_min < eps:
        L = L - lam_min + eps
    return ((Q * L.pow(-1.0 / p).unsqueeze(-2)) @ Q.mT).to(A.dtype)


def coupled_newton_root(A: Any, p: int, eps: float = 0.0, tol: float = 1e-6, max_iters: int = 100
                        ) -> tuple[Any, int]:
    """Scalable / Distributed Shampoo's coupled Newton (A + eps I)^(-1/p); returns (X, iterations)."""
    torch = _torch()
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    A = A + eps * eye
    alpha = -1.0 / p
    z = (p + 1) / (2 * torch.linalg.norm(A))
    X = z ** (1.0 / p) * eye
    M = z * A
    iterations = 0
    while torch.max(torch.abs(M - eye)) > tol and iterations < max_iters:
        M_p = (1 - alpha) * eye + alpha * M
        X = X @ M_p
        M = torch.linalg.matrix_power(M_p, p) @ M
        iterations += 1
    return X, iterations


def loop(fn: Callable[..., Any], blocks: Sequence[Any], *args: Any) -> list:
    """fn(block, *args) for each block, in a Python loop (the anchors' per-block structure)."""
    return [fn(b, *args) for b in blocks]


def soap_qr_refresh(A: Any, Q: Any) -> tuple[Any, Any]:
    """SOAP's eigenbasis refresh of a torch factor A with basis Q: (qr(A Q[:, order]).Q, order),
    order sorting the estimates diag(Q^T A Q) descending (stable)."""
    torch = _torch()
    estimates = torch.diag(Q.T @ A @ Q)
    order = torch.argsort(estimates, descending=True, stable=True)
    return torch.linalg.qr(A @ Q[:, order]).Q, order


# ---- Probes

def torch_probes(n: int, kind: str, dtype: Any, device: Any, generator: Any = None) -> Any:
    """One probe vector of length n drawn with torch's generator."""
    torch = _torch()
    if kind == "rademacher":
        return torch.randint(0, 2, (n,), dtype=dtype, device=device, generator=generator) * 2 - 1
    z = torch.randn((n,), dtype=dtype, device=device, generator=generator)
    return z / torch.linalg.vector_norm(z) if kind == "sphere" else z


def numpy_probes(n: int, kind: str, dtype: Any, rng: np.random.Generator) -> np.ndarray:
    """One probe vector of length n drawn with NumPy's generator."""
    if kind == "rademacher":
        return rng.integers(0, 2, n, dtype=np.int8).astype(dtype) * 2 - 1
    z = rng.standard_normal(n, dtype=dtype)
    return z / np.linalg.norm(z) if kind == "sphere" else z


# ---- Hutchinson estimators and the optimizer steps

def resnet18_cifar_shapes() -> list[tuple[int, ...]]:
    """The 62 parameter tensors (11.17M entries) of a CIFAR ResNet-18 (3x3 stem, 10 classes)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first_in = cin if block == 0 else width
            shapes += [(width, first_in, 3, 3), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            if block == 0 and (stride != 1 or cin != width):
                shapes += [(width, cin, 1, 1), (width,), (width,)]
        cin = width
    return shapes + [(10, 512), (10,)]


def adahessian_step_torch(params: Sequence[Any], grads: Sequence[Any], hessian: Sequence[Any],
                          exp_avg: Sequence[Any], exp_avg_sq: Sequence[Any], step: int, lr: float = 0.15,
                          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-4, weight_decay: float = 0.0,
                          hessian_power: float = 1.0) -> None:
    """AdaHessian's per-tensor step, in place."""
    beta1, beta2 = betas
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    for p, g, h, m, v in zip(params, grads, hessian, exp_avg, exp_avg_sq):
        if h.dim() <= 1:
            d = h.abs()
        elif h.dim() in (2, 3):
            d = h.abs().mean(dim=-1, keepdim=True)
        else:
            d = h.abs().mean(dim=[2, 3], keepdim=True)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(d.expand_as(v), d.expand_as(v), value=1 - beta2)
        denom = (v.sqrt() ** hessian_power) / math.sqrt(bias2) ** hessian_power + eps
        p.sub_(lr * (m / bias1 / denom + weight_decay * p))


def sophia_step_torch(params: Sequence[Any], grads: Sequence[Any], exp_avg: Sequence[Any], hessian: Sequence[Any],
                      lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                      weight_decay: float = 0.1, batch_size: int = 5120, eps: float = 1e-15) -> None:
    """Sophia's per-tensor clipped step, in place."""
    beta1 = betas[0]
    for p, g, m, h in zip(params, grads, exp_avg, hessian):
        p.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        ratio = (m.abs() / (rho * batch_size * h + eps)).clamp(None, 1)
        p.addcmul_(m.sign(), ratio, value=-lr)


def xtrace_per_probe(matvec_one: Callable[[Any], Any], n: int, num_matvecs: int, generator: Any, dtype: Any,
                     device: Any = "cpu") -> float:
    """XTrace with one matvec per probe (curvlinops' loop structure) and torch linear algebra."""
    torch = _torch()
    k = num_matvecs // 2
    omega = (torch.randint(0, 2, (n, k), generator=generator, dtype=dtype, device=device) * 2 - 1)
    y = torch.stack([matvec_one(omega[:, i]) for i in range(k)], dim=1)
    q, r = torch.linalg.qr(y)
    z = torch.stack([matvec_one(q[:, i]) for i in range(k)], dim=1)
    s = torch.linalg.inv(r).T
    s = s / torch.linalg.vector_norm(s, dim=0)
    h, w, t = q.T @ z, q.T @ omega, z.T @ omega
    sw = (s * w).sum(0)
    v = w - s * sw
    estimates = (torch.trace(h) - (s * (h @ s)).sum(0) + (omega * y).sum(0) - 2 * (t * v).sum(0)
                 + (v * (h @ v)).sum(0))
    return float(estimates.mean())


def hutchinson_layer_traces_loop(loss_fn: Callable[[], Any], params: Sequence[Any], num_matvecs: int,
                                 generator: Any) -> list[float]:
    """PyHessian's trace loop extended per layer: one Rademacher probe and one double-backward
    Hessian-vector product per iteration; the per-tensor v^T Hv are averaged."""
    torch = _torch()
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    sums = [0.0] * len(params)
    for _ in range(num_matvecs):
        v = [torch.randint(0, 2, p.shape, generator=generator, dtype=p.dtype) * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        for i, (a, b) in enumerate(zip(v, hv)):
            sums[i] += float((a * b).sum())
    return [s / num_matvecs for s in sums]


# ---- M-FAC

class MFACDynamic:
    """M-FAC's dynamic sliding-window inverse-Fisher product (see the module docstring)."""

    def __init__(self, d: int, m: int, damp: float, dtype: Any = None, device: Any = "cpu") -> None:
        torch = _torch()
        dtype = torch.float32 if dtype is None else dtype
        self.m, self.lambd = m, 1.0 / damp
        self.G = torch.zeros(m, d, dtype=dtype, device=device)
        self.GG = torch.zeros(m, m, dtype=dtype, device=device)
        self.last = 0
        self.eye = torch.eye(m, dtype=dtype, device=device)
        self.setup()

    def setup(self) -> None:
        torch = _torch()
        A = self.lambd * self.GG + self.m * self.eye
        chol = torch.linalg.cholesky(A)
        U = torch.diagonal(chol)[:, None] * chol.T  # the pivot-free LU's U
        self.denom = torch.diagonal(U).clone()
        self.D = torch.triu(U) - self.m * self.eye
        T = -torch.tril(self.D.T / self.denom[None, :], diagonal=-1)
        self.coef = self.lambd * torch.linalg.solve_triangular(self.eye - T, self.eye, upper=False)

    def push(self, g: Any) -> None:
        self.G[self.last] = g
        row = self.G @ g
        self.GG[self.last, :] = row
        self.GG[:, self.last] = row
        self.last = (self.last + 1) % self.m
        self.setup()

    def ihvp(self, x: Any) -> Any:
        torch = _torch()
        y = self.lambd * (self.G @ x)
        # y_i -= sum_{k<i} D[k, i] y_k / q_k: a unit lower triangular solve with (D^T / q) below the diagonal.
        N = torch.tril(self.D.T / self.denom[None, :], diagonal=-1) + self.eye
        y = torch.linalg.solve_triangular(N, y[:, None], upper=False, unitriangular=True)[:, 0]
        return self.lambd * x - self.G.T @ (self.coef.T @ (y / self.denom))


def pot_sinkhorn(a: Any, b: Any, C: Any, reg: float, iterations: int, method: str = "sinkhorn_log",
                 tol: float = 0.0) -> Any:
    """POT's Sinkhorn: to ``tol`` (its stop: the 2-norm of the column error, every 10
    iterations) within ``iterations``, or with tol 0 for exactly ``iterations`` iterations (a
    budget timed and scaled to the count at a tolerance: log-domain Sinkhorn's iterates are the
    same in every implementation)."""
    import warnings

    import ot

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge": the budget is the point
        return ot.sinkhorn(a, b, C, reg, method=method, numItermax=iterations, stopThr=tol)


def pot_batch(a: Any, b: Any, C: Any, reg: float, tol: float, max_iter: int = 100000) -> Any:
    """POT's batched solver (``ot.batch.solve_batch``, log-domain Sinkhorn) on (B, n, m) arrays:
    the plans."""
    import ot

    return ot.batch.solve_batch(C, reg=reg, a=a, b=b, max_iter=max_iter, tol=tol, method="log_sinkhorn",
                                grad="detach").plan


def _torch() -> Any:
    import torch

    return torch
