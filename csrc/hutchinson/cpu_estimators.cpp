// CPU kernels of the estimator cores: the sketch QR, the XTrace / XDiag / XNysTrace
// leave-one-out downdates, the Lanczos step and the tridiagonal eigenproblem. Products with n
// rows go to BLAS in the data's dtype; the k x k algebra between them runs in float64.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/blas.h"
#include "core/dispatch.h"
#include "core/runtime.h"
#include "hutchinson/estimators_cpu.h"

namespace curvkit {
namespace {

// y = alpha op(A) x + beta y, A (m x n) row-major.
inline void gemv(bool ta, int m, int n, float alpha, const float* a, const float* x, float beta, float* y) {
  scipy_cblas_sgemv(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, m, n, alpha, a, n, x, 1, beta, y, 1);
}
inline void gemv(bool ta, int m, int n, double alpha, const double* a, const double* x, double beta, double* y) {
  scipy_cblas_dgemv(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, m, n, alpha, a, n, x, 1, beta, y, 1);
}
inline int geqrf(int m, int n, float* a, int lda, float* tau) {
  return scipy_LAPACKE_sgeqrf(LAPACK_ROW_MAJOR, m, n, a, lda, tau);
}
inline int geqrf(int m, int n, double* a, int lda, double* tau) {
  return scipy_LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, m, n, a, lda, tau);
}
inline int orgqr(int m, int n, float* a, int lda, const float* tau) {
  return scipy_LAPACKE_sorgqr(LAPACK_ROW_MAJOR, m, n, n, a, lda, tau);
}
inline int orgqr(int m, int n, double* a, int lda, const double* tau) {
  return scipy_LAPACKE_dorgqr(LAPACK_ROW_MAJOR, m, n, n, a, lda, tau);
}

using Dense = std::vector<double>;  // a row-major k x k float64 matrix

template <class T>
Dense to_dense(const T* a, int64_t count) {
  return Dense(a, a + count);
}

// Rows of an (n, k) array per deterministic reduction chunk: partial sums are formed per chunk
// and added in chunk order, so results do not depend on the thread count.
constexpr int64_t kRowChunk = 2048;

// Hutchinson's quadratic forms: out[j] = sum_i x_ij y_ij in float64.
template <class T>
void column_dots_impl(const T* x, const T* y, int64_t n, int64_t k, double* out) {
  const int64_t chunks = (n + kRowChunk - 1) / kRowChunk;
  std::vector<double> partial(static_cast<size_t>(chunks * k), 0.0);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (n * k > (1 << 16))
  for (int64_t c = 0; c < chunks; ++c) {
    double* p = partial.data() + c * k;
    for (int64_t i = c * kRowChunk; i < std::min(n, (c + 1) * kRowChunk); ++i)
      for (int64_t j = 0; j < k; ++j) p[j] += double(x[i * k + j]) * double(y[i * k + j]);
  }
  for (int64_t j = 0; j < k; ++j) out[j] = 0.0;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < k; ++j) out[j] += partial[size_t(c * k + j)];
}

// S = R^{-T} with unit columns (s_i spans the direction of range(Y) that column i alone adds).
// Diagonal entries of R below eps * max |R_jj| are raised to that floor: a sketch of rank below
// k (an operator of lower rank) then gives finite s_i, and the leave-one-out bases still hold
// the operator's range, so the estimates stay exact there.
Dense unit_inverse_transpose(const Dense& r, int64_t k, double eps) {
  double largest = 0.0;
  for (int64_t j = 0; j < k; ++j) largest = std::max(largest, std::abs(r[size_t(j * k + j)]));
  const double floor = largest > 0 ? eps * largest : 1.0;
  std::vector<double> diag(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) {
    const double d = r[size_t(j * k + j)];
    diag[size_t(j)] = std::abs(d) >= floor ? d : std::copysign(floor, d);
  }
  Dense s(size_t(k * k), 0.0);
#pragma omp parallel for schedule(dynamic) num_threads(num_threads()) if (k > 64)
  for (int64_t i = 0; i < k; ++i) {
    // Forward substitution R^T s = e_i: s_j = 0 for j < i.
    std::vector<double> col(static_cast<size_t>(k), 0.0);
    for (int64_t j = i; j < k; ++j) {
      double acc = j == i ? 1.0 : 0.0;
      for (int64_t l = i; l < j; ++l) acc -= r[size_t(l * k + j)] * col[size_t(l)];
      col[size_t(j)] = acc / diag[size_t(j)];
    }
    double norm = 0.0;
    for (double v : col) norm += v * v;
    norm = std::sqrt(norm);
    for (int64_t j = 0; j < k; ++j) s[size_t(j * k + i)] = col[size_t(j)] / norm;
  }
  return s;
}

// Products with n rows (n up to millions, the other sides tens to hundreds) run as one OpenMP
// loop over fixed row chunks, each a single-threaded BLAS call: no synchronization inside
// BLAS, and partial sums added in chunk order, so results do not depend on the thread count.
constexpr int64_t kProductRows = 8192;

template <class F>
void for_row_chunks(int64_t n, const F& body) {
  const int64_t chunks = (n + kProductRows - 1) / kProductRows;
  if (chunks <= 1) {
    if (n > 0) body(0, n);
    return;
  }
  SingleThreadedBlas single;
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t c = 0; c < chunks; ++c) body(c * kProductRows, std::min(n, (c + 1) * kProductRows) - c * kProductRows);
}

// A^T B (k1 x k2, float64) for row-major A (n x k1, leading dimension lda) and B (n x k2, ldb).
template <class T>
Dense tn_product(const T* a, int64_t lda, int64_t k1, const T* b, int64_t ldb, int64_t k2, int64_t n) {
  const int64_t chunks = std::max<int64_t>(1, (n + kProductRows - 1) / kProductRows);
  std::vector<T> partial(static_cast<size_t>(chunks * k1 * k2), T(0));
  for_row_chunks(n, [&](int64_t row0, int64_t rows) {
    blas::gemm_ex(true, false, int(k1), int(k2), int(rows), T(1), a + row0 * lda, int(lda), b + row0 * ldb, int(ldb),
                  T(0), partial.data() + (row0 / kProductRows) * k1 * k2, int(k2));
  });
  Dense out(static_cast<size_t>(k1 * k2), 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < k1 * k2; ++i) out[size_t(i)] += double(partial[size_t(c * k1 * k2 + i)]);
  return out;
}

// out = alpha A C + beta out, A (n x k1, lda), C (k1 x k2, row-major, contiguous), out (n x k2, ldo).
template <class T>
void nn_product(const T* a, int64_t lda, int64_t k1, const T* c, int64_t k2, T alpha, T beta, T* out, int64_t ldo,
                int64_t n) {
  for_row_chunks(n, [&](int64_t row0, int64_t rows) {
    blas::gemm_ex(false, false, int(rows), int(k2), int(k1), alpha, a + row0 * lda, int(lda), c, int(k2), beta,
                  out + row0 * ldo, int(ldo));
  });
}

// Inverse of an upper triangular k x k matrix (float64).
Dense upper_inverse(const Dense& r, int64_t k) {
  Dense inv(static_cast<size_t>(k * k), 0.0);
  for (int64_t j = 0; j < k; ++j) {  // column j: R x = e_j, back substitution
    for (int64_t i = j; i >= 0; --i) {
      double acc = i == j ? 1.0 : 0.0;
      for (int64_t l = i + 1; l <= j; ++l) acc -= r[size_t(i * k + l)] * inv[size_t(l * k + j)];
      inv[size_t(i * k + j)] = acc / r[size_t(i * k + i)];
    }
  }
  return inv;
}

bool cholesky_upper(Dense& g, int64_t k);

// CholeskyQR2 of x (n x b, leading dimension ld) in place, R (b x b) returned in `r`: two
// passes of G = X^T X, X <- X R^{-1}, then a check that X^T X = I to working accuracy. Four
// products with n rows instead of LAPACK's level-2-bound Householder panels on a tall, thin
// sketch; false (x untouched) when the sketch is too ill-conditioned for it (a rank below b).
template <class T>
bool cholesky_qr2(T* x, int64_t ld, int64_t b, int64_t n, Dense& r) {
  std::vector<T> saved(static_cast<size_t>(n * b)), rinv_t(static_cast<size_t>(b * b));
  for (int64_t i = 0; i < n; ++i) std::copy_n(x + i * ld, b, saved.data() + i * b);
  r.assign(static_cast<size_t>(b * b), 0.0);
  for (int64_t i = 0; i < b; ++i) r[size_t(i * b + i)] = 1.0;
  const double eps = std::numeric_limits<T>::epsilon();
  for (int pass = 0; pass < 2; ++pass) {
    Dense g = tn_product(x, ld, b, x, ld, b, n);
    double largest = 0.0, smallest = INFINITY;
    bool ok = cholesky_upper(g, b);
    for (int64_t i = 0; ok && i < b; ++i) {
      largest = std::max(largest, g[size_t(i * b + i)]);
      smallest = std::min(smallest, g[size_t(i * b + i)]);
    }
    // The first pass must leave X within the range where the second restores orthogonality
    // (condition below eps^{-1/2}); the diagonal ratio bounds the condition from below, hence
    // the margin.
    if (!ok || !(smallest > 10 * std::sqrt(eps) * largest)) {
      for (int64_t i = 0; i < n; ++i) std::copy_n(saved.data() + i * b, b, x + i * ld);
      return false;
    }
    const Dense inv = upper_inverse(g, b);
    for (int64_t i = 0; i < b * b; ++i) rinv_t[size_t(i)] = T(inv[size_t(i)]);
    std::vector<T> tmp(static_cast<size_t>(n * b));
    nn_product(x, ld, b, rinv_t.data(), b, T(1), T(0), tmp.data(), b, n);
    for (int64_t i = 0; i < n; ++i) std::copy_n(tmp.data() + i * b, b, x + i * ld);
    Dense next(static_cast<size_t>(b * b), 0.0);  // R <- R_pass R
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = i; j < b; ++j)
        for (int64_t l = i; l <= j; ++l) next[size_t(i * b + j)] += g[size_t(i * b + l)] * r[size_t(l * b + j)];
    r = next;
  }
  const Dense check = tn_product(x, ld, b, x, ld, b, n);
  double worst = 0.0;
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < b; ++j) worst = std::max(worst, std::abs(check[size_t(i * b + j)] - (i == j)));
  if (worst > 100 * eps * double(b)) {
    for (int64_t i = 0; i < n; ++i) std::copy_n(saved.data() + i * b, b, x + i * ld);
    return false;
  }
  return true;
}

template <class T>
void sketch_qr_impl(T* q, T* r, int64_t n, int64_t k, int64_t k0) {
  const int64_t b = k - k0;
  if (b <= 0) return;
  const int N = blas::dim(n, "sketch rows"), K = blas::dim(k, "sketch columns"), B = int(b);
  T* x = q + k0;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = i < k0 ? k0 : 0; j < k; ++j) r[i * k + j] = T(0);
  if (k0 > 0) {
    std::vector<T> c(static_cast<size_t>(k0 * b));
    for (int pass = 0; pass < 2; ++pass) {  // twice is enough (Giraud et al.'s CGS2)
      const Dense proj = tn_product(q, k, k0, x, k, b, n);
      for (int64_t i = 0; i < k0 * b; ++i) c[size_t(i)] = T(proj[size_t(i)]);
      nn_product(q, k, k0, c.data(), b, T(-1), T(1), x, k, n);
      for (int64_t i = 0; i < k0; ++i)
        for (int64_t j = 0; j < b; ++j) r[i * k + k0 + j] += c[size_t(i * b + j)];
    }
  }
  Dense rc;
  if (cholesky_qr2(x, k, b, n, rc)) {
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = i; j < b; ++j) r[(k0 + i) * k + k0 + j] = T(rc[size_t(i * b + j)]);
    return;
  }
  std::vector<T> tau(static_cast<size_t>(b));
  const int info = geqrf(N, B, x, K, tau.data());
  // LAPACKE refuses NaN and Inf by a negative info naming the matrix argument.
  CK_CHECK_VALUE(info == 0, "argument 'q' (the sketch) holds non-finite values (NaN or Inf); LAPACK geqrf info ", info);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = i; j < b; ++j) r[(k0 + i) * k + k0 + j] = x[i * k + j];
  CK_CHECK_VALUE(orgqr(N, B, x, K, tau.data()) == 0, "sketch QR failed (LAPACK orgqr)");
}

// Q^T B (k x k) in the data's dtype, returned in float64.
template <class T>
Dense cross(const T* a, const T* b, int64_t n, int64_t k) {
  return tn_product(a, k, k, b, k, k, n);
}

template <class T>
void xtrace_impl(const T* omega, const T* y, const T* q, const T* r_in, const T* z, int64_t n, int64_t k, bool improved,
                 double* out) {
  const Dense h = cross(q, z, n, k), w = cross(q, omega, n, k), t = cross(z, omega, n, k);
  std::vector<double> omega_y(static_cast<size_t>(k));
  column_dots_impl(omega, y, n, k, omega_y.data());
  const Dense r = to_dense(r_in, k * k);
  const Dense s = unit_inverse_transpose(r, k, std::numeric_limits<T>::epsilon());
  double trace_h = 0.0;
  for (int64_t i = 0; i < k; ++i) trace_h += h[size_t(i * k + i)];
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (k > 32)
  for (int64_t i = 0; i < k; ++i) {
    std::vector<double> si(static_cast<size_t>(k)), v(static_cast<size_t>(k));
    double sw = 0.0, ww = 0.0;
    for (int64_t a = 0; a < k; ++a) {
      si[size_t(a)] = s[size_t(a * k + i)];
      sw += si[size_t(a)] * w[size_t(a * k + i)];
      ww += w[size_t(a * k + i)] * w[size_t(a * k + i)];
    }
    for (int64_t a = 0; a < k; ++a) v[size_t(a)] = w[size_t(a * k + i)] - si[size_t(a)] * sw;
    double shs = 0.0, vhv = 0.0, tv = 0.0;
    for (int64_t a = 0; a < k; ++a) {
      double hs = 0.0, hv = 0.0;
      for (int64_t c = 0; c < k; ++c) {
        hs += h[size_t(a * k + c)] * si[size_t(c)];
        hv += h[size_t(a * k + c)] * v[size_t(c)];
      }
      shs += si[size_t(a)] * hs;
      vhv += v[size_t(a)] * hv;
      tv += t[size_t(a * k + i)] * v[size_t(a)];
    }
    const double scale = improved ? double(n - k + 1) / (double(n) - ww + sw * sw) : 1.0;
    out[i] = trace_h - shs + scale * (omega_y[size_t(i)] - 2.0 * tv + vhv);
  }
}

template <class T>
void xdiag_impl(const T* omega, const T* q, const T* r_in, const T* z, int64_t n, int64_t k, T* mean, T* variance) {
  const Dense r = to_dense(r_in, k * k);
  const Dense s = unit_inverse_transpose(r, k, std::numeric_limits<T>::epsilon());
  std::vector<double> c(static_cast<size_t>(k), 0.0);  // s_i^T R e_i
  for (int64_t i = 0; i < k; ++i)
    for (int64_t a = 0; a < k; ++a) c[size_t(i)] += s[size_t(a * k + i)] * r[size_t(a * k + i)];
  std::vector<T> st(s.begin(), s.end()), qs(static_cast<size_t>(n * k)), zs(static_cast<size_t>(n * k));
  nn_product(q, k, k, st.data(), k, T(1), T(0), qs.data(), k, n);
  nn_product(z, k, k, st.data(), k, T(1), T(0), zs.data(), k, n);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (n * k > (1 << 15))
  for (int64_t row = 0; row < n; ++row) {
    double base = 0.0;
    for (int64_t j = 0; j < k; ++j) base += double(q[row * k + j]) * double(z[row * k + j]);
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const double qsv = qs[size_t(row * k + j)];
      const double d = base - qsv * double(zs[size_t(row * k + j)]) + double(omega[row * k + j]) * qsv * c[size_t(j)];
      sum += d;
      sum_sq += d * d;
    }
    const double m = sum / double(k);
    const double var = k > 1 ? std::max(0.0, sum_sq - double(k) * m * m) / double(k - 1) / double(k)
                             : std::numeric_limits<double>::infinity();
    mean[row] = T(m);
    variance[row] = T(var);
  }
}

// Upper Cholesky factor C of the symmetric positive definite g (g = C^T C); false otherwise.
bool cholesky_upper(Dense& g, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    double d = g[size_t(j * k + j)];
    for (int64_t l = 0; l < j; ++l) d -= g[size_t(l * k + j)] * g[size_t(l * k + j)];
    if (!(d > 0.0)) return false;
    d = std::sqrt(d);
    g[size_t(j * k + j)] = d;
    for (int64_t c = j + 1; c < k; ++c) {
      double v = g[size_t(j * k + c)];
      for (int64_t l = 0; l < j; ++l) v -= g[size_t(l * k + j)] * g[size_t(l * k + c)];
      g[size_t(j * k + c)] = v / d;
    }
  }
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < i; ++j) g[size_t(i * k + j)] = 0.0;
  return true;
}

template <class T>
bool xnystrace_impl(const T* omega, T* y, int64_t n, int64_t k, double relative_shift, double* out) {
  double norm_y = 0.0;
  for (int64_t i = 0; i < n * k; ++i) norm_y += double(y[i]) * double(y[i]);
  const double nu = relative_shift * std::sqrt(norm_y) / std::sqrt(double(n));
  for (int64_t i = 0; i < n * k; ++i) y[i] = T(double(y[i]) + nu * double(omega[i]));
  Dense c = cross(omega, y, n, k);
  // R of Y_shift = Q R (its rows are the first k rows of y after geqrf).
  std::vector<T> tau(static_cast<size_t>(k));
  CK_CHECK_VALUE(geqrf(blas::dim(n, "rows"), int(k), y, int(k), tau.data()) == 0, "XNysTrace QR failed (geqrf)");
  Dense r(size_t(k * k), 0.0);
  for (int64_t row = 0; row < k; ++row)
    for (int64_t j = row; j < k; ++j) r[size_t(row * k + j)] = double(y[row * k + j]);
  return xnystrace_leave_one_out(c, r, n, k, nu, out);
}

template <class T>
void project_out_impl(const T* q, T* x, int64_t n, int64_t k, int64_t p) {
  if (k == 0 || p == 0) return;
  std::vector<T> c(static_cast<size_t>(k * p));
  for (int pass = 0; pass < 2; ++pass) {
    const Dense proj = tn_product(q, k, k, x, p, p, n);
    for (int64_t i = 0; i < k * p; ++i) c[size_t(i)] = T(proj[size_t(i)]);
    nn_product(q, k, k, c.data(), p, T(-1), T(1), x, p, n);
  }
}

template <class T>
double dot(const T* a, const T* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

// The 2-norm, scaled by a power of two near the largest entry so that the squares of
// subnormal or huge float64 entries neither underflow nor overflow (float squares in double
// cannot). NaN or Inf entries give NaN or Inf.
template <class T>
double norm2(const T* x, int64_t n) {
  if constexpr (!std::is_same_v<T, double>) {
    return std::sqrt(dot(x, x, n));
  } else {
    double largest = 0.0;
    for (int64_t i = 0; i < n; ++i) largest = std::max(largest, std::fabs(x[i]));
    if (largest == 0.0 || !(largest <= std::numeric_limits<double>::max())) return std::sqrt(dot(x, x, n));
    const int e = std::ilogb(largest);  // 2^-e in two factors: one alone overflows for subnormals
    const double s1 = std::ldexp(1.0, -e / 2), s2 = std::ldexp(1.0, -e - (-e / 2));
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double y = x[i] * s1 * s2;
      s += y * y;
    }
    return std::ldexp(std::sqrt(s), e);
  }
}

template <class F>
void parallel_for(int64_t count, const F& body) {
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t i = 0; i < count; ++i) body(i);
}

template <class T>
void row_dots_impl(const T* a, const T* b, int64_t n, int64_t k, T* o) {
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (n * k > (1 << 15))
  for (int64_t i = 0; i < n; ++i) o[i] = T(dot(a + i * k, b + i * k, k));
}

template <class T>
void accumulate_impl(const T* a, const T* b, int64_t n, int64_t k, int64_t count, T* mu, T* s2) {
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (n * k > (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    double block_mean = 0.0, block_m2 = 0.0;
    for (int64_t j = 0; j < k; ++j) block_mean += double(a[i * k + j]) * double(b[i * k + j]);
    block_mean /= double(k);
    for (int64_t j = 0; j < k; ++j) {
      const double d = double(a[i * k + j]) * double(b[i * k + j]) - block_mean;
      block_m2 += d * d;
    }
    if (count == 0) {
      mu[i] = T(block_mean);
      s2[i] = T(block_m2);
    } else {
      const double total = double(count + k), delta = block_mean - double(mu[i]);
      mu[i] = T(double(mu[i]) + delta * double(k) / total);
      s2[i] = T(double(s2[i]) + block_m2 + delta * delta * double(count) * double(k) / total);
    }
  }
}

template <class T>
void lanczos_probe(T* basis, int64_t m, int64_t n, T* w, int64_t p, int64_t b, double* alpha, double* beta,
                   int64_t* length, int64_t j, bool reorthogonalize, bool restart) {
  std::vector<T> wb(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) wb[size_t(i)] = w[i * p + b];
  const bool active = *length == j && (j == 0 || beta[j - 1] > 0.0 || restart);
  if (!active) {
    for (int64_t i = 0; i < n; ++i) w[i * p + b] = T(0);
    alpha[j] = beta[j] = 0.0;
    return;
  }
  const T* vj = basis + j * n;
  const double input_norm = norm2(wb.data(), n);
  if (j > 0) {
    const T bprev = T(beta[j - 1]);
    const T* vprev = basis + (j - 1) * n;
    for (int64_t i = 0; i < n; ++i) wb[size_t(i)] -= bprev * vprev[i];
  }
  double a = dot(vj, wb.data(), n);
  for (int64_t i = 0; i < n; ++i) wb[size_t(i)] -= T(a) * vj[i];
  if (reorthogonalize) {
    std::vector<T> c(static_cast<size_t>(j + 1));
    for (int pass = 0; pass < 2; ++pass) {
      gemv(false, int(j + 1), int(n), T(1), basis, wb.data(), T(0), c.data());
      gemv(true, int(j + 1), int(n), T(-1), basis, c.data(), T(1), wb.data());
      a += double(c[size_t(j)]);
    }
  }
  const double norm = norm2(wb.data(), n);
  alpha[j] = a;
  *length = j + 1;
  // An invariant subspace: what is left is rounding of the input.
  if (!(norm > 16 * std::numeric_limits<T>::epsilon() * std::max(input_norm, std::abs(a)))) {
    beta[j] = 0.0;
    for (int64_t i = 0; i < n; ++i) w[i * p + b] = T(0);
    return;
  }
  beta[j] = norm;
  T* next = basis + (j + 1) * n;
  for (int64_t i = 0; i < n; ++i) {
    next[i] = T(double(wb[size_t(i)]) / norm);
    w[i * p + b] = next[i];
  }
}

}  // namespace

bool xnystrace_leave_one_out(std::vector<double>& gram, const std::vector<double>& r, int64_t n, int64_t k, double nu,
                             double* out) {
  Dense& c = gram;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < i; ++j)
      c[size_t(i * k + j)] = c[size_t(j * k + i)] = 0.5 * (c[size_t(i * k + j)] + c[size_t(j * k + i)]);
  if (!cholesky_upper(c, k)) return false;
  // B = Q F with F = R C^{-1}, so |B x| = |F x|.
  Dense f(size_t(k * k), 0.0);
  for (int64_t row = 0; row < k; ++row) {  // f C = r_row, C upper: solve left to right
    for (int64_t j = 0; j < k; ++j) {
      double acc = r[size_t(row * k + j)];
      for (int64_t l = 0; l < j; ++l) acc -= f[size_t(row * k + l)] * c[size_t(l * k + j)];
      f[size_t(row * k + j)] = acc / c[size_t(j * k + j)];
    }
  }
  double trace_k = 0.0;
  for (double v : f) trace_k += v * v;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (k > 32)
  for (int64_t i = 0; i < k; ++i) {
    std::vector<double> x(static_cast<size_t>(k), 0.0);  // C^T x = e_i
    for (int64_t j = i; j < k; ++j) {
      double acc = j == i ? 1.0 : 0.0;
      for (int64_t l = i; l < j; ++l) acc -= c[size_t(l * k + j)] * x[size_t(l)];
      x[size_t(j)] = acc / c[size_t(j * k + j)];
    }
    double xx = 0.0, fxx = 0.0;
    for (int64_t j = 0; j < k; ++j) xx += x[size_t(j)] * x[size_t(j)];
    for (int64_t a = 0; a < k; ++a) {
      double fx = 0.0;
      for (int64_t j = 0; j < k; ++j) fx += f[size_t(a * k + j)] * x[size_t(j)];
      fxx += fx * fx;
    }
    out[i] = trace_k - fxx / xx + 1.0 / xx - double(n) * nu;
  }
  return true;
}

void sketch_qr_cpu(const ArrayView& q, const ArrayView& r, int64_t k0) {
  CK_DISPATCH_COMPUTE(q.dtype, T, [&] { sketch_qr_impl(q.ptr<T>(), r.ptr<T>(), q.size(0), q.size(1), k0); });
}

void xtrace_estimates_cpu(const ArrayView& omega, const ArrayView& y, const ArrayView& q, const ArrayView& r,
                          const ArrayView& z, bool improved, const ArrayView& out) {
  CK_DISPATCH_COMPUTE(q.dtype, T, [&] {
    xtrace_impl(omega.ptr<T>(), y.ptr<T>(), q.ptr<T>(), r.ptr<T>(), z.ptr<T>(), q.size(0), q.size(1), improved,
                out.ptr<double>());
  });
}

void xdiag_estimates_cpu(const ArrayView& omega, const ArrayView& q, const ArrayView& r, const ArrayView& z,
                         const ArrayView& mean, const ArrayView& variance) {
  CK_DISPATCH_COMPUTE(q.dtype, T, [&] {
    xdiag_impl(omega.ptr<T>(), q.ptr<T>(), r.ptr<T>(), z.ptr<T>(), q.size(0), q.size(1), mean.ptr<T>(),
               variance.ptr<T>());
  });
}

bool xnystrace_estimates_cpu(const ArrayView& omega, const ArrayView& y, double relative_shift, const ArrayView& out) {
  return CK_DISPATCH_COMPUTE(y.dtype, T, [&] {
    return xnystrace_impl(omega.ptr<T>(), y.ptr<T>(), y.size(0), y.size(1), relative_shift, out.ptr<double>());
  });
}

void column_dots_cpu(const ArrayView& x, const ArrayView& y, const ArrayView& out) {
  CK_DISPATCH_COMPUTE(x.dtype, T,
                      [&] { column_dots_impl(x.ptr<T>(), y.ptr<T>(), x.size(0), x.size(1), out.ptr<double>()); });
}

void row_dots_cpu(const ArrayView& x, const ArrayView& y, const ArrayView& out) {
  CK_DISPATCH_COMPUTE(x.dtype, T, [&] { row_dots_impl(x.ptr<T>(), y.ptr<T>(), x.size(0), x.size(1), out.ptr<T>()); });
}

void project_out_cpu(const ArrayView& q, const ArrayView& x) {
  CK_DISPATCH_COMPUTE(q.dtype, T, [&] { project_out_impl(q.ptr<T>(), x.ptr<T>(), q.size(0), q.size(1), x.size(1)); });
}

void accumulate_products_cpu(const ArrayView& x, const ArrayView& y, int64_t count, const ArrayView& mean,
                             const ArrayView& m2) {
  CK_DISPATCH_COMPUTE(x.dtype, T, [&] {
    accumulate_impl(x.ptr<T>(), y.ptr<T>(), x.size(0), x.size(1), count, mean.ptr<T>(), m2.ptr<T>());
  });
}

void lanczos_step_cpu(const ArrayView& basis, const ArrayView& w, const ArrayView& alpha, const ArrayView& beta,
                      const ArrayView& lengths, int64_t j, bool reorthogonalize, bool restart) {
  CK_DISPATCH_COMPUTE(basis.dtype, T, [&] {
    const int64_t p = basis.size(0), m = basis.size(1) - 1, n = basis.size(2);
    const auto probe = [&](int64_t b) {
      lanczos_probe(basis.ptr<T>() + b * (m + 1) * n, m, n, w.ptr<T>(), p, b, alpha.ptr<double>() + b * m,
                    beta.ptr<double>() + b * m, lengths.ptr<int64_t>() + b, j, reorthogonalize, restart);
    };
    if (p == 1) {
      probe(0);
      return;
    }
    SingleThreadedBlas single;
    parallel_for(p, probe);
  });
}

void tridiagonal_eigh_cpu(const ArrayView& alpha, const ArrayView& beta, const ArrayView& lengths, int64_t steps,
                          const ArrayView& nodes, const ArrayView& vectors) {
  const int64_t p = alpha.size(0), m = alpha.size(1);
  const double *a = alpha.ptr<double>(), *e = beta.ptr<double>();
  const int64_t* len = lengths.ptr<int64_t>();
  double *out_nodes = nodes.ptr<double>(), *out_vectors = vectors.ptr<double>();
  std::vector<int> status(static_cast<size_t>(p), 0);
#pragma omp parallel for schedule(dynamic) num_threads(num_threads()) if (p > 1)
  for (int64_t b = 0; b < p; ++b) {
    const int64_t l = std::min(len[b], steps);
    double* nb = out_nodes + b * steps;
    double* vb = out_vectors + b * steps * steps;
    std::fill(vb, vb + steps * steps, 0.0);
    std::fill(nb, nb + steps, 0.0);
    if (l <= 0) continue;
    std::vector<double> d(a + b * m, a + b * m + l), off(e + b * m, e + b * m + std::max<int64_t>(l - 1, 1)),
        zz(size_t(l * l));
    status[size_t(b)] = scipy_LAPACKE_dstev(LAPACK_ROW_MAJOR, 'V', int(l), d.data(), off.data(), zz.data(), int(l));
    for (int64_t i = 0; i < steps; ++i) nb[i] = d[size_t(std::min(i, l - 1))];
    for (int64_t i = 0; i < l; ++i)
      for (int64_t c = 0; c < l; ++c) vb[i * steps + c] = zz[size_t(i * l + c)];
  }
  for (int64_t b = 0; b < p; ++b)
    CK_CHECK_VALUE(status[size_t(b)] == 0, "tridiagonal eigensolver (LAPACK stev) failed for probe ", b, " (info ",
                   status[size_t(b)], ")");
}

void basis_combination_cpu(const ArrayView& basis, const ArrayView& coefficients, int64_t steps, const ArrayView& out) {
  CK_DISPATCH_COMPUTE(basis.dtype, T, [&] {
    const int64_t p = basis.size(0), m1 = basis.size(1), n = basis.size(2), r = coefficients.size(2);
    const int64_t rows = coefficients.size(1);
    for (int64_t b = 0; b < p; ++b) {
      std::vector<T> c(static_cast<size_t>(steps * r));
      for (int64_t i = 0; i < steps; ++i)
        for (int64_t j = 0; j < r; ++j) c[size_t(i * r + j)] = T(coefficients.ptr<double>()[(b * rows + i) * r + j]);
      blas::gemm_ex(true, false, blas::dim(n, "rows"), int(r), int(steps), T(1), basis.ptr<T>() + b * m1 * n, int(n),
                    c.data(), int(r), T(0), out.ptr<T>() + b * n * r, int(r));
    }
  });
}

double power_step_cpu(const ArrayView& v, const ArrayView& w, const ArrayView* found, double& norm) {
  return CK_DISPATCH_COMPUTE(v.dtype, T, [&] {
    const int64_t n = v.numel();
    T *vp = v.ptr<T>(), *wp = w.ptr<T>();
    const double rayleigh = dot(vp, wp, n);
    if (found && found->numel() > 0) project_out_impl(found->ptr<T>(), wp, n, found->size(1), 1);
    norm = norm2(wp, n);
    if (norm > 0)
      for (int64_t i = 0; i < n; ++i) vp[i] = T(double(wp[i]) / norm);
    return rayleigh;
  });
}

}  // namespace curvkit
