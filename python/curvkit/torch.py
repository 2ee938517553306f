"""PyTorch integration (imported on demand: ``import curvkit.torch``): the square-root
family with autograd and the polar factor, as torch.library custom ops that torch.compile
traces without a graph break.

The square-root family is differentiable: they take the symmetric part (A + A^T)/2 of their
input (so ``torch.autograd.gradcheck`` works on them as written), and for S = A^{1/2} the
gradient with respect to A of a loss with gradient G_S on S is the X with S X + X S = G_S
(symmetrized); for R = A^{-1/2} it is the same with G_S = -R G_R R. The Lyapunov equation is
solved by :func:`curvkit.solve_lyapunov` (the matrix-sign iteration of Song et al., run to
convergence), on CPU and CUDA tensors alike. They are custom ops (``curvkit::sqrt_and_inv_sqrt``,
``curvkit::solve_lyapunov``) that torch.compile traces with ``fullgraph=True``, and once
differentiable: a second derivative (a Hessian-vector product through them, gradgradcheck)
raises a RuntimeError rather than silently dropping the curvature term.

>>> import torch, curvkit, curvkit.torch as ct
>>> B = torch.randn(6, 6, dtype=torch.float64)
>>> A = (B @ B.T + torch.eye(6, dtype=torch.float64)).requires_grad_()
>>> ct.matrix_sqrt(A).trace().backward()          # d tr(A^{1/2}) / dA = A^{-1/2} / 2
>>> bool(torch.allclose(A.grad, curvkit.matrix_inv_sqrt(A.detach()) / 2))
True

:func:`polar` and :func:`polar_update_` are :func:`curvkit.polar` and
:func:`curvkit.polar_update_` as the custom ops ``curvkit::polar`` and
``curvkit::polar_update_`` (with fake implementations for tracing), so that Muon's step can
be compiled with ``fullgraph=True``. Under CUDA graphs (``mode="reduce-overhead"``) pass
``check_finite=False``: the check is a host synchronization.

>>> G, W = torch.randn(32, 64), torch.randn(32, 64)
>>> expected = W * (1 - 0.02 * 0.01) - 0.02 * curvkit.polar(G)
>>> _ = ct.polar_update_(W, G, lr=0.02, weight_decay=0.01)   # also inside torch.compile
>>> bool(torch.allclose(W, expected))
True
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _args
from . import newton_schulz as _ns
from ._errors import ArgumentTypeError, report_unconverged
from .sinkhorn import sinkhorn_cost as _sinkhorn_cost


def _tensor(x, name):
    """x, which must be a torch tensor: these wrappers are torch's autograd and custom ops."""
    if not isinstance(x, torch.Tensor):
        kind = f"{type(x).__module__}.{type(x).__qualname__}"
        raise ArgumentTypeError(f"argument '{name}' must be a torch.Tensor, got {kind}")
    return x


def _symmetric_part(A):
    return (A + A.mT) / 2


@torch.library.custom_op("curvkit::sqrt_and_inv_sqrt", mutates_args=())
def _sqrt_op(A: torch.Tensor, want_inverse: bool, method: str, tol: float,
             max_iters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    # Only what is asked for: the square root of a singular PSD matrix exists (its backward, a
    # Lyapunov solve with S, then reports the singularity). An unwanted R is empty.
    A = _symmetric_part(A).contiguous()
    if want_inverse:
        S, R = _ns.matrix_sqrt_and_inv_sqrt(A, method=method, tol=tol, max_iters=max_iters)
        return S, R
    return _ns.matrix_sqrt(A, method=method, tol=tol, max_iters=max_iters), A.new_empty(0)


@_sqrt_op.register_fake
def _(A, want_inverse, method, tol, max_iters):
    return torch.empty_like(A, memory_format=torch.contiguous_format), (
        torch.empty_like(A, memory_format=torch.contiguous_format) if want_inverse else A.new_empty(0))


@torch.library.custom_op("curvkit::solve_lyapunov", mutates_args=())
def _lyapunov_op(S: torch.Tensor, C: torch.Tensor, max_iters: int) -> torch.Tensor:
    return _ns.solve_lyapunov(S, C.contiguous(), max_iters=max_iters)


@_lyapunov_op.register_fake
def _(S, C, max_iters):
    return torch.empty_like(C, memory_format=torch.contiguous_format)


def _sqrt_setup_context(ctx, inputs, output):
    _, want_inverse, _, _, max_iters = inputs
    ctx.save_for_backward(*output)
    ctx.want_inverse, ctx.max_iters = want_inverse, max_iters


def _sqrt_backward(ctx, grad_s, grad_r):
    # Once differentiable: the Lyapunov op has no derivative of its own, so a second backward
    # (create_graph=True, torch.autograd.gradgradcheck) raises instead of dropping that term.
    S, R = ctx.saved_tensors
    total = grad_s if grad_s is not None else torch.zeros_like(S)
    if ctx.want_inverse and grad_r is not None:
        total = total - R @ grad_r @ R
    return _symmetric_part(_lyapunov_op(S, total, ctx.max_iters)), None, None, None, None


_sqrt_op.register_autograd(_sqrt_backward, setup_context=_sqrt_setup_context)


def _square_roots(A, want_sqrt, want_inverse, method, tol, max_iters):
    S, R = _sqrt_op(_tensor(A, "A"), want_inverse, method, float(_args.real(tol, "tol")),
                    _args.max_iters(max_iters))
    if want_sqrt and want_inverse:
        return S, R
    return S if want_sqrt else R


def matrix_sqrt(A, method="auto", tol=1e-8, max_iters=100):
    """Differentiable :func:`curvkit.matrix_sqrt` of the symmetric part (A + A^T)/2 of a
    torch tensor, as the custom op ``curvkit::sqrt_and_inv_sqrt`` (torch.compile traces it
    with ``fullgraph=True``). Once differentiable: a second derivative raises."""
    return _square_roots(A, True, False, method, tol, max_iters)


def matrix_inv_sqrt(A, method="auto", tol=1e-8, max_iters=100):
    """Differentiable :func:`curvkit.matrix_inv_sqrt`, as :func:`matrix_sqrt`."""
    return _square_roots(A, False, True, method, tol, max_iters)


def matrix_sqrt_and_inv_sqrt(A, method="auto", tol=1e-8, max_iters=100):
    """Differentiable :func:`curvkit.matrix_sqrt_and_inv_sqrt`, as :func:`matrix_sqrt`."""
    return _square_roots(A, True, True, method, tol, max_iters)


def _schedule(coefficients):
    """(name, flattened triples) for the ops' schema: a schedule name, or a list of (a, b, c)."""
    if isinstance(coefficients, str):
        return coefficients, None
    return "", [float(v) for triple in coefficients for v in triple]


def _coefficients(name, flat):
    return name if flat is None else [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


@torch.library.custom_op("curvkit::polar", mutates_args=())
def _polar_op(G: torch.Tensor, steps: int, name: str, flat: Optional[List[float]], norm_eps: float, method: str,
              check_finite: bool) -> torch.Tensor:
    return _ns.polar(G, steps, _coefficients(name, flat), norm_eps, method, check_finite=check_finite)


@_polar_op.register_fake
def _(G, steps, name, flat, norm_eps, method, check_finite):
    return torch.empty_like(G, memory_format=torch.contiguous_format)


@torch.library.custom_op("curvkit::polar_update_", mutates_args=("params",))
def _polar_update_op(params: List[torch.Tensor], G: List[torch.Tensor], lr: List[float], weight_decay: List[float],
                     scale: List[float], steps: int, name: str, flat: Optional[List[float]], norm_eps: float,
                     method: str, check_finite: bool) -> None:
    _ns.polar_update_(list(params), list(G), lr, weight_decay, scale, steps, _coefficients(name, flat), norm_eps,
                      method, check_finite)


@_polar_update_op.register_fake
def _(params, G, lr, weight_decay, scale, steps, name, flat, norm_eps, method, check_finite):
    return None


def _steps(steps):  # checked before the op's int64 schema sees it
    return _args.steps(steps)


def polar(G: torch.Tensor, steps: int = 5, coefficients: Union[str, Sequence] = "muon", norm_eps: float = 1e-7,
          method: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """:func:`curvkit.polar` of one tensor, as the custom op ``curvkit::polar``."""
    G = _tensor(G, "G")
    return _polar_op(G, _steps(steps), *_schedule(coefficients), float(norm_eps), method, bool(check_finite))


def polar_update_(param, G, lr: _ns.Factor, weight_decay: _ns.Factor = 0.0, scale: _ns.Factor = 1.0, steps: int = 5,
                  coefficients: Union[str, Sequence] = "muon", norm_eps: float = 1e-7, method: str = "auto",
                  check_finite: bool = True):
    """:func:`curvkit.polar_update_` (a tensor or a list of them; ``lr``, ``weight_decay``
    and ``scale`` one number or one per tensor), as the custom op ``curvkit::polar_update_``.
    Returns ``param``."""
    single = not isinstance(param, (list, tuple))
    params, updates = ([param], [G]) if single else (list(param), list(G))
    params = [_tensor(p, "param") for p in params]
    updates = [_tensor(g, "G") for g in updates]
    count = None if single else len(params)
    factors = [_ns._per_parameter(v, name, count) for v, name in
               ((lr, "lr"), (weight_decay, "weight_decay"), (scale, "scale"))]
    _polar_update_op(params, updates, *factors, _steps(steps), *_schedule(coefficients), float(norm_eps), method,
                     bool(check_finite))
    return param


# ---------------------------------------------------------------------------------------
# Hessian-vector products of a loss, and per-layer Hutchinson traces from shared probes


def hessian_matvec(loss_fn, params: Sequence[torch.Tensor]):
    """The Hessian of ``loss_fn()`` with respect to ``params`` as a matvec on probe blocks.

    Returns ``matvec(Z)`` mapping Z (n, k), n the total number of parameter entries (in the
    order of ``params``, each flattened), to H Z (n, k): one double backward through the
    gradient graph, batched over the k columns (``is_grads_batched``), not a loop over probes.
    The gradient graph is built once, on the first call, and kept; call ``hessian_matvec``
    again for a new batch. Pass it to :func:`curvkit.trace_estimate` and the other
    estimators with ``like=`` a tensor of the parameters' dtype and device.

    >>> import torch, curvkit, curvkit.torch as ct
    >>> w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    >>> a = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> hv = ct.hessian_matvec(lambda: 0.5 * w @ a @ w, [w])
    >>> hv(torch.eye(5, dtype=torch.float64)).diagonal()
    tensor([1., 2., 3., 4., 5.], dtype=torch.float64)
    """
    params = [p for p in params]
    if not params or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
        raise ArgumentTypeError("argument 'params' must be a non-empty sequence of tensors that require grad")
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    state = {}

    def matvec(z: torch.Tensor) -> torch.Tensor:
        if "grads" not in state:
            with torch.enable_grad():
                loss = loss_fn()
                state["grads"] = torch.autograd.grad(loss, params, create_graph=True)
        if z.dim() != 2 or z.shape[0] != n:
            raise ArgumentTypeError(f"hessian_matvec: the block must have shape ({n}, k), got {tuple(z.shape)}")
        k = z.shape[1]
        rows = z.T.to(params[0].dtype).contiguous()
        outputs = [rows[:, a:a + s].reshape(k, *p.shape)
                   for a, s, p in zip(_offsets(sizes), sizes, params)]
        hz = torch.autograd.grad(state["grads"], params, grad_outputs=outputs, retain_graph=True,
                                 is_grads_batched=True, allow_unused=True)
        cols = [torch.zeros(k, s, dtype=rows.dtype, device=rows.device) if h is None else h.reshape(k, s)
                for h, s in zip(hz, sizes)]
        return torch.cat(cols, dim=1).T.contiguous().to(z.dtype)

    return matvec


def _offsets(sizes):
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


def layer_traces(loss_fn, params: Sequence[torch.Tensor], num_matvecs: int, kind: str = "rademacher",
                 seed: int = 0, block_size: int = 32, return_diagonals: bool = False):
    """Per-tensor Hutchinson traces tr(H_ll) of the Hessian's diagonal blocks, from shared probes.

    All tensors share each probe, so one batched Hessian-vector product (a block of
    ``block_size`` probes, :func:`hessian_matvec`) serves every layer: HAWQ's per-layer
    sensitivity (trace / number of parameters) for the cost of one trace estimate.

    Returns a list with one dict per tensor: "trace", "std_error" (of the trace) and, with
    ``return_diagonals``, "diagonal" (a tensor of the parameter's shape, the Hutchinson
    estimate of diag(H_ll)).

    >>> import torch, curvkit.torch as ct
    >>> w1 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    >>> w2 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    >>> loss = lambda: (w1 ** 2).sum() + 3 * (w2 ** 2).sum()    # diagonal: exact with sign probes
    >>> [r["trace"] for r in ct.layer_traces(loss, [w1, w2], num_matvecs=8)]
    [8.0, 18.0]
    >>> loss = lambda: (w1 ** 2).sum() + 3 * (w2 ** 2).sum() + w1[0] * w2[0]
    >>> r = ct.layer_traces(loss, [w1, w2], num_matvecs=400)    # the coupling adds noise only
    >>> [abs(e["trace"] - t) < 4 * e["std_error"] for e, t in zip(r, (8.0, 18.0))]
    [True, True]
    """
    from . import _core
    from .hutchinson import probes

    params = [p for p in params]
    matvec = hessian_matvec(loss_fn, params)
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    m = _args.index(num_matvecs, "num_matvecs", 1, 2**31)
    block = _args.index(block_size, "block_size", 1, 2**31)
    compute = "float64" if params[0].dtype == torch.float64 else "float32"
    dtype = getattr(torch, compute)
    samples: List[List[torch.Tensor]] = [[] for _ in params]
    means = [torch.zeros(s, dtype=dtype) for s in sizes]
    m2 = [torch.zeros(s, dtype=dtype) for s in sizes]
    done = 0
    while done < m:
        k = min(block, m - done)
        z = probes((n, k), kind=kind, seed=seed, offset=done, dtype=compute, device=params[0].device)
        if kind == "sphere":
            z *= n ** 0.5
        hz = matvec(z).to(dtype).contiguous()
        for i, (a, s) in enumerate(zip(_offsets(sizes), sizes)):
            zi, hi = z[a:a + s].cpu(), hz[a:a + s].cpu()
            out = torch.empty(k, dtype=torch.float64)
            _core.column_dots(zi, hi, out)
            samples[i].append(out)
            if return_diagonals:
                _core.accumulate_products(zi, hi, done, means[i], m2[i])
        done += k
    result = []
    for i, p in enumerate(params):
        values = torch.cat(samples[i])
        entry: dict = {"trace": float(values.mean()),
                 "std_error": float(values.std() / m ** 0.5) if m > 1 else float("inf")}
        if return_diagonals:
            entry["diagonal"] = means[i].reshape(p.shape).to(p.device)
        result.append(entry)
    return result


def _point_costs(x, y, cost, p):
    """The ground cost matrix of point clouds (..., n, d) and (..., m, d), differentiable."""
    diff = x.unsqueeze(-2) - y.unsqueeze(-3)
    if cost == "sqeuclidean":
        return (diff * diff).sum(-1)
    if cost == "euclidean":
        return (diff * diff).sum(-1).sqrt()
    if cost == "l1":
        return diff.abs().sum(-1)
    return diff.abs().pow(p).sum(-1)


@torch.library.custom_op("curvkit::sinkhorn_cost", mutates_args=())
def _sinkhorn_op(a: Optional[torch.Tensor], b: Optional[torch.Tensor], C: Optional[torch.Tensor],
                 x: Optional[torch.Tensor], y: Optional[torch.Tensor], init_f: Optional[torch.Tensor],
                 init_g: Optional[torch.Tensor], cost: str, p: float, reg: float, method: str, tol: float,
                 max_iter: int, max_newton: int, density: Optional[float],
                 float32_warmup: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # (loss, f, g): the potentials are what the backward needs (the envelope theorem).
    init = None if init_f is None else (init_f, init_g)
    value, info = _sinkhorn_cost(a, b, C, x=x, y=y, cost=cost, p=p, reg=reg, method=method, tol=tol,
                                 max_iter=max_iter, max_newton=max_newton, density=density,
                                 float32_warmup=float32_warmup, init=init, return_info=True)
    report_unconverged("curvkit.torch.sinkhorn_cost", [info], value, True)
    like = C if C is not None else x
    assert like is not None  # _sinkhorn_cost refused neither C nor x

    def cast(v):
        return torch.as_tensor(v).to(like.device, like.dtype)

    return cast(value), cast(info["f"]), cast(info["g"])


@_sinkhorn_op.register_fake
def _(a, b, C, x, y, init_f, init_g, cost, p, reg, method, tol, max_iter, max_newton, density, float32_warmup):
    like, other = (C, C) if C is not None else (x, y)
    batch, n, m = like.shape[:-2], like.shape[-2], other.shape[-1 if C is not None else -2]
    return like.new_empty(batch), like.new_empty((*batch, n)), like.new_empty((*batch, m))


@torch.library.custom_op("curvkit::sinkhorn_cost_backward", mutates_args=())
def _sinkhorn_backward_op(grad: torch.Tensor, f: torch.Tensor, g: torch.Tensor, C: Optional[torch.Tensor],
                          x: Optional[torch.Tensor], y: Optional[torch.Tensor], cost: str, p: float,
                          reg: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # (d/dC or empty, d/dx, d/dy): the plan P = exp((f + g - C) / reg) weighted by grad. An op
    # of its own, without an autograd formula, so that a double backward raises instead of
    # silently differentiating the envelope with the potentials held fixed.
    costs = C if C is not None else _point_costs(x, y, cost, p)
    weight = grad[..., None, None] * torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - costs) / reg)
    if C is not None:
        return weight, f.new_empty(0), f.new_empty(0)
    return (f.new_empty(0), *_point_cost_grads(x, y, weight, cost, p))


def _point_cost_grads(x, y, weight, cost, p):
    """(sum_j W_ij dC_ij/dx_i, sum_i W_ij dC_ij/dy_j) for the costs of :func:`_point_costs`; at
    coincident points the euclidean and l1 costs take the subgradient 0."""
    if cost == "sqeuclidean":  # 2 (x_i - y_j): no (n, m, d) tensor
        return (2 * (x * weight.sum(-1, keepdim=True) - weight @ y),
                2 * (y * weight.sum(-2).unsqueeze(-1) - weight.mT @ x))
    diff = x.unsqueeze(-2) - y.unsqueeze(-3)
    if cost == "euclidean":
        norm = (diff * diff).sum(-1, keepdim=True).sqrt()
        slope = torch.where(norm > 0, diff / torch.where(norm > 0, norm, 1), 0)
    elif cost == "l1":
        slope = diff.sign()
    else:
        slope = p * diff.abs().pow(p - 1) * diff.sign()
    weighted = weight.unsqueeze(-1) * slope
    return weighted.sum(-2), -weighted.sum(-3)


@_sinkhorn_backward_op.register_fake
def _(grad, f, g, C, x, y, cost, p, reg):
    if C is None:
        return f.new_empty(0), torch.empty_like(x), torch.empty_like(y)
    return torch.empty_like(C), f.new_empty(0), f.new_empty(0)


def _sinkhorn_setup_context(ctx, inputs, output):
    a, b, C, x, y, _, _, cost, p, reg, *_ = inputs
    _, f, g = output
    ctx.save_for_backward(f, g, C, x, y)
    ctx.options = (cost, p, reg)


def _sinkhorn_backward(ctx, grad, grad_f, grad_g):
    f, g, C, x, y = ctx.saved_tensors
    grad_C, grad_x, grad_y = _sinkhorn_backward_op(grad, f, g, C, x, y, *ctx.options)
    grad_a = grad[..., None] * f if ctx.needs_input_grad[0] else None
    grad_b = grad[..., None] * g if ctx.needs_input_grad[1] else None
    if C is not None:
        return grad_a, grad_b, grad_C, None, None, *([None] * 11)
    return grad_a, grad_b, None, grad_x, grad_y, *([None] * 11)


_sinkhorn_op.register_autograd(_sinkhorn_backward, setup_context=_sinkhorn_setup_context)


def sinkhorn_cost(a: Optional[torch.Tensor], b: Optional[torch.Tensor], C: Optional[torch.Tensor] = None, *,
                  x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, cost: str = "sqeuclidean",
                  p: float = 2.0, reg: float, method: str = "auto", tol: float = 1e-9, max_iter: int = 10000,
                  max_newton: int = 200, density: Optional[float] = None, float32_warmup: bool = False,
                  init: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """:func:`curvkit.sinkhorn_cost` with gradients with respect to a, b, C, x and y by the
    envelope theorem: d/dC = P, d/da = f, d/db = g at the optimum (no unrolled iterations;
    memory O(n m) in the backward pass, for the plan). Single problems or batches (B, ...)
    of tensors; the loss has the cost's dtype and shape (B,) or (). Gradients with respect
    to a and b are defined up to adding a constant (the potentials' shift): only
    mass-preserving changes of a and b are meaningful. Once differentiable: a double
    backward raises (no autograd formula for ``curvkit::sinkhorn_cost_backward``) rather
    than differentiate with the potentials held fixed. A custom op
    (``curvkit::sinkhorn_cost``): compiles with ``torch.compile(fullgraph=True)``.

    >>> import torch, curvkit.torch as ct
    >>> x = torch.rand(20, 2, dtype=torch.float64, requires_grad=True)
    >>> y = torch.rand(25, 2, dtype=torch.float64)
    >>> loss = ct.sinkhorn_cost(None, None, x=x, y=y, reg=0.05)
    >>> loss.backward()
    >>> x.grad.shape
    torch.Size([20, 2])
    """
    init_f, init_g = (None, None) if init is None else (_tensor(init[0], "init"), _tensor(init[1], "init"))
    return _sinkhorn_op(a, b, C, x, y, init_f, init_g, cost, float(p), float(reg), method, float(tol),
                        int(max_iter), int(max_newton), None if density is None else float(density),
                        bool(float32_warmup))[0]


class MFAC(torch.optim.Optimizer):
    """M-FAC's optimizer (Frantar et al., 2021) over a :class:`curvkit.FisherWindow`: each step
    pushes the model's flattened gradient g into a window of the last ``m`` gradients and moves
    the parameters along ``-lr * F^-1 g``, ``F = damp I + (1/m) sum g_i g_i^T`` (optionally with
    momentum and decoupled weight decay). A thin example of the window, not a tuned optimizer.

    ``damp`` bounds the step: F^-1 g is at most g / damp, reached as the gradients shrink; too
    small a damp makes late steps explode (M-FAC's published runs tune it, 1e-4 .. 1e-7 for
    large models with normalized losses).

    The window holds ``m * d`` values of ``dtype`` (default the parameters' dtype) on the
    parameters' device; parameters without a gradient contribute zeros.

    >>> import torch, curvkit.torch as ct
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Linear(4, 1, dtype=torch.float64)
    >>> X, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    >>> opt = ct.MFAC(model.parameters(), lr=0.1, m=8, damp=0.1)
    >>> first = torch.nn.functional.mse_loss(model(X), y).item()
    >>> for _ in range(20):
    ...     opt.zero_grad()
    ...     torch.nn.functional.mse_loss(model(X), y).backward()
    ...     opt.step()
    >>> torch.nn.functional.mse_loss(model(X), y).item() < first
    True
    """

    def __init__(self, params, lr: float = 1e-3, m: int = 32, damp: float = 1e-5, momentum: float = 0.0,
                 weight_decay: float = 0.0, dtype=None, normalize: str = "capacity") -> None:
        from .mfac import FisherWindow

        defaults = dict(lr=_args.real(lr, "lr"), momentum=_args.real(momentum, "momentum"),
                        weight_decay=_args.real(weight_decay, "weight_decay"))
        super().__init__(params, defaults)
        flat = [p for group in self.param_groups for p in group["params"]]
        if not flat:
            raise ArgumentTypeError("argument 'params' holds no tensors")
        d = sum(p.numel() for p in flat)
        self.window = FisherWindow(d, m, damp, dtype=dtype if dtype is not None else flat[0].dtype, like=flat[0],
                                   normalize=normalize)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat = [p for group in self.param_groups for p in group["params"]]
        dtype = getattr(torch, self.window.dtype)
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in flat])
        self.window.push(g)
        update = self.window.ihvp(g)
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                n = p.numel()
                u = update[offset:offset + n].view_as(p).to(p.dtype)
                offset += n
                if group["momentum"]:
                    buf = self.state[p].get("momentum")
                    buf = u.clone() if buf is None else buf.mul_(group["momentum"]).add_(u)
                    self.state[p]["momentum"] = buf
                    u = buf
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u, alpha=-group["lr"])
        return loss


__all__ = ["MFAC", "hessian_matvec", "layer_traces", "matrix_inv_sqrt", "matrix_sqrt", "matrix_sqrt_and_inv_sqrt",
           "polar", "polar_update_", "sinkhorn_cost"]
