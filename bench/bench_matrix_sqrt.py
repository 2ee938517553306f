"""Matrix square root: curvkit's coupled Newton-Schulz, eigh and Pade against the float64
eigh route in PyTorch (bench/baselines/matrix_sqrt.py), float32 SPD input with condition
number 1e3, in one run. Run: python -m pytest bench/bench_matrix_sqrt.py --benchmark-only

On CPU curvkit computes in float64; each curvkit benchmark records its relative error
against the float64 eigh reference (extra_info["rel_error"]).
"""
import numpy as np
import pytest

import curvkit

torch = pytest.importorskip("torch")
from baselines.matrix_sqrt import eigh_sqrt  # noqa: E402

SIZES = [64, 256, 1024]


def _spd(n, cond=1e3):
    rng = np.random.default_rng(n)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * np.logspace(0, -np.log10(cond), n)) @ Q.T
    return torch.from_numpy(((A + A.T) / 2).astype(np.float32))


def _rel_error(S, A):
    ref = eigh_sqrt(A.double())
    return float(torch.linalg.norm(S.double() - ref) / torch.linalg.norm(ref))


@pytest.mark.parametrize("n", SIZES)
def test_torch_eigh(benchmark, n):
    A = _spd(n)
    benchmark.group = f"sqrt-float32-{n}"
    benchmark.extra_info.update(impl="torch eigh f64", rel_error=_rel_error(eigh_sqrt(A), A))
    benchmark(lambda: eigh_sqrt(A))


@pytest.mark.parametrize("method", ["newton_schulz", "eigh", "pade"])
@pytest.mark.parametrize("n", SIZES)
def test_curvkit(benchmark, n, method):
    A = _spd(n)
    benchmark.group = f"sqrt-float32-{n}"
    S, info = curvkit.matrix_sqrt(A, method=method, return_info=True)
    impl = "curvkit" if method == "newton_schulz" else f"curvkit {method}"
    benchmark.extra_info.update(impl=impl, rel_error=_rel_error(S, A), iterations=int(info["iterations"]))
    benchmark(lambda: curvkit.matrix_sqrt(A, method=method, return_info=True))
