"""``python -m curvkit.accuracy``: how accurate each kernel is, across condition, size and dtype.

Every kernel and method of each family runs on problems from :mod:`curvkit.testing` and is
measured against its float64 or extended-precision reference; where an anchor exists
(:mod:`curvkit.testing.anchors`, PyTorch), it runs on the same stored input and is measured
the same way. The command writes ``accuracy.md`` (the machine, then one table per family),
``accuracy.csv`` (every row, full precision) and, with matplotlib, ``img/accuracy_<family>.png`` (error
against the swept variable, one panel per dtype, curvkit solid and the anchor dashed).

::

    python -m curvkit.accuracy [families ...] [--dtype float64 float32 ...] [--device cpu|cuda]
                               [--out DIR] [--quick] [--no-plots]

Each row: family, kernel, method, impl (curvkit or the anchor), dtype, device, n, the swept
variable (``param``: condition number, kappa or spectrum) and its ``value``, the ``seed`` of
the problem, the ``error`` and, where curvkit documents one, the ``bound`` it stays within
(``ok`` says whether it did). :func:`measure` recomputes one row from those fields.

A new family adds one entry to :data:`FAMILIES`: its swept variable and values, sizes, and
its measurements (see :class:`Measurement`).

Examples
--------
>>> from curvkit import accuracy
>>> rows = accuracy.sweep(["mfac"], dtypes=["float64"], quick=True, with_anchors=False)
>>> sorted({row["kernel"] for row in rows})
['FisherWindow.ihvp', 'fisher_ihvp']
>>> all(row["ok"] == "yes" for row in rows)
True
>>> accuracy.measure(rows[0]) == rows[0]["error"]
True
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

import curvkit

from . import _report, testing
from .newton_schulz import schedule as _schedule
from .testing import anchors
from .testing._measures import _f64

# ---- moving inputs to the framework, device and dtype under test

_NUMPY_DTYPES = ("float64", "float32", "float16")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _to(x: np.ndarray, dtype: str, device: str) -> Any:
    """x (float64 NumPy) stored in ``dtype`` on ``device``: NumPy on the CPU where NumPy has the
    dtype, else a torch tensor."""
    if device == "cpu" and dtype in _NUMPY_DTYPES:
        return np.ascontiguousarray(x, dtype=dtype)
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=getattr(torch, dtype))


def _torch(x: np.ndarray, dtype: str, device: str) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=getattr(torch, dtype))


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 values x holds once rounded to dtype (the reference's input)."""
    if dtype in _NUMPY_DTYPES:
        return x.astype(dtype).astype(np.float64)
    return _f64(_torch(x, dtype, "cpu"))


def _rng(seed: int, n: int, value: float) -> np.random.Generator:
    return np.random.default_rng([seed, n, int(round(1000 * math.log10(value))) if value > 0 else 0])


U64 = 2.0 ** -53


class Unrepresentable(Exception):
    """The problem does not exist in this dtype (an SPD matrix whose rounding to float32 is
    singular or indefinite has no inverse root): the sweep leaves the point out."""


def _finite(*arrays: np.ndarray) -> None:
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise Unrepresentable("the reference is not finite on the stored input")


# ---- the measurements (inputs and references are cached: every method and anchor of a
# family measures against the same one; nothing writes into them)


@dataclass(frozen=True)
class Measurement:
    """One kernel and method (or one anchor) of a family.

    ``run(n, value, seed, dtype, device) -> error`` (or ``(error, note)``, the note saying what
    the kernel reported: a fallback, unresolved eigenvalues); ``bound(dtype, value) -> float or None``,
    the documented bound where there is one; ``dtypes``: those it runs in (None: all);
    ``torch``: needs PyTorch (an anchor, or a dtype NumPy lacks is handled separately);
    ``package``: another package an anchor calls (POT), skipped where it is not installed."""

    kernel: str
    method: str
    impl: str
    error: str
    run: Callable[[int, Any, int, str, str], Any]
    bound: Callable[[str, float], Optional[float]] = lambda dtype, value: None
    dtypes: Optional[tuple[str, ...]] = None
    torch: bool = False
    package: Optional[str] = None  # another package the anchor calls (run only where installed)


@dataclass(frozen=True)
class Family:
    """A family's sweep: the swept variable ``param`` over ``values`` (``quick_values`` for
    --quick) at sizes ``sizes`` (``quick_sizes``), and its measurements."""

    title: str
    param: str
    values: tuple[Any, ...]
    quick_values: tuple[Any, ...]
    sizes: tuple[int, ...]
    quick_sizes: tuple[int, ...]
    measurements: tuple[Measurement, ...] = field(default_factory=tuple)


# newton_schulz: polar (Muon's 5 steps), orthonormalize, matrix square roots


@functools.lru_cache(maxsize=32)
def _polar_input(n: int, cond: float, seed: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    G = testing.matrix_with_spectrum(_rng(seed, n, cond), n, n // 2, np.logspace(0, -math.log10(cond), n // 2))
    stored = _stored(G, dtype)
    steps, norm_scale = _schedule("muon", 5)
    return stored, testing.newton_schulz(stored, steps, norm_scale)


def _polar(n: int, cond: float, seed: int, dtype: str, device: str) -> float:
    stored, want = _polar_input(n, cond, seed, dtype)
    return testing.max_residual(curvkit.polar(_to(stored, dtype, device), 5), want, relative=False)


def _polar_muon(n: int, cond: float, seed: int, dtype: str, device: str) -> float:
    stored, want = _polar_input(n, cond, seed, dtype)
    return testing.max_residual(anchors.muon_newton_schulz(_torch(stored, dtype, device), 5), want,
                                relative=False)


# Bjorck's step grows a small singular value by 1.5x: 16 steps reach condition ~1e2-1e3
ORTHONORMALIZE_STEPS = 16


def _orthonormalize(method: str) -> Callable[[int, float, int, str, str], tuple[float, str]]:
    def run(n: int, cond: float, seed: int, dtype: str, device: str) -> tuple[float, str]:
        # a basis whose columns lost orthogonality: singular values from 1 down to 1/cond
        Q = testing.matrix_with_spectrum(_rng(seed, n, cond), n, n // 4,
                                         np.logspace(0, -math.log10(cond), n // 4))
        out, info = curvkit.orthonormalize(_to(_stored(Q, dtype), dtype, device), method=method,
                                           steps=ORTHONORMALIZE_STEPS, return_info=True)
        if bool(np.all(info["converged"])):
            return testing.orthogonality_error(out), ""
        return math.inf, "rank-deficient" if method == "qr" else "not converged"
    return run


@functools.lru_cache(maxsize=32)
def _sqrt_pair(n: int, cond: float, seed: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stored = _stored(testing.spd_with_condition(_rng(seed, n, cond), n, cond), dtype)
    with np.errstate(divide="ignore"):
        S, R = testing.sqrt_and_inv_sqrt(stored)
    _finite(R)
    return stored, S, R


def _matrix_sqrt(method: str, inverse: bool) -> Callable[[int, float, int, str, str], float]:
    def run(n: int, cond: float, seed: int, dtype: str, device: str) -> float:
        stored, S, R = _sqrt_pair(n, cond, seed, dtype)
        function = curvkit.matrix_inv_sqrt if inverse else curvkit.matrix_sqrt
        tol = 1e-8 if dtype == "float64" else 1e-6
        return testing.rel_frobenius(function(_to(stored, dtype, device), method=method, tol=tol), R if inverse else S)
    return run


def _eigh_sqrt(inverse: bool) -> Callable[[int, float, int, str, str], float]:
    def run(n: int, cond: float, seed: int, dtype: str, device: str) -> float:
        stored, S, R = _sqrt_pair(n, cond, seed, dtype)
        out = anchors.eigh_sqrt(_torch(stored, dtype, device), -0.5 if inverse else 0.5)
        return testing.rel_frobenius(out, R if inverse else S)
    return run


def _sqrt_bound(inverse: bool) -> Callable[[str, float], Optional[float]]:
    def bound(dtype: str, cond: float) -> Optional[float]:
        # the bounds of tests/test_matrix_sqrt.py, over the conditions they are tested at
        if dtype == "float64":  # the inverse root's relative condition number is about cond / 2
            return (max(1e-12, 2 * U64 * cond) if inverse else 1e-12) if cond <= 1e6 else None
        return testing.TOL[(dtype, "inv_sqrt" if inverse else "sqrt")] if cond <= 1e3 else None
    return bound


# inverse_root: matrix_inverse_root (p = 4), eigh


@functools.lru_cache(maxsize=32)
def _root_input(n: int, cond: float, seed: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    stored = _stored(testing.spd_with_condition(_rng(seed, n, cond), n, cond), dtype)
    with np.errstate(divide="ignore"):
        want = testing.inverse_root(stored, 4)
    _finite(want)
    return stored, want


def _inverse_root(method: str) -> Callable[[int, float, int, str, str], tuple[float, str]]:
    def run(n: int, cond: float, seed: int, dtype: str, device: str) -> tuple[float, str]:
        stored, want = _root_input(n, cond, seed, dtype)
        X, info = curvkit.matrix_inverse_root(_to(stored, dtype, device), 4, method=method, return_info=True)
        if not bool(np.all(info["converged"])):
            return math.inf, "not converged"
        notes = []
        if bool(np.any(info["fell_back"])):
            notes.append("fell back to float64 eigh")
        if int(np.max(info["unresolved"])) > 0:
            notes.append(f"{int(np.max(info['unresolved']))} eigenvalues unresolved: pseudo-inverse there")
        return testing.rel_frobenius(X, want), "; ".join(notes)
    return run


def _root_anchor(which: str) -> Callable[[int, float, int, str, str], float]:
    def run(n: int, cond: float, seed: int, dtype: str, device: str) -> float:
        stored, want = _root_input(n, cond, seed, dtype)
        A = _torch(stored, dtype, device)
        X = anchors.eigh_root(A, 4) if which == "eigh" else anchors.coupled_newton_root(A, 4)[0]
        return testing.rel_frobenius(X, want)
    return run


def _root_bound(method: str) -> Callable[[str, float], Optional[float]]:
    def bound(dtype: str, cond: float) -> Optional[float]:
        if dtype == "float64":  # tests/test_inverse_root.py's float64_bound at p = 4, eps = 0, tested to 1e6
            return max(testing.TOL[("float64", "root_" + method)], U64 * cond) if cond <= 1e6 else None
        return testing.TOL[("float32", "root_" + method)] if dtype == "float32" and cond <= 1e3 else None
    return bound


def _eigh(n: int, cond: float, seed: int, dtype: str, device: str) -> float:
    stored = _stored(testing.spd_with_condition(_rng(seed, n, cond), n, cond), dtype)
    w_ref = testing.eigh_extended(stored)[0].astype(np.float64)
    w, _ = curvkit.eigh(_to(stored, dtype, device))
    return testing.max_residual(np.sort(_f64(w)), np.sort(w_ref))


# hutchinson: trace estimates on the XTrace test spectra at 120 matvecs, mean over 4 seeds

TRACE_MATVECS = 120
TRACE_TRIALS = 4


@functools.lru_cache(maxsize=32)
def _spectrum_matrix(n: int, name: str, seed: int) -> np.ndarray:
    # one rotation per (seed, n) for every spectrum, as the XTrace paper's test set
    Q = np.linalg.qr(np.random.default_rng([seed, n]).standard_normal((n, n)))[0]
    A = (Q * testing.xtrace_spectrum(name, n)) @ Q.T
    return (A + A.T) / 2


def _trace(method: str) -> Callable[[int, Any, int, str, str], float]:
    def run(n: int, name: Any, seed: int, dtype: str, device: str) -> float:
        A = _stored(_spectrum_matrix(n, name, seed), dtype)
        exact = float(np.trace(A))
        a = _to(A, dtype, device)
        estimates = [curvkit.trace_estimate(a, None, TRACE_MATVECS, method=method, seed=s, dtype=dtype)
                     for s in range(TRACE_TRIALS)]
        return float(np.mean([abs(e - exact) / exact for e in estimates]))
    return run


def _trace_xtrace_loop(n: int, name: Any, seed: int, dtype: str, device: str) -> float:
    import torch

    A = _stored(_spectrum_matrix(n, name, seed), dtype)
    exact = float(np.trace(A))
    a = _torch(A, dtype, device)
    errors = []
    for s in range(TRACE_TRIALS):
        generator = torch.Generator(device=device).manual_seed(s)
        estimate = anchors.xtrace_per_probe(lambda v: a @ v, n, TRACE_MATVECS, generator, a.dtype, device)
        errors.append(abs(estimate - exact) / exact)
    return float(np.mean(errors))


# mfac: fisher_ihvp and FisherWindow against the dense float64 solve, over kappa

MFAC_M = 16


@functools.lru_cache(maxsize=32)
def _mfac_input(d: int, kappa: float, seed: int, dtype: str) -> tuple[np.ndarray, np.ndarray, float]:
    rng = _rng(seed, d, kappa)
    G, damp = testing.gradient_window(rng, MFAC_M, d, kappa=kappa)
    return _stored(G, dtype), _stored(rng.standard_normal(d), dtype), damp


def _fisher_ihvp(d: int, kappa: float, seed: int, dtype: str, device: str) -> float:
    G, x, damp = _mfac_input(d, kappa, seed, dtype)
    out = curvkit.fisher_ihvp(_to(G, dtype, device), _to(x, dtype, device), damp)
    return testing.rel_frobenius(out, testing.fisher_solve(G, x, damp))


def _window(d: int, kappa: float, seed: int, dtype: str, device: str) -> float:
    G, x, damp = _mfac_input(d, kappa, seed, dtype)
    window = curvkit.FisherWindow(d, MFAC_M, damp, dtype=dtype, like=_to(x, dtype, device))
    for g in G:
        window.push(_to(g, dtype, device))
    return testing.rel_frobenius(window.ihvp(_to(x, dtype, device)), testing.fisher_solve(G, x, damp))


def _window_anchor(d: int, kappa: float, seed: int, dtype: str, device: str) -> float:
    G, x, damp = _mfac_input(d, kappa, seed, dtype)
    anchor = anchors.MFACDynamic(d, MFAC_M, damp, dtype=_torch(x, dtype, device).dtype, device=device)
    for g in G:
        anchor.push(_torch(g, dtype, device))
    return testing.rel_frobenius(anchor.ihvp(_torch(x, dtype, device)), testing.fisher_solve(G, x, damp))


def _mfac_bound(dtype: str, kappa: float) -> Optional[float]:
    # docs/mfac.md: the result's rounding plus float64 rounding amplified by kappa
    if dtype != "float64" and kappa >= 1e5:
        return None
    return testing.TOL[(dtype, "mfac")] + testing.TOL[("float64", "mfac_kappa")] * kappa


# sinkhorn: plans of the SNS assignment problem (C ~ U[0, 1], uniform marginals) against the
# float64 log-domain reference, swept over reg (the reference, plain Sinkhorn, needs reg large
# enough to converge to 1e-12 in its iteration budget).


@functools.lru_cache(maxsize=32)
def _ot_input(n: int, reg: float, seed: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    a, b, C = testing.ot_assignment(n, seed=seed)
    a, b, C = (_stored(v, dtype) for v in (a, b, C))
    b = b * (a.sum() / b.sum())  # as curvkit does: b rescaled to a's mass
    P = testing.sinkhorn_log(a, b, C, reg, tol=1e-12)[0]
    return a, b, C, P


def _sinkhorn(method: str) -> Callable[[int, float, int, str, str], float]:
    def run(n: int, reg: float, seed: int, dtype: str, device: str) -> float:
        a, b, C, P = _ot_input(n, reg, seed, dtype)
        got = curvkit.sinkhorn(_to(a, dtype, device), _to(b, dtype, device), _to(C, dtype, device), reg=reg,
                               method=method, tol=1e-11, max_iter=200_000)  # the reference's budget
        return float(np.abs(_f64(got) - P).max() / P.max())
    return run


def _sinkhorn_pot(n: int, reg: float, seed: int, dtype: str, device: str) -> float:
    import ot  # the anchor: POT's log-domain Sinkhorn, as installed

    a, b, C, P = _ot_input(n, reg, seed, dtype)
    got = ot.sinkhorn(a, b, C, reg, method="sinkhorn_log", stopThr=1e-12, numItermax=200_000)
    return float(np.abs(_f64(got) - P).max() / P.max())


def _sinkhorn_bound(dtype: str, reg: float) -> Optional[float]:
    return testing.TOL[(dtype, "ot_plan")]


def _polar_bound(dtype: str, cond: float) -> Optional[float]:
    return testing.TOL[(dtype, "polar")]


M = Measurement
FAMILIES: dict[str, Family] = {
    "newton_schulz": Family(
        "Newton-Schulz: polar factor (Muon, 5 steps), orthonormalize, matrix square roots",
        "cond", (1e1, 1e3, 1e6, 1e9), (1e2, 1e6), (64, 192), (32,), (
            M("polar", "muon", "curvkit", "max |X - X_ref| (float64 iteration)", _polar, _polar_bound),
            M("polar", "muon", "anchor: Muon NS5 (torch)", "max |X - X_ref| (float64 iteration)", _polar_muon,
              torch=True),
            M("orthonormalize", "qr", "curvkit", "max |Q^T Q - I|", _orthonormalize("qr")),
            M("orthonormalize", f"polar, {ORTHONORMALIZE_STEPS} steps", "curvkit", "max |Q^T Q - I|",
              _orthonormalize("polar")),
            M("matrix_sqrt", "newton_schulz", "curvkit", "rel. Frobenius (extended ref.)",
              _matrix_sqrt("newton_schulz", False), _sqrt_bound(False)),
            M("matrix_sqrt", "eigh", "curvkit", "rel. Frobenius (extended ref.)", _matrix_sqrt("eigh", False),
              _sqrt_bound(False)),
            M("matrix_sqrt", "eigh", "anchor: eigh, float64 (torch)", "rel. Frobenius (extended ref.)",
              _eigh_sqrt(False), torch=True),
            M("matrix_inv_sqrt", "newton_schulz", "curvkit", "rel. Frobenius (extended ref.)",
              _matrix_sqrt("newton_schulz", True), _sqrt_bound(True)),
            M("matrix_inv_sqrt", "eigh", "curvkit", "rel. Frobenius (extended ref.)", _matrix_sqrt("eigh", True),
              _sqrt_bound(True)),
            M("matrix_inv_sqrt", "eigh", "anchor: eigh, float64 (torch)", "rel. Frobenius (extended ref.)",
              _eigh_sqrt(True), torch=True),
        )),
    "inverse_root": Family(
        "Inverse roots (p = 4; float32 falls back to float64 where it cannot resolve the input, the default) "
        "and eigh",
        "cond", (1e1, 1e3, 1e6, 1e9), (1e2, 1e6), (64, 192), (32,), (
            M("matrix_inverse_root", "eigh", "curvkit", "rel. Frobenius (extended ref.)", _inverse_root("eigh"),
              _root_bound("eigh"), dtypes=("float64", "float32")),
            M("matrix_inverse_root", "newton", "curvkit", "rel. Frobenius (extended ref.)", _inverse_root("newton"),
              _root_bound("newton"), dtypes=("float64", "float32")),
            M("matrix_inverse_root", "eigh", "anchor: Distributed Shampoo eigh (torch)",
              "rel. Frobenius (extended ref.)", _root_anchor("eigh"), dtypes=("float64", "float32"), torch=True),
            M("matrix_inverse_root", "newton", "anchor: coupled Newton (torch)", "rel. Frobenius (extended ref.)",
              _root_anchor("newton"), dtypes=("float64", "float32"), torch=True),
            M("eigh", "lapack", "curvkit", "max |w - w_ref| / max |w_ref|", _eigh, dtypes=("float64", "float32")),
        )),
    "hutchinson": Family(
        f"Trace estimates, {TRACE_MATVECS} matvecs, mean relative error over {TRACE_TRIALS} seeds (XTrace spectra)",
        "spectrum", ("flat", "poly", "exp9", "exp7", "step"), ("flat", "exp7"), (1000,), (200,), (
            M("trace_estimate", "hutchinson", "curvkit", "|est - tr| / tr", _trace("hutchinson"),
              dtypes=("float64", "float32")),
            M("trace_estimate", "hutch++", "curvkit", "|est - tr| / tr", _trace("hutch++"),
              dtypes=("float64", "float32")),
            M("trace_estimate", "xtrace", "curvkit", "|est - tr| / tr", _trace("xtrace"),
              dtypes=("float64", "float32")),
            M("trace_estimate", "xnystrace", "curvkit", "|est - tr| / tr", _trace("xnystrace"),
              dtypes=("float64", "float32")),
            M("trace_estimate", "xtrace", "anchor: XTrace per-probe loop (torch)", "|est - tr| / tr",
              _trace_xtrace_loop, dtypes=("float64", "float32"), torch=True),
        )),
    "mfac": Family(
        f"M-FAC inverse-Fisher products, m = {MFAC_M} gradients, against the dense float64 solve",
        "kappa", (1e2, 1e4, 1e6), (1e2, 1e6), (4096,), (256,), (
            M("fisher_ihvp", "static", "curvkit", "rel. 2-norm (dense solve)", _fisher_ihvp, _mfac_bound),
            M("FisherWindow.ihvp", "dynamic", "curvkit", "rel. 2-norm (dense solve)", _window, _mfac_bound),
            M("FisherWindow.ihvp", "dynamic", "anchor: M-FAC dynamic (torch)", "rel. 2-norm (dense solve)",
              _window_anchor, dtypes=("float64", "float32"), torch=True),  # torch has no half Cholesky
        )),
    "sinkhorn": Family(
        "Entropic OT plans (SNS assignment problem) to marginal error 1e-11, against the float64 log-domain "
        "reference (max |P - P_ref| / max P_ref)",
        "reg", (1e-1, 3e-2, 1e-2), (1e-1, 1e-2), (64,), (32,), (
            M("sinkhorn", "log", "curvkit", "max |P - P_ref| / max P_ref", _sinkhorn("log"), _sinkhorn_bound),
            M("sinkhorn", "sns", "curvkit", "max |P - P_ref| / max P_ref", _sinkhorn("sns"), _sinkhorn_bound),
            M("sinkhorn", "log", "anchor: POT sinkhorn_log", "max |P - P_ref| / max P_ref", _sinkhorn_pot,
              dtypes=("float64",), package="ot"),
        )),
}
"""The registry: family name -> :class:`Family`. A new family is one entry."""

COLUMNS = ("family", "kernel", "method", "impl", "dtype", "device", "n", "param", "value", "seed", "error",
           "bound", "ok", "note")


def _ok(error: float, bound: Optional[float]) -> str:
    if bound is None:
        return "-"
    return "yes" if error <= bound else "no"


def _measurement(row: dict[str, Any]) -> Measurement:
    for m in FAMILIES[row["family"]].measurements:
        if (m.kernel, m.method, m.impl) == (row["kernel"], row["method"], row["impl"]):
            return m
    raise KeyError(f"no measurement {row['kernel']}/{row['method']}/{row['impl']} in {row['family']}")


def _value(family: Family, value: Any) -> Any:
    return value if family.param == "spectrum" else float(value)


def _run(m: Measurement, n: int, value: Any, seed: int, dtype: str, device: str) -> tuple[float, str]:
    try:
        with curvkit.failure_policy("raise"):
            result = m.run(n, value, seed, dtype, device)
    except curvkit.ConvergenceError:
        return math.inf, "ConvergenceError"  # reported, never a silent NaN
    except curvkit.ArgumentError:
        return math.inf, "refused (ArgumentError): the input does not fit the dtype"
    return result if isinstance(result, tuple) else (float(result), "")


def measure(row: dict[str, Any]) -> float:
    """Recompute one row's error from its fields (a row of :func:`sweep`, or of the CSV as
    strings)."""
    family = FAMILIES[row["family"]]
    return _run(_measurement(row), int(row["n"]), _value(family, row["value"]), int(row["seed"]), row["dtype"],
                row["device"])[0]


def sweep(families: Optional[Sequence[str]] = None, dtypes: Sequence[str] = ("float64", "float32"),
          device: str = "cpu", quick: bool = False, with_anchors: bool = True, seed: int = 0,
          verbose: bool = False) -> list[dict[str, Any]]:
    """Run the sweeps of ``families`` (all by default) and return their rows (see the module
    docstring). Anchors run where PyTorch is installed and ``with_anchors`` is true; dtypes NumPy
    lacks (bfloat16) and CUDA need PyTorch."""
    names = list(FAMILIES) if not families else list(families)
    for name in names:
        if name not in FAMILIES:
            raise ValueError(f"unknown family {name!r}; one of {', '.join(FAMILIES)}")
    torch_ok = _has_torch()
    rows: list[dict[str, Any]] = []
    for name in names:
        family = FAMILIES[name]
        sizes = family.quick_sizes if quick else family.sizes
        values = family.quick_values if quick else family.values
        for m in family.measurements:
            if m.torch and not (with_anchors and torch_ok):
                continue
            if m.package and not (with_anchors and importlib.util.find_spec(m.package) is not None):
                continue
            for dtype in dtypes:
                if m.dtypes is not None and dtype not in m.dtypes:
                    continue
                if (dtype not in _NUMPY_DTYPES or device != "cpu") and not torch_ok:
                    continue
                for n in sizes:
                    for value in values:
                        if verbose:
                            _report.progress(f"  {name}: {m.kernel} {m.method} [{m.impl}] {dtype} n={n} "
                                             f"{family.param}={value}")
                        try:
                            error, note = _run(m, n, value, seed, dtype, device)
                        except Unrepresentable:
                            continue
                        bound = None if m.impl != "curvkit" else m.bound(dtype, _value(family, value))
                        rows.append({"family": name, "kernel": m.kernel, "method": m.method, "impl": m.impl,
                                     "dtype": dtype, "device": device, "n": n, "param": family.param,
                                     "value": value, "seed": seed, "error": error, "bound": bound,
                                     "ok": _ok(error, bound), "note": note})
    return rows


def _markdown(rows: Sequence[dict[str, Any]], machine: dict[str, str], command: str) -> str:
    lines = ["# curvkit accuracy report", "", f"Regenerate: `{command}`", "", "Machine:", "",
             *_report.machine_lines(machine), "",
             "error: against the float64 or extended-precision reference of curvkit.testing, on the input as "
             "stored in the dtype; bound: the bound the tests hold the kernel to, over the range they test "
             "(ok: within it; - where none applies); inf: the kernel reported no convergence (or, for "
             "orthonormalize, a rank-deficient input); points whose reference does not exist in the dtype "
             "(a float32 matrix that rounds to singular) are left out.", ""]
    for name in dict.fromkeys(r["family"] for r in rows):
        family = FAMILIES[name]
        lines += [f"## {name}", "", family.title, ""]
        ours = [r for r in rows if r["family"] == name]
        lines += _report.markdown_table(ours, ("kernel", "method", "impl", "dtype", "n", "param", "value", "error",
                                                 "bound", "ok", "note"))
        lines += ["", f"![{name}](img/accuracy_{name}.png)", ""]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], out: Path, quiet: bool = False) -> list[Path]:
    """One PNG per family: error against the swept variable, a panel per dtype, one line per
    kernel/method (curvkit solid, anchors dashed). Nothing without matplotlib."""
    plt = _report.pyplot(quiet)
    if plt is None:
        return []
    paths = []
    for name in dict.fromkeys(r["family"] for r in rows):
        family = FAMILIES[name]
        ours = [r for r in rows if r["family"] == name]
        dtypes = list(dict.fromkeys(r["dtype"] for r in ours))
        fig, axes = plt.subplots(1, len(dtypes), figsize=(4.2 * len(dtypes), 3.4), squeeze=False)
        n_max = max(int(r["n"]) for r in ours)
        for ax, dtype in zip(axes[0], dtypes):
            lines = dict.fromkeys((r["kernel"], r["method"], r["impl"]) for r in ours if r["dtype"] == dtype)
            for kernel, method, impl in lines:
                pts = [r for r in ours if (r["kernel"], r["method"], r["impl"], r["dtype"]) ==
                       (kernel, method, impl, dtype) and int(r["n"]) == n_max]
                xs = [str(r["value"]) if family.param == "spectrum" else float(r["value"]) for r in pts]
                ys = [max(float(r["error"]), 1e-18) for r in pts]
                label = f"{kernel} {method}" + ("" if impl == "curvkit" else " (anchor)")
                ax.plot(xs, ys, "--" if impl != "curvkit" else "-", marker="o", markersize=3, label=label)
            if family.param != "spectrum":
                ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{name}, {dtype}, n = {n_max}", fontsize=9)
            ax.set_xlabel(family.param, fontsize=8)
            ax.set_ylabel("error", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=6)
        path = out / "img" / f"accuracy_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _report.save_figure(plt, fig, path)
        paths.append(path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m curvkit.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help=f"any of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"],
                        choices=["float64", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="accuracy-report", help="output folder (default: ./accuracy-report)")
    parser.add_argument("--quick", action="store_true", help="small sizes and fewer points (seconds)")
    parser.add_argument("--no-anchors", action="store_true", help="curvkit only")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not curvkit.has_cuda():
        parser.error("--device cuda needs a GPU and a CUDA build of curvkit")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _report.progress(f"curvkit.accuracy: {', '.join(args.families or FAMILIES)} ({'quick' if args.quick else 'full'})")
    rows = sweep(args.families, args.dtype, args.device, args.quick, not args.no_anchors, verbose=True)
    command = "python -m curvkit.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "accuracy.md").write_text(_markdown(rows, _report.machine(), command.strip()))
    _report.write_csv(out / "accuracy.csv", rows, COLUMNS)
    plots = [] if args.no_plots else plot(rows, out)
    failed = [r for r in rows if r["ok"] == "no"]
    _report.progress(f"wrote {out / 'accuracy.md'}, {out / 'accuracy.csv'} and {len(plots)} plots; "
                     f"{len(rows)} rows, {len(failed)} outside their bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
