"""PyTorch autograd for curvkit's matrix functions (imported on demand: ``import curvkit.torch``).

The square-root family is differentiable: for S = A^{1/2}, the gradient with respect to A
of a loss with gradient G_S on S is the X with S X + X S = G_S (symmetrized, since only
(A + A^T)/2 enters); for R = A^{-1/2} it is the same with G_S = -R G_R R. The Lyapunov
equation is solved by :func:`curvkit.solve_lyapunov` (the matrix-sign iteration of Song et
al., run to convergence), on CPU and CUDA tensors alike.

>>> import torch, curvkit.torch as ct
>>> B = torch.randn(6, 6, dtype=torch.float64)
>>> A = (B @ B.T + torch.eye(6, dtype=torch.float64)).requires_grad_()
>>> ct.matrix_sqrt(A).trace().backward()          # d tr(A^{1/2}) / dA = A^{-1/2} / 2
>>> bool(torch.allclose(A.grad, curvkit.matrix_inv_sqrt(A.detach()) / 2))
True
"""
from __future__ import annotations

import torch

import curvkit

from . import newton_schulz as _ns


class _SqrtFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, want_sqrt, want_inverse, method, tol, max_iters):
        S, R = _ns.matrix_sqrt_and_inv_sqrt(A.detach(), method=method, tol=tol, max_iters=max_iters)
        ctx.save_for_backward(S, R)
        ctx.max_iters = max_iters
        outputs = ([S] if want_sqrt else []) + ([R] if want_inverse else [])
        ctx.layout = (want_sqrt, want_inverse)
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    @staticmethod
    def backward(ctx, *grads):
        S, R = ctx.saved_tensors
        want_sqrt, want_inverse = ctx.layout
        grads = list(grads)
        grad_s = grads.pop(0) if want_sqrt else None
        grad_r = grads.pop(0) if want_inverse else None
        total = torch.zeros_like(S)
        if grad_s is not None:
            total = total + grad_s
        if grad_r is not None:
            total = total - R @ grad_r @ R
        X = _ns.solve_lyapunov(S, total.contiguous(), max_iters=ctx.max_iters)
        return (X + X.mT) / 2, None, None, None, None, None


def matrix_sqrt(A, method="auto", tol=1e-8, max_iters=100):
    """Differentiable :func:`curvkit.matrix_sqrt` for torch tensors."""
    return _SqrtFunction.apply(A, True, False, method, tol, max_iters)


def matrix_inv_sqrt(A, method="auto", tol=1e-8, max_iters=100):
    """Differentiable :func:`curvkit.matrix_inv_sqrt` for torch tensors."""
    return _SqrtFunction.apply(A, False, True, method, tol, max_iters)


def matrix_sqrt_and_inv_sqrt(A, method="auto", tol=1e-8, max_iters=100):
    """Differentiable :func:`curvkit.matrix_sqrt_and_inv_sqrt` for torch tensors."""
    return _SqrtFunction.apply(A, True, True, method, tol, max_iters)


__all__ = ["matrix_inv_sqrt", "matrix_sqrt", "matrix_sqrt_and_inv_sqrt"]
