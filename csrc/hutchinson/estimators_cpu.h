// CPU backends of the estimator cores (hutchinson.h), called by hutchinson.cpp once the
// arguments are checked. Same arguments and meaning as the public functions.
#pragma once
#include <vector>

#include "core/array.h"

namespace curvkit {

void sketch_qr_cpu(const ArrayView& q, const ArrayView& r, int64_t k0);
void xtrace_estimates_cpu(const ArrayView& omega, const ArrayView& y, const ArrayView& q, const ArrayView& r,
                          const ArrayView& z, bool improved, const ArrayView& out);
void xdiag_estimates_cpu(const ArrayView& omega, const ArrayView& q, const ArrayView& r, const ArrayView& z,
                         const ArrayView& mean, const ArrayView& variance);
bool xnystrace_estimates_cpu(const ArrayView& omega, const ArrayView& y, double relative_shift, const ArrayView& out);
// The k x k part of XNysTrace (on the host for both backends): from the Gram matrix
// Omega^T (Y + nu Omega) (row-major, symmetrized here, overwritten by its Cholesky factor) and
// the R factor (row-major, upper) of Y + nu Omega, the k leave-one-out estimates into out.
// False when the Gram matrix is not positive definite.
bool xnystrace_leave_one_out(std::vector<double>& gram, const std::vector<double>& r, int64_t n, int64_t k, double nu,
                             double* out);
void column_dots_cpu(const ArrayView& x, const ArrayView& y, const ArrayView& out);
void row_dots_cpu(const ArrayView& x, const ArrayView& y, const ArrayView& out);
void project_out_cpu(const ArrayView& q, const ArrayView& x);
void accumulate_products_cpu(const ArrayView& x, const ArrayView& y, int64_t count, const ArrayView& mean,
                             const ArrayView& m2);
void lanczos_step_cpu(const ArrayView& basis, const ArrayView& w, const ArrayView& alpha, const ArrayView& beta,
                      const ArrayView& lengths, int64_t j, bool reorthogonalize, bool restart);
void tridiagonal_eigh_cpu(const ArrayView& alpha, const ArrayView& beta, const ArrayView& lengths, int64_t steps,
                          const ArrayView& nodes, const ArrayView& vectors);
void basis_combination_cpu(const ArrayView& basis, const ArrayView& coefficients, int64_t steps, const ArrayView& out);
double power_step_cpu(const ArrayView& v, const ArrayView& w, const ArrayView* found, double& norm);

}  // namespace curvkit
