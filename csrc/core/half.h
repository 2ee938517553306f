// float16 / bfloat16 storage types and correctly rounded conversions, written with integer
// operations only so that CPU and CUDA produce the same bits.
#pragma once
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define CK_HD __host__ __device__ __forceinline__
#else
#define CK_HD inline
#endif

namespace curvkit {

struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

CK_HD uint64_t double_bits(double x) {
  uint64_t b;
  memcpy(&b, &x, 8);
  return b;
}
CK_HD double bits_double(uint64_t b) {
  double x;
  memcpy(&x, &b, 8);
  return x;
}

// Round a double to the nearest (ties to even) binary format with EXP exponent bits and
// MANT stored mantissa bits (float16: 5, 10; bfloat16: 8, 7), in one rounding step.
template <int EXP, int MANT>
CK_HD uint16_t round_to_small_float(double x) {
  constexpr int bias = (1 << (EXP - 1)) - 1;
  constexpr uint16_t inf = uint16_t(((1u << EXP) - 1) << MANT);
  const uint64_t b = double_bits(x);
  const uint16_t sign = uint16_t((b >> 48) & 0x8000u);
  const uint64_t mag = b & 0x7fffffffffffffffull;
  if (mag >= 0x7ff0000000000000ull)  // inf, or nan (kept quiet)
    return uint16_t(sign | inf | (mag > 0x7ff0000000000000ull ? (1u << (MANT - 1)) : 0u));
  const int e = int(mag >> 52) - 1023;
  if (e > bias) return uint16_t(sign | inf);
  if (e < 1 - bias - MANT - 1) return sign;  // below half the smallest subnormal, or zero
  const uint64_t m = (mag & ((1ull << 52) - 1)) | (1ull << 52);
  const int shift = (52 - MANT) + (e < 1 - bias ? (1 - bias) - e : 0);
  uint64_t kept = m >> shift;
  const uint64_t rem = m & ((1ull << shift) - 1), halfway = 1ull << (shift - 1);
  if (rem > halfway || (rem == halfway && (kept & 1))) ++kept;
  if (e < 1 - bias) return uint16_t(sign | kept);  // subnormal (kept may carry into the normals)
  return uint16_t(sign | ((uint64_t(e + bias) << MANT) + kept - (1ull << MANT)));
}

template <int EXP, int MANT>
CK_HD double small_float_to_double(uint16_t h) {
  constexpr int bias = (1 << (EXP - 1)) - 1;
  const uint64_t sign = uint64_t(h & 0x8000u) << 48;
  const uint32_t ex = (h >> MANT) & ((1u << EXP) - 1), mant = h & ((1u << MANT) - 1);
  if (ex == (1u << EXP) - 1) return bits_double(sign | 0x7ff0000000000000ull | (uint64_t(mant) << (52 - MANT)));
  if (ex == 0) {  // subnormal: mant * 2^(1 - bias - MANT), exact in double
    const double tiny = bits_double(uint64_t(1023 + 1 - bias - MANT) << 52);
    const double v = double(mant) * tiny;
    return sign ? -v : v;
  }
  return bits_double(sign | (uint64_t(int(ex) - bias + 1023) << 52) | (uint64_t(mant) << (52 - MANT)));
}

// from_double<T>: the one rounding every kernel uses to store a result.
template <class T>
CK_HD T from_double(double x) {
  return static_cast<T>(x);
}
template <>
CK_HD half_t from_double<half_t>(double x) {
  return {round_to_small_float<5, 10>(x)};
}
template <>
CK_HD bfloat16_t from_double<bfloat16_t>(double x) {
  return {round_to_small_float<8, 7>(x)};
}

template <class T>
CK_HD double to_double(T x) {
  return static_cast<double>(x);
}
template <>
CK_HD double to_double<half_t>(half_t x) {
  return small_float_to_double<5, 10>(x.bits);
}
template <>
CK_HD double to_double<bfloat16_t>(bfloat16_t x) {
  return small_float_to_double<8, 7>(x.bits);
}

}  // namespace curvkit
