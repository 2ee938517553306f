// Ground costs from point clouds, written once for the CPU and CUDA kernels: the cost of a pair
// is a sum over coordinates of term(x_k - y_k), then finish(sum).
#pragma once
#include <cmath>
#include <type_traits>

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

// The shift c that stores potentials balanced, (f + c, g - c) (the same plan), minimizing the
// largest magnitude: f in [f_lo, f_hi], g in [g_lo, g_hi] (their finite entries). Half-precision
// potentials are stored so: they then fit whenever the costs do (f_i + g_j ~ C_ij on the support).
CK_HD double balancing_shift(double f_lo, double f_hi, double g_lo, double g_hi) {
  const double down = f_lo < -g_hi ? -f_lo : g_hi, up = f_hi > -g_lo ? f_hi : -g_lo;
  return (down - up) / 2;
}

template <class S>
constexpr bool is_half_precision = !std::is_same_v<S, float> && !std::is_same_v<S, double>;

}  // namespace curvkit::ot_math
