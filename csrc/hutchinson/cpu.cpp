#include <omp.h>

#include <algorithm>
#include <vector>

#include "core/dispatch.h"
#include "core/runtime.h"
#include "core/simd.h"
#include "hutchinson/hutchinson.h"
#include "hutchinson/probe_math.h"

namespace curvkit {
namespace {

using namespace probe_math;

constexpr int64_t kRowsPerTask = 128;  // rows of the (n, k) probe matrix per parallel task

// Gaussian pairs pair0 .. pair0+count-1 of one probe into z0[], z1[]. The loop vectorizes
// (branch-free portable math); clones for AVX-512 and AVX2 run the same IEEE operations per
// lane, so every clone gives the same bits as the scalar definition.
CK_SIMD_CLONES void gaussian_pairs(uint64_t seed, uint64_t probe, uint64_t pair0, int64_t count,
                                   double* __restrict__ z0, double* __restrict__ z1) {
  for (int64_t p = 0; p < count; ++p) gaussian_pair(seed, probe, pair0 + uint64_t(p), z0[p], z1[p]);
}

// Runs body(b, row_block) over all (batch, row block) tasks on curvkit's threads. Tasks are
// independent and every entry is a fixed function of its indices, so the result does not
// depend on the thread count.
template <class Body>
void for_row_blocks(const ProbeLayout& L, Body body) {
  const int64_t blocks = (L.n + kRowsPerTask - 1) / kRowsPerTask, tasks = L.batch * blocks;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (tasks * L.k * kRowsPerTask > (1 << 15))
  for (int64_t t = 0; t < tasks; ++t) body(t / blocks, t % blocks);
}

template <class T>
void rademacher(T* out, const ProbeLayout& L, uint64_t seed, uint64_t offset) {
  static_assert(kRowsPerTask == kSignsPerBlock, "one Philox block per column per task");
  // +-1 for each bit pattern of a byte, so a vector writes 8 entries per copy.
  static const auto table = [] {
    std::vector<T> t(256 * 8);
    for (int byte = 0; byte < 256; ++byte)
      for (int bit = 0; bit < 8; ++bit) t[byte * 8 + bit] = from_double<T>((byte >> bit) & 1 ? 1.0 : -1.0);
    return t;
  }();
  const T plus = from_double<T>(1.0), minus = from_double<T>(-1.0);
  for_row_blocks(L, [&](int64_t b, int64_t rb) {
    const int64_t row0 = rb * kRowsPerTask, rows = std::min(kRowsPerTask, L.n - row0);
    T* base = out + (b * L.n + row0) * L.k;
    for (int64_t j = 0; j < L.k; ++j) {
      const Philox4x32 r = philox_block(seed, offset + uint64_t(b * L.k + j), uint64_t(rb));
      static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bit i of the block is bit i%8 of byte i/8");
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(r.v);
      if (L.k == 1) {
        int64_t i = 0;
        for (; i + 8 <= rows; i += 8) std::copy_n(&table[bytes[i / 8] * 8], 8, base + i);
        for (; i < rows; ++i) base[i] = (bytes[i / 8] >> (i % 8)) & 1 ? plus : minus;
      } else {
        for (int64_t i = 0; i < rows; ++i) base[i * L.k + j] = (r.v[i / 32] >> (i % 32)) & 1 ? plus : minus;
      }
    }
  });
}

// Gaussian probes, or sphere probes when norms is non-null (one norm per column).
template <class T>
void gaussian(T* out, const ProbeLayout& L, uint64_t seed, uint64_t offset, const double* norms) {
  static_assert(kRowsPerTask % 2 == 0, "tasks hold whole pairs");
  for_row_blocks(L, [&](int64_t b, int64_t rb) {
    const int64_t row0 = rb * kRowsPerTask, rows = std::min(kRowsPerTask, L.n - row0);
    T* base = out + (b * L.n + row0) * L.k;
    double z[2][kRowsPerTask / 2];
    for (int64_t j = 0; j < L.k; ++j) {
      const uint64_t q = offset + uint64_t(b * L.k + j);
      gaussian_pairs(seed, q, uint64_t(row0 / 2), (rows + 1) / 2, z[0], z[1]);
      if (norms) {
        const double norm = norms[b * L.k + j];
        for (int64_t i = 0; i < rows; ++i)
          base[i * L.k + j] = from_double<T>(sphere_entry(z[i & 1][i / 2], row0 + i, norm));
      } else {
        for (int64_t i = 0; i < rows; ++i) base[i * L.k + j] = from_double<T>(z[i & 1][i / 2]);
      }
    }
  });
}

// Column 2-norms of the gaussian probes, summed in the order probe_math prescribes (the lane
// sums of lane_sum_squares, from pairs already drawn in bulk).
std::vector<double> sphere_norms(const ProbeLayout& L, uint64_t seed, uint64_t offset) {
  const int64_t columns = L.batch * L.k, chunks = (L.n + kNormChunk - 1) / kNormChunk;
  std::vector<double> partial(static_cast<size_t>(columns * chunks)), norms(static_cast<size_t>(columns));
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (columns * L.n > (1 << 14))
  for (int64_t t = 0; t < columns * chunks; ++t) {
    const int64_t c = t / chunks, chunk = t % chunks;
    const uint64_t q = offset + uint64_t(c);
    const int64_t count = std::min<int64_t>(kNormChunk, L.n - chunk * kNormChunk);
    double z[2][kNormChunk / 2];
    gaussian_pairs(seed, q, uint64_t(chunk * kNormChunk / 2), (count + 1) / 2, z[0], z[1]);
    double lanes[kNormLanes];
    for (int l = 0; l < kNormLanes; ++l) {
      double s = 0.0;
      for (int64_t pair = l; 2 * pair < count; pair += kNormLanes) {
        s = pmath::add(s, pmath::mul(z[0][pair], z[0][pair]));
        if (2 * pair + 1 < count) s = pmath::add(s, pmath::mul(z[1][pair], z[1][pair]));
      }
      lanes[l] = s;
    }
    for (int off = kNormLanes / 2; off >= 1; off /= 2) {
      double next[kNormLanes];
      for (int l = 0; l < kNormLanes; ++l) next[l] = pmath::add(lanes[l], lanes[l ^ off]);
      std::copy_n(next, kNormLanes, lanes);
    }
    partial[size_t(t)] = lanes[0];
  }
  for (int64_t c = 0; c < columns; ++c) {
    double* column = partial.data() + c * chunks;
    tree_sum_in_place(column, chunks);
    norms[size_t(c)] = pmath::sqrt(column[0]);
  }
  return norms;
}

}  // namespace

void probes_cpu(const ArrayView& out, ProbeKind kind, uint64_t seed, uint64_t offset) {
  const ProbeLayout L = probe_layout(out);
  if (out.numel() == 0) return;
  CK_DISPATCH_FLOATING(out.dtype, "out", T, [&] {
    switch (kind) {
      case ProbeKind::Rademacher: rademacher(out.ptr<T>(), L, seed, offset); break;
      case ProbeKind::Gaussian: gaussian(out.ptr<T>(), L, seed, offset, nullptr); break;
      case ProbeKind::Sphere: {
        const std::vector<double> norms = sphere_norms(L, seed, offset);
        gaussian(out.ptr<T>(), L, seed, offset, norms.data());
        break;
      }
    }
  });
}

}  // namespace curvkit
