// CPU BLAS (OpenBLAS from scipy-openblas32, 32-bit integers) as typed templates over
// float/double. Row-major throughout; symmetric results are written to the lower triangle.
#pragma once
#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/check.h"

namespace curvkit::blas {

// BLAS dimensions are 32-bit: refuse larger ones with a clear error.
inline int dim(int64_t n, const char* what) {
  CK_CHECK_VALUE(n <= INT_MAX, what, " (", n, ") exceeds the 2^31-1 limit of the CPU BLAS");
  return static_cast<int>(n);
}

// C (n x n, lower) = alpha * op(A) op(A)^T + beta * C; op(A) = A (n x k) or A^T (A is k x n).
inline void syrk(bool trans, int n, int k, float alpha, const float* a, int lda, float beta, float* c, int ldc) {
  scipy_cblas_ssyrk(CblasRowMajor, CblasLower, trans ? CblasTrans : CblasNoTrans, n, k, alpha, a, lda, beta, c, ldc);
}
inline void syrk(bool trans, int n, int k, double alpha, const double* a, int lda, double beta, double* c, int ldc) {
  scipy_cblas_dsyrk(CblasRowMajor, CblasLower, trans ? CblasTrans : CblasNoTrans, n, k, alpha, a, lda, beta, c, ldc);
}

// C (m x n) = alpha * S B + beta * C (left) or alpha * B S + beta * C (right), S symmetric
// (lower triangle read).
inline void symm(bool left, int m, int n, float alpha, const float* s, int lds, const float* b, int ldb, float beta,
                 float* c, int ldc) {
  scipy_cblas_ssymm(CblasRowMajor, left ? CblasLeft : CblasRight, CblasLower, m, n, alpha, s, lds, b, ldb, beta, c,
                    ldc);
}
inline void symm(bool left, int m, int n, double alpha, const double* s, int lds, const double* b, int ldb, double beta,
                 double* c, int ldc) {
  scipy_cblas_dsymm(CblasRowMajor, left ? CblasLeft : CblasRight, CblasLower, m, n, alpha, s, lds, b, ldb, beta, c,
                    ldc);
}

// C (m x n) = alpha * A B + beta * C, A m x k, B k x n, all row-major and contiguous.
inline void gemm(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c) {
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, alpha, a, k, b, n, beta, c, n);
}
inline void gemm(int m, int n, int k, double alpha, const double* a, const double* b, double beta, double* c) {
  scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, alpha, a, k, b, n, beta, c, n);
}

// C (m x n) = alpha * op(A) op(B) + beta * C, op(X) = X or X^T, any leading dimensions.
inline void gemm_ex(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                    int ldb, float beta, float* c, int ldc) {
  scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a,
                    lda, b, ldb, beta, c, ldc);
}
inline void gemm_ex(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                    int ldb, double beta, double* c, int ldc) {
  scipy_cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a,
                    lda, b, ldb, beta, c, ldc);
}

// Lower triangle of C (n x n) = alpha * op(A) op(B) + beta * C, op(A) n x k, op(B) k x n.
inline void gemmt_ex(bool ta, bool tb, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                     float beta, float* c, int ldc) {
  scipy_cblas_sgemmt(CblasRowMajor, CblasLower, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, n, k,
                     alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void gemmt_ex(bool ta, bool tb, int n, int k, double alpha, const double* a, int lda, const double* b, int ldb,
                     double beta, double* c, int ldc) {
  scipy_cblas_dgemmt(CblasRowMajor, CblasLower, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, n, k,
                     alpha, a, lda, b, ldb, beta, c, ldc);
}

// Lower triangle of C (n x n) = alpha * A B + beta * C, A and B n x n: for products known to
// be symmetric (polynomials in one matrix), at half the flops of a full product.
inline void gemmt(int n, float alpha, const float* a, const float* b, float beta, float* c) {
  scipy_cblas_sgemmt(CblasRowMajor, CblasLower, CblasNoTrans, CblasNoTrans, n, n, alpha, a, n, b, n, beta, c, n);
}
inline void gemmt(int n, double alpha, const double* a, const double* b, double beta, double* c) {
  scipy_cblas_dgemmt(CblasRowMajor, CblasLower, CblasNoTrans, CblasNoTrans, n, n, alpha, a, n, b, n, beta, c, n);
}

// Lower triangle of C (n x n) = alpha * A^T B + beta * C, A and B n x n: congruences V^T (S V)
// known to be symmetric, at half the flops of a full product.
inline void gemmt_tn(int n, float alpha, const float* a, const float* b, float beta, float* c) {
  scipy_cblas_sgemmt(CblasRowMajor, CblasLower, CblasTrans, CblasNoTrans, n, n, alpha, a, n, b, n, beta, c, n);
}
inline void gemmt_tn(int n, double alpha, const double* a, const double* b, double beta, double* c) {
  scipy_cblas_dgemmt(CblasRowMajor, CblasLower, CblasTrans, CblasNoTrans, n, n, alpha, a, n, b, n, beta, c, n);
}

// Calls f(i, j) for every j <= i of an n x n row-major matrix, in 16 x 16 tiles of the lower
// triangle, tile rows first, first + step, ...: work that touches both (i, j) and (j, i) then
// stays in cache. Row by row, the (j, i) side walks down columns, which at a power-of-two n
// conflict in cache (mirroring 1024^2 float32: 2.6 ms row by row, 1.2-1.4 ms in tiles).
constexpr int64_t kTile = 16;
template <class F>
void for_lower_tiles(int64_t n, F f, int64_t first = 0, int64_t step = 1) {
  for (int64_t i0 = first * kTile; i0 < n; i0 += step * kTile)
    for (int64_t j0 = 0; j0 <= i0; j0 += kTile)
      for (int64_t i = i0; i < std::min(n, i0 + kTile); ++i)
        for (int64_t j = j0; j <= std::min(i, j0 + kTile - 1); ++j) f(i, j);
}

// Calls f(i, j) for every entry of an m x k matrix in kTile x kTile tiles: for copies between
// row-major and column-major order, whose one side walks down columns.
template <class F>
void for_tiles(int64_t m, int64_t k, F f) {
  for (int64_t i0 = 0; i0 < m; i0 += kTile)
    for (int64_t j0 = 0; j0 < k; j0 += kTile)
      for (int64_t i = i0; i < std::min(m, i0 + kTile); ++i)
        for (int64_t j = j0; j < std::min(k, j0 + kTile); ++j) f(i, j);
}

// Symmetric eigendecomposition (LAPACK syevd): a (n x n, row-major, symmetric: both triangles
// equal) is overwritten by the eigenvectors (columns), w by the eigenvalues in ascending order.
// Returns LAPACK's info. LAPACK reads the same buffer column-major (a symmetric matrix is its own
// transpose), and one tiled in-place transpose turns its column eigenvectors row-major: LAPACKE's
// row-major entry point copied the matrix out and back transposed and scanned it for NaN.
template <class T>
int syevd(int n, T* a, T* w) {
  const auto call = [&](T* work, int lwork, int* iwork, int liwork) {
    if constexpr (std::is_same_v<T, float>)
      return scipy_LAPACKE_ssyevd_work(LAPACK_COL_MAJOR, 'V', 'L', n, a, n, w, work, lwork, iwork, liwork);
    else
      return scipy_LAPACKE_dsyevd_work(LAPACK_COL_MAJOR, 'V', 'L', n, a, n, w, work, lwork, iwork, liwork);
  };
  T work_size = 0;
  int iwork_size = 0;
  if (int info = call(&work_size, -1, &iwork_size, -1); info != 0) return info;
  std::vector<T> work(std::max<size_t>(1, size_t(work_size)));
  std::vector<int> iwork(std::max<size_t>(1, size_t(iwork_size)));
  const int info = call(work.data(), int(work.size()), iwork.data(), int(iwork.size()));
  for_lower_tiles(n, [a, n](int64_t i, int64_t j) { std::swap(a[i * n + j], a[j * n + i]); });
  return info;
}

// Solves S X = B for SPD S (n x n, lower triangle; overwritten by its Cholesky factor), B
// (n x n) overwritten by X. Returns LAPACK's info (> 0: S not positive definite).
inline int posv(int n, float* s, float* b) { return scipy_LAPACKE_sposv(LAPACK_ROW_MAJOR, 'L', n, n, s, n, b, n); }
inline int posv(int n, double* s, double* b) { return scipy_LAPACKE_dposv(LAPACK_ROW_MAJOR, 'L', n, n, s, n, b, n); }

// Copies the lower triangle of a row-major n x n matrix to its upper triangle (tile rows first,
// first + step, ...).
template <class T>
void mirror_lower_tiles(T* a, int64_t n, int64_t first = 0, int64_t step = 1) {
  for_lower_tiles(n, [a, n](int64_t i, int64_t j) { a[j * n + i] = a[i * n + j]; }, first, step);
}
template <class T>
void mirror_lower(T* a, int64_t n) {
  mirror_lower_tiles(a, n);
}

}  // namespace curvkit::blas
