// Probe entries as functions of (seed, probe, entry), shared by the CPU and CUDA kernels
// (see hutchinson.h for the definition).
#pragma once
#include <cstdint>

#include "core/philox.h"
#include "core/portable_math.h"

namespace curvkit::probe_math {

constexpr int kSignsPerBlock = 128;  // rademacher entries per Philox block
constexpr int kNormChunk = 256;      // sphere: entries per partial sum of squares
constexpr int kNormLanes = 32;       // sphere: lane sums per chunk (a CUDA warp)

CK_HD void gaussian_pair(uint64_t seed, uint64_t probe, uint64_t pair, double& z0, double& z1) {
  const Philox4x32 r = philox_block(seed, probe, pair);
  const uint64_t a = r.v[0] | (uint64_t(r.v[1]) << 32), b = r.v[2] | (uint64_t(r.v[3]) << 32);
  constexpr double two_m53 = 1.0 / 9007199254740992.0;                        // 2^-53
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

// Sphere norms are sums of squares in a fixed order, so that CPU and CUDA agree bit for bit:
//  1. chunk c holds entries 256c .. 256c+255 (128 gaussian pairs); lane l < 32 adds, in
//     order, the squares of entries 2p and 2p+1 for its pairs p = 128c + l + 32t, t < 4
//     (lane_sum_squares);
//  2. the 32 lane sums are combined by an xor butterfly: offsets 16, 8, 4, 2, 1;
//  3. the chunk sums s_0 .. s_{m-1} are combined by the aligned binary tree: the node for
//     chunks [j 2^h, (j+1) 2^h) is left + right child, or the left child alone when the
//     right one is past the end (tree_sum_in_place). Its depth is log2(m), so a GPU
//     reduces a long probe in a few short passes instead of one long serial sum.
CK_HD double lane_sum_squares(uint64_t seed, uint64_t probe, int64_t n, int64_t chunk, int lane) {
  double s = 0.0;
  for (int t = 0; t < kNormChunk / 2 / kNormLanes; ++t) {
    const int64_t pair = chunk * (kNormChunk / 2) + lane + kNormLanes * t;
    if (2 * pair >= n) break;
    double z0, z1;
    gaussian_pair(seed, probe, uint64_t(pair), z0, z1);
    s = pmath::add(s, pmath::mul(z0, z0));
    if (2 * pair + 1 < n) s = pmath::add(s, pmath::mul(z1, z1));
  }
  return s;
}

// Step 3 over v[0 .. m-1], leaving the total in v[0]: level h adds v[i + 2^h] into v[i] for
// i a multiple of 2^(h+1).
inline void tree_sum_in_place(double* v, int64_t m) {
  for (int64_t width = 1; width < m; width *= 2)
    for (int64_t i = 0; i + width < m; i += 2 * width) v[i] = pmath::add(v[i], v[i + width]);
}

// Entry value of a sphere probe given its gaussian value z, entry index i and norm.
CK_HD double sphere_entry(double z, int64_t i, double norm) {
  if (norm == 0.0) return i == 0 ? 1.0 : 0.0;
  return pmath::div(z, norm);
}

}  // namespace curvkit::probe_math
