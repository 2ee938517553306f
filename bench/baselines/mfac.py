"""M-FAC's dynamic algorithm (the sliding-window inverse-Fisher product of M-FAC's optimizer,
copied unchanged into EFCP and the ISTA optimizers) in plain PyTorch, for side-by-side timing.

A ring buffer G (m x d) and its Gram matrix G G^T. Each new gradient overwrites row `last`
and its Gram row and column (one product), then setup() rebuilds everything from the Gram
matrix in O(m^3): A = G G^T / damp + m I factored without pivoting (A is SPD, so that LU is
diag(sqrt q) times the Cholesky factor), D = the strict upper part of that U plus its
diagonal less m, q = diag(U), and B = (I - T)^-1 / damp with T[i, j] = -D[j, i] / q[j].
A product: y = G x / damp, the forward recursion y_i -= sum_{k<i} D[k, i] y_k / q_k,
result = x / damp - G^T (B^T (y / q)). Everything in the storage dtype, as the anchor does.
"""
from __future__ import annotations

import torch


class MFACDynamic:
    def __init__(self, d: int, m: int, damp: float, dtype=torch.float32, device="cpu") -> None:
        self.m, self.lambd = m, 1.0 / damp
        self.G = torch.zeros(m, d, dtype=dtype, device=device)
        self.GG = torch.zeros(m, m, dtype=dtype, device=device)
        self.last = 0
        self.eye = torch.eye(m, dtype=dtype, device=device)
        self.setup()

    def setup(self) -> None:
        A = self.lambd * self.GG + self.m * self.eye
        chol = torch.linalg.cholesky(A)
        U = torch.diagonal(chol)[:, None] * chol.T  # the pivot-free LU's U
        self.denom = torch.diagonal(U).clone()
        self.D = torch.triu(U) - self.m * self.eye
        T = -torch.tril(self.D.T / self.denom[None, :], diagonal=-1)
        self.coef = self.lambd * torch.linalg.solve_triangular(self.eye - T, self.eye, upper=False)

    def push(self, g: torch.Tensor) -> None:
        self.G[self.last] = g
        row = self.G @ g
        self.GG[self.last, :] = row
        self.GG[:, self.last] = row
        self.last = (self.last + 1) % self.m
        self.setup()

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lambd * (self.G @ x)
        # y_i -= sum_{k<i} D[k, i] y_k / q_k: a unit lower triangular solve with (D^T / q) below the diagonal.
        N = torch.tril(self.D.T / self.denom[None, :], diagonal=-1) + self.eye
        y = torch.linalg.solve_triangular(N, y[:, None], upper=False, unitriangular=True)[:, 0]
        return self.lambd * x - self.G.T @ (self.coef.T @ (y / self.denom))
