// Level-3 products split over an OpenMP team, each thread in single-threaded BLAS on its own
// slice. curvkit's loops and its products then share one pool of threads (PyTorch's too when
// PyTorch is loaded: both use libgomp.so.1), where OpenBLAS's own pool would contend with it:
// a pool's workers spin for a while after each parallel region, and on 2 cores the spinning
// workers of one pool halve the other's speed (bench/results/optimizers_cpu.md). The caller
// holds SingleThreadedBlas. With threads = 1, inside a parallel region, or for products too
// small to pay for a fork, one BLAS call. Row-major; symmetric results in the lower triangle.
#pragma once
#include <omp.h>

#include <cmath>
#include <cstdint>

#include "core/blas.h"

namespace curvkit::team_blas {

// Below this many flops (about 30 us on one core) a product runs as one call.
constexpr double kMinTeamFlops = 1 << 21;
// A copy of an entry with a scattered write costs about as much time as this many flops of a
// product (1024^2 float32: 1.2 ns an entry against 90 GFLOP/s), for copies that use run().
constexpr double kFlopsPerCopiedEntry = 100;

// Row where band t of `parts` starts: equal rows, or equal areas of the lower triangle.
inline int even_band(int n, int parts, int t) { return int(int64_t(n) * t / parts); }
inline int triangle_band(int n, int parts, int t) { return int(std::lround(n * std::sqrt(double(t) / parts))); }

// body(t, parts) on a team of `threads`, or body(0, 1) on the calling thread.
template <class Body>
void run(int threads, double flops, Body body) {
  if (threads <= 1 || flops < kMinTeamFlops || omp_in_parallel()) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(threads)
  body(omp_get_thread_num(), omp_get_num_threads());
}

// C (n x n, lower) = alpha op(A) op(A)^T + beta C, op(A) = A (n x k) or A^T (A k x n): bands of
// rows of equal area, each a rectangle left of the diagonal (gemm) and a diagonal block (syrk).
template <class T>
void syrk(int threads, bool trans, int n, int k, T alpha, const T* a, int lda, T beta, T* c, int ldc) {
  run(threads, double(n) * n * k, [&](int t, int parts) {
    const int i0 = triangle_band(n, parts, t), i1 = triangle_band(n, parts, t + 1);
    if (i1 == i0) return;
    const T* rows = trans ? a + i0 : a + int64_t(i0) * lda;  // op(A) rows i0..i1
    T* band = c + int64_t(i0) * ldc;
    if (i0 > 0) blas::gemm_ex(trans, !trans, i1 - i0, i0, k, alpha, rows, lda, a, lda, beta, band, ldc);
    blas::syrk(trans, i1 - i0, k, alpha, rows, lda, beta, band + i0, ldc);
  });
}

// C (m x n) = alpha S B + beta C (left, S m x m: bands of columns) or alpha B S + beta C
// (right, S n x n: bands of rows); S's lower triangle is read.
template <class T>
void symm(int threads, bool left, int m, int n, T alpha, const T* s, int lds, const T* b, int ldb, T beta, T* c,
          int ldc) {
  run(threads, 2.0 * m * n * (left ? m : n), [&](int t, int parts) {
    const int size = left ? n : m, j0 = even_band(size, parts, t), j1 = even_band(size, parts, t + 1);
    if (j1 == j0) return;
    if (left)
      blas::symm(true, m, j1 - j0, alpha, s, lds, b + j0, ldb, beta, c + j0, ldc);
    else
      blas::symm(false, j1 - j0, n, alpha, s, lds, b + int64_t(j0) * ldb, ldb, beta, c + int64_t(j0) * ldc, ldc);
  });
}

// Lower triangle of C (n x n) = alpha op(A) B + beta C, A and B n x n and contiguous, op(A) = A
// (gemmt) or A^T (gemmt_tn): bands of rows of equal area.
template <class T>
void gemmt(int threads, bool trans_a, int n, T alpha, const T* a, const T* b, T beta, T* c) {
  run(threads, double(n) * n * n, [&](int t, int parts) {
    const int i0 = triangle_band(n, parts, t), i1 = triangle_band(n, parts, t + 1);
    if (i1 == i0) return;
    const T* rows = trans_a ? a + i0 : a + int64_t(i0) * n;  // op(A) rows i0..i1
    T* band = c + int64_t(i0) * n;
    if (i0 > 0) blas::gemm_ex(trans_a, false, i1 - i0, i0, n, alpha, rows, n, b, n, beta, band, n);
    blas::gemmt_ex(trans_a, false, i1 - i0, n, alpha, rows, n, b + i0, n, beta, band + i0, n);
  });
}

// blas::mirror_lower, its tile rows dealt out in turn (row t holds t + 1 tiles: near-equal shares).
template <class T>
void mirror_lower(int threads, T* a, int n) {
  run(threads, kFlopsPerCopiedEntry * n * n, [&](int t, int parts) { blas::mirror_lower_tiles(a, n, t, parts); });
}

}  // namespace curvkit::team_blas
