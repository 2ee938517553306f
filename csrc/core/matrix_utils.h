// Helpers shared by the dense matrix-function families (Newton–Schulz, inverse roots): input
// checks and conversions for batches of square matrices, norms, the convergence test of
// quadratically convergent iterations (its rules in core/numerics.h, shared with CUDA), and the
// batch scheduler.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "core/array.h"
#include "core/blas.h"
#include "core/check.h"
#include "core/dispatch.h"
#include "core/interrupt.h"
#include "core/numerics.h"
#include "core/runtime.h"

namespace curvkit {

// Matrices at most this cheap (n^3 or r^2 c flops) run one per thread with single-threaded
// BLAS; larger ones one at a time with all threads inside BLAS.
constexpr double kSmallTask = 512.0 * 512.0 * 512.0;

// Checks matrix `index` of `a`: finite, and symmetric within the dtype's tolerance.
inline void check_symmetric(const ArrayView& a, int64_t index, const char* name) {
  const int64_t n = a.size(-1);
  CK_DISPATCH_FLOATING(a.dtype, name, S, [&] {
    const S* p = a.ptr<const S>() + index * n * n;
    double amax = 0, dmax = 0;
    bool finite = true;
    blas::for_lower_tiles(n, [&](int64_t i, int64_t j) {
      const double x = to_double(p[i * n + j]), y = to_double(p[j * n + i]);
      finite &= std::fabs(x) <= DBL_MAX && std::fabs(y) <= DBL_MAX;
      amax = std::max(amax, std::max(std::fabs(x), std::fabs(y)));
      dmax = std::max(dmax, std::fabs(x - y));
    });
    CK_CHECK_VALUE(finite, "argument '", name, "' contains NaN or Inf (matrix ", index, ")");
    CK_CHECK_VALUE(dmax <= symmetry_tolerance(a.dtype) * amax, "argument '", name, "' must be symmetric: matrix ",
                   index, " has max|A - A^T| / max|A| = ", amax > 0 ? dmax / amax : 0.0);
  });
}

// Checks matrix `index` of a (..., m, k) array `a` for NaN and Inf.
inline void check_finite_matrix(const ArrayView& a, int64_t index, const char* name) {
  const int64_t size = a.size(-2) * a.size(-1);
  CK_DISPATCH_FLOATING(a.dtype, name, S, [&] {
    const S* p = a.ptr<const S>() + index * size;
    bool finite = true;
    for (int64_t i = 0; i < size; ++i) finite &= std::fabs(to_double(p[i])) <= DBL_MAX;
    CK_CHECK_VALUE(finite, "argument '", name, "' contains NaN or Inf (matrix ", index, ")");
  });
}

// (A + A^T)/2 of matrix `index`, in T.
template <class T>
void load_symmetrized(const ArrayView& a, int64_t index, T* dst) {
  const int64_t n = a.size(-1);
  CK_DISPATCH_FLOATING(a.dtype, "A", S, [&] {
    const S* p = a.ptr<const S>() + index * n * n;
    blas::for_lower_tiles(n, [&](int64_t i, int64_t j) {
      dst[i * n + j] = dst[j * n + i] = T(0.5 * (to_double(p[i * n + j]) + to_double(p[j * n + i])));
    });
  });
}

// Matrix `index` of a (..., m, k) array, as T (elements in order).
template <class T>
void load_matrix(const ArrayView& a, int64_t index, T* dst) {
  const int64_t size = a.size(-2) * a.size(-1);
  CK_DISPATCH_FLOATING(a.dtype, "input", S, [&] {
    const S* p = a.ptr<const S>() + index * size;
    for (int64_t i = 0; i < size; ++i) dst[i] = T(to_double(p[i]));
  });
}

// scale * src into matrix `index` of a (..., m, k) output, rounded once to its dtype; false, with
// zeros written, where a value overflowed the dtype.
template <class T>
bool store_matrix(const T* src, const ArrayView& out, int64_t index, double scale = 1.0) {
  const int64_t size = out.size(-2) * out.size(-1);
  return CK_DISPATCH_FLOATING(out.dtype, "out", D, [&] {
    D* p = out.ptr<D>() + index * size;
    bool finite = true;
    for (int64_t i = 0; i < size; ++i) {
      p[i] = from_double<D>(scale * double(src[i]));
      finite &= std::fabs(to_double(p[i])) <= DBL_MAX;
    }
    // A result beyond the output dtype's range (1e40 in float32) is never handed on as Inf.
    if (!finite) std::fill(p, p + size, from_double<D>(0.0));
    return finite;
  });
}

// Matrix `index` of a (..., m, k) array, as T in column-major order (dst[j m + i] = a[i, j]): what
// LAPACK's QR takes, read in tiles.
template <class T>
void load_matrix_transposed(const ArrayView& a, int64_t index, T* dst) {
  const int64_t m = a.size(-2), k = a.size(-1);
  CK_DISPATCH_FLOATING(a.dtype, "input", S, [&] {
    const S* p = a.ptr<const S>() + index * m * k;
    blas::for_tiles(m, k, [&](int64_t i, int64_t j) { dst[j * m + i] = T(to_double(p[i * k + j])); });
  });
}

// Column-major src (m x k) into matrix `index` of a (..., m, k) output, as store_matrix.
template <class T>
bool store_matrix_transposed(const T* src, const ArrayView& out, int64_t index) {
  const int64_t m = out.size(-2), k = out.size(-1);
  return CK_DISPATCH_FLOATING(out.dtype, "out", D, [&] {
    D* p = out.ptr<D>() + index * m * k;
    bool finite = true;
    blas::for_tiles(m, k, [&](int64_t i, int64_t j) {
      p[i * k + j] = from_double<D>(double(src[j * m + i]));
      finite &= std::fabs(to_double(p[i * k + j])) <= DBL_MAX;
    });
    if (!finite) std::fill(p, p + m * k, from_double<D>(0.0));
    return finite;
  });
}

// (X + X^T)/2 of a row-major n x n matrix, in place.
template <class T>
void symmetrize(T* x, int64_t n) {
  blas::for_lower_tiles(
      n, [x, n](int64_t i, int64_t j) { x[i * n + j] = x[j * n + i] = T(0.5) * (x[i * n + j] + x[j * n + i]); });
}

// ||A||_inf (largest absolute row sum) of a row-major n x n matrix: with ||A||_F, a cheap
// upper bound on the largest eigenvalue of symmetric A.
template <class T>
double max_row_sum(const T* a, int64_t n) {
  double row_max = 0;
  for (int64_t i = 0; i < n; ++i) {
    double row = 0;
    for (int64_t j = 0; j < n; ++j) row += std::fabs(double(a[i * n + j]));
    row_max = std::max(row_max, row);
  }
  return row_max;
}

// A length-n vector into entry `index` of a (..., n) output; false, with zeros written, where a
// value overflowed the dtype.
template <class T>
bool store_vector(const T* src, int64_t n, const ArrayView& out, int64_t index) {
  return CK_DISPATCH_FLOATING(out.dtype, "out", D, [&] {
    D* p = out.ptr<D>() + index * n;
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) {
      p[i] = from_double<D>(double(src[i]));
      finite &= std::fabs(to_double(p[i])) <= DBL_MAX;
    }
    if (!finite) std::fill(p, p + n, from_double<D>(0.0));  // as store_matrix
    return finite;
  });
}

// Largest |entry| of a row-major matrix (finite entries).
template <class T>
double max_abs(const T* a, int64_t size) {
  double m = 0;
  for (int64_t i = 0; i < size; ++i) m = std::max(m, std::fabs(double(a[i])));
  return m;
}

// Calls body(pow2) with pow2(x) = std::ldexp(x, k) for every x: where 2^k is a normal double, a
// product by it (rounded once, as ldexp rounds), so that body's loops vectorize (a call of
// scalbn per entry was a fifth of a 256 x 784 polar); ldexp itself beyond.
template <class Body>
void with_pow2(int k, Body body) {
  if (k >= DBL_MIN_EXP - 1 && k < DBL_MAX_EXP) {
    const double factor = std::ldexp(1.0, k);
    body([factor](double x) { return x * factor; });
  } else {
    body([k](double x) { return std::ldexp(x, k); });
  }
}

// a <- 2^k a, exact (no entry overflows when k comes from numerics::even_scale_exponent).
template <class T>
void scale_pow2(T* a, int64_t size, int k) {
  with_pow2(k, [&](auto pow2) {
    for (int64_t i = 0; i < size; ++i) a[i] = T(pow2(double(a[i])));
  });
}

template <class T>
double frobenius(const T* a, int64_t size) {
  double s = 0;
  for (int64_t i = 0; i < size; ++i) s += double(a[i]) * double(a[i]);
  return std::sqrt(s);
}

template <class T>
bool all_finite(const std::vector<T>& v) {
  bool ok = true;
  for (T x : v) ok &= std::fabs(double(x)) <= DBL_MAX;
  return ok;
}

// ||I - M||_F^2
template <class T>
double identity_sum_squares(const T* m, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double d = numerics::identity_difference(double(m[i * n + j]), i == j);
      s += d * d;
    }
  return s;
}

// ||I - M||_F / sqrt(n)
template <class T>
double identity_distance(const T* m, int64_t n) {
  return numerics::rms_distance(identity_sum_squares(m, n), n);
}

// max|M - I| (Inf when M holds NaN or Inf)
template <class T>
double max_distance_to_identity(const T* m, int64_t n) {
  double r = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) r = std::max(r, numerics::identity_gap(double(m[i * n + j]), i == j));
  return r;
}

// Quadratically convergent sign iterations stop once the distance to I is at rounding level or
// has stopped falling near it; a distance above 2 means divergence, and no convergence within
// numerics::sign_step_limit steps a singular input (numerics::sign_verdict).
struct ConvergenceWatch {
  ConvergenceWatch(double unit, int64_t n) : eps(unit), limit(numerics::sign_step_limit(n, unit)) {}
  double eps, previous = std::numeric_limits<double>::infinity();
  int limit, steps = 0;
  bool converged = false, diverged = false;
  bool done(double r) {
    switch (numerics::sign_verdict(r, previous, eps, steps, limit)) {
      case numerics::SignVerdict::Diverged: return diverged = true;
      case numerics::SignVerdict::Converged: return converged = true;
      case numerics::SignVerdict::Stalled: return true;
      case numerics::SignVerdict::GoOn: break;
    }
    previous = r;
    ++steps;
    return false;
  }
};

// How run_matrix_tasks splits a batch: tasks of cost at most `small_task` run one per thread,
// and threads inside one task reach `threaded_efficiency` of linear speed-up (products on
// curvkit's team: ~85% on 2 cores).
struct TaskPolicy {
  double small_task = kSmallTask;
  double threaded_efficiency = 0.85;
  double alone_single_threaded = 0;  // a lone task at most this costly runs in single-threaded BLAS
};

// LAPACK's eigensolvers scale poorly over threads (the tridiagonal reduction is bound by
// memory): with at least as many matrices as threads, one matrix per thread is faster at every
// size (measured: 8 x 1024^2 roots 1.4x faster than threaded LAPACK on 2 cores), and a threaded
// 1024^2 eigh gains ~0-40% on 2 cores. Up to 384^2 even a lone matrix runs on one thread: right
// after a PyTorch op, OpenBLAS's threads meet libgomp's spinning workers (a 256^2 eigh square
// root took 13.2 ms there against 7.6 ms on one thread; even at 384^2, threads ahead from 512^2).
constexpr double kLoneLapackSingleThreaded = 384.0 * 384.0 * 384.0;
inline TaskPolicy lapack_tasks(int64_t count, int threads) {
  return {count >= threads ? std::numeric_limits<double>::infinity() : kSmallTask, 0.5, kLoneLapackSingleThreaded};
}

// QR on curvkit's team (team_qr.h) reaches ~80% of linear speed-up on 2 cores (784^2 float32:
// 12.5 against 20.7 ms on one thread; 256^2: 0.8 against 1.2 ms): worth threading for the one
// large factor beside small ones (SOAP's 784^2 beside 256^2 ones).
inline TaskPolicy qr_tasks(int64_t count, int threads) { return {lapack_tasks(count, threads).small_task, 0.8, 0.0}; }

// One matrix per thread leaves threads idle when one matrix outweighs the rest (Muon's
// 256 x 784 beside a 256 x 256 and a 10 x 256): moves the k largest of `small` (sorted by cost,
// largest first) to `large`, for the k that minimizes the estimated time: the k threaded, then
// the makespan's lower bound for the rest one per thread.
template <class Cost>
void balance_matrix_tasks(int threads, double efficiency, Cost cost, std::vector<int64_t>& small,
                          std::vector<int64_t>& large) {
  double rest = 0;
  for (int64_t i : small) rest += cost(i);
  double threaded = 0, best = std::max(small.empty() ? 0.0 : cost(small[0]), rest / threads);
  size_t best_k = 0;
  for (size_t k = 1; k <= small.size(); ++k) {
    threaded += cost(small[k - 1]) / (threads * efficiency);
    rest -= cost(small[k - 1]);
    const double time = threaded + (k < small.size() ? std::max(cost(small[k]), rest / threads) : 0.0);
    if (time < best) best = time, best_k = k;
  }
  large.insert(large.end(), small.begin(), small.begin() + std::ptrdiff_t(best_k));
  small.erase(small.begin(), small.begin() + std::ptrdiff_t(best_k));
}

// Runs body(i, slot) for every task i in [0, count) on `threads` threads (the caller's one
// snapshot of num_threads(), also used to size per-slot workspaces): tasks with cost(i) <=
// policy.small_task one per thread with single-threaded BLAS, largest first, unless one outweighs the
// rest (balance_matrix_tasks); the others one at a time with all threads inside BLAS (or on
// curvkit's OpenMP team: team_blas), those of cost at most policy.alone_single_threaded in
// single-threaded BLAS. `slot` (< threads) names the worker, so callers can keep
// one workspace per slot. Bodies must not throw: check inputs before. Bodies may poll
// interrupted() and stop early; the call then throws Interrupted once every started task is
// done (so no exception crosses a parallel region).
template <class Cost, class Body>
void run_matrix_tasks(int threads, int64_t count, Cost cost, Body body, TaskPolicy policy = {}) {
  std::vector<int64_t> small, large;
  for (int64_t i = 0; i < count; ++i) (count > 1 && cost(i) <= policy.small_task ? small : large).push_back(i);
  std::stable_sort(small.begin(), small.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  if (threads > 1) balance_matrix_tasks(threads, policy.threaded_efficiency, cost, small, large);
  if (small.size() > 1) {
    SingleThreadedBlas single;
    InterruptState* caller = current_interrupt();
#pragma omp parallel num_threads(threads)
    {
      const InterruptShare share(caller);  // workers see the caller's interrupt flag
#pragma omp for schedule(dynamic)
      for (int64_t k = 0; k < int64_t(small.size()); ++k)
        if (!interrupted()) body(small[size_t(k)], omp_get_thread_num());
    }
  } else {
    large.insert(large.end(), small.begin(), small.end());
  }
  for (int64_t i : large) {
    throw_if_interrupted();
    std::optional<SingleThreadedBlas> single;
    if (cost(i) <= policy.alone_single_threaded) single.emplace();
    body(i, 0);
  }
  throw_if_interrupted();
}

}  // namespace curvkit
