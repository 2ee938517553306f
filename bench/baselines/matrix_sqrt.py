"""Matrix square roots as the anchors compute them, in plain PyTorch.

`eigh_sqrt`: the eigendecomposition route (upcast to float64, eigenvalues floored at 0,
rebuilt V diag(w^p) V^T), as Distributed Shampoo computes matrix roots.
"""
import torch


def eigh_sqrt(A, power=0.5):
    w, V = torch.linalg.eigh(A.double())
    return ((V * w.clamp(min=0).pow(power).unsqueeze(-2)) @ V.mT).to(A.dtype)
