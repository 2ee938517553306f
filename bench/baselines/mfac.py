"""The M-FAC family's anchors in plain PyTorch, as the published code computes them.

MFACDynamic
    M-FAC's dynamic sliding-window algorithm (lives in curvkit.testing.anchors).
MFACStatic
    M-FAC's static algorithm in its blocked form (Frantar et al. 2021, M-FAC ``prun.py``,
    ``HInvFastBatch``; one block of d coordinates is the full static case, ``HInvFastSwap``
    without paging). For every block at once, gradient i becomes
    ``v_i = g_i / damp - sum_{j<i} (v_j . g_i / q_j) v_j`` and ``q_i = m + g_i . v_i``: two
    batched products over the rows already built per gradient, O(m^2 d) in all, in the storage
    dtype. Then ``F^-1 x = x / damp - sum_i (v_i . x / q_i) v_i`` and
    ``diag(F^-1) = 1 / damp - sum_i v_i^2 / q_i``. A partial last block is its own batch of one,
    as M-FAC's ``HInvFastBlock`` does.
OBERTBlockInverse
    oBERT's block inverse (Kurtic et al. 2022, sparseml ``EmpiricalBlockFisherInverse``): a dense
    B x B inverse per block, ``I / damp`` at first, and one batched Sherman-Morrison update per
    gradient: ``u = F^-1 g`` per block, ``alpha = sqrt(m + g . u)``,
    ``F^-1 -= (u / alpha)(u / alpha)^T`` (a batched outer-product update of all d B entries).
    d is zero-padded to a multiple of B, as oBERT does. Products are batched B x B matrix-vector
    products; the diagonal is read off.
torch_woodbury, torch_woodbury_diag
    What a PyTorch user writes for the static case: ``K = G G^T``, the Cholesky factor of
    ``m damp I + K``, ``F^-1 x = (x - G^T C^-1 G x) / damp`` and
    ``diag(F^-1) = (1 - colsum((L^-1 G)^2)) / damp``, in the storage dtype (float32 BLAS).
"""
from __future__ import annotations

import math

import torch

from curvkit.testing.anchors import MFACDynamic

__all__ = ["MFACDynamic", "MFACStatic", "OBERTBlockInverse", "torch_woodbury", "torch_woodbury_diag"]


def _batched_static(grads: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """M-FAC's static recursion on (b, m, B) gradients: the rows v_i (overwriting a copy) and q."""
    b, m, _ = grads.shape
    inv = 1.0 / damp
    V = grads.clone()
    q = torch.empty((b, m), dtype=grads.dtype, device=grads.device)
    for i in range(m):
        g = grads[:, i, :]
        v = inv * g
        if i > 0:
            coef = torch.bmm(V[:, :i, :], g.unsqueeze(2)).squeeze(2) / q[:, :i]  # (b, i)
            v = v - torch.bmm(coef.unsqueeze(1), V[:, :i, :]).squeeze(1)
        V[:, i, :] = v
        q[:, i] = m + (g * v).sum(dim=1)
    return V, q


class MFACStatic:
    """M-FAC's static algorithm (blocked with ``block`` coordinates per block; None: one block)."""

    def __init__(self, G: torch.Tensor, damp: float, block: int | None = None) -> None:
        m, d = G.shape
        self.m, self.d, self.damp = m, d, damp
        self.block = d if block is None else block
        full = d // self.block
        self.parts = []  # (start, V (b, m, B), q (b, m))
        if full:
            grads = G[:, :full * self.block].T.reshape(full, self.block, m).transpose(1, 2)
            self.parts.append((0, *_batched_static(grads, damp)))
        if full * self.block < d:
            rest = G[:, full * self.block:].unsqueeze(0)
            self.parts.append((full * self.block, *_batched_static(rest, damp)))

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for start, V, q in self.parts:
            b, _, B = V.shape
            xb = x[start:start + b * B].reshape(b, B)
            coef = torch.bmm(V, xb.unsqueeze(2)).squeeze(2) / q
            out[start:start + b * B] = (xb / self.damp - torch.bmm(coef.unsqueeze(1), V).squeeze(1)).reshape(-1)
        return out

    def diag(self) -> torch.Tensor:
        out = torch.empty(self.d, dtype=self.parts[0][1].dtype, device=self.parts[0][1].device)
        for start, V, q in self.parts:
            b, _, B = V.shape
            out[start:start + b * B] = (1.0 / self.damp - (V * V / q.unsqueeze(2)).sum(dim=1)).reshape(-1)
        return out


class OBERTBlockInverse:
    """oBERT's dense block inverse, built by one Sherman-Morrison update per gradient."""

    def __init__(self, d: int, m: int, block: int, damp: float, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> None:
        self.d, self.m, self.B = d, m, block
        self.blocks = math.ceil(d / block)
        eye = torch.eye(block, dtype=dtype, device=device) / damp
        self.F_inv = eye.unsqueeze(0).repeat(self.blocks, 1, 1)

    def _padded(self, v: torch.Tensor) -> torch.Tensor:
        pad = self.blocks * self.B - v.numel()
        return torch.nn.functional.pad(v, (0, pad)) if pad else v

    def add_grad(self, g: torch.Tensor) -> None:
        g = self._padded(g).view(self.blocks, self.B)
        u = torch.bmm(self.F_inv, g.unsqueeze(2)).squeeze(2)
        alpha = (self.m + (g * u).sum(dim=1)).sqrt().unsqueeze(1)
        u = u / alpha
        self.F_inv.baddbmm_(u.unsqueeze(2), u.unsqueeze(1), alpha=-1)

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        x = self._padded(x).view(self.blocks, self.B, 1)
        return torch.bmm(self.F_inv, x).flatten()[: self.d]

    def diag(self) -> torch.Tensor:
        return self.F_inv.diagonal(dim1=1, dim2=2).flatten()[: self.d]


def torch_woodbury(G: torch.Tensor, x: torch.Tensor, damp: float) -> torch.Tensor:
    m = G.shape[0]
    C = G @ G.T
    C.diagonal().add_(m * damp)
    L = torch.linalg.cholesky(C)
    y = torch.cholesky_solve((G @ x).unsqueeze(1), L).squeeze(1)
    return (x - G.T @ y) / damp


def torch_woodbury_diag(G: torch.Tensor, damp: float) -> torch.Tensor:
    m = G.shape[0]
    C = G @ G.T
    C.diagonal().add_(m * damp)
    L = torch.linalg.cholesky(C)
    V = torch.linalg.solve_triangular(L, G, upper=False)
    return (1.0 - (V * V).sum(dim=0)) / damp
