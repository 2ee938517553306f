// The per-element arithmetic of the fused AdaHessian and Sophia steps, shared by the CPU and
// CUDA kernels so both evaluate the same operations in the same order (the float64 results
// match tests/reference.py bit for bit; the build turns off FMA contraction).
#pragma once
#include <cmath>

#include "core/half.h"

namespace curvkit::step_math {

#ifndef __CUDA_ARCH__
using std::fabs;
using std::pow;
using std::sqrt;
#endif

// x^k with NumPy's exact shortcuts for the common exponents, the C library's pow else (as
// testing's libm_power; NumPy's own `**` may take a vector pow that differs in the last bit).
template <class C>
CK_HD C power(C x, C k) {
  if (k == C(1)) return x;
  if (k == C(0.5)) return sqrt(x);
  if (k == C(2)) return x * x;
  if (k == C(0)) return C(1);
  if (k == C(-1)) return C(1) / x;
  return pow(x, k);
}

// Whether power(x, k) takes a shortcut (no call to the C library's pow, which does not vectorize).
inline bool power_is_exact_shortcut(double k) { return k == 1 || k == 0.5 || k == 2 || k == 0 || k == -1; }

// The scalars of one AdaHessian step, computed once per call in float64 as the reference does.
struct AdaHessianScalars {
  double lr, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, sqrt_bias2_pow, eps, weight_decay, power;
};

template <class C>
struct AdaHessianElement {
  C lr, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, sqrt_bias2_pow, eps, weight_decay, power;
  explicit CK_HD AdaHessianElement(const AdaHessianScalars& s)
      : lr(C(s.lr)),
        beta1(C(s.beta1)),
        one_minus_beta1(C(s.one_minus_beta1)),
        beta2(C(s.beta2)),
        one_minus_beta2(C(s.one_minus_beta2)),
        bias1(C(s.bias1)),
        sqrt_bias2_pow(C(s.sqrt_bias2_pow)),
        eps(C(s.eps)),
        weight_decay(C(s.weight_decay)),
        power(C(s.power)) {}
  // d: the group's mean |h|.
  CK_HD void operator()(C& p, C g, C d, C& m, C& v) const {
    m = beta1 * m + one_minus_beta1 * g;
    v = beta2 * v + one_minus_beta2 * (d * d);
    const C denom = power_of(sqrt(v)) / sqrt_bias2_pow + eps;
    p = p - lr * (m / bias1 / denom + weight_decay * p);
  }
  CK_HD C power_of(C x) const { return step_math::power(x, power); }
};

struct SophiaScalars {
  double lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, rho_bs, eps;
};

template <class C>
struct SophiaElement {
  C lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, rho_bs, eps;
  explicit CK_HD SophiaElement(const SophiaScalars& s)
      : lr(C(s.lr)),
        beta1(C(s.beta1)),
        one_minus_beta1(C(s.one_minus_beta1)),
        beta2(C(s.beta2)),
        one_minus_beta2(C(s.one_minus_beta2)),
        decay(C(s.decay)),
        rho_bs(C(s.rho_bs)),
        eps(C(s.eps)) {}
  CK_HD void update_hessian(C& h, C e) const { h = beta2 * h + one_minus_beta2 * e; }
  // Returns whether the step was unclipped (ratio < 1).
  CK_HD bool operator()(C& p, C g, C& m, C h) const {
    p = p * decay;
    m = beta1 * m + one_minus_beta1 * g;
    const C ratio = fabs(m) / (rho_bs * h + eps);
    const C sign = m > C(0) ? C(1) : (m < C(0) ? C(-1) : C(0));
    const C clipped = ratio < C(1) ? ratio : (ratio != ratio ? ratio : C(1));  // NaN stays NaN (np.minimum)
    p = p - lr * (sign * clipped);
    return ratio < C(1);
  }
};

inline AdaHessianScalars adahessian_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                            double power, long long step) {
  const double bias2 = 1.0 - std::pow(beta2, double(step));
  return {lr,
          beta1,
          1.0 - beta1,
          beta2,
          1.0 - beta2,
          1.0 - std::pow(beta1, double(step)),
          std::pow(std::sqrt(bias2), power),
          eps,
          weight_decay,
          power};
}

}  // namespace curvkit::step_math
