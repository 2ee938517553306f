// Probe entries as functions of (seed, probe, entry), shared by the CPU and CUDA kernels
// (see hutchinson.h for the definition).
#pragma once
#include <cstdint>

#include "core/philox.h"
#include "core/portable_math.h"

namespace curvkit::probe_math {

constexpr int kSignsPerBlock = 128;  // rademacher entries per Philox block
constexpr int kNormChunk = 256;      // sphere: entries per partial sum of squares
constexpr int kNormLanes = 32;       // sphere: lanes per chunk (a CUDA warp)

CK_HD void gaussian_pair(uint64_t seed, uint64_t probe, uint64_t pair, double& z0, double& z1) {
  const Philox4x32 r = philox_block(seed, probe, pair);
  const uint64_t a = r.v[0] | (uint64_t(r.v[1]) << 32), b = r.v[2] | (uint64_t(r.v[3]) << 32);
  constexpr double two_m53 = 1.0 / 9007199254740992.0;  // 2^-53
  const double u = pmath::mul(pmath::u53_to_double((a >> 11) + 1), two_m53);  // (0, 1], exact
  const double t = pmath::mul(pmath::u53_to_double(b >> 11), two_m53);        // [0, 1), exact
  const double radius = pmath::sqrt(pmath::mul(-2.0, pmath::log(u)));
  double s, c;
  pmath::sincos_2pi(t, s, c);
  z0 = pmath::mul(radius, c);
  z1 = pmath::mul(radius, s);
}

CK_HD double gaussian_entry(uint64_t seed, uint64_t probe, uint64_t i) {
  double z0, z1;
  gaussian_pair(seed, probe, i / 2, z0, z1);
  return (i & 1) ? z1 : z0;
}

// One lane's share of a chunk's sum of squares: entries chunk*256 + lane + 32 t, t < 8, in
// order. Lanes are then combined by an xor butterfly (offsets 16, 8, 4, 2, 1) and chunks
// summed in order; CPU and CUDA follow the same order, so the norms agree bit for bit.
CK_HD double lane_sum_squares(uint64_t seed, uint64_t probe, int64_t n, int64_t chunk, int lane) {
  double s = 0.0;
  for (int t = 0; t < kNormChunk / kNormLanes; ++t) {
    const int64_t i = chunk * kNormChunk + lane + kNormLanes * t;
    if (i < n) {
      const double z = gaussian_entry(seed, probe, uint64_t(i));
      s = pmath::add(s, pmath::mul(z, z));
    }
  }
  return s;
}

// Entry value of a sphere probe given its gaussian value z, entry index i and norm.
CK_HD double sphere_entry(double z, int64_t i, double norm) {
  if (norm == 0.0) return i == 0 ? 1.0 : 0.0;
  return pmath::div(z, norm);
}

}  // namespace curvkit::probe_math
