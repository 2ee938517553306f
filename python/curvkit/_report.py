"""What ``python -m curvkit.accuracy`` and ``python -m curvkit.bench`` share: the machine's
description, Markdown and CSV tables (written and read back), and optional matplotlib plots."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

Row = dict[str, Any]


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "vendor_id", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
    except OSError:
        pass
    return fields


# x86 cores by (vendor, family, model range): a VM's "model name" often hides the part ("AMD
# EPYC"), and the core decides how wide its AVX-512 really is (Zen 4 runs 512-bit operations as
# two 256-bit halves) and which kernels OpenBLAS and MKL pick.
_X86_CORES = [
    ("AuthenticAMD", 23, range(0x00, 0x30), "Zen/Zen+"), ("AuthenticAMD", 23, range(0x30, 0x100), "Zen 2"),
    ("AuthenticAMD", 25, range(0x00, 0x10), "Zen 3"), ("AuthenticAMD", 25, range(0x20, 0x60), "Zen 3"),
    ("AuthenticAMD", 25, range(0x10, 0x20), "Zen 4"), ("AuthenticAMD", 25, range(0x60, 0x100), "Zen 4"),
    ("AuthenticAMD", 26, range(0x00, 0x100), "Zen 5"),
    ("GenuineIntel", 6, range(0x55, 0x56), "Skylake-SP/Cascade Lake"),
    ("GenuineIntel", 6, range(0x6a, 0x6b), "Ice Lake-SP"),
    ("GenuineIntel", 6, range(0x8f, 0x90), "Sapphire Rapids"), ("GenuineIntel", 6, range(0xcf, 0xd0), "Emerald Rapids"),
    ("GenuineIntel", 6, range(0xad, 0xae), "Granite Rapids"),
]


def core_type(vendor: str, family: int, model: int) -> str:
    """The x86 core's name for a CPUID vendor, family and model, or "family F model M".

    >>> core_type("AuthenticAMD", 25, 17)
    'Zen 4'
    >>> core_type("GenuineIntel", 6, 143)
    'Sapphire Rapids'
    """
    for v, f, models, name in _X86_CORES:
        if v == vendor and f == family and model in models:
            return name
    return f"family {family} model {model}"


def machine() -> dict[str, str]:
    """The machine a report was made on: CPU model, cores, the ISA extensions that matter to
    the kernels, BLAS (with its kernel), GPU if any, and the software versions."""
    import curvkit

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "asimd", "sve") if f in flags]
    config = curvkit.config()
    out = {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "core": (core_type(info["vendor_id"], int(info.get("cpu family") or 0), int(info.get("model") or 0))
                 if "vendor_id" in info else platform.machine()),
        "cores": str(os.cpu_count()),
        "isa": " ".join(isa) or "-",
        "blas": str(config.get("blas", "?")),
        "threads": str(config.get("threads", "?")),
        "curvkit": str(config.get("version", "?")),
        "numpy": str(config.get("numpy", "?")),
        "python": platform.python_version(),
        "gpu": "none",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None:
        out["torch"] = str(torch.__version__)
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    return out


def machine_lines(info: dict[str, str]) -> list[str]:
    return [f"- {key}: {value}" for key, value in info.items()]


def format_number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value == value else "nan"
    return str(value)


def markdown_table(rows: Sequence[Row], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_number(row.get(c, "")) for c in columns) + " |")
    return lines


def parse_markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every pipe table of a Markdown text, as lists of {column: cell}."""
    tables: list[list[dict[str, str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-:"):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            i += 2
            table = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                table.append(dict(zip(header, cells)))
                i += 1
            tables.append(table)
        else:
            i += 1
    return tables


def write_csv(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c, "") for c in columns})


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pyplot(quiet: bool = False) -> Optional[Any]:
    """matplotlib.pyplot with the file-only backend, or None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not quiet:
            print("matplotlib is not installed: no plots (pip install 'curvkit[plots]')", file=sys.stderr)
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: Path) -> None:
    """A small PNG: 90 dpi, palette-friendly line art."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
