"""Entropic OT: curvkit.sinkhorn against POT's sinkhorn_log and sinkhorn_stabilized (and its
batched solver), side by side in one run. Run: python -m pytest bench/bench_sinkhorn.py --benchmark-only

Groups (time to the tolerance; ratio = anchor time / curvkit time):
  sns-assignment-n500   C ~ U[0, 1], uniform marginals, reg = 1/1200, L1 marginal error 1e-9 (the
                        SNS paper's case). POT and curvkit's own log-domain Sinkhorn are timed
                        over a fixed budget and scaled to the iteration count log-domain Sinkhorn
                        needs on this draw ("x N it" in the table: extrapolated).
  regot1-n{n}           RegOT's Synthetic I: the same costs with reg = 1e-3, tol 1e-6 (n = 5000: timed
                        runs only).
  grid28-{l1,sqeuclidean}  a 28 x 28 grid, cost / max, blob marginals, reg = 1e-3, tol 1e-6.
  easy-points500-reg{1,0.1}  squared distances of 500 random 2-D points, reg = 1 and 0.1, tol 1e-6:
                        Sinkhorn converges in 3 and 20 iterations; "auto" must not pay for Newton.
  batch-64x256          64 problems of 256 x 256 (sqeuclidean costs of random 2-D points), reg = 0.01,
                        tol 1e-6 per problem: curvkit's batched call against ot.batch.solve_batch.
"curvkit" is the default method="auto" (Sinkhorn, handing over to Newton when its rate is slow),
"curvkit-sns" method="sns" (20 Sinkhorn iterations, then Newton) and "curvkit-log" method="log",
side by side: "auto" should be within ~1.2x of the better of the two on every case.
CUDA (-k cuda, on a GPU machine): the same groups prefixed "cuda-", POT on torch CUDA tensors.
Each log-domain iteration reads the n x m cost twice and takes 2 n m exponentials: the table's
rate is those exponentials per second.
"""
import functools

import numpy as np
import pytest
from baselines.sinkhorn import marginal_error, ot_assignment, ot_grid, pot_batch, pot_sinkhorn

import curvkit

ot = pytest.importorskip("ot")

def _budget(request, n, m):
    """Iterations per timed round of a fixed-budget run: about 2.5e7 cost entries' worth, 10 to
    100 (10 in the smoke run)."""
    if not _timing(request):
        return 10
    return int(min(100, max(10, 2.5e7 / (n * m))))


def _timing(request):
    return not request.config.getoption("benchmark_disable")


@functools.lru_cache(maxsize=None)
def _log_iterations(case, tol):
    """Iterations log-domain Sinkhorn needs on a case (curvkit's, the same iterates as POT's)."""
    a, b, C, reg = CASES[case]()
    _, info = curvkit.sinkhorn(a, b, C, reg=reg, method="log", tol=tol, max_iter=1_000_000, return_info=True)
    return int(info["iterations"])


def _points(n, reg, seed=1):
    """Squared distances of n random 2-D points to n others, uniform marginals: easy at large reg."""
    rng = np.random.default_rng(seed)
    x, y = rng.random((n, 2)), rng.random((n, 2))
    a = np.full(n, 1 / n)
    return a, a.copy(), ((x[:, None] - y[None]) ** 2).sum(-1), reg


CASES = {
    "sns-assignment-n500": lambda: ot_assignment(500) + (1 / 1200,),
    "regot1-n1000": lambda: ot_assignment(1000, seed=42) + (1e-3,),
    "regot1-n5000": lambda: ot_assignment(5000, seed=42) + (1e-3,),
    "grid28-l1": lambda: ot_grid(cost="l1") + (1e-3,),
    "grid28-sqeuclidean": lambda: ot_grid(cost="l2") + (1e-3,),
    "easy-points500-reg1": lambda: _points(500, 1.0),
    "easy-points500-reg0.1": lambda: _points(500, 0.1),
}
TOLS = {"sns-assignment-n500": 1e-9}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["curvkit", "curvkit-sns", "curvkit-log", "pot-log", "pot-stabilized"])
def test_time_to_tolerance(benchmark, request, case, impl):
    if case == "regot1-n5000" and not _timing(request):
        pytest.skip("large case: timed runs only")
    a, b, C, reg = CASES[case]()
    tol = TOLS.get(case, 1e-6)
    n, m = C.shape
    benchmark.group = case
    benchmark.extra_info.update(impl=impl, flops=2.0 * n * m)
    if impl in ("curvkit", "curvkit-sns"):  # "auto" (the default) and "sns", to the tolerance
        method = "sns" if impl == "curvkit-sns" else "auto"
        P, info = benchmark(curvkit.sinkhorn, a, b, C, reg=reg, tol=tol, method=method, return_info=True)
        assert info["converged"] and marginal_error(P, a, b) <= tol * 1.001
        benchmark.extra_info.update(iterations=float(info["iterations"]), newton=int(info["newton_steps"]),
                                    flops=2.0 * n * m * (info["iterations"] + 3 * info["newton_steps"]))
        return
    # anchors (and curvkit's own log-domain Sinkhorn): a fixed budget, scaled to the count
    budget = _budget(request, n, m)
    count = _log_iterations(case, tol) if _timing(request) else budget
    budget = min(budget, count)  # an easy case is timed whole (curvkit's "log" stops at tol)
    if impl == "curvkit-log":
        benchmark(curvkit.sinkhorn, a, b, C, reg=reg, method="log", tol=tol, max_iter=budget, return_info=True)
    else:
        method = "sinkhorn_log" if impl == "pot-log" else "sinkhorn_stabilized"
        benchmark(pot_sinkhorn, a, b, C, reg, budget, method)
    benchmark.extra_info.update(iterations=float(count), scale=count / budget, flops=2.0 * n * m * count)


@pytest.mark.parametrize("impl", ["curvkit", "curvkit-sns", "curvkit-log", "pot-batch"])
def test_batched_small_problems(benchmark, request, impl):
    if impl in ("pot-batch", "curvkit-log") and not _timing(request):
        pytest.skip("POT's batched solve takes a minute, log-domain Sinkhorn seconds: timed runs only")
    rng = np.random.default_rng(0)
    B, n = 64, 256
    x, y = rng.random((B, n, 2)), rng.random((B, n, 2))
    C = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    a = np.full((B, n), 1 / n)
    reg, tol = 0.01, 1e-6
    benchmark.group = f"batch-{B}x{n}"
    benchmark.extra_info.update(impl=impl)
    if impl.startswith("curvkit"):  # "auto", "sns" and "log", each to the tolerance
        method = {"curvkit": "auto", "curvkit-sns": "sns", "curvkit-log": "log"}[impl]
        P, info = benchmark(curvkit.sinkhorn, a, a, C, reg=reg, tol=tol, method=method, return_info=True)
        assert info["converged"].all()
        benchmark.extra_info.update(iterations=float(info["iterations"].mean()),
                                    newton=float(info["newton_steps"].mean()))
    else:
        P = benchmark(pot_batch, a, a, C, reg, tol)
    worst = max(marginal_error(P[k], a[k], a[k]) for k in range(B))
    benchmark.extra_info.update(rel_error=worst)


# ---- CUDA (run with -k cuda on a GPU machine): the same cases as torch CUDA tensors, curvkit
# ("auto" and "log") beside POT's sinkhorn_log on the same device (a fixed budget scaled to the
# log-domain iteration count, as above), and the batched case against POT's batched solver there.
def _cuda_ready():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and curvkit.has_cuda()


cuda = pytest.mark.skipif(not _cuda_ready(), reason="needs a GPU, PyTorch with CUDA and a CUDA build of curvkit")


def _on_gpu(*values):
    import torch

    return [torch.from_numpy(v).cuda() if isinstance(v, np.ndarray) else v for v in values]


def _synchronized(benchmark, fn):
    """Times fn() with the device synchronized after each call; returns its last result."""
    import torch

    out = []

    def run():
        out[:] = [fn()]
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    return out[0]


@cuda
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["curvkit", "curvkit-sns", "curvkit-log", "pot-log"])
def test_cuda_time_to_tolerance(benchmark, request, case, impl):
    a, b, C, reg = _on_gpu(*CASES[case]())
    tol = TOLS.get(case, 1e-6)
    n, m = C.shape
    benchmark.group = f"cuda-{case}"
    benchmark.extra_info.update(impl=impl, flops=2.0 * n * m)
    if impl in ("curvkit", "curvkit-sns"):
        method = "sns" if impl == "curvkit-sns" else "auto"
        P, info = _synchronized(benchmark, lambda: curvkit.sinkhorn(a, b, C, reg=reg, tol=tol, method=method,
                                                                    return_info=True))
        assert info["converged"] and info["marginal_error"] <= tol
        benchmark.extra_info.update(iterations=float(info["iterations"]), newton=int(info["newton_steps"]),
                                    flops=2.0 * n * m * (info["iterations"] + 3 * info["newton_steps"]))
        return
    budget = _budget(request, n, m)
    count = _log_iterations(case, tol) if _timing(request) else budget
    budget = min(budget, count)
    if impl == "curvkit-log":
        _synchronized(benchmark, lambda: curvkit.sinkhorn(a, b, C, reg=reg, method="log", tol=tol, max_iter=budget,
                                                          return_info=True))
    else:
        _synchronized(benchmark, lambda: pot_sinkhorn(a, b, C, reg, budget, "sinkhorn_log"))
    benchmark.extra_info.update(iterations=float(count), scale=count / budget, flops=2.0 * n * m * count)


@cuda
@pytest.mark.parametrize("impl", ["curvkit", "pot-batch"])
def test_cuda_batched_small_problems(benchmark, impl):
    rng = np.random.default_rng(0)
    B, n = 64, 256
    x, y = rng.random((B, n, 2)), rng.random((B, n, 2))
    a, C = _on_gpu(np.full((B, n), 1 / n), ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1))
    reg, tol = 0.01, 1e-6
    benchmark.group = f"cuda-batch-{B}x{n}"
    benchmark.extra_info.update(impl=impl)
    if impl == "curvkit":
        P, info = _synchronized(benchmark, lambda: curvkit.sinkhorn(a, a, C, reg=reg, tol=tol, return_info=True))
        assert info["converged"].all()
        benchmark.extra_info.update(iterations=float(info["iterations"].mean()))
    else:
        P = _synchronized(benchmark, lambda: pot_batch(a, a, C, reg, tol))
    P = P.cpu().numpy()
    a_host = a.cpu().numpy()
    benchmark.extra_info.update(rel_error=max(marginal_error(P[k], a_host[k], a_host[k]) for k in range(B)))


# ---- The "auto" decision swept (python bench/bench_sinkhorn.py): time to tolerance of "auto",
# "sns" and "log" on one thread, best of 3, over problems from easy to hard; a markdown table.
def sweep_auto(reps=3):
    import time

    curvkit.set_num_threads(1)
    problems = [(f"500 points, reg {reg}", _points(500, reg)) for reg in (0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005)]
    problems += [(f"assignment n=700, reg {reg}", ot_assignment(700, seed=7) + (reg,))
                 for reg in (0.05, 0.02, 0.01, 0.005, 0.003, 0.002)]
    print("| problem | tol | auto | sns | log | auto / better |\n|---|---|---|---|---|---|")
    for name, (a, b, C, reg) in problems:
        for tol in (1e-6, 1e-9):
            times, cells = {}, []
            for method in ("auto", "sns", "log"):
                best = float("inf")
                for _ in range(reps):
                    start = time.perf_counter()
                    _, info = curvkit.sinkhorn(a, b, C, reg=reg, tol=tol, method=method, max_iter=20000,
                                               return_info=True)
                    best = min(best, time.perf_counter() - start)
                assert info["converged"]
                times[method] = best
                cells.append(f"{best * 1e3:.1f} ms ({info['iterations']} + {info['newton_steps']})")
            print(f"| {name} | {tol:.0e} | " + " | ".join(cells) +
                  f" | {times['auto'] / min(times['sns'], times['log']):.2f} |")


if __name__ == "__main__":
    sweep_auto()
