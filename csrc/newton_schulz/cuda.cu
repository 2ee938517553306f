// Newton–Schulz family on CUDA: not written yet. The entry points exist so that CUDA builds
// link, and CUDA arrays get a clear error instead of a crash.
#include "core/check.h"
#include "newton_schulz/newton_schulz.h"

namespace curvkit {

void polar_cuda(const std::vector<ArrayView>&, const std::vector<ArrayView>&, const PolarOptions&, StreamHandle) {
  throw ValueError("curvkit.polar does not support CUDA arrays yet (CPU only in this version)");
}

void matrix_sqrt_cuda(const ArrayView&, const ArrayView*, const ArrayView*, const SqrtOptions&, SqrtStatus*,
                      StreamHandle) {
  throw ValueError("curvkit.matrix_sqrt does not support CUDA arrays yet (CPU only in this version)");
}

}  // namespace curvkit
