"""curvkit.testing: what an accuracy suite or a microbenchmark of curvkit's kernels needs.

- Problem generators: matrices with a given spectrum or condition number, rank-deficient Gram
  matrices, Shampoo-like EMA factor sequences, the XTrace test spectra, M-FAC gradient windows
  of a given kappa, and entropic OT problems (the SNS paper's and RegOT's synthetic sets).
- References in float64 and extended precision, written from the definitions: polar factor
  and Newton-Schulz, eigh refined in np.longdouble and the spectral functions built on it
  (inverse roots, square roots), Philox probes, AdaHessian and Sophia steps, dense Fisher
  solves, log-domain Sinkhorn.
- Error measures (relative Frobenius, max-norm residual, orthogonality, OT marginal error) and
  the tolerance table per dtype that curvkit's own tests use.
- :mod:`curvkit.testing.anchors`: the anchors' published algorithms in plain PyTorch (imported
  on demand; needs torch), timed and measured beside curvkit by ``python -m curvkit.bench`` and
  ``python -m curvkit.accuracy``.

This module needs NumPy only. It is stable API: curvkit's tests are written against it.

Examples
--------
>>> import numpy as np
>>> import curvkit
>>> from curvkit import testing
>>> A = testing.spd_with_condition(np.random.default_rng(0), 64, 1e4)
>>> S = curvkit.matrix_sqrt(A)
>>> bool(testing.rel_frobenius(S, testing.sqrt_and_inv_sqrt(A)[0]) < testing.tolerance("float64", "sqrt"))
True
"""
from ._measures import (
    TOL,
    UNIT_ROUNDOFF,
    marginal_error,
    max_residual,
    orthogonality_error,
    rel_frobenius,
    tolerance,
)
from ._problems import (
    OT_DEFAULT_REG,
    OT_KINDS,
    XTRACE_SPECTRA,
    float32_accumulated_factor,
    gradient_window,
    matrix_with_spectrum,
    ot_assignment,
    ot_grid,
    ot_identity,
    ot_problem,
    ot_synthetic2,
    rank_deficient_gram,
    shampoo_factors,
    spd_with_condition,
    spd_with_spectrum,
    xtrace_spectrum,
)
from ._references import (
    EXTENDED,
    adahessian_group_size,
    adahessian_step,
    cos_sin_2pi,
    eigh_extended,
    fisher_inverse,
    fisher_matrix,
    fisher_solve,
    group_mean_abs,
    inverse_root,
    newton_schulz,
    philox4x32_10,
    polar_factor,
    probes,
    round_to_bfloat16_bits,
    sinkhorn_log,
    sophia_step,
    spd_functions,
    sphere_norms_in_order,
    sqrt_and_inv_sqrt,
)

__all__ = [
    "EXTENDED", "OT_DEFAULT_REG", "OT_KINDS", "TOL", "UNIT_ROUNDOFF", "XTRACE_SPECTRA",
    "adahessian_group_size", "adahessian_step", "cos_sin_2pi", "eigh_extended", "fisher_inverse", "fisher_matrix",
    "fisher_solve", "float32_accumulated_factor", "gradient_window", "group_mean_abs", "inverse_root",
    "marginal_error", "matrix_with_spectrum",
    "max_residual", "newton_schulz", "orthogonality_error", "ot_assignment", "ot_grid", "ot_identity", "ot_problem",
    "ot_synthetic2", "philox4x32_10", "polar_factor", "probes", "rank_deficient_gram", "rel_frobenius",
    "round_to_bfloat16_bits", "shampoo_factors", "sinkhorn_log", "sophia_step", "spd_functions",
    "spd_with_condition", "spd_with_spectrum", "sphere_norms_in_order", "sqrt_and_inv_sqrt", "tolerance",
    "xtrace_spectrum",
]
