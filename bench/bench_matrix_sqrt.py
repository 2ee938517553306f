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


# ---- CUDA (run with -k cuda on a GPU machine): Newton-Schulz (float64 inside) against the
# torch eigh route in float32 and float64, float32 input of condition 1e3.
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and curvkit.has_cuda()),
                          reason="needs a GPU and a CUDA build of curvkit")


@cuda
@pytest.mark.parametrize("impl", ["curvkit", "torch eigh f32", "torch eigh f64"])
@pytest.mark.parametrize("n", [256, 512, 1024, 2048])
def test_cuda_sqrt(benchmark, n, impl):
    A = _spd(n).cuda()
    benchmark.group = f"cuda-sqrt-float32-{n}"
    fn = {"curvkit": lambda: curvkit.matrix_sqrt(A),
          "torch eigh f32": lambda: eigh_sqrt(A, upcast=False),
          "torch eigh f64": lambda: eigh_sqrt(A)}[impl]
    benchmark.extra_info.update(impl=impl, rel_error=_rel_error(fn(), A))

    def run():
        fn()
        torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
