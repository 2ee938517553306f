"""Matrix square roots as the anchors compute them, in plain PyTorch.

`eigh_sqrt`: the eigendecomposition route (upcast to float64, eigenvalues floored at 0,
rebuilt V diag(w^p) V^T), as Distributed Shampoo computes matrix roots; `upcast=False`
decomposes in the input's dtype.
"""
import torch


def eigh_sqrt(A, power=0.5, upcast=True):
    w, V = torch.linalg.eigh(A.double() if upcast else A)
    return ((V * w.clamp(min=0).pow(power).unsqueeze(-2)) @ V.mT).to(A.dtype)
