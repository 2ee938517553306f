"""CUDA timings recorded in bench/results/gpu_h100.md: probe generation split into kernel and
call time, polar (Muon) against Muon's NS5 in PyTorch, and the matrix square root against
the eigh route, side by side in one process.
Run on a GPU machine after `bash bench/gpu_run.sh`: python3 bench/gpu_timings.py"""

import os

import numpy as np
import torch

import curvkit

torch.backends.cuda.matmul.allow_tf32 = False


def bench(fn, reps=30):
    """Median milliseconds of `reps` runs, CUDA events, after 3 warm-up runs."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def kernel_ms(fn, reps=10, trace=None):
    """Milliseconds of CUDA kernels per call of fn (torch.profiler), and the kernels' names;
    NaN and no names if the profiler fails (the call times are still worth having). With
    `trace`, a Chrome trace of host and device (3 calls) goes to $OUT/trace.json."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        if trace and os.environ.get("OUT"):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
            prof.export_chrome_trace(os.path.join(os.environ["OUT"], f"{trace}.json"))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", None)
            t = e.self_cuda_time_total if t is None else t
            if t > 0:
                kernels[e.key] = t / reps / 1e3
        return sum(kernels.values()), kernels
    except Exception as error:  # noqa: BLE001 - a profiler problem must not end the run
        print(f"(profiler failed: {error!r})")
        return float("nan"), {}


def graph_ms(fn, like):
    """Median milliseconds of a CUDA graph replay of fn(out) (NaN if capture fails)."""
    out = torch.empty_like(like)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(out)
        return bench(graph.replay)
    except Exception as error:  # noqa: BLE001 - report and go on with the other timings
        print(f"(graph capture failed: {error!r})")
        return float("nan")


print("== probes, 1e7 entries: call time (CUDA events, median) and kernel time (profiler)")
N = 10_000_000
for kind in ["rademacher", "gaussian", "sphere"]:
    for dt in [torch.float32, torch.float64]:
        like = torch.empty(0, dtype=dt, device="cuda")
        ours = lambda: curvkit.probes(N, kind, seed=1, like=like)  # noqa: E731
        if kind == "rademacher":
            theirs = lambda: torch.randint(0, 2, (N,), device="cuda").to(dt).mul_(2).sub_(1)  # noqa: E731
        elif kind == "gaussian":
            theirs = lambda: torch.randn(N, device="cuda", dtype=dt)  # noqa: E731
        else:
            theirs = lambda: torch.nn.functional.normalize(torch.randn(N, device="cuda", dtype=dt), dim=0)  # noqa: E731
        mb = N * torch.finfo(dt).bits / 8 / 1e6
        (ko, parts), (kt, _) = kernel_ms(ours), kernel_ms(theirs)
        co, ct = bench(ours), bench(theirs)
        split = ", ".join(f"{name.split('(')[0][-40:]} {ms * 1e3:.0f} us" for name, ms in parts.items())
        print(
            f"{kind:10s} {str(dt)[6:]:8s} curvkit call {co * 1e3:6.0f} us kernels {ko * 1e3:6.0f} us "
            f"({mb / ko if ko > 0 else float('nan'):5.0f} GB/s) | "
            f"torch call {ct * 1e3:6.0f} us kernels {kt * 1e3:6.0f} us | call ratio {ct / co:.2f} | {split}",
            flush=True,
        )

print("== polar, 5 muon steps, vs Muon NS5 in torch (median ms of 30, CUDA events)")
for dt, shapes in [
    (torch.bfloat16, [(4096, 4096), (32, 1024, 1024), (8, 2048, 2048), (1024, 4096), (32, 256, 256)]),
    (torch.float32, [(4096, 4096)]),
]:
    for shape in shapes:
        G = torch.randn(*shape, device="cuda").to(dt)
        r = min(shape[-2:])
        c = max(shape[-2:])
        bt = 1 if len(shape) == 2 else shape[0]
        flops = 5 * (4 * r * r * c + 2 * r**3) * bt

        def base():
            a, b, cc = 3.4445, -4.7750, 2.0315
            X = G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)
            for _ in range(5):
                A = X @ X.mT
                B = b * A + cc * A @ A
                X = a * X + B @ X
            return X

        tb = bench(base)
        tk = bench(lambda: curvkit.polar(G, 5, "muon"))
        tu = bench(lambda: curvkit.polar(G, 5, "muon", check_finite=False))  # no host synchronization
        tg = graph_ms(lambda out: curvkit.polar(G, 5, "muon", out=out, check_finite=False), G)
        trace = (
            f"trace_polar_{str(dt)[6:]}_{'x'.join(map(str, shape))}"
            if shape in [(4096, 4096), (32, 1024, 1024)]
            else None
        )
        ko, parts = kernel_ms(lambda: curvkit.polar(G, 5, "muon"), trace=trace)
        top = ", ".join(
            f"{name.split('(')[0][-30:]} {ms:.3f}" for name, ms in sorted(parts.items(), key=lambda kv: -kv[1])[:4]
        )
        print(
            f"{str(dt)[6:]:9s} {str(shape):18s} torch {tb:7.3f} ms ({flops / tb / 1e9:5.0f} TF/s)  "
            f"curvkit {tk:7.3f} ms ({flops / tk / 1e9:5.0f} effective TF/s)  ratio {tb / tk:.2f}"
            f" | unchecked {tu:.3f} ms, CUDA graph {tg:.3f} ms (ratio {tb / tg:.2f}) | "
            f"curvkit kernels {ko:.3f} ms (gaps {tk - ko:.3f}): {top}",
            flush=True,
        )
print("== sqrt, float32 input, cond 1e3: curvkit newton_schulz (float64 inside) vs torch eigh route")
rng = np.random.default_rng(0)
for n in [256, 512, 1024, 2048]:
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.logspace(0, -3, n)
    A64 = (Q * w) @ Q.T
    Sref = (Q * np.sqrt(w)) @ Q.T
    A = torch.tensor(A64, device="cuda", dtype=torch.float32)

    def eigh_sqrt(A):
        w, V = torch.linalg.eigh(A)
        return (V * w.clamp_min(0).sqrt()) @ V.mT

    def err(S):
        return np.linalg.norm(S.double().cpu().numpy() - Sref) / np.linalg.norm(Sref)

    S, info = curvkit.matrix_sqrt(A, return_info=True)
    t1 = bench(lambda: curvkit.matrix_sqrt(A), reps=10)
    t2 = bench(lambda: eigh_sqrt(A), reps=5)
    t3 = bench(lambda: eigh_sqrt(A.double()).float(), reps=5)
    print(
        f"n={n:5d} curvkit {t1:7.2f} ms err {err(S):.1e} ({int(info['iterations'])} steps) | "
        f"eigh f32 {t2:7.2f} ms err {err(eigh_sqrt(A)):.1e} ratio {t2 / t1:.2f} | "
        f"eigh f64 {t3:7.2f} ms ratio {t3 / t1:.2f}",
        flush=True,
    )
