"""python -m curvkit.accuracy and python -m curvkit.bench: their outputs parse, every figure
they claim matches a recomputation, and docs/accuracy.md and docs/bench.md still say what the
commands measure."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import torch

from curvkit import _report, accuracy, bench

DOCS = Path(__file__).resolve().parents[1] / "docs"
needs_matplotlib = pytest.mark.skipif(_report.pyplot(quiet=True) is None, reason="matplotlib is not installed")


def number(cell):
    return None if cell in ("", "-") else float(cell)


def check_ok_column(error, bound, ok):
    if bound is None:
        assert ok == "-"
    else:
        assert ok == ("yes" if error <= bound else "no")


def agrees(claimed, recomputed, bound):
    """A claimed error and its recomputation agree: equal to 3 digits (the table's rounding) on
    the same machine, or both within the bound, or within a factor of 4 (another BLAS build
    rounds differently; errors at rounding level move by small factors)."""
    if math.isinf(claimed) or math.isinf(recomputed):
        return math.isinf(claimed) and math.isinf(recomputed)
    if bound is not None and claimed <= bound and recomputed <= bound:
        return True
    return recomputed <= 4 * claimed + 1e-300 and claimed <= 4 * recomputed + 1e-300


@pytest.fixture(scope="module")
def accuracy_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    assert accuracy.main(["--quick", "--out", str(out)]) == 0
    return out


def test_accuracy_report_parses_and_matches_its_csv(accuracy_report):
    rows = _report.read_csv(accuracy_report / "accuracy.csv")
    tables = _report.parse_markdown_tables((accuracy_report / "accuracy.md").read_text())
    md = [r for table in tables for r in table]
    families = {r["family"] for r in rows}
    assert families == set(accuracy.FAMILIES)
    assert len(tables) == len(families) and len(md) == len(rows)
    for csv_row, md_row in zip(rows, md):
        for key in ("kernel", "method", "impl", "dtype", "n", "param"):
            assert md_row[key] == csv_row[key]
        assert md_row["error"] == _report.format_number(float(csv_row["error"]))
        error, bound = float(csv_row["error"]), number(csv_row["bound"])
        check_ok_column(error, bound, csv_row["ok"])
        assert csv_row["ok"] != "no", csv_row  # curvkit stays within every bound it documents
    assert any(r["impl"] != "curvkit" for r in rows) == (torch is not None)  # anchors beside curvkit


def test_accuracy_figures_match_a_recomputation(accuracy_report):
    rows = _report.read_csv(accuracy_report / "accuracy.csv")
    for row in rows[::3]:
        recomputed = accuracy.measure(row)
        assert recomputed == pytest.approx(float(row["error"]), rel=1e-6) or \
            agrees(float(row["error"]), recomputed, number(row["bound"])), row


@needs_matplotlib
def test_accuracy_plots(accuracy_report):
    pngs = sorted((accuracy_report / "img").glob("accuracy_*.png"))
    assert [p.stem for p in pngs] == sorted(f"accuracy_{f}" for f in accuracy.FAMILIES)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 150_000 for p in pngs)


def test_commands_work_without_matplotlib(tmp_path):
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'matplotlib':\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from curvkit import accuracy\n"
            f"sys.exit(accuracy.main(['mfac', '--quick', '--dtype', 'float64', '--out', {str(tmp_path)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "matplotlib is not installed: no plots" in result.stderr
    assert (tmp_path / "accuracy.csv").exists() and not (tmp_path / "img").exists()


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        accuracy.sweep(["nope"])
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        bench.run(["nope"])


def test_docs_accuracy_report_claims_hold():
    """docs/accuracy.md is the CPU report: its tables parse, every ok agrees with its error and
    bound, and a sample of its rows (the cheaper sizes) recomputes to the figures it shows."""
    text = (DOCS / "accuracy.md").read_text()
    assert "Regenerate: `python -m curvkit.accuracy" in text
    rows = [r for table in _report.parse_markdown_tables(text) for r in table if "error" in r]
    assert {r["impl"] for r in rows} >= {"curvkit"} and len(rows) > 100
    by_family = {}
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
        elif line.startswith("| ") and not line.startswith("| kernel"):
            by_family.setdefault(current, 0)
            by_family[current] += 1
    assert set(by_family) == set(accuracy.FAMILIES)
    for row in rows:
        check_ok_column(float(row["error"]), number(row["bound"]), row["ok"])
        assert row["ok"] != "no", row
    # recompute the curvkit rows at the smallest size of each family (seconds, not minutes)
    family_of = {}
    for name, family in accuracy.FAMILIES.items():
        for m in family.measurements:
            family_of[(m.kernel, m.method, m.impl)] = name
    sample = []
    for row in rows:
        name = family_of[(row["kernel"], row["method"], row["impl"])]
        if row["impl"] == "curvkit" and int(row["n"]) == min(accuracy.FAMILIES[name].sizes) and \
                name != "hutchinson" and (row["dtype"] != "bfloat16" or torch is not None):
            sample.append({**row, "family": name, "device": "cpu", "seed": 0})
    assert len(sample) > 20
    for row in sample[::4]:
        recomputed = accuracy.measure(row)
        assert agrees(float(row["error"]), recomputed, number(row["bound"])), (row, recomputed)


@pytest.mark.skipif(torch is None, reason="the anchors are PyTorch code")
def test_bench_quick_family_outputs_parse(tmp_path):
    assert bench.main(["mfac", "--quick", "--out", str(tmp_path)]) == 0
    rows = _report.read_csv(tmp_path / "bench.csv")
    machine = (tmp_path / "bench_machine.json").read_text()
    rates = {k: float(v) for k, v in json.loads(machine).items() if k in ("gemm_float32", "gemm_float64", "copy",
                                                                          "read")}
    assert min(rates.values()) > 0 and len(rates) == 4
    md = [r for table in _report.parse_markdown_tables((tmp_path / "bench.md").read_text()) for r in table]
    assert len(md) == len(rows) == 2 * len(bench.FAMILIES["mfac"][0].quick_sizes)
    case = bench.FAMILIES["mfac"][0]
    for row, md_row in zip(rows, md):
        seconds = float(row["median_s"])
        ours = next(float(r["median_s"]) for r in rows if r["n"] == row["n"] and r["impl"] == "curvkit")
        assert float(row["ratio"]) == pytest.approx(seconds / ours, rel=1e-9)
        amount, unit = case.work(int(row["n"]), row["dtype"])
        assert unit == "read" and row["unit"] == "GB/s"
        assert float(row["rate"]) == pytest.approx(amount / seconds / 1e9, rel=1e-9)
        assert float(row["peak_fraction"]) == pytest.approx(float(row["rate"]) / rates["read"], rel=1e-5)
        assert md_row["ratio"] == _report.format_number(float(row["ratio"]))
        assert md_row["median_ms"] == _report.format_number(seconds * 1e3)


@pytest.mark.skipif(torch is None, reason="the anchors are PyTorch code")
def test_bench_isolated_processes_time_the_same_case():
    # --isolate: each side timed by python -m curvkit.bench --one in a fresh process
    times = [bench._time_isolated("hutchinson", 0, 1 << 16, impl, "cpu", 0.01) for impl in ("curvkit", "anchor")]
    assert all(np.isfinite(t) and 0 < t < 1 for t in times)


def test_docs_bench_report_claims_hold():
    text = (DOCS / "bench.md").read_text()
    assert "Regenerate: `python -m curvkit.bench" in text and "GEMM" in text and "copy" in text
    rows = [r for table in _report.parse_markdown_tables(text) for r in table if "ratio" in r]
    assert len(rows) >= 2 * sum(len(c.sizes) for cases in bench.FAMILIES.values() for c in cases)
    for row in rows:
        if row["impl"] == "curvkit":
            assert float(row["ratio"]) == 1.0
        # rate x time is the case's work, to the table's 3 digits
        case = next(c for cases in bench.FAMILIES.values() for c in cases if c.name == row["case"])
        work = case.work(int(row["n"]), row["dtype"])
        if work is None:  # no common work count (Sinkhorn's iterations differ by method): no rate
            assert row["rate"] == "-"
            continue
        amount, _ = work
        assert float(row["rate"]) * float(row["median_ms"]) * 1e6 == pytest.approx(amount, rel=2e-2)
