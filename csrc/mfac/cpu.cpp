// M-FAC family, CPU kernels: the passes over G (OpenMP over fixed column chunks, float64
// accumulation, partial sums added in chunk order so the result does not depend on the thread
// count) and the m x m float64 factor work (OpenBLAS / LAPACK, and the row-parallel rank-one
// update).
#include <cblas.h>
#include <lapacke.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/blas.h"
#include "core/check.h"
#include "core/dispatch.h"
#include "core/half.h"
#include "core/interrupt.h"
#include "core/matrix_utils.h"
#include "core/runtime.h"
#include "core/simd.h"
#include "mfac/mfac.h"

namespace curvkit::mfac {

namespace {

// Storage element -> double. bfloat16 is the top half of a float32, so it widens by a shift.
inline double load(float v) { return v; }
inline double load(double v) { return v; }
inline double load(bfloat16_t v) {
  const uint32_t bits = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline double load(half_t v) { return to_double(v); }

template <class S>
const char* dtype_name() {
  if (std::is_same<S, float>::value) return "float32";
  if (std::is_same<S, double>::value) return "float64";
  if (std::is_same<S, bfloat16_t>::value) return "bfloat16";
  return "float16";
}

// Threads for a loop of `work` multiply-adds: one below ~1e5, where waking the team (and then
// contending with OpenBLAS's spinning pool on few cores) costs more than the loop.
inline int team(int threads, double work) { return work < 1e5 ? 1 : threads; }

// Columns of G one task of a pass covers: fixed by d alone (at most 256 chunks, at least 8192
// columns), so the order partial sums are added in never depends on the thread count.
struct Chunks {
  int64_t size, count;
  explicit Chunks(int64_t d) {
    size = std::max<int64_t>(8192, (d + 255) / 256);
    count = d > 0 ? (d + size - 1) / size : 0;
  }
};

// Four consecutive elements widened to float64: float and double as one vector load (an
// element-wise form had the compiler gather them lane by lane), the half types one by one.
// (Out by reference: a 32-byte vector returned by value would change the ABI without AVX.)
using Double4 = double __attribute__((vector_size(32)));
CK_INLINE void load4(const float* p, Double4& out) {
  using Float4 = float __attribute__((vector_size(16)));
  Float4 v;
  std::memcpy(&v, p, sizeof v);
  out = __builtin_convertvector(v, Double4);
}
CK_INLINE void load4(const double* p, Double4& out) { std::memcpy(&out, p, sizeof out); }
template <class S>
CK_INLINE void load4(const S* p, Double4& out) {
  out = Double4{load(p[0]), load(p[1]), load(p[2]), load(p[3])};
}

// Dot products of R rows with one float64 vector, each row on four accumulators (lane j mod
// 4: 4 R chains in flight, one 256-bit vector a row under AVX2; a single chain is bound by the
// float64 add latency, not memory), x loaded once for the R rows, the lanes added pairwise at
// the end. The order of each row's sum is fixed, the same in every clone.
template <int R, class S>
CK_INLINE void dot_rows_fixed(const S* const* rows, const double* x, int64_t len, double* out) {
  Double4 acc[R] = {};
  int64_t j = 0;
  for (; j + 4 <= len; j += 4) {
    Double4 xv, g;
    load4(x + j, xv);
    for (int r = 0; r < R; ++r) {
      load4(rows[r] + j, g);
      acc[r] += g * xv;
    }
  }
  for (int r = 0; r < R; ++r) {
    double s = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);
    for (int64_t t = j; t < len; ++t) s += load(rows[r][t]) * x[t];
    out[r] = s;
  }
}

template <class S>
CK_INLINE void dot_rows_any(const S* const* rows, int count, const double* x, int64_t len, double* out) {
  switch (count) {
    case 4: return dot_rows_fixed<4>(rows, x, len, out);
    case 3: return dot_rows_fixed<3>(rows, x, len, out);
    case 2: return dot_rows_fixed<2>(rows, x, len, out);
    default: return dot_rows_fixed<1>(rows, x, len, out);
  }
}

// Up to four rows; float and double storage in AVX2 / AVX-512 clones (the widening and the
// products vectorize), the half types as written.
CK_SIMD_CLONES void dot_rows(const float* const* rows, int count, const double* x, int64_t len, double* out) {
  dot_rows_any(rows, count, x, len, out);
}
CK_SIMD_CLONES void dot_rows(const double* const* rows, int count, const double* x, int64_t len, double* out) {
  dot_rows_any(rows, count, x, len, out);
}
template <class S>
void dot_rows(const S* const* rows, int count, const double* x, int64_t len, double* out) {
  dot_rows_any(rows, count, x, len, out);
}

// acc[j] += (g0[j] w0 + g1[j] w1) + (g2[j] w2 + g3[j] w3): four rows of G^T w per sweep of the
// accumulator (a quarter of its loads and stores), in clones as dot_rows.
template <class S>
CK_INLINE void add_rows4_any(double* __restrict__ acc, const S* __restrict__ g0, const S* __restrict__ g1,
                             const S* __restrict__ g2, const S* __restrict__ g3, const double* w, int64_t len) {
  const double w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t j = 0; j < len; ++j)
    acc[j] += (load(g0[j]) * w0 + load(g1[j]) * w1) + (load(g2[j]) * w2 + load(g3[j]) * w3);
}
CK_SIMD_CLONES void add_rows4(double* acc, const float* g0, const float* g1, const float* g2, const float* g3,
                              const double* w, int64_t len) {
  add_rows4_any(acc, g0, g1, g2, g3, w, len);
}
CK_SIMD_CLONES void add_rows4(double* acc, const double* g0, const double* g1, const double* g2, const double* g3,
                              const double* w, int64_t len) {
  add_rows4_any(acc, g0, g1, g2, g3, w, len);
}
template <class S>
void add_rows4(double* acc, const S* g0, const S* g1, const S* g2, const S* g3, const double* w, int64_t len) {
  add_rows4_any(acc, g0, g1, g2, g3, w, len);
}

// Y (n, k) float64 = G[slots] X with X (d, k) in the storage dtype; rows of G in `slots` order.
// Tasks are (column chunk, group of four rows) pairs, chunk-major, so the threads stream
// neighbouring rows against one chunk of X held in cache (64K columns: long row segments for the
// prefetchers); each row's dot product is one task's, and the chunks are added in order: the
// result does not depend on the thread count. A thread takes a chunk's row groups at a time, or
// its share of them when there are fewer chunks than threads (d = 1e4: one chunk).
template <class S>
void gram_product(const S* G, int64_t d, const std::vector<int64_t>& slots, const S* X, int64_t k, double* Y,
                  int threads) {
  const int64_t n = int64_t(slots.size());
  constexpr int64_t chunk = 65536;
  const int64_t chunks = (d + chunk - 1) / chunk, groups = (n + 3) / 4, tasks = chunks * groups;
  std::vector<double> partial(static_cast<size_t>(chunks * n * k), 0.0);
  const int team_size = team(threads, double(n) * double(d) * double(k));
  const int64_t grain = chunks >= team_size ? groups : (groups + team_size - 1) / team_size;
#pragma omp parallel num_threads(team_size)
  {
    std::vector<double> xb(static_cast<size_t>(std::min(chunk, d) * k)), acc(static_cast<size_t>(k));
    int64_t loaded = -1;
    // Dynamically: a thread slowed by a busy core takes fewer tasks instead of holding up the pass.
#pragma omp for schedule(dynamic, grain)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t c = t / groups, r0 = (t % groups) * 4, j0 = c * chunk, len = std::min(chunk, d - j0);
      const int count = int(std::min<int64_t>(4, n - r0));
      if (c != loaded) {
        for (int64_t e = 0; e < len * k; ++e) xb[size_t(e)] = load(X[j0 * k + e]);
        loaded = c;
      }
      double* out = partial.data() + (c * n + r0) * k;
      if (k == 1) {
        const S* rows[4];
        for (int r = 0; r < count; ++r) rows[r] = G + slots[size_t(r0 + r)] * d + j0;
        dot_rows(rows, count, xb.data(), len, out);
      } else {
        for (int r = 0; r < count; ++r) {
          const S* g = G + slots[size_t(r0 + r)] * d + j0;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = 0; j < len; ++j) {
            const double gj = load(g[j]);
            const double* xr = xb.data() + j * k;
            for (int64_t q = 0; q < k; ++q) acc[size_t(q)] += gj * xr[q];
          }
          for (int64_t q = 0; q < k; ++q) out[r * k + q] = acc[size_t(q)];
        }
      }
    }
  }
  for (int64_t e = 0; e < n * k; ++e) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[size_t(c * n * k + e)];
    Y[e] = s;
  }
}

// out = (X - G[slots]^T W) / damp, W (n, k) float64, X and out (d, k) in the storage dtype.
template <class S>
void woodbury_finish(const S* G, int64_t d, const std::vector<int64_t>& slots, const double* W, const S* X, int64_t k,
                     double damp, S* out, int threads) {
  const int64_t n = int64_t(slots.size());
  // 32K columns per task (the float64 accumulator stays in L2, row segments stay long), fewer when
  // that leaves a thread without one. Each column adds its rows in the same order whatever the split.
  const int team_size = team(threads, double(n) * double(d) * double(k));
  Chunks ch(d);
  ch.size = std::max<int64_t>(1, std::min<int64_t>(32768, (d + team_size - 1) / team_size));
  ch.count = (d + ch.size - 1) / ch.size;
#pragma omp parallel num_threads(team_size)
  {
    std::vector<double> acc(static_cast<size_t>(ch.size * k));
#pragma omp for schedule(dynamic)
    for (int64_t c = 0; c < ch.count; ++c) {
      const int64_t j0 = c * ch.size, len = std::min(ch.size, d - j0);
      std::fill(acc.begin(), acc.begin() + len * k, 0.0);
      int64_t i = 0;
      if (k == 1)
        for (; i + 4 <= n; i += 4)
          add_rows4(acc.data(), G + slots[size_t(i)] * d + j0, G + slots[size_t(i + 1)] * d + j0,
                    G + slots[size_t(i + 2)] * d + j0, G + slots[size_t(i + 3)] * d + j0, W + i, len);
      for (; i < n; ++i) {
        const S* g = G + slots[size_t(i)] * d + j0;
        if (k == 1) {
          const double w = W[i];
          for (int64_t j = 0; j < len; ++j) acc[size_t(j)] += load(g[j]) * w;
        } else {
          const double* w = W + i * k;
          for (int64_t j = 0; j < len; ++j) {
            const double gj = load(g[j]);
            for (int64_t q = 0; q < k; ++q) acc[size_t(j * k + q)] += gj * w[q];
          }
        }
      }
      for (int64_t t = 0; t < len * k; ++t)
        out[j0 * k + t] = from_double<S>((load(X[j0 * k + t]) - acc[size_t(t)]) / damp);
    }
  }
}

// A result is never handed on with NaN or Inf: x held them, or |x| / damp overflows the dtype.
template <class S>
void check_result(const S* out, int64_t size, double damp, const char* what) {
  bool finite = true;
  for (int64_t i = 0; i < size; ++i) finite &= std::fabs(load(out[i])) <= DBL_MAX;
  CK_CHECK_VALUE(finite, "the result of ", what, " is not finite in ", dtype_name<S>(),
                 ": argument 'x' holds NaN or Inf, or |x| / damp (argument 'damp' = ", damp, ") overflows the dtype");
}

// Sum of squares of a vector in the storage dtype (chunk order), and whether it is finite.
template <class S>
double squared_norm(const S* g, int64_t d, bool& finite, int threads) {
  const Chunks ch(d);
  std::vector<double> partial(size_t(ch.count), 0.0);
  std::vector<unsigned char> ok(size_t(ch.count), 1);
#pragma omp parallel for schedule(dynamic) num_threads(team(threads, double(d)))
  for (int64_t c = 0; c < ch.count; ++c) {
    const int64_t j0 = c * ch.size, len = std::min(ch.size, d - j0);
    double s = 0;
    bool fin = true;
    for (int64_t j = 0; j < len; ++j) {
      const double v = load(g[j0 + j]);
      fin &= std::fabs(v) <= DBL_MAX;
      s += v * v;
    }
    partial[size_t(c)] = s;
    ok[size_t(c)] = fin;
  }
  double s = 0;
  finite = true;
  for (int64_t c = 0; c < ch.count; ++c) {
    s += partial[size_t(c)];
    finite &= ok[size_t(c)] != 0;
  }
  return s;
}

template <class S>
bool all_finite_array(const S* a, int64_t size, int threads) {
  bool finite = true;
#pragma omp parallel for reduction(&& : finite) num_threads(team(threads, double(size)))
  for (int64_t i = 0; i < size; ++i) finite = finite && std::fabs(load(a[i])) <= DBL_MAX;
  return finite;
}

template <class S>
void widen(const S* a, int64_t size, double* out, int threads) {
#pragma omp parallel for num_threads(team(threads, double(size)))
  for (int64_t i = 0; i < size; ++i) out[i] = load(a[i]);
}

// ---- The m x m float64 factor: row-major, leading dimension ld, lower triangle.

// Cholesky of C = scale * damp * I + K[slots, slots] into L; false if not positive definite.
bool refactor_from_gram(const double* K, int64_t m, const Capacitance& cap, double* L) {
  const int64_t n = cap.n;
  std::fill(L, L + m * m, 0.0);
  for (int64_t p = 0; p < n; ++p)
    for (int64_t q = 0; q <= p; ++q)
      L[p * m + q] = K[cap.slots[size_t(p)] * m + cap.slots[size_t(q)]] + (p == q ? cap.scale * cap.damp : 0.0);
  if (n == 0) return true;
  // Row-major lower is column-major upper: no transposed copy.
  const int info = scipy_LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', blas::dim(n, "the window size"), L,
                                             blas::dim(m, "the window capacity"));
  if (info != 0) return false;
  for (int64_t p = 0; p < n; ++p) std::fill(L + p * m + p + 1, L + p * m + n, 0.0);
  return true;
}

// x <- L^-1 x (forward substitution) on the leading n x n block.
void forward(const double* L, int64_t ld, int64_t n, double* x) {
  if (n > 0) scipy_cblas_dtrsv(CblasRowMajor, CblasLower, CblasNoTrans, CblasNonUnit, int(n), L, int(ld), x, 1);
}

// Y (n, k) <- C^-1 Y = L^-T L^-1 Y.
void cholesky_solve(const double* L, int64_t ld, int64_t n, double* Y, int64_t k) {
  if (n == 0 || k == 0) return;
  scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, int(n), int(k), 1.0, L, int(ld),
                    Y, int(k));
  scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasTrans, CblasNonUnit, int(n), int(k), 1.0, L, int(ld), Y,
                    int(k));
}

// Drops the first row and column of C = L L^T: the trailing factor L22 becomes chol(L22 L22^T +
// v v^T), v = L[1:, 0], written to the leading (n-1) x (n-1) block. With p = L22^-1 v,
// L22 L22^T + v v^T = L22 (I + p p^T) L22^T and chol(I + p p^T) is known in closed form
// (sigma_k = 1 + sum_{j<k} p_j^2): M_kk = sqrt(sigma_{k+1}/sigma_k), M_ik = p_i p_k /
// sqrt(sigma_k sigma_{k+1}) for i > k. So row i of L22 M needs only row i of L22 and p (a suffix
// sum), and the rows run in parallel; sigma >= 1 keeps every step free of cancellation.
void remove_first(double* L, int64_t ld, int64_t n, int threads) {
  if (n <= 1) {
    if (n == 1) L[0] = 0;
    return;
  }
  const int64_t r = n - 1;
  double* L22 = L + ld + 1;
  std::vector<double> p(static_cast<size_t>(r)), sigma(static_cast<size_t>(r + 1)), diag(static_cast<size_t>(r)),
      coef(static_cast<size_t>(r));
  for (int64_t i = 0; i < r; ++i) p[size_t(i)] = L[(i + 1) * ld];
  forward(L22, ld, r, p.data());
  sigma[0] = 1;
  for (int64_t k = 0; k < r; ++k) sigma[size_t(k + 1)] = sigma[size_t(k)] + p[size_t(k)] * p[size_t(k)];
  for (int64_t k = 0; k < r; ++k) {
    diag[size_t(k)] = std::sqrt(sigma[size_t(k + 1)] / sigma[size_t(k)]);
    coef[size_t(k)] = p[size_t(k)] / std::sqrt(sigma[size_t(k)] * sigma[size_t(k + 1)]);
  }
#pragma omp parallel for schedule(dynamic, 16) num_threads(team(threads, 0.5 * double(r) * double(r)))
  for (int64_t i = 0; i < r; ++i) {
    double* row = L22 + i * ld;
    double suffix = 0;
    for (int64_t k = i; k >= 0; --k) {
      const double old = row[k];
      row[k] = old * diag[size_t(k)] + coef[size_t(k)] * suffix;
      suffix += old * p[size_t(k)];
    }
  }
  // Shift the updated block up and left by one (row i reads row i + 1 before it is overwritten).
  for (int64_t i = 0; i < r; ++i) {
    std::memmove(L + i * ld, L22 + i * ld, size_t(i + 1) * sizeof(double));
    std::fill(L + i * ld + i + 1, L + i * ld + n, 0.0);
  }
  std::fill(L + r * ld, L + r * ld + n, 0.0);
}

// Appends row n to the factor of the leading n x n block: r = L^-1 c, L[n, n] = sqrt(diagonal -
// r.r). False (nothing written) when that is not positive.
bool append_row(double* L, int64_t ld, int64_t n, std::vector<double> c, double diagonal) {
  forward(L, ld, n, c.data());
  double rr = 0;
  for (int64_t p = 0; p < n; ++p) rr += c[size_t(p)] * c[size_t(p)];
  const double pivot = diagonal - rr;
  if (!(pivot > 0) || !std::isfinite(pivot) || !std::isfinite(rr)) return false;
  std::copy_n(c.data(), n, L + n * ld);  // n may be 0 (c empty: memcpy from null is undefined)
  L[n * ld + n] = std::sqrt(pivot);
  return true;
}

[[noreturn]] void throw_breakdown(const Capacitance& cap) {
  throw ValueError(cat("the capacitance matrix damp*c*I + G G^T (", cap.n, " x ", cap.n, ", c = ", cap.scale,
                       ", damp = ", cap.damp,
                       ") is not positive definite in float64: 'damp' is too small for the gradients' norms"));
}

// diag(F^-1) = (1 - column sums of (L^-1 G[slots])^2) / damp, a column chunk per task.
template <class S>
void inverse_diag(const S* G, int64_t d, const Capacitance& cap, const double* L, int64_t ld, S* out, int threads) {
  const int64_t n = cap.n, width = 256;
  const int64_t tasks = (d + width - 1) / width;
  SingleThreadedBlas single;
#pragma omp parallel num_threads(team(threads, double(n) * double(n) * double(d)))
  {
    std::vector<double> z(static_cast<size_t>(std::max<int64_t>(n, 1) * width));
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t j0 = t * width, len = std::min(width, d - j0);
      for (int64_t p = 0; p < n; ++p) {
        const S* g = G + cap.slots[size_t(p)] * d + j0;
        for (int64_t j = 0; j < len; ++j) z[size_t(p * len + j)] = load(g[j]);
      }
      if (n > 0)
        scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, int(n), int(len), 1.0, L,
                          int(ld), z.data(), int(len));
      for (int64_t j = 0; j < len; ++j) {
        double s = 0;
        for (int64_t p = 0; p < n; ++p) s += z[size_t(p * len + j)] * z[size_t(p * len + j)];
        out[j0 + j] = from_double<S>((1.0 - s) / cap.damp);
      }
    }
  }
}

// F^-1 X through a factored capacitance: the two passes over G and an O(n^2 k) solve.
template <class S>
void woodbury_apply(const S* G, int64_t d, const Capacitance& cap, const double* L, int64_t ld, const S* X, int64_t k,
                    S* out, int threads) {
  std::vector<double> Y(static_cast<size_t>(cap.n * k));
  gram_product(G, d, cap.slots, X, k, Y.data(), threads);
  cholesky_solve(L, ld, cap.n, Y.data(), k);
  woodbury_finish(G, d, cap.slots, Y.data(), X, k, cap.damp, out, threads);
}

int64_t columns(const ArrayView& x) { return x.ndim() == 2 ? x.size(1) : 1; }

// K (m x m, full) = G G^T in float64, a column chunk at a time through dsyrk (threaded BLAS).
template <class S>
void gram_matrix(const S* G, int64_t m, int64_t d, double* K) {
  std::fill(K, K + m * m, 0.0);
  if (m == 0) return;
  const int64_t width = std::max<int64_t>(256, std::min<int64_t>(4096, (int64_t(1) << 22) / m));
  std::vector<double> buf(static_cast<size_t>(m * width));
  for (int64_t j0 = 0; j0 < d; j0 += width) {
    const int64_t len = std::min(width, d - j0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < len; ++j) buf[size_t(i * len + j)] = load(G[i * d + j0 + j]);
    blas::syrk(false, int(m), int(len), 1.0, buf.data(), int(len), 1.0, K, int(m));
    throw_if_interrupted();
  }
  blas::mirror_lower(K, m);
}

// The state after a push into a window of capacity m.
FisherWindowState next_state(const FisherWindowState& state, int64_t m) {
  const bool full = state.size == m;
  FisherWindowState next = state;
  next.size = full ? m : state.size + 1;
  next.oldest = full ? (state.oldest + 1) % m : 0;
  next.count = state.count + 1;
  next.since_refactor = state.since_refactor + 1;
  return next;
}

// Once the new gradient's Gram row is in K: L follows it, by the rank-one update and the append
// (O(m^2)), or refactored from K when c changed, the period came, or the append broke down.
void advance_factor(const double* K, double* L, int64_t m, const FisherWindowState& state, FisherWindowState& next,
                    const FisherWindowOptions& o, const std::vector<double>& dots, double norm2, int threads) {
  const Capacitance cap = window_capacitance(next, m, o);
  const double old_scale = fisher_window_scale(m, state.size, o.normalize);
  const int64_t every = o.refactor_every > 0 ? o.refactor_every : m;
  bool refactor = cap.scale != old_scale || next.since_refactor >= every;
  if (!refactor) {
    if (state.size == m) remove_first(L, m, state.size, threads);
    refactor = !append_row(L, m, int64_t(dots.size()), dots, cap.scale * o.damp + norm2);
  }
  if (refactor) {
    if (!refactor_from_gram(K, m, cap, L)) throw_breakdown(cap);
    next.since_refactor = 0;
  }
}

void check_kappa(double norm2, const Capacitance& cap) {
  const double kappa = norm2 / (cap.scale * cap.damp);
  CK_CHECK_VALUE(kappa <= kMaxKappa, "argument 'g' has ||g||^2 / (c * damp) = ", kappa, " > ", kMaxKappa, ": 'damp' (",
                 cap.damp, ") is too small for float64 to hold the capacitance matrix positive ",
                 "definite; the window is unchanged");
}

}  // namespace

// ---- Sliding window

FisherWindowState push_cpu(const FisherWindowArrays& w, const FisherWindowState& state, const FisherWindowOptions& o,
                           const ArrayView& g) {
  const int threads = num_threads();
  const int64_t m = w.G.size(0), d = w.G.size(1), n = state.size;
  const bool full = n == m;
  const int64_t target = full ? state.oldest : n;
  FisherWindowState next = next_state(state, m);
  const Capacitance cap = window_capacitance(next, m, o);
  double* K = w.gram.ptr<double>();
  double* L = w.factor.ptr<double>();

  CK_DISPATCH_FLOATING(w.G.dtype, "G", S, [&] {
    S* G = w.G.ptr<S>();
    const S* gp = g.ptr<const S>();
    bool finite = true;
    const double norm2 = squared_norm(gp, d, finite, threads);
    CK_CHECK_VALUE(finite, "argument 'g' contains NaN or Inf; the window is unchanged");
    check_kappa(norm2, cap);
    // The gradients that stay, in age order (their slots), and their products with g.
    std::vector<int64_t> kept;
    for (int64_t p = full ? 1 : 0; p < n; ++p) kept.push_back((state.oldest + p) % m);
    std::vector<double> dots(kept.size());
    gram_product(G, d, kept, gp, 1, dots.data(), threads);
    std::memcpy(G + target * d, gp, size_t(d) * sizeof(S));
    for (size_t i = 0; i < kept.size(); ++i) K[target * m + kept[i]] = K[kept[i] * m + target] = dots[i];
    K[target * m + target] = norm2;
    advance_factor(K, L, m, state, next, o, dots, norm2, threads);
  });
  return next;
}

void ihvp_cpu(const FisherWindowArrays& w, const Capacitance& cap, const ArrayView& x, const ArrayView& out) {
  const int threads = num_threads();
  CK_DISPATCH_FLOATING(w.G.dtype, "G", S, [&] {
    woodbury_apply(w.G.ptr<const S>(), w.G.size(1), cap, w.factor.ptr<const double>(), w.G.size(0), x.ptr<const S>(),
                   columns(x), out.ptr<S>(), threads);
    check_result(out.ptr<const S>(), x.numel(), cap.damp, "ihvp");
  });
}

void diag_cpu(const FisherWindowArrays& w, const Capacitance& cap, const ArrayView& out) {
  const int threads = num_threads();
  CK_DISPATCH_FLOATING(w.G.dtype, "G", S, [&] {
    inverse_diag(w.G.ptr<const S>(), w.G.size(1), cap, w.factor.ptr<const double>(), w.G.size(0), out.ptr<S>(),
                 threads);
    check_result(out.ptr<const S>(), out.numel(), cap.damp, "diag");
  });
}

void refactor_cpu(const FisherWindowArrays& w, const Capacitance& cap) {
  if (!refactor_from_gram(w.gram.ptr<const double>(), w.G.size(0), cap, w.factor.ptr<double>())) throw_breakdown(cap);
}

// ---- Compressed (sparse) window

namespace {

// The k largest |a[j]| of [b0, b1), ties to the smaller index (deterministic), ascending.
void select_block(const std::vector<double>& a, int64_t b0, int64_t b1, int64_t k, std::vector<int32_t>& chosen) {
  std::vector<int32_t> idx(static_cast<size_t>(b1 - b0));
  for (int64_t j = b0; j < b1; ++j) idx[size_t(j - b0)] = int32_t(j);
  const auto larger = [&](int32_t x, int32_t y) {
    const double ax = std::fabs(a[size_t(x)]), ay = std::fabs(a[size_t(y)]);
    return ax > ay || (ax == ay && x < y);
  };
  if (k < int64_t(idx.size())) std::nth_element(idx.begin(), idx.begin() + k, idx.end(), larger);
  idx.resize(size_t(k));
  std::sort(idx.begin(), idx.end());
  chosen.insert(chosen.end(), idx.begin(), idx.end());
}

// Y (rows, k) = the sparse rows `rows` times X (d, k) (X of any element type).
template <class S, class T>
void sparse_rows_times(const int32_t* I, const S* V, int64_t nnz, const std::vector<int64_t>& rows, const T* X,
                       int64_t k, double* Y, int threads) {
  const int64_t n = int64_t(rows.size());
#pragma omp parallel for schedule(static) num_threads(team(threads, double(n) * double(nnz) * double(k)))
  for (int64_t p = 0; p < n; ++p) {
    const int64_t s = rows[size_t(p)];
    for (int64_t q = 0; q < k; ++q) Y[p * k + q] = 0;
    for (int64_t t = 0; t < nnz; ++t) {
      const double v = load(V[s * nnz + t]);
      const int64_t j = I[s * nnz + t];
      for (int64_t q = 0; q < k; ++q) Y[p * k + q] += v * load(X[j * k + q]);
    }
  }
}

}  // namespace

FisherWindowState sparse_push_cpu(const SparseWindowArrays& w, const FisherWindowState& state,
                                  const FisherWindowOptions& o, const SparseOptions& so, const ArrayView& g) {
  const int threads = num_threads();
  const int64_t m = w.indices.size(0), nnz = w.indices.size(1), d = w.error.size(0), n = state.size;
  const int64_t block = so.block > 0 ? so.block : d;
  const bool full = n == m;
  const int64_t target = full ? state.oldest : n;
  FisherWindowState next = next_state(state, m);
  const Capacitance cap = window_capacitance(next, m, o);
  double* K = w.gram.ptr<double>();
  double* L = w.factor.ptr<double>();
  int32_t* I = w.indices.ptr<int32_t>();
  CK_DISPATCH_FLOATING(w.values.dtype, "values", S, [&] {
    CK_DISPATCH_COMPUTE(w.values.dtype, E, [&] {
      S* V = w.values.ptr<S>();
      E* err = w.error.ptr<E>();
      const S* gp = g.ptr<const S>();
      // e + g, checked before anything is written.
      std::vector<double> acc(static_cast<size_t>(d));
      bool finite = true;
      for (int64_t j = 0; j < d; ++j) {
        acc[size_t(j)] = double(err[j]) + load(gp[j]);
        finite &= std::fabs(load(gp[j])) <= DBL_MAX && std::fabs(acc[size_t(j)]) <= DBL_MAX;
      }
      CK_CHECK_VALUE(finite,
                     "argument 'g' contains NaN or Inf (or overflows the error feedback); the window is "
                     "unchanged");
      std::vector<int32_t> chosen;
      chosen.reserve(size_t(nnz));
      for (int64_t b0 = 0; b0 < d; b0 += block)
        select_block(acc, b0, std::min(d, b0 + block), std::min(so.k_per_block, std::min(d, b0 + block) - b0), chosen);
      std::vector<S> kept_values(static_cast<size_t>(nnz));
      std::vector<double> z(size_t(d), 0.0);  // the stored row, densified
      double norm2 = 0;
      for (int64_t t = 0; t < nnz; ++t) {
        kept_values[size_t(t)] = from_double<S>(acc[size_t(chosen[size_t(t)])]);
        const double v = load(kept_values[size_t(t)]);
        z[size_t(chosen[size_t(t)])] = v;
        norm2 += v * v;
      }
      check_kappa(norm2, cap);
      std::vector<int64_t> kept;
      for (int64_t p = full ? 1 : 0; p < n; ++p) kept.push_back((state.oldest + p) % m);
      std::vector<double> dots(kept.size());
      sparse_rows_times(I, V, nnz, kept, z.data(), 1, dots.data(), threads);
      // The error keeps what was not stored, the stored values' rounding included.
      for (int64_t j = 0; j < d; ++j) err[j] = E(acc[size_t(j)] - z[size_t(j)]);
      std::copy_n(chosen.data(), nnz, I + target * nnz);  // nnz may be 0
      std::copy_n(kept_values.data(), nnz, V + target * nnz);
      for (size_t i = 0; i < kept.size(); ++i) K[target * m + kept[i]] = K[kept[i] * m + target] = dots[i];
      K[target * m + target] = norm2;
      advance_factor(K, L, m, state, next, o, dots, norm2, threads);
    });
  });
  return next;
}

void sparse_ihvp_cpu(const SparseWindowArrays& w, const Capacitance& cap, const ArrayView& x, const ArrayView& out) {
  const int threads = num_threads();
  const int64_t m = w.indices.size(0), nnz = w.indices.size(1), d = w.error.size(0), n = cap.n, k = columns(x);
  const int32_t* I = w.indices.ptr<const int32_t>();
  const double* L = w.factor.ptr<const double>();
  CK_DISPATCH_FLOATING(w.values.dtype, "values", S, [&] {
    const S* V = w.values.ptr<const S>();
    const S* X = x.ptr<const S>();
    std::vector<double> Y(size_t(n * k), 0.0);
    sparse_rows_times(I, V, nnz, cap.slots, X, k, Y.data(), threads);
    cholesky_solve(L, m, n, Y.data(), k);
    std::vector<double> acc(size_t(d * k), 0.0);
    for (int64_t p = 0; p < n; ++p) {
      const int64_t s = cap.slots[size_t(p)];
      for (int64_t t = 0; t < nnz; ++t) {
        const double v = load(V[s * nnz + t]);
        const int64_t j = I[s * nnz + t];
        for (int64_t q = 0; q < k; ++q) acc[size_t(j * k + q)] += v * Y[size_t(p * k + q)];
      }
    }
    S* o = out.ptr<S>();
    for (int64_t t = 0; t < d * k; ++t) o[t] = from_double<S>((load(X[t]) - acc[size_t(t)]) / cap.damp);
    check_result(o, d * k, cap.damp, "ihvp");
  });
}

// ---- Static

void static_cpu(const ArrayView& G, const ArrayView* x, const ArrayView* out, const ArrayView* diag, const ArrayView* V,
                double damp) {
  const int threads = num_threads();
  const int64_t m = G.size(0), d = G.size(1);
  Capacitance cap;
  cap.n = m;
  cap.damp = damp;
  cap.scale = double(std::max<int64_t>(m, 1));
  cap.slots.resize(size_t(m));
  for (int64_t i = 0; i < m; ++i) cap.slots[size_t(i)] = i;
  blas::dim(m, "the number of gradients m");
  CK_DISPATCH_FLOATING(G.dtype, "G", S, [&] {
    const S* g = G.ptr<const S>();
    CK_CHECK_VALUE(all_finite_array(g, m * d, threads), "argument 'G' contains NaN or Inf");
    if (x) CK_CHECK_VALUE(all_finite_array(x->ptr<const S>(), x->numel(), threads), "argument 'x' contains NaN or Inf");
    std::vector<double> K(static_cast<size_t>(m * m)), L(size_t(m * m));
    gram_matrix(g, m, d, K.data());
    for (int64_t i = 0; i < m; ++i) {
      const double kappa = K[size_t(i * m + i)] / (cap.scale * damp);
      CK_CHECK_VALUE(kappa <= kMaxKappa, "argument 'damp' (", damp, ") is too small: gradient ", i,
                     " has ||g||^2 / (m * damp) = ", kappa, " > ", kMaxKappa);
    }
    if (!refactor_from_gram(K.data(), m, cap, L.data())) throw_breakdown(cap);
    if (x) {
      woodbury_apply(g, d, cap, L.data(), m, x->ptr<const S>(), columns(*x), out->ptr<S>(), threads);
      check_result(out->ptr<const S>(), out->numel(), damp, "fisher_ihvp");
    }
    if (diag) {
      inverse_diag(g, d, cap, L.data(), m, diag->ptr<S>(), threads);
      check_result(diag->ptr<const S>(), diag->numel(), damp, "fisher_inverse_diag");
    }
    if (V) {
      double* v = V->ptr<double>();
      const int ld = blas::dim(d, "the dimension d");
      widen(g, m * d, v, threads);
      if (m > 0 && d > 0)
        scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, int(m), ld, 1.0, L.data(),
                          int(m), v, ld);
    }
  });
}

void entries_cpu(const ArrayView& V, const ArrayView& rows, const ArrayView& cols, const ArrayView& out, double damp) {
  const int64_t m = V.size(0), d = V.size(1), count = rows.numel();
  const int64_t* r = rows.ptr<const int64_t>();
  const int64_t* c = cols.ptr<const int64_t>();
  for (int64_t e = 0; e < count; ++e) {
    CK_CHECK_VALUE(r[e] >= 0 && r[e] < d, "argument 'rows' entry ", e, " (", r[e], ") is outside [0, ", d - 1, "]");
    CK_CHECK_VALUE(c[e] >= 0 && c[e] < d, "argument 'cols' entry ", e, " (", c[e], ") is outside [0, ", d - 1, "]");
  }
  const double* v = V.ptr<const double>();
  double* o = out.ptr<double>();
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (count * m > 65536)
  for (int64_t e = 0; e < count; ++e) {
    double s = 0;
    for (int64_t p = 0; p < m; ++p) s += v[p * d + r[e]] * v[p * d + c[e]];
    o[e] = ((r[e] == c[e] ? 1.0 : 0.0) - s) / damp;
  }
}

// ---- Blockwise

void blocks_cpu(const ArrayView& G, const ArrayView* x, const ArrayView* out, const ArrayView* diag, double damp,
                int64_t block) {
  const int threads = num_threads();
  const int64_t m = G.size(0), d = G.size(1);
  const int64_t count = d > 0 ? (d + block - 1) / block : 0;
  const int64_t k = x ? columns(*x) : 0;
  const double scale = double(std::max<int64_t>(m, 1));
  blas::dim(std::min(block, d), "argument 'block_size'");
  blas::dim(m, "the number of gradients m");
  std::vector<unsigned char> failed(size_t(count), 0);
  CK_DISPATCH_FLOATING(G.dtype, "G", S, [&] {
    const S* g = G.ptr<const S>();
    CK_CHECK_VALUE(all_finite_array(g, m * d, threads), "argument 'G' contains NaN or Inf");
    if (x) CK_CHECK_VALUE(all_finite_array(x->ptr<const S>(), x->numel(), threads), "argument 'x' contains NaN or Inf");
    const auto width = [&](int64_t b) { return std::min(block, d - b * block); };
    const auto cost = [&](int64_t b) {
      const double w = double(width(b));
      return w <= double(m) ? w * w * double(m) : double(m) * double(m) * w;
    };
    run_matrix_tasks(threads, count, cost, [&](int64_t b, int) {
      const int64_t j0 = b * block, bw = width(b);
      const int ibw = int(bw), im = int(m);
      std::vector<double> Gb(static_cast<size_t>(m * bw));
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < bw; ++j) Gb[size_t(i * bw + j)] = load(g[i * d + j0 + j]);
      std::vector<double> xb;
      if (x) {
        xb.resize(size_t(bw * k));
        const S* xp = x->ptr<const S>() + j0 * k;
        for (int64_t t = 0; t < bw * k; ++t) xb[size_t(t)] = load(xp[t]);
      }
      std::vector<double> result(static_cast<size_t>(x ? bw * k : bw));
      if (bw <= m || m == 0) {
        // Dense F_b = damp I + G_b^T G_b / m (bw x bw).
        std::vector<double> F(size_t(bw * bw), 0.0);
        if (m > 0) blas::syrk(true, ibw, im, 1.0 / scale, Gb.data(), ibw, 0.0, F.data(), ibw);
        for (int64_t j = 0; j < bw; ++j) F[size_t(j * bw + j)] += damp;
        if (scipy_LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', ibw, F.data(), ibw) != 0) {
          failed[size_t(b)] = 1;
          return;
        }
        if (x) {
          result = xb;
          cholesky_solve(F.data(), bw, bw, result.data(), k);
        } else {
          if (scipy_LAPACKE_dpotri_work(LAPACK_COL_MAJOR, 'U', ibw, F.data(), ibw) != 0) {
            failed[size_t(b)] = 1;
            return;
          }
          for (int64_t j = 0; j < bw; ++j) result[size_t(j)] = F[size_t(j * bw + j)];
        }
      } else {
        // Woodbury with the m x m capacitance of the block.
        std::vector<double> C(size_t(m * m), 0.0);
        blas::syrk(false, im, ibw, 1.0, Gb.data(), ibw, 0.0, C.data(), im);
        for (int64_t i = 0; i < m; ++i) C[size_t(i * m + i)] += scale * damp;
        if (scipy_LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', im, C.data(), im) != 0) {
          failed[size_t(b)] = 1;
          return;
        }
        if (x) {
          std::vector<double> Y(static_cast<size_t>(m * k));
          scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, im, int(k), ibw, 1.0, Gb.data(), ibw, xb.data(),
                            int(k), 0.0, Y.data(), int(k));
          cholesky_solve(C.data(), m, m, Y.data(), k);
          result = xb;
          scipy_cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, ibw, int(k), im, -1.0, Gb.data(), ibw, Y.data(),
                            int(k), 1.0, result.data(), int(k));
          for (double& v : result) v /= damp;
        } else {
          scipy_cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, im, ibw, 1.0, C.data(),
                            im, Gb.data(), ibw);
          for (int64_t j = 0; j < bw; ++j) {
            double s = 0;
            for (int64_t i = 0; i < m; ++i) s += Gb[size_t(i * bw + j)] * Gb[size_t(i * bw + j)];
            result[size_t(j)] = (1.0 - s) / damp;
          }
        }
      }
      S* o = x ? out->ptr<S>() + j0 * k : diag->ptr<S>() + j0;
      for (size_t t = 0; t < result.size(); ++t) o[t] = from_double<S>(result[t]);
    });
    if (x) check_result(out->ptr<const S>(), out->numel(), damp, "fisher_ihvp");
    if (diag) check_result(diag->ptr<const S>(), diag->numel(), damp, "fisher_inverse_diag");
  });
  for (int64_t b = 0; b < count; ++b)
    CK_CHECK_VALUE(!failed[size_t(b)], "block ", b, " of F is not positive definite in float64: 'damp' (", damp,
                   ") is too small for the gradients' norms");
}

}  // namespace curvkit::mfac
