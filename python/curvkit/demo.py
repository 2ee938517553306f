"""A short tour: `python -m curvkit.demo`.

Estimates the trace of a matrix with Hutchinson's estimator from curvkit's reproducible
probes, shows that probes drawn in pieces equal probes drawn at once, and prints the build.
"""
import time

import numpy as np

import curvkit


def main():
    curvkit.show_config()
    n = 2000
    rng = np.random.default_rng(0)
    spectrum = 1.0 / np.arange(1, n + 1)  # a decaying spectrum, like a Hessian's
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (q * spectrum) @ q.T
    exact = spectrum.sum()
    print(f"\nHutchinson trace of a {n}x{n} PSD matrix (exact {exact:.4f}):")
    for k in (10, 100, 1000):
        z = curvkit.probes((n, k), "rademacher", seed=1)
        estimate = np.einsum("ij,ij->", z, a @ z) / k
        print(f"  {k:5d} Rademacher probes: {estimate:.4f}  (relative error {abs(estimate - exact) / exact:.1e})")

    whole = curvkit.probes((n, 8), "gaussian", seed=7)
    pieces = np.hstack([curvkit.probes((n, 3), "gaussian", seed=7),
                        curvkit.probes((n, 5), "gaussian", seed=7, offset=3)])
    print(f"\nprobes drawn in two calls equal one call: {bool((whole == pieces).all())}")

    size = 10_000_000
    curvkit.probes(size, dtype="float32")  # warm up
    start = time.perf_counter()
    curvkit.probes(size, dtype="float32")
    seconds = time.perf_counter() - start
    print(f"{size:.0e} float32 Rademacher entries in {seconds * 1e3:.1f} ms "
          f"({4 * size / seconds / 1e9:.1f} GB/s on {curvkit.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
