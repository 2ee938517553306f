// Ground costs from point clouds, written once for the CPU and CUDA kernels: the cost of a pair
// is a sum over coordinates of term(x_k - y_k), then finish(sum).
#pragma once
#include <cmath>

#include "core/half.h"
#include "sinkhorn/sinkhorn.h"

namespace curvkit::ot_math {

template <class T>
CK_HD T cost_term(GroundCost kind, T diff, T p) {
  switch (kind) {
    case GroundCost::L1: return diff < T(0) ? -diff : diff;
    case GroundCost::PNorm: return pow(diff < T(0) ? -diff : diff, p);
    default: return diff * diff;  // sqeuclidean, euclidean
  }
}

template <class T>
CK_HD T cost_finish(GroundCost kind, T sum) {
  return kind == GroundCost::Euclidean ? sqrt(sum) : sum;
}

}  // namespace curvkit::ot_math
