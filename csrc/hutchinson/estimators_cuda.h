// CUDA backends of the estimator cores that run on CUDA arrays (hutchinson.h), called by
// hutchinson.cpp once the arguments are checked; CUDA builds only.
#pragma once
#include "core/array.h"

namespace curvkit {

void sketch_qr_cuda(const ArrayView& q, const ArrayView& r, int64_t k0, StreamHandle stream);
void xtrace_estimates_cuda(const ArrayView& omega, const ArrayView& y, const ArrayView& q, const ArrayView& r,
                           const ArrayView& z, bool improved, const ArrayView& out, StreamHandle stream);
void xdiag_estimates_cuda(const ArrayView& omega, const ArrayView& q, const ArrayView& r, const ArrayView& z,
                          const ArrayView& mean, const ArrayView& variance, StreamHandle stream);
void column_dots_cuda(const ArrayView& x, const ArrayView& y, const ArrayView& out, StreamHandle stream);
void row_dots_cuda(const ArrayView& x, const ArrayView& y, const ArrayView& out, StreamHandle stream);
void project_out_cuda(const ArrayView& q, const ArrayView& x, StreamHandle stream);
void accumulate_products_cuda(const ArrayView& x, const ArrayView& y, int64_t count, const ArrayView& mean,
                              const ArrayView& m2, StreamHandle stream);
bool xnystrace_estimates_cuda(const ArrayView& omega, const ArrayView& y, double relative_shift, const ArrayView& out,
                              StreamHandle stream);
void lanczos_step_cuda(const ArrayView& basis, const ArrayView& w, const ArrayView& alpha, const ArrayView& beta,
                       const ArrayView& lengths, int64_t j, bool reorthogonalize, bool restart, StreamHandle stream);
// alpha, beta, lengths on the device; nodes and vectors on the host.
void tridiagonal_eigh_cuda(const ArrayView& alpha, const ArrayView& beta, const ArrayView& lengths, int64_t steps,
                           const ArrayView& nodes, const ArrayView& vectors, StreamHandle stream);
void basis_combination_cuda(const ArrayView& basis, const ArrayView& coefficients, int64_t steps, const ArrayView& out,
                            StreamHandle stream);
double power_step_cuda(const ArrayView& v, const ArrayView& w, const ArrayView* found, double& norm,
                       StreamHandle stream);

}  // namespace curvkit
