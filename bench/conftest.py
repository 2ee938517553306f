"""Benchmark session helpers: each benchmark records its implementation and the bytes it
writes or the flops it does; the summary prints, per group, every implementation's time,
rate (GB/s or GFLOP/s) or accuracy (relative error), and ratio to curvkit's."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        if bench.stats is None:  # pragma: no cover - a benchmark that failed
            continue
        groups.setdefault(bench.group, []).append(bench)
    tr = terminalreporter
    tr.write_sep("=", "curvkit vs anchors (median time; ratio = other time / curvkit time; xN: budget scaled N times)")
    tr.write_line(f"{'group':34s} {'impl':18s} {'median ms':>10s} {'rate':>28s} {'ratio':>7s}")
    for group, benches in sorted(groups.items()):
        ours = next((b for b in benches if b.extra_info.get("impl") == "curvkit"), None)
        for b in sorted(benches, key=lambda b: b.extra_info.get("impl", "")):
            # implementations timed in turn within one benchmark (_in_turn.py): each one's median
            in_turn = b.extra_info.get("in_turn", {})
            for impl, t in in_turn.items():
                tr.write_line(f"{group:34s} {impl:18s} {t * 1e3:10.3f} {'-':>28s} {t / in_turn['curvkit']:7.2f}")
            if in_turn:
                continue
            # a solve timed over a fixed budget of iterations, scaled to its count at the tolerance
            median = b.stats.median * b.extra_info.get("scale", 1.0)
            if "flops" in b.extra_info:
                rate = f"{b.extra_info['flops'] / median / 1e9:9.1f} GF/s"
            elif "bytes" in b.extra_info:
                rate = f"{b.extra_info['bytes'] / median / 1e9:9.2f} GB/s"
            else:
                rate = "-"
            if "rel_error" in b.extra_info:
                rate = f"err {b.extra_info['rel_error']:.1e}"
            if "iterations" in b.extra_info:
                rate += f", {b.extra_info['iterations']:.1f} it"
            if "matmuls" in b.extra_info:
                rate += f", {b.extra_info['matmuls']:.1f} mm"
            if "scale" in b.extra_info:
                rate += f" x{b.extra_info['scale']:.0f}"
            if b.extra_info.get("fell_back"):
                rate += f", {b.extra_info['fell_back']} fb"
            ratio = median / (ours.stats.median * ours.extra_info.get("scale", 1.0)) if ours else float("nan")
            impl = b.extra_info.get("impl", "?")
            tr.write_line(f"{group:34s} {impl:18s} {median * 1e3:10.3f} {rate:>28s} {ratio:7.2f}")
