// log and sin/cos built from individually rounded IEEE operations (no fused multiply-add,
// no library calls), so the CPU and CUDA kernels produce the same bits. Accuracy is a few
// ulps, which is ample for drawing random numbers; these are not general-purpose libm.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/half.h"

namespace curvkit::pmath {

#ifdef __CUDA_ARCH__
CK_HD double add(double a, double b) { return __dadd_rn(a, b); }
CK_HD double mul(double a, double b) { return __dmul_rn(a, b); }
CK_HD double div(double a, double b) { return __ddiv_rn(a, b); }
CK_HD double sqrt(double a) { return __dsqrt_rn(a); }
#else
CK_HD double add(double a, double b) { return a + b; }
CK_HD double mul(double a, double b) { return a * b; }
CK_HD double div(double a, double b) { return a / b; }
CK_HD double sqrt(double a) { return std::sqrt(a); }
#endif

// Exact double of an integer 0 <= x <= 2^53 from bit operations and exact subtractions
// (int64 -> double has no packed instruction before AVX-512, so this keeps loops vectorized).
CK_HD double u53_to_double(uint64_t x) {
  constexpr uint64_t kTwo52Bits = 0x4330000000000000ull;
  constexpr double kTwo52 = 4503599627370496.0;
  const double half = add(bits_double((x >> 1) | kTwo52Bits), -kTwo52);  // exact, x >> 1 < 2^52
  const double low = add(bits_double((x & 1) | kTwo52Bits), -kTwo52);
  return add(add(half, half), low);
}

// Natural log of a positive normal double: x = 2^e m, m in (sqrt(1/2), sqrt(2)],
// log m = 2 atanh(s) with s = (m - 1) / (m + 1), |s| < 0.1716, series to s^21.
CK_HD double log(double x) {
  const uint64_t b = double_bits(x);
  const double m1 = bits_double((b & ((1ull << 52) - 1)) | (1023ull << 52));  // in [1, 2)
  const bool above = m1 > 1.4142135623730951;
  const double m = mul(m1, above ? 0.5 : 1.0);  // exact; a select of constants keeps loops branch-free
  // e + 1024 in [1, 2047], as a double without an int -> double conversion
  const double de = add(u53_to_double((b >> 52) + 1 + (above ? 1 : 0)), -1024.0);
  const double s = div(add(m, -1.0), add(m, 1.0));
  const double s2 = mul(s, s);
  double p = 1.0 / 21.0;
  p = add(mul(p, s2), 1.0 / 19.0);
  p = add(mul(p, s2), 1.0 / 17.0);
  p = add(mul(p, s2), 1.0 / 15.0);
  p = add(mul(p, s2), 1.0 / 13.0);
  p = add(mul(p, s2), 1.0 / 11.0);
  p = add(mul(p, s2), 1.0 / 9.0);
  p = add(mul(p, s2), 1.0 / 7.0);
  p = add(mul(p, s2), 1.0 / 5.0);
  p = add(mul(p, s2), 1.0 / 3.0);
  const double two_s = mul(2.0, s);
  const double log_m = add(two_s, mul(two_s, mul(s2, p)));
  // ln 2 split so that e * LN2_HI is exact (fdlibm's constants).
  constexpr double LN2_HI = 6.93147180369123816490e-01, LN2_LO = 1.90821492927058770002e-10;
  return add(mul(de, LN2_HI), add(mul(de, LN2_LO), log_m));
}

// cos(2 pi t) and sin(2 pi t) for t in [0, 1): exact reduction to a quarter turn
// (t * 4 = q + f, |f| <= 1/2), then Taylor polynomials on |x| <= pi/4.
CK_HD void sincos_2pi(double t, double& s_out, double& c_out) {
  const double r = mul(t, 4.0);
  const int quarter = int(add(r, 0.5));       // floor, as r >= 0
  const double f = add(r, -double(quarter));  // exact
  const double x = mul(f, 1.5707963267948966);
  const double x2 = mul(x, x);
  double ps = 1.0 / 355687428096000.0;  // 1/17!
  ps = add(mul(ps, x2), -1.0 / 1307674368000.0);
  ps = add(mul(ps, x2), 1.0 / 6227020800.0);
  ps = add(mul(ps, x2), -1.0 / 39916800.0);
  ps = add(mul(ps, x2), 1.0 / 362880.0);
  ps = add(mul(ps, x2), -1.0 / 5040.0);
  ps = add(mul(ps, x2), 1.0 / 120.0);
  ps = add(mul(ps, x2), -1.0 / 6.0);
  const double sx = add(x, mul(mul(x, x2), ps));
  double pc = 1.0 / 20922789888000.0;  // 1/16!
  pc = add(mul(pc, x2), -1.0 / 87178291200.0);
  pc = add(mul(pc, x2), 1.0 / 479001600.0);
  pc = add(mul(pc, x2), -1.0 / 3628800.0);
  pc = add(mul(pc, x2), 1.0 / 40320.0);
  pc = add(mul(pc, x2), -1.0 / 720.0);
  pc = add(mul(pc, x2), 1.0 / 24.0);
  pc = add(mul(pc, x2), -0.5);
  const double cx = add(1.0, mul(x2, pc));
  // Rotate by quarter * 90 degrees: q=1 -> (-s, c), q=2 -> (-c, -s), q=3 -> (s, -c).
  const int q = quarter & 3;
  const double c = (q & 1) ? sx : cx, s = (q & 1) ? cx : sx;
  c_out = mul(c, (q == 1) | (q == 2) ? -1.0 : 1.0);
  s_out = mul(s, q >= 2 ? -1.0 : 1.0);
}

}  // namespace curvkit::pmath
