// Householder QR on curvkit's OpenMP team (see team_blas.h for why one pool): LAPACK's blocked
// algorithm (geqrf, then Q formed as orgqr does), with each block's update of the columns to its
// right split into chunks that the team's threads take as they come. The first thread factors
// the next panel (level-2, the serial part) while the others update the rest with the current
// block (look-ahead), and Q is formed by level-3 updates only, into a separate matrix. Threaded
// OpenBLAS geqrf + orgqr on 2 cores lost half its speed to libgomp's workers, which spin for
// milliseconds after any OpenMP region (PyTorch's or curvkit's) and take its second core
// (bench/results/optimizers_cpu.md). The caller holds SingleThreadedBlas. Column-major.
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "core/blas.h"
#include "core/team_blas.h"

namespace curvkit::team_qr {

// Reflectors per block (LAPACK's own default for geqrf; 16 and 48 were slower here).
constexpr int kBlock = 32;
// An update's columns go out in chunks of at least kMinChunk, about kChunksPerThread per thread:
// the first thread joins late (after its panel) and takes fewer (measured on 2 cores: 32 to 128
// columns per chunk within 10% of one another at 784^2).
constexpr int kMinChunk = 32;
constexpr int kChunksPerThread = 2;

inline void geqr2(int m, int n, float* a, int lda, float* tau, float* work) {
  scipy_LAPACKE_sgeqr2_work(LAPACK_COL_MAJOR, m, n, a, lda, tau, work);
}
inline void geqr2(int m, int n, double* a, int lda, double* tau, double* work) {
  scipy_LAPACKE_dgeqr2_work(LAPACK_COL_MAJOR, m, n, a, lda, tau, work);
}
inline void larft(int n, int k, const float* v, int ldv, const float* tau, float* t, int ldt) {
  scipy_LAPACKE_slarft_work(LAPACK_COL_MAJOR, 'F', 'C', n, k, v, ldv, tau, t, ldt);
}
inline void larft(int n, int k, const double* v, int ldv, const double* tau, double* t, int ldt) {
  scipy_LAPACKE_dlarft_work(LAPACK_COL_MAJOR, 'F', 'C', n, k, v, ldv, tau, t, ldt);
}
// C (m x n) <- H^T C (transpose) or H C, H = I - V T V^T from k reflectors in V (m x k).
inline void larfb(bool transpose, int m, int n, int k, const float* v, int ldv, const float* t, int ldt, float* c,
                  int ldc, float* work) {
  scipy_LAPACKE_slarfb_work(LAPACK_COL_MAJOR, 'L', transpose ? 'T' : 'N', 'F', 'C', m, n, k, v, ldv, t, ldt, c, ldc,
                            work, n);
}
inline void larfb(bool transpose, int m, int n, int k, const double* v, int ldv, const double* t, int ldt, double* c,
                  int ldc, double* work) {
  scipy_LAPACKE_dlarfb_work(LAPACK_COL_MAJOR, 'L', transpose ? 'T' : 'N', 'F', 'C', m, n, k, v, ldv, t, ldt, c, ldc,
                            work, n);
}

// QR of a (m x k, m >= k, column-major, leading dimension m) on `threads` threads: a is left
// holding R and the reflectors (as geqrf leaves them), q (m x k) the explicit Q (as orgqr).
template <class T>
void qr(int threads, int m, int k, T* a, T* q) {
  const int blocks = (k + kBlock - 1) / kBlock;
  std::vector<T> tau(static_cast<size_t>(k)), tmat(size_t(blocks) * kBlock * kBlock);
  std::vector<std::atomic<int>> taken(size_t(2 * blocks));  // chunks of each update handed out
  for (auto& c : taken) c.store(0, std::memory_order_relaxed);
  const auto col = [&](T* x, int row, int column) { return x + int64_t(column) * m + row; };
  const auto first = [](int b) { return b * kBlock; };
  const auto width = [&](int b) { return std::min(kBlock, k - b * kBlock); };
  const auto panel = [&](int b, T* work) {  // reflectors of block b and their T
    const int j = first(b);
    geqr2(m - j, width(b), col(a, j, j), m, tau.data() + j, work);
    larft(m - j, width(b), col(a, j, j), m, tau.data() + j, tmat.data() + size_t(b) * kBlock * kBlock, kBlock);
  };
  // Block b applied to columns [c0, c1) of x (a: H_b^T, the factorization; q: H_b, forming Q).
  const auto apply = [&](int b, bool transpose, T* x, int c0, int c1, T* work) {
    const int j = first(b);
    larfb(transpose, m - j, c1 - c0, width(b), col(a, j, j), m, tmat.data() + size_t(b) * kBlock * kBlock, kBlock,
          col(x, j, c0), m, work);
  };
  const double flops = 4.0 / 3.0 * double(k) * k * (3.0 * m - k);  // geqrf's and orgqr's
  team_blas::run(threads, flops, [&](int t, int parts) {
    std::vector<T> work(size_t(k) * kBlock);  // larfb's, for up to k columns
    const auto chunks = [&](std::atomic<int>& next, int c0, int c1, auto body) {
      const int count = kChunksPerThread * parts, size = std::max(kMinChunk, (c1 - c0 + count - 1) / count);
      for (int c = c0 + next.fetch_add(size); c < c1; c = c0 + next.fetch_add(size)) body(c, std::min(c1, c + size));
    };
    const auto sync = [parts] {
      if (parts > 1) {
#pragma omp barrier
      }
    };
    if (t == 0) panel(0, work.data());
    sync();
    for (int b = 0; b < blocks; ++b) {
      const int next = std::min(k, first(b + 1)), after = std::min(k, first(b + 2));
      if (t == 0 && b + 1 < blocks) {
        apply(b, true, a, next, after, work.data());
        panel(b + 1, work.data());
      }
      chunks(taken[size_t(b)], after, k, [&](int c0, int c1) { apply(b, true, a, c0, c1, work.data()); });
      sync();
    }
    // Q = H_0 H_1 ... applied to the first k columns of I, last block first.
    for (int c = t; c < k; c += parts) {
      std::fill(col(q, 0, c), col(q, m, c), T(0));
      *col(q, c, c) = T(1);
    }
    sync();
    for (int b = blocks - 1; b >= 0; --b) {
      chunks(taken[size_t(blocks + b)], first(b), k, [&](int c0, int c1) { apply(b, false, q, c0, c1, work.data()); });
      sync();
    }
  });
}

}  // namespace curvkit::team_qr
