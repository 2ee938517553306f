"""``python -m curvkit.bench``: curvkit against each anchor, side by side, on this machine.

For every case of each family (a kernel at a few sizes) the command times curvkit and the
anchor (:mod:`curvkit.testing.anchors`, the published algorithm in plain PyTorch) in one
process, one after the other on the same inputs (or each in a fresh process with
``--isolate``), and reports the median times, their ratio (anchor time / curvkit time: above
1 means curvkit is faster), and the rate of each (GFLOP/s for compute-bound kernels, GB/s for
memory-bound ones) as a fraction of this machine's own GEMM, copy or read rate, measured
first by the command. It names the machine (CPU model, ISA extensions, BLAS and its kernel, GPU) and
writes ``bench.md``, ``bench.csv``, ``bench_machine.json`` (the machine and its rates) and, with
matplotlib, ``img/bench_<family>.png`` (time against size, curvkit solid, anchor dashed). The
1-minute load average before and after is in the machine list: another job on the machine
makes the figures noisy, and ``--threads 1`` makes them less so.

::

    python -m curvkit.bench [families ...] [--quick] [--isolate] [--device cpu|cuda] [--out DIR]
                            [--threads N] [--no-plots]

``--quick`` runs the small sizes with short timing budgets (under two minutes on a 2-core
machine). A new family adds one entry to :data:`FAMILIES`, a list of :class:`Case`.

Examples
--------
>>> from curvkit import bench
>>> sorted(bench.FAMILIES)
['hutchinson', 'inverse_root', 'mfac', 'newton_schulz', 'sinkhorn']
>>> seconds = bench.median_time(lambda: sum(range(100)), budget=0.01)
>>> seconds > 0
True
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

import curvkit

from . import _report, testing
from .testing import anchors

# ---- timing


def median_time(fn: Callable[[], Any], budget: float = 0.2, max_runs: int = 50, sync: Callable[[], Any] = lambda: None
                ) -> float:
    """Median wall time of ``fn()`` in seconds, after one warm-up call, over as many runs as fit
    in ``budget`` seconds (at least 3, at most ``max_runs``); ``sync`` waits for queued GPU work."""
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def machine_rates(quick: bool = False) -> dict[str, float]:
    """This machine's own rates: GEMM in GFLOP/s (torch.matmul, float32 and float64 square
    products of 1024, or 512 with ``quick``); in GB/s the copy rate (bytes read + written, the
    faster of np.copyto and torch's copy_ of 64 MiB) and the read rate (torch's float32 G @ x
    over a 128 MiB G, as bench/results/mfac_cpu.md measures it)."""
    import torch

    n = 512 if quick else 1024
    budget = 0.3 if quick else 1.0
    generator = torch.Generator().manual_seed(0)
    rates = {}
    for name in ("float32", "float64"):
        dtype = getattr(torch, name)
        a = torch.randn(n, n, dtype=dtype, generator=generator)
        b = torch.randn(n, n, dtype=dtype, generator=generator)
        c = torch.empty(n, n, dtype=dtype)
        seconds = median_time(functools.partial(torch.matmul, a, b, out=c), budget=budget)
        rates[f"gemm_{name}"] = 2 * n ** 3 / seconds / 1e9
    src = np.ones(8 << 20)
    dst = np.empty_like(src)
    seconds = min(median_time(functools.partial(np.copyto, dst, src), budget=budget),
                  median_time(functools.partial(torch.from_numpy(dst).copy_, torch.from_numpy(src)), budget=budget))
    rates["copy"] = 2 * src.nbytes / seconds / 1e9
    G = torch.ones(32, 1 << 20, dtype=torch.float32)
    x = torch.ones(1 << 20, dtype=torch.float32)
    seconds = median_time(functools.partial(torch.mv, G, x), budget=budget)
    rates["read"] = G.numel() * 4 / seconds / 1e9
    return rates


# ---- the cases


@dataclass(frozen=True)
class Case:
    """One kernel at a list of sizes.

    ``setup(n, dtype, device) -> (curvkit_fn, anchor_fn)``: two zero-argument callables on the
    same inputs (the anchor's None when it has none). ``work(n, dtype) -> (amount, unit)``:
    the flops ("flop", compared with the GEMM rate), bytes read and written ("byte", with the
    copy rate) or bytes read ("read", with the read rate) one call does, or None."""

    name: str
    anchor: str
    sizes: tuple[int, ...]
    quick_sizes: tuple[int, ...]
    dtype: str
    setup: Callable[[int, str, str], tuple[Callable[[], Any], Optional[Callable[[], Any]]]]
    work: Callable[[int, str], Optional[tuple[float, str]]]


def _torch() -> Any:
    import torch

    return torch


def _pair(x: np.ndarray, dtype: str, device: str) -> tuple[Any, Any]:
    """x as curvkit's input (NumPy on the CPU, torch on a GPU) and as the anchor's (torch)."""
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=getattr(torch, dtype))
    return (np.ascontiguousarray(x, dtype=dtype) if device == "cpu" else t), t


def _polar(n: int, dtype: str, device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    G = np.random.default_rng(n).standard_normal((n, n))
    ours, theirs = _pair(G, dtype, device)
    return (lambda: curvkit.polar(ours, 5)), (lambda: anchors.muon_newton_schulz(theirs, 5))


def _spd(n: int) -> np.ndarray:
    return testing.spd_with_condition(np.random.default_rng(n), n, 1e3)


def _sqrt(n: int, dtype: str, device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    ours, theirs = _pair(_spd(n), dtype, device)
    return (lambda: curvkit.matrix_sqrt(ours)), (lambda: anchors.eigh_sqrt(theirs))


def _root(n: int, dtype: str, device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    ours, theirs = _pair(_spd(n), dtype, device)
    return (lambda: curvkit.matrix_inverse_root(ours, 4, eps=1e-6)), (lambda: anchors.eigh_root(theirs, 4, 1e-6))


def _eigenbasis(n: int, dtype: str, device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    A = _spd(n)
    rng = np.random.default_rng(n + 1)
    Q = np.linalg.qr(np.linalg.eigh(A)[1] + 1e-2 * rng.standard_normal((n, n)))[0]  # a basis off by a step
    ours_a, theirs_a = _pair(A, dtype, device)
    ours_q, theirs_q = _pair(Q, dtype, device)
    return (lambda: curvkit.eigenbasis_update(ours_a, ours_q)), (lambda: anchors.soap_qr_refresh(theirs_a, theirs_q))


def _probes(n: int, dtype: str, device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    torch = _torch()
    generator = torch.Generator(device=device).manual_seed(0)
    like = None if device == "cpu" else torch.empty(0, device=device)
    ours = (lambda: curvkit.probes(n, "gaussian", dtype=dtype)) if like is None else \
        (lambda: curvkit.probes(n, "gaussian", like=like, dtype=getattr(torch, dtype)))
    return ours, (lambda: anchors.torch_probes(n, "gaussian", getattr(torch, dtype), device, generator))


def _xtrace(n: int, dtype: str, device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    torch = _torch()
    A = testing.spd_with_spectrum(np.random.default_rng(n), testing.xtrace_spectrum("exp9", n))
    ours, theirs = _pair(A, dtype, device)
    generator = torch.Generator(device=device).manual_seed(0)
    return (lambda: curvkit.trace_estimate(ours, None, TRACE_MATVECS, method="xtrace", dtype=dtype)), \
        (lambda: anchors.xtrace_per_probe(lambda v: theirs @ v, n, TRACE_MATVECS, generator, theirs.dtype, device))


TRACE_MATVECS = 60
MFAC_M = 32


def _mfac(d: int, dtype: str, device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    torch = _torch()
    G, damp = testing.gradient_window(np.random.default_rng(d), MFAC_M, d, kappa=1e3)
    x = np.random.default_rng(d + 1).standard_normal(d)
    ours_x, theirs_x = _pair(x, dtype, device)
    window = curvkit.FisherWindow(d, MFAC_M, damp, dtype=dtype, like=ours_x)
    anchor = anchors.MFACDynamic(d, MFAC_M, damp, dtype=getattr(torch, dtype), device=device)
    for g in G:
        ours_g, theirs_g = _pair(g, dtype, device)
        window.push(ours_g)
        anchor.push(theirs_g)
    return (lambda: window.ihvp(ours_x)), (lambda: anchor.ihvp(theirs_x))


SINKHORN_REG, SINKHORN_TOL = 1e-2, 1e-6


def _sinkhorn(n: int, dtype: str, device: str) -> tuple[Callable[[], Any], Optional[Callable[[], Any]]]:
    a, b, C = testing.ot_assignment(n, seed=n)
    ours = [_pair(v, dtype, device)[0] for v in (a, b, C)]

    def anchor() -> Any:
        # POT stops on the 2-norm of the column error, checked every 10 iterations: at least as
        # strict as curvkit's L1 stop at the same tolerance
        return anchors.pot_sinkhorn(a, b, C, SINKHORN_REG, 100_000, "sinkhorn_log", SINKHORN_TOL)

    try:
        import ot  # noqa: F401  (the anchor: POT, when installed)
    except ImportError:
        return (lambda: curvkit.sinkhorn(*ours, reg=SINKHORN_REG, tol=SINKHORN_TOL)), None
    return (lambda: curvkit.sinkhorn(*ours, reg=SINKHORN_REG, tol=SINKHORN_TOL)), anchor


def _itemsize(dtype: str) -> int:
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]


# Nominal flop counts, the same for both sides so that the rates compare: a Muon step does
# three products of n^3 multiply-adds on a square matrix (X X^T, A A, B X); a symmetric
# eigendecomposition with vectors ~9 n^3 (Golub & Van Loan, Matrix Computations, 4th ed.,
# section 8.3) plus the rebuild V diag(f(w)) V^T, 2 n^3; SOAP's refresh the power step A Q, 2 n^3,
# and a QR with Q formed, 8/3 n^3 (geqrf and orgqr, 4/3 n^3 each).
FAMILIES: dict[str, list[Case]] = {
    "newton_schulz": [
        Case("polar, Muon 5 steps", "Muon NS5 (torch)", (256, 512, 1024), (128, 256), "float32", _polar,
             lambda n, dtype: (5 * 3 * 2.0 * n ** 3, "flop")),
        Case("matrix_sqrt (auto: eigh on CPU)", "eigh in float64 (torch)", (128, 256, 512), (64, 128), "float32",
             _sqrt, lambda n, dtype: (11.0 * n ** 3, "flop")),
    ],
    "inverse_root": [
        Case("matrix_inverse_root p=4 (auto)", "Distributed Shampoo eigh (torch)", (128, 256, 512), (64, 128),
             "float32", _root, lambda n, dtype: (11.0 * n ** 3, "flop")),
        Case("eigenbasis_update (SOAP's refresh)", "SOAP QR refresh (torch)", (256, 512, 1024), (128, 256),
             "float32", _eigenbasis, lambda n, dtype: (14.0 / 3.0 * n ** 3, "flop")),
    ],
    "hutchinson": [
        Case("probes, gaussian", "torch.randn", (1 << 20, 1 << 23), (1 << 18, 1 << 20), "float32", _probes,
             lambda n, dtype: (float(n * _itemsize(dtype)), "byte")),
        Case(f"trace_estimate xtrace, {TRACE_MATVECS} matvecs", "XTrace per-probe loop (torch)", (1000, 2000),
             (500,), "float64", _xtrace, lambda n, dtype: (2.0 * n * n * TRACE_MATVECS, "flop")),
    ],
    "mfac": [
        # two passes over G (G x, then G^T w): the bytes read bound the product
        Case(f"FisherWindow.ihvp, m={MFAC_M}", "M-FAC dynamic (torch)", (1 << 16, 1 << 18, 1 << 20),
             (1 << 14, 1 << 17), "float32", _mfac, lambda d, dtype: (2.0 * MFAC_M * d * _itemsize(dtype), "read")),
    ],
    "sinkhorn": [
        # the iteration counts differ by method: no common work count, times and ratios only
        Case(f"sinkhorn (auto) to {SINKHORN_TOL:g}, assignment, reg {SINKHORN_REG:g}", "POT sinkhorn_log",
             (256, 512, 1024), (128, 256), "float64", _sinkhorn, lambda n, dtype: None),
    ],
}
"""The registry: family name -> its cases. A new family is one entry."""

COLUMNS = ("family", "case", "impl", "dtype", "device", "n", "median_s", "rate", "unit", "peak_fraction", "ratio")


def _sync(device: str) -> Callable[[], Any]:
    if device == "cpu":
        return lambda: None
    return _torch().cuda.synchronize


def _time_one(family: str, index: int, n: int, impl: str, device: str, budget: float) -> float:
    case = FAMILIES[family][index]
    ours, theirs = case.setup(n, case.dtype, device)
    fn = ours if impl == "curvkit" else theirs
    if fn is None:
        return math.nan
    # NumPy's OpenBLAS threads, woken by the setup, spin ~0.1 s before they sleep: let them
    time.sleep(0.25)
    return median_time(fn, budget=budget, sync=_sync(device))


def _time_pair(family: str, index: int, n: int, device: str, budget: float) -> tuple[float, float]:
    """Median times of curvkit and the anchor, their runs interleaved (A B A B ...) so that a
    load that comes and goes on a shared machine weighs on both alike."""
    case = FAMILIES[family][index]
    ours, theirs = case.setup(n, case.dtype, device)
    sync = _sync(device)
    fns = [ours] if theirs is None else [ours, theirs]
    for fn in fns:  # warm-up
        fn()
        sync()
    time.sleep(0.25)  # NumPy's OpenBLAS threads, woken by the setup, spin ~0.1 s before they sleep
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < 3 or (time.perf_counter() - start < 2 * budget and len(times[0]) < 50):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    medians = [float(np.median(t)) for t in times]
    return medians[0], (medians[1] if theirs is not None else math.nan)


def _set_threads(count: int) -> None:
    curvkit.set_num_threads(count)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(count)


def _time_isolated(family: str, index: int, n: int, impl: str, device: str, budget: float) -> float:
    spec = json.dumps([family, index, n, impl, device, budget])
    command = [sys.executable, "-m", "curvkit.bench", "--threads", str(curvkit.get_num_threads()), "--one", spec]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def run(families: Optional[Sequence[str]] = None, quick: bool = False, device: str = "cpu", isolate: bool = False,
        rates: Optional[dict[str, float]] = None, verbose: bool = False) -> list[dict[str, Any]]:
    """Time every case of ``families`` (all by default), curvkit and anchor, and return the
    rows (see :data:`COLUMNS`); ``rates`` (from :func:`machine_rates`) gives the peak fractions."""
    names = list(FAMILIES) if not families else list(families)
    for name in names:
        if name not in FAMILIES:
            raise ValueError(f"unknown family {name!r}; one of {', '.join(FAMILIES)}")
    budget = 0.1 if quick else 1.0
    rows: list[dict[str, Any]] = []
    for name in names:
        for index, case in enumerate(FAMILIES[name]):
            for n in (case.quick_sizes if quick else case.sizes):
                if verbose:
                    _report.progress(f"  {name}: {case.name} n={n} {case.dtype}")
                if isolate:
                    pair = {impl: _time_isolated(name, index, n, impl, device, budget)
                            for impl in ("curvkit", "anchor")}
                else:
                    pair = dict(zip(("curvkit", "anchor"), _time_pair(name, index, n, device, budget)))
                work = case.work(n, case.dtype)
                for impl, seconds in pair.items():
                    row: dict[str, Any] = {"family": name, "case": case.name,
                                           "impl": "curvkit" if impl == "curvkit" else case.anchor,
                                           "dtype": case.dtype, "device": device, "n": n, "median_s": seconds,
                                           "rate": None, "unit": "", "peak_fraction": None,
                                           "ratio": seconds / pair["curvkit"]}
                    if work is not None:
                        amount, unit = work
                        row["rate"] = amount / seconds / 1e9
                        row["unit"] = "GFLOP/s" if unit == "flop" else "GB/s"
                        if rates and device == "cpu":
                            peak = {"flop": rates[f"gemm_{case.dtype}"], "byte": rates["copy"],
                                    "read": rates["read"]}[unit]
                            row["peak_fraction"] = row["rate"] / peak
                    rows.append(row)
    return rows


def _markdown(rows: Sequence[dict[str, Any]], machine: dict[str, str], rates: dict[str, float], command: str,
              isolate: bool) -> str:
    lines = ["# curvkit benchmarks", "", f"Regenerate: `{command}`", "", "Machine:", "",
             *_report.machine_lines(machine), "",
             "This machine's own rates (measured by the command): "
             f"GEMM {rates['gemm_float32']:.1f} GFLOP/s float32, {rates['gemm_float64']:.1f} GFLOP/s float64 "
             f"(torch.matmul); copy {rates['copy']:.1f} GB/s (read + write), read {rates['read']:.1f} GB/s "
             "(np.copyto or torch copy_, the faster; torch float32 G @ x).", "",
             "Median wall time per call, "
             f"{'each side in a fresh process' if isolate else 'both in one process, their runs interleaved'}; "
             "ratio = time / curvkit's time (the anchor's ratio above 1: curvkit is faster); rate in the "
             "case's nominal flops or bytes (the same count for both sides); peak_fraction = rate / the "
             "machine's GEMM rate (flops), copy rate (bytes read and written) or read rate (bytes read).", ""]
    for name in dict.fromkeys(r["family"] for r in rows):
        lines += [f"## {name}", ""]
        lines += _report.markdown_table([{**r, "median_ms": r["median_s"] * 1e3} for r in rows if r["family"] == name],
                                        ("case", "impl", "dtype", "n", "median_ms", "rate", "unit", "peak_fraction",
                                         "ratio"))
        lines += ["", f"![{name}](img/bench_{name}.png)", ""]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], out: Path, quiet: bool = False) -> list[Path]:
    """One PNG per family: median time against size, a panel per case, curvkit solid and the
    anchor dashed. Nothing without matplotlib."""
    plt = _report.pyplot(quiet)
    if plt is None:
        return []
    paths = []
    for name in dict.fromkeys(r["family"] for r in rows):
        ours = [r for r in rows if r["family"] == name]
        cases = list(dict.fromkeys(r["case"] for r in ours))
        fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.2), squeeze=False)
        for ax, case in zip(axes[0], cases):
            for impl in dict.fromkeys(r["impl"] for r in ours if r["case"] == case):
                pts = [r for r in ours if r["case"] == case and r["impl"] == impl]
                ax.plot([int(r["n"]) for r in pts], [float(r["median_s"]) * 1e3 for r in pts],
                        "-" if impl == "curvkit" else "--", marker="o", markersize=3, label=impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(case, fontsize=8)
            ax.set_xlabel("n", fontsize=8)
            ax.set_ylabel("median ms", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
        path = out / "img" / f"bench_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _report.save_figure(plt, fig, path)
        paths.append(path)
    return paths


def _load() -> str:
    """The 1-minute load average against the core count: another job on the machine shows here."""
    try:
        return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m curvkit.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help=f"any of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, short timing (under two minutes)")
    parser.add_argument("--isolate", action="store_true", help="time each side in a fresh process")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="bench-report", help="output folder (default: ./bench-report)")
    parser.add_argument("--threads", type=int, help="threads for curvkit and PyTorch alike (default: as set)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        _set_threads(args.threads)
    if args.one:
        family, index, n, impl, device, budget = json.loads(args.one)
        print(_time_one(family, index, n, impl, device, budget))
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        parser.error("the anchors are PyTorch code: pip install torch")
    if args.device == "cuda" and not curvkit.has_cuda():
        parser.error("--device cuda needs a GPU and a CUDA build of curvkit")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = _report.machine()
    machine["threads"] = str(curvkit.get_num_threads())
    machine["load average before"] = _load()
    _report.progress(f"curvkit.bench on {machine['cpu']} ({machine['core']}; {machine['isa']}), {machine['blas']}, "
                     f"GPU: {machine['gpu']}")
    _report.progress("measuring this machine's GEMM and copy rates")
    rates = machine_rates(args.quick)
    _report.progress(f"  GEMM {rates['gemm_float32']:.1f} / {rates['gemm_float64']:.1f} GFLOP/s (float32 / float64), "
                     f"copy {rates['copy']:.1f} GB/s, read {rates['read']:.1f} GB/s")
    rows = run(args.families, args.quick, args.device, args.isolate, rates, verbose=True)
    machine["load average after"] = _load()
    command = "python -m curvkit.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "bench.md").write_text(_markdown(rows, machine, rates, command.strip(), args.isolate))
    _report.write_csv(out / "bench.csv", rows, COLUMNS)
    described = {**machine, **{k: f"{v:.6g}" for k, v in rates.items()}}
    (out / "bench_machine.json").write_text(json.dumps(described, indent=1))
    plots = [] if args.no_plots else plot(rows, out)
    for r in rows:
        if r["impl"] != "curvkit":
            _report.progress(f"  {r['family']}: {r['case']} n={r['n']}: anchor / curvkit = {r['ratio']:.2f}")
    _report.progress(f"wrote {out / 'bench.md'}, {out / 'bench.csv'} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
