"""curvkit: native CPU and CUDA kernels for second-order optimization and optimal transport.

Functions take NumPy arrays, PyTorch tensors and CuPy arrays and return the caller's kind,
on the caller's device. See the README for the contracts.
"""
import os as _os

# curvkit's OpenBLAS threads spin for about 0.3 ms (2^20 cycles) after a call, not OpenBLAS's
# default ~0.1 s: long enough to bridge the many short BLAS calls inside one LAPACK call (with
# 2^4, sleeping at once, a threaded 784^2 QR took 2x as long), short enough to leave the cores
# to PyTorch's and NumPy's pools between curvkit calls (with the default, a Muon step in a
# PyTorch training loop took 2.6x the pure-torch step). bench/results/optimizers_cpu.md. Set
# only while curvkit's OpenBLAS loads, unless the caller set it.
_spin = _os.environ.get("OPENBLAS_THREAD_TIMEOUT")
if _spin is None:
    _os.environ["OPENBLAS_THREAD_TIMEOUT"] = "20"
try:
    import scipy_openblas32 as _openblas  # noqa: F401  (loads the OpenBLAS the extension links)

    from . import _core
finally:
    if _spin is None:
        del _os.environ["OPENBLAS_THREAD_TIMEOUT"]
from ._config import config, get_num_threads, has_cuda, set_num_threads, show_config
from ._errors import (
    ArgumentError,
    ArgumentTypeError,
    ConvergenceError,
    ConvergenceWarning,
    CudaError,
    CurvkitError,
    failure_policy,
    get_failure_policy,
    set_failure_policy,
)
from .hutchinson import (
    adahessian_step_,
    diag_estimate,
    probes,
    probes_like,
    sophia_step_,
    spectral_density,
    top_eigenvalues,
    trace_estimate,
)
from .inverse_root import eigenbasis_update, eigh, matrix_inverse_root, orthonormalize
from .mfac import (
    FisherWindow,
    SparseFisherWindow,
    fisher_ihvp,
    fisher_inverse_diag,
    fisher_inverse_entries,
    fisher_inverse_factor,
)
from .newton_schulz import (
    matrix_inv_sqrt,
    matrix_sqrt,
    matrix_sqrt_and_inv_sqrt,
    polar,
    polar_update_,
    solve_lyapunov,
)
from .sinkhorn import sinkhorn, sinkhorn_cost

__version__ = _core.build_info()["version"]

__all__ = [
    "__version__",
    "adahessian_step_",
    "ArgumentError",
    "ArgumentTypeError",
    "ConvergenceError",
    "ConvergenceWarning",
    "CudaError",
    "CurvkitError",
    "config",
    "diag_estimate",
    "eigenbasis_update",
    "failure_policy",
    "FisherWindow",
    "fisher_ihvp",
    "fisher_inverse_diag",
    "fisher_inverse_entries",
    "fisher_inverse_factor",
    "eigh",
    "get_failure_policy",
    "get_num_threads",
    "has_cuda",
    "matrix_inverse_root",
    "matrix_inv_sqrt",
    "matrix_sqrt",
    "matrix_sqrt_and_inv_sqrt",
    "orthonormalize",
    "polar",
    "polar_update_",
    "probes",
    "probes_like",
    "set_failure_policy",
    "set_num_threads",
    "show_config",
    "sinkhorn",
    "sinkhorn_cost",
    "SparseFisherWindow",
    "solve_lyapunov",
    "sophia_step_",
    "spectral_density",
    "top_eigenvalues",
    "trace_estimate",
]
