"""Inverse p-th roots as the anchors compute them, in plain PyTorch (written from their
published algorithms: Distributed Shampoo, Shi et al. 2023, arXiv 2309.06497; Scalable
Shampoo, Anil et al. 2020, arXiv 2002.09018).

`eigh_root`: Distributed Shampoo's eigendecomposition root (float64 upcast, eps ridge,
eigenvalues shifted when the smallest is below eps, Q diag(L^{-1/p}) Q^T); `upcast=False`
decomposes in the input's dtype (the faster torch.linalg.eigh route on GPUs).
`coupled_newton_root`: Scalable / Distributed Shampoo's coupled Newton iteration
(z = (p+1)/(2||A||_F), X_0 = z^{1/p} I, M_0 = z A, M' = (1 - alpha) I + alpha M with
alpha = -1/p, X <- X M', M <- M'^p M, until ||M - I||_max <= 1e-6 or 100 iterations).
Both loop over a list of blocks in Python, as the anchors do.
"""
import torch


def eigh_root(A, p, eps=0.0, upcast=True):
    A64 = A.double() if upcast else A
    n = A.shape[-1]
    L, Q = torch.linalg.eigh(A64 + eps * torch.eye(n, dtype=A64.dtype, device=A.device))
    lam_min = L.min()
    if lam_min < eps:
        L = L - lam_min + eps
    return ((Q * L.pow(-1.0 / p).unsqueeze(-2)) @ Q.mT).to(A.dtype)


def coupled_newton_root(A, p, eps=0.0, tol=1e-6, max_iters=100):
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


def loop(fn, blocks, *args):
    return [fn(b, *args) for b in blocks]
