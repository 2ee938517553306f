"""Reference optimizers on curvkit: Muon, Shampoo, SOAP and AdaHessian as short
torch.optim.Optimizers.

Each does what its paper's optimizer does, with curvkit doing the linear algebra in one call
per step for all of a model's matrices: Muon's orthogonalization fused into the update
(``curvkit.torch.polar_update_``), Shampoo's inverse fourth roots of every factor of every
block in one ragged call (``curvkit.matrix_inverse_root``), SOAP's eigenbasis refresh of every
factor in one call (``curvkit.eigenbasis_update``), AdaHessian's probes and fused update of every
parameter (``curvkit.probes_like``, ``curvkit.adahessian_step_``). tests/test_optimizers.py trains a model with
each, next to the pure-PyTorch versions in bench/baselines/optimizers.py, and checks that the
loss curves agree; bench/bench_optimizers.py times their steps.

Muon, Shampoo and SOAP take matrices (2-D parameters, or conv weights viewed as (out, -1));
give biases and norms to another optimizer (AdamW), as Muon's authors do.

Run it: ``python examples/optimizers.py`` trains a small MLP with each and prints its loss.
"""
from __future__ import annotations

import torch

import curvkit
import curvkit.torch as ct


def _matrix(p: torch.Tensor) -> torch.Tensor:
    """p as a matrix (out, in): a view, so updates reach p."""
    if p.ndim < 2:
        raise ValueError("these optimizers take matrices (2-D or conv weights); give vectors to AdamW")
    return p.view(p.shape[0], -1)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024): SGD momentum (Nesterov), orthogonalized by 5 Newton–Schulz
    steps with the quintic (3.4445, -4.7750, 2.0315), scaled by max(1, rows / cols) ** 0.5,
    with decoupled weight decay. One fused ``polar_update_`` call updates every matrix."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      steps=steps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            params, updates, scales = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                w = _matrix(p)
                params.append(w)
                updates.append(update.reshape(w.shape))
                scales.append(max(1.0, w.shape[0] / w.shape[1]) ** 0.5)
            if params:
                self._update(params, updates, group, scales)
        return loss

    def _update(self, params, updates, group, scales):
        """param <- param (1 - lr wd) - lr scale polar(update), for every matrix in one call."""
        ct.polar_update_(params, updates, lr=group["lr"], weight_decay=group["weight_decay"], scale=scales,
                         steps=group["steps"])


def _blocks(w: torch.Tensor, size: int):
    """The (rows, cols) slices of w's blocks of at most size x size (the last ones smaller)."""
    return [(slice(i, i + size), slice(j, j + size)) for i in range(0, w.shape[0], size)
            for j in range(0, w.shape[1], size)]


class Shampoo(torch.optim.Optimizer):
    """Shampoo (Gupta et al., 2018; Anil et al., 2020) in blocks: for each block G of a matrix,
    L <- b L + (1 - b) G G^T and R <- b R + (1 - b) G^T G; every ``precondition_frequency``
    steps the inverse fourth roots of all the model's factors are taken in one ragged
    ``matrix_inverse_root`` call (the float32 factors floored and ridged by ``eps``); the step
    is L^(-1/4) G R^(-1/4), grafted to the gradient's norm, with momentum and decoupled
    weight decay."""

    def __init__(self, params, lr=0.01, beta2=0.95, momentum=0.9, eps=1e-6, weight_decay=0.0, block_size=128,
                 precondition_frequency=10):
        super().__init__(params, dict(lr=lr, beta2=beta2, momentum=momentum, eps=eps, weight_decay=weight_decay,
                                      block_size=block_size, precondition_frequency=precondition_frequency))

    def _factors(self, p, group):
        state = self.state[p]
        if not state:
            w = _matrix(p)
            state["step"] = 0
            state["blocks"] = _blocks(w, group["block_size"])
            state["L"] = [w.new_zeros(w[r].shape[0], w[r].shape[0]) for r, _ in state["blocks"]]
            state["R"] = [w.new_zeros(w[:, c].shape[1], w[:, c].shape[1]) for _, c in state["blocks"]]
            state["roots"] = None
            state["momentum_buffer"] = torch.zeros_like(w)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            states = [self._factors(p, group) for p in live]
            b = group["beta2"]
            for p, state in zip(live, states):
                g = p.grad.reshape(_matrix(p).shape)
                for (r, c), L, R in zip(state["blocks"], state["L"], state["R"]):
                    gb = g[r, c]
                    L.mul_(b).add_(gb @ gb.T, alpha=1 - b)
                    R.mul_(b).add_(gb.T @ gb, alpha=1 - b)
                state["step"] += 1
            if states and (states[0]["roots"] is None or states[0]["step"] % group["precondition_frequency"] == 0):
                roots = iter(self._inverse_roots([f for s in states for f in s["L"] + s["R"]], group["eps"]))
                for s in states:
                    s["roots"] = ([next(roots) for _ in s["L"]], [next(roots) for _ in s["R"]])
            for p, state in zip(live, states):
                w, g = _matrix(p), p.grad.reshape(_matrix(p).shape)
                direction = torch.empty_like(g)
                for (r, c), lr_root, rr_root in zip(state["blocks"], *state["roots"]):
                    d = lr_root @ g[r, c] @ rr_root
                    direction[r, c] = d * (g[r, c].norm() / d.norm().clamp_min(1e-30))  # grafted to SGD
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(direction)
                w.mul_(1 - group["lr"] * group["weight_decay"]).add_(buf, alpha=-group["lr"])
        return loss

    def _inverse_roots(self, factors, eps):
        """(F + eps I)^(-1/4) of every factor (floored at 0), in one ragged call."""
        return curvkit.matrix_inverse_root(factors, p=4, eps=eps)


class SOAP(torch.optim.Optimizer):
    """SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's factors. L and R are EMAs
    of G G^T and G^T G; the first step only sets them and their bases (eigh); every
    ``precondition_frequency`` steps the bases are refreshed by one power step and QR
    (``curvkit.eigenbasis_update``, all the model's factors in one call), and Adam's second
    moment follows its columns' new order. The step is Q_L (m' / (sqrt(v') + eps)) Q_R^T,
    m' and the gradient rotated into the basis, with bias correction and decoupled weight
    decay."""

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.0,
                 precondition_frequency=10):
        super().__init__(params, dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                      weight_decay=weight_decay, precondition_frequency=precondition_frequency))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            (beta1, beta2), sb = group["betas"], group["shampoo_beta"]
            refresh = []
            for p in live:
                w, g = _matrix(p), p.grad.reshape(_matrix(p).shape)
                state = self.state[p]
                if not state:  # the first step sets the factors and their bases only
                    state["step"] = 0
                    state["L"], state["R"] = g @ g.T, g.T @ g
                    state["QL"], state["QR"] = self._initial_bases(state["L"], state["R"])
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(w), torch.zeros_like(w)
                    continue
                state["step"] += 1
                ql, qr = state["QL"], state["QR"]
                state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).add_((ql.T @ g @ qr).square(), alpha=1 - beta2)
                m = ql.T @ state["exp_avg"] @ qr
                t = state["step"]
                step_size = group["lr"] * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)
                direction = ql @ (m / (state["exp_avg_sq"].sqrt() + group["eps"])) @ qr.T
                w.mul_(1 - group["lr"] * group["weight_decay"]).add_(direction, alpha=-step_size)
                state["L"].mul_(sb).add_(g @ g.T, alpha=1 - sb)
                state["R"].mul_(sb).add_(g.T @ g, alpha=1 - sb)
                if t % group["precondition_frequency"] == 0:
                    refresh.append(state)
            if refresh:  # every due factor of every matrix in one call
                new = iter(self._refresh([s[k] for s in refresh for k in ("L", "R")],
                                         [s[k] for s in refresh for k in ("QL", "QR")]))
                for s in refresh:
                    (s["QL"], perm_l), (s["QR"], perm_r) = next(new), next(new)
                    s["exp_avg_sq"] = s["exp_avg_sq"][perm_l][:, perm_r]
        return loss

    def _initial_bases(self, L, R):
        """Eigenvectors of L and R, by descending eigenvalue (as SOAP orders them)."""
        return tuple(v.flip(-1).contiguous() for _, v in curvkit.eigh([L, R]))

    def _refresh(self, factors, bases):
        """(new basis, permutation) per factor: one power step and QR, columns by descending
        eigenvalue estimate; every factor in one call."""
        return [(q, torch.as_tensor(perm, device=q.device)) for q, _, perm in curvkit.eigenbasis_update(factors, bases)]


class AdaHessian(torch.optim.Optimizer):
    """AdaHessian (Yao et al., 2021): Adam with the Hessian diagonal in place of the squared
    gradient. Each step draws one Rademacher probe z per parameter (``curvkit.probes_like``,
    named by (seed, step, index)), takes H z by a double backward, and hands z * Hz to
    ``curvkit.adahessian_step_``: spatial averaging by tensor rank, |z * Hz|, the RMS EMA with
    bias correction and the step, over every parameter in one native call. It needs the
    gradient's graph: call ``loss.backward(create_graph=True)`` before ``step()``. Takes any
    parameter (biases too)."""

    def __init__(self, params, lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      hessian_power=hessian_power))
        self.seed, self.steps = seed, 0

    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        self.steps += 1
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        probes = curvkit.probes_like(params, seed=self.seed, step=self.steps)
        hz = torch.autograd.grad([p.grad for p in params], params, grad_outputs=probes)
        with torch.no_grad():
            for group in self.param_groups:
                live = [p for p in group["params"] if p.grad is not None]
                index = {id(p): i for i, p in enumerate(params)}
                for p in live:
                    self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                    self.state[p].setdefault("exp_avg_sq", torch.zeros_like(p))
                samples = [(probes[index[id(p)]] * hz[index[id(p)]]).contiguous() for p in live]
                self._update(live, [p.grad.detach() for p in live], samples, group)
        return loss

    def _update(self, params, grads, samples, group):
        """AdaHessian's update of every parameter of the group, in one call."""
        curvkit.adahessian_step_(params, grads, samples, [self.state[p]["exp_avg"] for p in params],
                                 [self.state[p]["exp_avg_sq"] for p in params], step=self.steps, lr=group["lr"],
                                 betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                                 hessian_power=group["hessian_power"])


def _demo():
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    y = (x @ torch.randn(32, 1)).sin()
    for name, make in [("Muon", lambda ps: Muon(ps, lr=0.02)), ("Shampoo", lambda ps: Shampoo(ps, lr=0.02)),
                       ("SOAP", lambda ps: SOAP(ps, lr=3e-3)), ("AdaHessian", lambda ps: AdaHessian(ps, lr=0.05))]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        matrices = [p for p in model.parameters() if p.ndim == 2]
        vectors = [p for p in model.parameters() if p.ndim < 2]
        optimizers = [make(matrices), torch.optim.AdamW(vectors, lr=1e-3)]
        for _ in range(100):
            loss = torch.nn.functional.mse_loss(model(x), y)
            for o in optimizers:
                o.zero_grad()
            loss.backward(create_graph=name == "AdaHessian")
            for o in optimizers:
                o.step()
        print(f"{name:10s} loss after 100 steps: {loss.item():.4f}")


if __name__ == "__main__":
    _demo()
