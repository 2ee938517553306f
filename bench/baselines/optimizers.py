"""The reference optimizers of examples/optimizers.py with the anchors' linear algebra in plain
PyTorch instead of curvkit's, everything else identical (so tests compare the linear algebra
inside one optimizer, and benchmarks time what each step costs):

- Muon: ``zeropower_via_newtonschulz5`` (Keller Jordan's Muon), one matrix at a time.
- Shampoo: Distributed Shampoo's eigh root per factor (``matrix_inverse_root_eigen``: eigh of
  F + eps I; if its smallest eigenvalue is below eps, the spectrum is shifted up to eps).
- AdaHessian: the reference optimizer's per-tensor loop (``baselines.hutchinson``).
- SOAP: SOAP's ``get_orthogonal_matrix_QR``: estimates diag(Q^T F Q), columns sorted
  descending, Q <- qr(F Q).Q; the first bases from eigh (``torch.linalg.eigh`` of F + 1e-30 I),
  flipped to descending order.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from optimizers import SOAP, AdaHessian, Muon, Shampoo  # noqa: E402

from baselines.hutchinson import adahessian_step_torch  # noqa: E402
from baselines.newton_schulz import muon_newton_schulz  # noqa: E402
from curvkit.testing.anchors import soap_qr_refresh  # noqa: E402


class MuonNS5(Muon):
    def _update(self, params, updates, group, scales):
        for p, u, s in zip(params, updates, scales):
            p.mul_(1 - group["lr"] * group["weight_decay"]).add_(muon_newton_schulz(u, group["steps"]),
                                                                 alpha=-group["lr"] * s)


def eigh_root(F, p, eps):
    """Distributed Shampoo's eigh root (F + eps I)^(-1/p), in F's dtype."""
    L, Q = torch.linalg.eigh(F + eps * torch.eye(F.shape[-1], dtype=F.dtype, device=F.device))
    smallest = L.min()
    if smallest < eps:
        L = L - smallest + eps
    return (Q * L ** (-1.0 / p)) @ Q.T


class ShampooEigh(Shampoo):
    def _inverse_roots(self, factors, eps):
        return [eigh_root(f, 4, eps) for f in factors]


class SOAPQR(SOAP):
    def _initial_bases(self, L, R):
        eye = [torch.eye(m.shape[0], dtype=m.dtype, device=m.device) for m in (L, R)]
        return tuple(torch.linalg.eigh(m + 1e-30 * e)[1].flip(-1) for m, e in zip((L, R), eye))

    def _refresh(self, factors, bases):
        return [soap_qr_refresh(F, Q) for F, Q in zip(factors, bases)]


class AdaHessianLoop(AdaHessian):
    def _update(self, params, grads, samples, group):
        adahessian_step_torch(params, grads, samples, [self.state[p]["exp_avg"] for p in params],
                              [self.state[p]["exp_avg_sq"] for p in params], self.steps, lr=group["lr"],
                              betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                              hessian_power=group["hessian_power"])
