"""Sinkhorn family: plans, potentials and losses against float64 references (a NumPy log-domain
Sinkhorn and, where installed, POT), over methods, batches, lists, point-cloud costs and dtypes."""
import numpy as np
import pytest
from conftest import KERNEL_BACKENDS, backend_dtypes, make, needs_torch, to_numpy

import curvkit
from curvkit.testing import TOL, sinkhorn_log

METHODS = ["log", "sns", "auto"]
# Error against the float64 reference on the stored inputs, relative to the largest entry (of
# the plan; of reg for the potentials): TOL's "ot_plan".
PLAN_TOL = {dtype: TOL[(dtype, "ot_plan")] for dtype in ("float64", "float32", "float16", "bfloat16")}


def problem(rng, n, m, batch=()):
    a = rng.random(batch + (n,)) + 0.1
    b = rng.random(batch + (m,)) + 0.1
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    return a, b, rng.random(batch + (n, m))


def centered(f, g):
    """Potentials are unique up to (f + c, g - c): fix c by mean(f) = 0."""
    c = f.mean()
    return f - c, g + c


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend, dtype", backend_dtypes(["float32", "float64"]))
def test_plan_and_potentials_match_reference(backend, dtype, method, rng):
    a, b, C = problem(rng, 40, 50)
    reg = 0.02
    a_in, b_in, C_in = (make(v, backend, dtype) for v in (a, b, C))
    P, info = curvkit.sinkhorn(a_in, b_in, C_in, reg=reg, method=method, tol=1e-11, return_info=True)
    assert type(P) is type(C_in) and tuple(P.shape) == (40, 50)
    assert bool(info["converged"]) and info["marginal_error"] <= 1e-11
    # the reference solves the problem as stored (the inputs rounded to dtype)
    a_s, b_s, C_s = (to_numpy(v) for v in (a_in, b_in, C_in))
    P_ref, f_ref, g_ref = sinkhorn_log(a_s, b_s * a_s.sum() / b_s.sum(), C_s, reg, tol=1e-12)
    assert np.abs(to_numpy(P) - P_ref).max() <= PLAN_TOL[dtype] * P_ref.max()
    f, g = centered(to_numpy(info["f"]), to_numpy(info["g"]))
    fr, gr = centered(f_ref, g_ref)
    scale = PLAN_TOL[dtype] * reg
    assert np.abs(f - fr).max() <= scale and np.abs(g - gr).max() <= scale
    cost = float((P_ref * C_s).sum())
    assert abs(float(info["cost"]) - cost) <= PLAN_TOL[dtype] * cost
    objective = cost + reg * float((P_ref * (np.log(P_ref) - 1)).sum())
    assert abs(float(info["objective"]) - objective) <= PLAN_TOL[dtype] * abs(objective) + 1e-12


def test_against_pot(rng):
    ot = pytest.importorskip("ot")
    a, b, C = problem(rng, 30, 45)
    reg = 0.05
    P_pot, log = ot.sinkhorn(a, b, C, reg, method="sinkhorn_log", stopThr=1e-13, numItermax=100000, log=True)
    for method in METHODS:
        P, info = curvkit.sinkhorn(a, b, C, reg=reg, method=method, tol=1e-12, return_info=True)
        assert np.abs(P - P_pot).max() <= 1e-8 * P_pot.max()
        f, g = centered(info["f"], info["g"])
        fp, gp = centered(reg * log["log_u"], reg * log["log_v"])
        assert np.abs(f - fp).max() <= 1e-8 * reg and np.abs(g - gp).max() <= 1e-8 * reg


def test_small_reg_approaches_exact_ot(rng):
    ot = pytest.importorskip("ot")
    n = 50
    a, b = np.full(n, 1 / n), np.full(n, 1 / n)
    C = rng.random((n, n))
    exact = ot.emd2(a, b, C)
    gaps = []
    for reg in (1e-1, 1e-2, 1e-3):
        P = curvkit.sinkhorn(a, b, C, reg=reg)
        gaps.append(float((P * C).sum()) - exact)
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-12
    assert gaps[2] < 0.05 * exact


def test_sns_and_log_agree_on_a_hard_problem(rng):
    """The SNS paper's random assignment case, smaller: Sinkhorn is slow there, Newton is not."""
    n = 60
    C = rng.random((n, n))
    u = np.full(n, 1 / n)
    P_log, i_log = curvkit.sinkhorn(u, u, C, reg=0.01, method="log", tol=1e-10, max_iter=50000, return_info=True)
    P_sns, i_sns = curvkit.sinkhorn(u, u, C, reg=0.01, method="sns", tol=1e-10, return_info=True)
    assert i_sns["method"] == "sns" and i_sns["newton_steps"] > 0
    assert i_sns["iterations"] + 10 * i_sns["newton_steps"] < i_log["iterations"]
    assert np.abs(P_log - P_sns).max() <= 1e-7 * P_log.max()


def test_cuda_solves_as_the_cpu_does(cuda_backend, rng):
    """The CUDA solver against the CPU one on the same inputs: Sinkhorn warm-up, hand-over, Newton
    with its sparse Hessian, CG and line search, per problem of a batch, with the float32 warm-up,
    on point clouds and with zero-mass rows. Both follow sinkhorn/schedule.h, so the paths agree
    (the Newton steps may differ by one where the sums' rounding decides a line search)."""
    n = 60
    C = rng.random((3, n, n))
    C[1] *= 0.2  # easier: log-domain Sinkhorn meets tol before "auto" hands over
    u = np.full((3, n), 1 / n)
    u[2, 5] = 0
    u[2] /= u[2].sum()
    x, y = rng.random((n, 2)), rng.random((n, 2))
    cases = [dict(a=u, b=u, C=C, method=method, float32_warmup=warm)
             for method in ("sns", "auto") for warm in (False, True)]
    cases.append(dict(a=u[0], b=u[0], x=x, y=y, cost="euclidean", method="sns", float32_warmup=False))
    for case in cases:
        options = dict(case, reg=0.01, tol=1e-10, return_info=True)
        P_cpu, i_cpu = curvkit.sinkhorn(**options)
        on_device = {k: make(v, cuda_backend) if isinstance(v, np.ndarray) else v for k, v in options.items()}
        P, info = curvkit.sinkhorn(**on_device)
        assert type(P) is type(on_device["a"]) and np.all(info["converged"]) and np.all(info["marginal_error"] <= 1e-10)
        assert np.array_equal(info["method"], i_cpu["method"]), case
        assert np.all(np.abs(np.asarray(info["newton_steps"]) - i_cpu["newton_steps"]) <= 1), case
        assert np.abs(to_numpy(P) - P_cpu).max() <= 1e-8 * P_cpu.max(), case
        if case["method"] == "auto":  # the batch exercises both outcomes of the hand-over
            assert set(i_cpu["method"]) == {"sns", "log"}


def test_auto_hands_over_only_when_sinkhorn_is_slow(rng):
    """The decision, not its timing: a large reg converges in a few Sinkhorn iterations and
    Newton is never paid for; the random assignment at small reg hands over as soon as the rate
    is measured (11 iterations: the first error, then a window of 10)."""
    x, y = rng.random((200, 2)), rng.random((200, 2))
    _, easy = curvkit.sinkhorn(None, None, x=x, y=y, reg=1.0, tol=1e-9, return_info=True)
    assert easy["method"] == "log" and easy["newton_steps"] == 0 and easy["iterations"] < 20
    a, b, C = curvkit.testing.ot_assignment(200)
    _, hard = curvkit.sinkhorn(a, b, C, reg=1e-3, tol=1e-9, return_info=True)
    assert hard["method"] == "sns" and hard["iterations"] <= 11 and hard["converged"]
    # RegOT's Synthetic I: Sinkhorn's rate predicts 22-27 further iterations at every point and
    # slows as it goes (82 in all); handing over is 5.9x faster (bench/results/sinkhorn_cpu.md)
    a, b, C = curvkit.testing.ot_assignment(1000, seed=42)
    _, regot = curvkit.sinkhorn(a, b, C, reg=1e-3, tol=1e-6, return_info=True)
    assert regot["method"] == "sns" and regot["iterations"] <= 11 and regot["converged"]


def test_identity_recovery(rng):
    x = rng.random((40, 3))
    y = x + 1e-4 * rng.standard_normal(x.shape)
    P = curvkit.sinkhorn(None, None, x=x, y=y, reg=1e-4)
    assert np.trace(P) > 0.99
    assert np.abs(P - np.eye(40) / 40).max() < 1e-3


@pytest.mark.parametrize("cost, p", [("sqeuclidean", 2.0), ("euclidean", 2.0), ("l1", 1.0), ("pnorm", 1.5)])
def test_point_cloud_costs_match_the_matrix(cost, p, rng):
    x, y = rng.random((25, 3)), rng.random((35, 3))
    diff = np.abs(x[:, None, :] - y[None, :, :])
    C = {"sqeuclidean": (diff ** 2).sum(-1), "euclidean": np.sqrt((diff ** 2).sum(-1)), "l1": diff.sum(-1),
         "pnorm": (diff ** p).sum(-1)}[cost]
    a, b = np.full(25, 1 / 25), np.full(35, 1 / 35)
    P_points, info = curvkit.sinkhorn(a, b, x=x, y=y, cost=cost, p=p, reg=0.01, return_info=True)
    P_matrix = curvkit.sinkhorn(a, b, C, reg=0.01)
    assert np.abs(P_points - P_matrix).max() <= 1e-9 * P_matrix.max()
    assert abs(curvkit.sinkhorn_cost(a, b, x=x, y=y, cost=cost, p=p, reg=0.01) - info["objective"]) <= 1e-12


def test_batches_and_lists_solve_each_problem_on_its_own(rng):
    a, b, C = problem(rng, 20, 30, batch=(4,))
    C[2] *= 20  # a harder problem in the batch: it stops later than the others
    P, info = curvkit.sinkhorn(a, b, C, reg=0.02, tol=1e-11, return_info=True)
    assert P.shape == (4, 20, 30) and info["converged"].shape == (4,)
    for k in range(4):
        P_k, info_k = curvkit.sinkhorn(a[k], b[k], C[k], reg=0.02, tol=1e-11, return_info=True)
        assert np.abs(P[k] - P_k).max() <= 1e-14
        assert info["iterations"][k] == info_k["iterations"]
    assert len(set(zip(info["iterations"].tolist(), info["newton_steps"].tolist()))) > 1  # each stopped on its own
    sizes = [(5, 7), (30, 20), (64, 64)]
    problems = [problem(rng, n, m) for n, m in sizes]
    plans, infos = curvkit.sinkhorn([p[0] for p in problems], [p[1] for p in problems], [p[2] for p in problems],
                                    reg=0.05, return_info=True)
    assert isinstance(plans, list) and [P.shape for P in plans] == sizes
    for (a_k, b_k, C_k), P_k, info_k in zip(problems, plans, infos):
        assert np.abs(P_k - curvkit.sinkhorn(a_k, b_k, C_k, reg=0.05)).max() <= 1e-14
        assert info_k["f"].shape == a_k.shape


def test_small_reg_never_overflows(rng):
    """exp(-C / reg) underflows for every entry here: the log domain does not care."""
    a, b, C = problem(rng, 30, 30)
    P, info = curvkit.sinkhorn(a, b, 1000 * C, reg=1e-3, return_info=True, max_iter=2000)
    assert np.isfinite(P).all() and np.isfinite(info["f"]).all()
    assert info["marginal_error"] <= 1e-9 or not info["converged"]


def test_non_convergence_is_reported(rng):
    a, b, C = problem(rng, 30, 30)
    P, info = curvkit.sinkhorn(a, b, C, reg=1e-3, method="log", max_iter=3, return_info=True)
    assert not info["converged"] and info["marginal_error"] > 1e-9 and np.isfinite(P).all()
    with curvkit.failure_policy("raise"), pytest.raises(curvkit.ConvergenceError) as e:
        curvkit.sinkhorn(a, b, C, reg=1e-3, method="log", max_iter=3)
    assert not e.value.info["converged"] and e.value.result.shape == (30, 30)


def test_zero_mass_rows_and_columns(rng):
    a, b, C = problem(rng, 10, 12)
    a[3] = 0
    b[[0, 5]] = 0
    a /= a.sum()
    b /= b.sum()
    P, info = curvkit.sinkhorn(a, b, C, reg=0.05, tol=1e-12, return_info=True)
    assert info["converged"] and (P[3] == 0).all() and (P[:, [0, 5]] == 0).all()
    keep_r, keep_c = a > 0, b > 0
    P_ref, _, _ = sinkhorn_log(a[keep_r], b[keep_c], C[np.ix_(keep_r, keep_c)], 0.05, tol=1e-12)
    assert np.abs(P[np.ix_(keep_r, keep_c)] - P_ref).max() <= 1e-9


def test_warm_start_and_float32_warmup(rng):
    a, b, C = problem(rng, 50, 50)
    P, info = curvkit.sinkhorn(a, b, C, reg=0.01, tol=1e-11, return_info=True)
    P2, info2 = curvkit.sinkhorn(a, b, C, reg=0.01, tol=1e-11, init=(info["f"], info["g"]), return_info=True)
    assert info2["iterations"] <= 1 and np.abs(P2 - P).max() <= 1e-10 * P.max()
    for method in METHODS:
        P3, info3 = curvkit.sinkhorn(a, b, C, reg=0.01, tol=1e-11, method=method, float32_warmup=True,
                                     return_info=True)
        assert info3["converged"] and np.abs(P3 - P).max() <= 1e-8 * P.max()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs(dtype, rng):
    torch = pytest.importorskip("torch")
    a, b, C = problem(rng, 16, 16)
    t = [torch.from_numpy(v).to(getattr(torch, dtype)) for v in (a, b, C)]
    P, info = curvkit.sinkhorn(*t, reg=0.05, tol=1e-6, return_info=True)
    assert P.dtype == getattr(torch, dtype) and info["converged"]
    P_ref = sinkhorn_log(to_numpy(t[0]), to_numpy(t[1]) * float(to_numpy(t[0]).sum() / to_numpy(t[1]).sum()),
                         to_numpy(t[2]), 0.05, tol=1e-12)[0]
    assert np.abs(to_numpy(P) - P_ref).max() <= PLAN_TOL[dtype] * P_ref.max()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_half_precision_potentials_are_balanced_or_reported(backend, rng):
    """float16 potentials are stored as (f + c, g - c), the same plan, centred so that they fit
    whenever the costs do; a potential no shift brings into range is reported, not passed on as
    a silent Inf."""
    n = 16
    u = np.full(n, 1 / n)
    # Costs near float16's lower limit: the solver's own potentials reach -65,860 here.
    C = -65000 - 400 * rng.random((n, n))
    # solved to 1e-9: PLAN_TOL bounds the plan's rounding, and a solve to 1e-3 was itself up to
    # 3.3e-3 max P from the converged plan (seen on CUDA, then on the CPU for the same costs)
    P, info = curvkit.sinkhorn(*(make(v, backend, "float16") for v in (u, u, C)), reg=100.0, tol=1e-9,
                               return_info=True)
    f, g = to_numpy(info["f"]), to_numpy(info["g"])
    assert info["converged"] and not info["potentials_overflow"]
    assert np.isfinite(f).all() and np.isfinite(g).all()
    C_s = to_numpy(make(C, backend, "float16"))
    P_ref = sinkhorn_log(u, u, C_s, 100.0, tol=1e-12)[0]
    assert np.abs(to_numpy(P) - P_ref).max() <= PLAN_TOL["float16"] * P_ref.max()
    # A mass of 1.2e-7 at reg 2e4: f spans 2.6e5, beyond float16 under any shift.
    a = np.full(8, 1 / 7)
    a[0] = 1.2e-7
    a /= a.sum()
    args = [make(v, backend, "float16") for v in (a, np.full(8, 1 / 8), 100 * rng.random((8, 8)))]
    P, info = curvkit.sinkhorn(*args, reg=2e4, tol=1e-3, return_info=True)
    assert info["potentials_overflow"] and not info["converged"] and np.isfinite(to_numpy(P)).all()
    with curvkit.failure_policy("raise"), pytest.raises(curvkit.ConvergenceError):
        curvkit.sinkhorn(*args, reg=2e4, tol=1e-3)


# The largest finite value of each dtype, and offsets of point clouds whose squared distances
# (computed in float64) put the potentials beyond it (the first) or within it (the second):
# f_i + g_j ~ C_ij ~ 2 offset^2 on the plan's support.
DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38}
OFFSETS = {"float16": (300.0, 100.0), "bfloat16": (2e19, 2e18), "float32": (2e19, 2e18)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_potentials_beyond_the_dtype_are_reported(dtype, rng):
    """float16 holds up to 65504, and f carries the costs' scale: costs ~ 1.8e5 from float16
    points give potentials that fit in no gauge ((f + c, g - c): max |f|, |g| >= max (f + g) / 2).
    Reported per problem (the batch's second problem fits), never stored as Inf; the plan fits
    and stays right."""
    backend = ("torch", "cpu") if dtype == "bfloat16" else ("numpy", None)
    if backend[0] == "torch":
        pytest.importorskip("torch")
    n, offsets = 20, np.array(OFFSETS[dtype])
    scale = offsets[0] / 30
    x = make(scale * rng.random((2, n, 2)), backend, dtype)
    y = make(scale * rng.random((2, n, 2)) + offsets[:, None, None], backend, dtype)
    ab = make(np.full((2, n), 1 / n), backend, dtype)
    xs, ys, a = to_numpy(x), to_numpy(y), to_numpy(ab)
    reg = scale * offsets[0] / 3
    P, info = curvkit.sinkhorn(ab, ab, x=x, y=y, reg=reg, tol=1e-11, return_info=True)
    assert info["potentials_overflow"].tolist() == [True, False] and info["converged"].tolist() == [False, True]
    for k in range(2):
        C = ((xs[k][:, None] - ys[k][None]) ** 2).sum(-1)
        P_ref, f_ref, g_ref = sinkhorn_log(a[k], a[k], C, reg, tol=1e-12)
        fg_ref = f_ref[:, None] + g_ref[None, :]
        assert (fg_ref.max() / 2 > DTYPE_MAX[dtype]) == (k == 0)  # the float64 reference's potentials
        f, g = to_numpy(info["f"][k]), to_numpy(info["g"][k])
        assert np.isfinite(f).all() and np.isfinite(g).all()
        if k == 0:
            assert (f == 0).all() and (g == 0).all()
        else:
            assert np.abs(f[:, None] + g[None, :] - fg_ref).max() <= 1e-2 * C.max()
        assert np.abs(to_numpy(P[k]) - P_ref).max() <= PLAN_TOL[dtype] * P_ref.max()
    with curvkit.failure_policy("raise"), pytest.raises(curvkit.ConvergenceError) as e:
        curvkit.sinkhorn(ab, ab, x=x, y=y, reg=reg, tol=1e-11)
    assert e.value.info["potentials_overflow"].tolist() == [True, False]


@needs_torch
def test_torch_gradients_by_the_envelope_theorem(rng):
    import torch

    import curvkit.torch as ct

    a, b, C = problem(rng, 5, 6)
    Ct = torch.from_numpy(C).requires_grad_()
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    options = dict(reg=0.1, tol=1e-14)
    assert torch.autograd.gradcheck(lambda C_: ct.sinkhorn_cost(at, bt, C_, **options), (Ct,))
    x = torch.from_numpy(rng.random((5, 2))).requires_grad_()
    y = torch.from_numpy(rng.random((6, 2))).requires_grad_()
    for cost, p in (("sqeuclidean", 2.0), ("euclidean", 2.0), ("l1", 2.0), ("pnorm", 3.0)):
        assert torch.autograd.gradcheck(
            lambda x_, y_, cost=cost, p=p: ct.sinkhorn_cost(at, bt, x=x_, y=y_, cost=cost, p=p, **options), (x, y))
    # a and b: along mass-preserving directions
    a_var = at.clone().requires_grad_()
    ct.sinkhorn_cost(a_var, bt, Ct.detach(), **options).backward()
    d = torch.zeros(5, dtype=torch.float64)
    d[1], d[3] = 1e-6, -1e-6
    numeric = (ct.sinkhorn_cost(at + d, bt, Ct.detach(), **options) - ct.sinkhorn_cost(at - d, bt, Ct.detach(),
                                                                                     **options)) / 2
    assert abs(float(numeric) - float(a_var.grad @ d)) <= 1e-6 * abs(float(numeric)) + 1e-14
    # batched losses
    Cb = torch.from_numpy(rng.random((3, 5, 6))).requires_grad_()
    loss = ct.sinkhorn_cost(None, None, Cb, reg=0.1)
    assert loss.shape == (3,)
    loss.sum().backward()
    assert torch.allclose(Cb.grad.sum((1, 2)), torch.ones(3, dtype=torch.float64), atol=1e-8)  # the plans' mass


@needs_torch
def test_torch_sinkhorn_cost_compiles_and_refuses_a_double_backward(rng):
    import torch

    import curvkit.torch as ct

    a, b, C = problem(rng, 5, 6)
    at, bt, Ct = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(C).requires_grad_()
    x = torch.from_numpy(rng.random((5, 2))).requires_grad_()
    y = torch.from_numpy(rng.random((6, 2)))

    def loss(C_, x_):
        return ct.sinkhorn_cost(at, bt, C_, reg=0.1, tol=1e-13) + ct.sinkhorn_cost(None, bt, x=x_, y=y, reg=0.1)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")  # fails on any graph break
    value = compiled(Ct, x)
    torch.testing.assert_close(value, loss(Ct, x), atol=0, rtol=0)
    for g_compiled, g_eager in zip(torch.autograd.grad(value, (Ct, x)), torch.autograd.grad(loss(Ct, x), (Ct, x))):
        torch.testing.assert_close(g_compiled, g_eager, atol=0, rtol=0)
    torch._dynamo.reset()
    torch.library.opcheck(torch.ops.curvkit.sinkhorn_cost.default,
                          (at, bt, Ct.detach(), None, None, None, None, "sqeuclidean", 2.0, 0.1, "auto", 1e-12, 10000,
                           200, None, False))
    (g,) = torch.autograd.grad(ct.sinkhorn_cost(at, bt, Ct, reg=0.1), Ct, create_graph=True)
    with pytest.raises(RuntimeError, match="curvkit.sinkhorn_cost_backward.*no autograd formula"):
        g.sum().backward()


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_sparse_plan(framework, rng):
    pytest.importorskip("scipy" if framework == "numpy" else "torch")
    x = rng.random((40, 2))
    y = x + 1e-4 * rng.standard_normal(x.shape)
    a, b, C = problem(rng, 30, 35)
    if framework == "torch":
        import torch

        x, y, a, b, C = (torch.from_numpy(v) for v in (x, y, a, b, C))
    S = curvkit.sinkhorn(None, None, x=x, y=y, reg=1e-4, sparse_tol=1e-9)
    dense = to_numpy(curvkit.sinkhorn(None, None, x=x, y=y, reg=1e-4))
    S_dense = S.toarray() if framework == "numpy" else S.to_dense().numpy()
    kept = dense >= 1e-9
    assert (S_dense[kept] == dense[kept]).all() and (S_dense[~kept] == 0).all()
    assert kept.sum() < 2 * 40  # nearly the identity
    plans = curvkit.sinkhorn(a[None].repeat(2, 0) if framework == "numpy" else a.repeat(2, 1),
                             b[None].repeat(2, 0) if framework == "numpy" else b.repeat(2, 1),
                             C[None].repeat(2, 0) if framework == "numpy" else C.repeat(2, 1, 1),
                             reg=0.05, sparse_tol=0.0 + 1e-300)
    assert isinstance(plans, list) and len(plans) == 2
    full = to_numpy(curvkit.sinkhorn(a, b, C, reg=0.05))
    for S in plans:
        S_dense = S.toarray() if framework == "numpy" else S.to_dense().numpy()
        np.testing.assert_array_equal(S_dense, full)


def test_sparse_plan_on_cuda(cuda_backend, rng):
    """Built on the device, returned there: the entries >= sparse_tol * mass of the dense plan,
    bit for bit (the same expression of the same potentials)."""
    x = rng.random((40, 2))
    y = x + 1e-4 * rng.standard_normal(x.shape)
    a, b, C = problem(rng, 30, 35, batch=(2,))
    x_d, y_d, a_d, b_d, C_d = (make(v, cuda_backend) for v in (x, y, a, b, C))
    cases = [(curvkit.sinkhorn(None, None, x=x_d, y=y_d, reg=1e-4, sparse_tol=1e-9),
              curvkit.sinkhorn(None, None, x=x_d, y=y_d, reg=1e-4), 1e-9)]
    cases += [(S, P, 1e-3) for S, P in zip(curvkit.sinkhorn(a_d, b_d, C_d, reg=0.05, sparse_tol=1e-3),
                                           curvkit.sinkhorn(a_d, b_d, C_d, reg=0.05))]
    for S, dense, sparse_tol in cases:
        S_dense = to_numpy(S.to_dense() if cuda_backend[0] == "torch" else S.toarray())
        dense = to_numpy(dense)
        kept = dense >= sparse_tol
        assert 0 < kept.sum() < dense.size
        assert (S_dense[kept] == dense[kept]).all() and (S_dense[~kept] == 0).all()


def test_sparse_plan_of_half_inputs(rng):
    """SciPy does not compute in float16: the plan comes back float32, its entries those of the
    float16 potentials (documented: about ten times the dense plan's error)."""
    pytest.importorskip("scipy")
    x, y = (10 * rng.random((50, 2))).astype(np.float16), (10 * rng.random((50, 2))).astype(np.float16)
    u = np.full(50, 1 / 50, dtype=np.float16)
    S = curvkit.sinkhorn(u, u, x=x, y=y, reg=1.0, sparse_tol=1e-12)
    dense = curvkit.sinkhorn(u, u, x=x, y=y, reg=1.0).astype(np.float64)
    assert S.dtype == np.float32 and S.nnz > 0
    assert np.abs(S.toarray() - dense).max() <= 20 * PLAN_TOL["float16"] * dense.max()
