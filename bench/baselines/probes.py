"""Probe generation as the anchors write it, in plain NumPy / PyTorch.

AdaHessian draws Rademacher probes as ``2 * randint_like(p, high=2) - 1`` (its
optim_adahessian.py); Gaussian probes are ``randn``; sphere probes are ``randn`` divided
by the column norms.
"""
import numpy as np


def torch_probes(n, kind, dtype, device, generator=None):
    import torch

    if kind == "rademacher":
        return torch.randint(0, 2, (n,), dtype=dtype, device=device, generator=generator) * 2 - 1
    z = torch.randn((n,), dtype=dtype, device=device, generator=generator)
    return z / torch.linalg.vector_norm(z) if kind == "sphere" else z


def numpy_probes(n, kind, dtype, rng):
    if kind == "rademacher":
        return rng.integers(0, 2, n, dtype=np.int8).astype(dtype) * 2 - 1
    z = rng.standard_normal(n, dtype=dtype)
    return z / np.linalg.norm(z) if kind == "sphere" else z
