"""Typed signatures of curvkit's native extension (csrc/python/module.cpp and each family's
bindings.cpp). Not an API: use the curvkit package. Arrays are NumPy, PyTorch or CuPy objects
read through DLPack or the buffer protocol; `stream` is a CUDA stream as an integer (0 for the
CPU); `workspace` is the allocator curvkit._arrays.workspace_allocator makes, or None."""

from typing import Any, Callable, Optional, Sequence

Array = Any
Info = dict[str, Any]
Workspace = Optional[Callable[[int], tuple[Any, int]]]

_testing: Any  # hooks for curvkit's own tests (array_info, workspace_trial, philox4x32_10, ...)

def num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
MAX_THREADS: int
def built_with_cuda() -> bool: ...
def cuda_device_count() -> int: ...
def build_info() -> dict[str, str]: ...
def convert(src: Array, dst: Array, stream: int = 0, name: str = "src") -> None: ...

# hutchinson
def probes(out: Array, *, kind: str, seed: int, offset: int, workspace: Optional[Array], stream: int) -> None: ...
def probes_flat(outs: list[Array], *, kind: str, seed: int, offsets: Sequence[int], workspace: Optional[Array],
                stream: int) -> None: ...
def probes_workspace_size(shape: Sequence[int], kind: str, cuda: bool) -> int: ...
def sketch_qr(q: Array, r: Array, k0: int, stream: int = 0, workspace: Workspace = None) -> None: ...
def xtrace_estimates(omega: Array, y: Array, q: Array, r: Array, z: Array, improved: bool, out: Array,
                     stream: int = 0, workspace: Workspace = None) -> None: ...
def xdiag_estimates(omega: Array, q: Array, r: Array, z: Array, mean: Array, variance: Array, stream: int = 0,
                    workspace: Workspace = None) -> None: ...
def xnystrace_estimates(omega: Array, y: Array, relative_shift: float, out: Array, stream: int = 0,
                        workspace: Workspace = None) -> bool: ...
def column_dots(x: Array, y: Array, out: Array, stream: int = 0, workspace: Workspace = None) -> None: ...
def row_dots(x: Array, y: Array, out: Array, stream: int = 0) -> None: ...
def project_out(q: Array, x: Array, stream: int = 0, workspace: Workspace = None) -> None: ...
def accumulate_products(x: Array, y: Array, count: int, mean: Array, m2: Array, stream: int = 0) -> None: ...
def lanczos_step(basis: Array, w: Array, alpha: Array, beta: Array, lengths: Array, j: int,
                 reorthogonalize: bool, restart: bool = False, stream: int = 0,
                 workspace: Workspace = None) -> None: ...
def tridiagonal_eigh(alpha: Array, beta: Array, lengths: Array, steps: int, nodes: Array, vectors: Array,
                     stream: int = 0) -> None: ...
def basis_combination(basis: Array, coefficients: Array, steps: int, out: Array, stream: int = 0,
                      workspace: Workspace = None) -> None: ...
def power_step(v: Array, w: Array, found: Optional[Array], stream: int = 0,
               workspace: Workspace = None) -> tuple[float, float]: ...
def adahessian_step(
    params: list[Array],
    grads: list[Array],
    hessian_diag_samples: list[Array],
    exp_avg: list[Array],
    exp_avg_sq: list[Array],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
    step: int,
    group_sizes: list[int],
    check_finite: bool,
    stream: int,
    workspace: Workspace,
) -> None: ...
def sophia_step(
    params: list[Array],
    grads: list[Array],
    exp_avg: list[Array],
    hessian: list[Array],
    hessian_estimate: list[Array],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    rho: float,
    weight_decay: float,
    batch_size: float,
    eps: float,
    count_wins: bool,
    check_finite: bool,
    stream: int,
    workspace: Workspace,
) -> int: ...

# newton_schulz
def polar(
    inputs: list[Array],
    outputs: list[Array],
    *,
    steps: Sequence[tuple[float, float, float]],
    norm_scale: float,
    norm_eps: float,
    method: str,
    alpha: list[float],
    beta: list[float],
    normalize: bool,
    check_finite: bool,
    stream: int,
    workspace: Workspace,
    out_name: str = "out",
) -> None: ...
def matrix_sqrt(
    inputs: list[Array],
    sqrt_out: list[Array],
    inv_sqrt_out: list[Array],
    *,
    method: str,
    max_iters: int,
    tol: float,
    fallback: bool,
    stream: int,
    workspace: Workspace,
) -> list[Info]: ...
def solve_lyapunov(
    S: list[Array], C: list[Array], out: list[Array], *, max_iters: int, stream: int, workspace: Workspace
) -> list[Info]: ...

# inverse_root
def matrix_inverse_root(
    inputs: list[Array],
    outputs: list[Array],
    inits: list[Optional[Array]],
    bases: list[Optional[Array]],
    *,
    p: int,
    eps: float,
    method: str,
    max_iters: int,
    tol: Optional[float],
    fallback: bool,
    compute_residual: bool,
    stream: int,
    workspace: Workspace,
) -> list[Info]: ...
def eigh(
    inputs: list[Array],
    values: list[Array],
    vectors: list[Array],
    bases: list[Optional[Array]],
    *,
    stream: int,
    workspace: Workspace,
) -> list[Info]: ...
def orthonormalize_qr(Q: list[Array], *, stream: int, workspace: Workspace) -> list[Info]: ...
def orthonormalize_polar(
    Q: list[Array], out: list[Array], *, steps: int, stream: int, workspace: Workspace
) -> list[Info]: ...
def eigenbasis_update(
    A: list[Array],
    Q: list[Array],
    Q_out: list[Array],
    estimates: list[Array],
    perm: list[Array],
    *,
    stream: int,
    workspace: Workspace,
) -> list[Info]: ...

# mfac
WindowState = tuple[int, int, int, int]  # size, oldest slot, count, pushes since refactor
WindowStatus = tuple[int, int, bool]  # fault (0: none), pushes the device accepted before it, result finite

def fisher_window_push(
    G: Array, gram: Array, factor: Array, state: WindowState, *, damp: float, normalize: str,
    refactor_every: int, status: Optional[Array], g: Array, stream: int, workspace: Workspace,
) -> WindowState: ...
def fisher_window_ihvp(
    G: Array, gram: Array, factor: Array, state: WindowState, *, damp: float, normalize: str,
    refactor_every: int, status: Optional[Array], x: Array, out: Array, stream: int, workspace: Workspace,
) -> WindowStatus: ...
def fisher_window_diag(
    G: Array, gram: Array, factor: Array, state: WindowState, *, damp: float, normalize: str,
    refactor_every: int, status: Optional[Array], out: Array, stream: int, workspace: Workspace,
) -> WindowStatus: ...
def fisher_window_refactor(
    G: Array, gram: Array, factor: Array, state: WindowState, *, damp: float, normalize: str,
    refactor_every: int, status: Optional[Array], stream: int, workspace: Workspace,
) -> None: ...
def fisher_window_status(status: Array, *, stream: int, workspace: Workspace) -> WindowStatus: ...
def fisher_ihvp(G: Array, x: Array, out: Array, *, damp: float, stream: int, workspace: Workspace) -> None: ...
def fisher_inverse_diag(G: Array, out: Array, *, damp: float, stream: int, workspace: Workspace) -> None: ...
def fisher_inverse_factor(G: Array, V: Array, *, damp: float, stream: int, workspace: Workspace) -> None: ...
def fisher_inverse_entries(
    V: Array, rows: Array, cols: Array, out: Array, *, damp: float, stream: int, workspace: Workspace
) -> None: ...
def fisher_ihvp_blocks(
    G: Array, x: Array, out: Array, *, damp: float, block_size: int, stream: int, workspace: Workspace
) -> None: ...
def fisher_inverse_diag_blocks(
    G: Array, out: Array, *, damp: float, block_size: int, stream: int, workspace: Workspace
) -> None: ...
def fisher_sparse_window_push(
    indices: Array, values: Array, error: Array, gram: Array, factor: Array, state: WindowState, *, damp: float,
    normalize: str, refactor_every: int, status: Optional[Array], block_size: int, k: int, g: Array,
    stream: int, workspace: Workspace,
) -> WindowState: ...
def fisher_sparse_window_ihvp(
    indices: Array, values: Array, error: Array, gram: Array, factor: Array, state: WindowState, *, damp: float,
    normalize: str, refactor_every: int, status: Optional[Array], x: Array, out: Array, stream: int,
    workspace: Workspace,
) -> WindowStatus: ...

# ---- sinkhorn
def sinkhorn(
    a: list[Array],
    b: list[Array],
    C: list[Optional[Array]],
    x: list[Optional[Array]],
    y: list[Optional[Array]],
    f: list[Array],
    g: list[Array],
    plan: list[Optional[Array]],
    *,
    cost: str,
    p: float,
    reg: float,
    method: str,
    tol: float,
    max_iter: int,
    max_newton: int,
    density: float,
    float32_warmup: bool,
    warm_start: bool,
    stream: int,
    workspace: Workspace,
) -> list[dict[str, Any]]: ...
def sinkhorn_sparse_plan(
    a: Array,
    b: Array,
    C: Optional[Array],
    x: Optional[Array],
    y: Optional[Array],
    f: Array,
    g: Array,
    *,
    cost: str,
    p: float,
    reg: float,
    threshold: float,
    index: int,
    stream: int,
    workspace: Workspace,
) -> tuple[Any, Any, Any]: ...
