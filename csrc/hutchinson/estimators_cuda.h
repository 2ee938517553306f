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

}  // namespace curvkit
