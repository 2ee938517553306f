#include "core/cuda_utils.h"
#include "core/dispatch.h"
#include "hutchinson/hutchinson.h"
#include "hutchinson/probe_math.h"

namespace curvkit {
namespace {

using namespace probe_math;

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// k == 1: each probe is contiguous. A warp covers 1024 entries (8 Philox blocks): lane l
// holds 32 signs (word l%4 of block l/4), and at step s every lane takes its bit of lane
// s's word, so each store of the warp is 32 consecutive entries.
template <class T>
__global__ void rademacher_vectors_kernel(T* __restrict__ out, int64_t batch, int64_t n, uint64_t seed,
                                          uint64_t offset) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_probe = (n + 1023) / 1024, tasks = batch * warps_per_probe;
  const int64_t nwarps = int64_t(gridDim.x) * blockDim.x / 32;
  const T plus = from_double<T>(1.0), minus = from_double<T>(-1.0);
  for (int64_t task = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; task < tasks; task += nwarps) {
    const int64_t b = task / warps_per_probe, w = task % warps_per_probe;
    const Philox4x32 r = philox_block(seed, offset + uint64_t(b), uint64_t(w * 8 + lane / 4));
    const uint32_t word = r.v[lane & 3];
    T* p = out + b * n + w * 1024;
    const int64_t remaining = n - w * 1024;
#pragma unroll 4
    for (int s = 0; s < 32; ++s) {
      const uint32_t bits = __shfl_sync(kFullMask, word, s);
      const int64_t i = s * 32 + lane;
      if (i < remaining) p[i] = (bits >> lane) & 1 ? plus : minus;
    }
  }
}

// k > 1: a thread writes 32 entries (one Philox word) of one column; neighbouring threads
// take neighbouring columns, so stores coalesce when k >= 32.
template <class T>
__global__ void rademacher_matrix_kernel(T* __restrict__ out, ProbeLayout L, uint64_t seed, uint64_t offset) {
  const int64_t words = (L.n + 31) / 32, items = L.batch * words * L.k;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const T plus = from_double<T>(1.0), minus = from_double<T>(-1.0);
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < items; t += stride) {
    const int64_t q = t / L.k, j = t - q * L.k, b = q / words, g = q - b * words;
    const Philox4x32 r = philox_block(seed, offset + uint64_t(b * L.k + j), uint64_t(g / 4));
    const uint32_t word = r.v[g & 3];
    T* p = out + (b * L.n + g * 32) * L.k + j;
    const int64_t rows = L.n - g * 32 < 32 ? L.n - g * 32 : 32;
    for (int i = 0; i < rows; ++i) p[i * L.k] = (word >> i) & 1 ? plus : minus;
  }
}

// One thread per (batch, pair of rows, column); sphere probes divide by norms.
template <class T>
__global__ void gaussian_kernel(T* __restrict__ out, ProbeLayout L, uint64_t seed, uint64_t offset,
                                const double* __restrict__ norms) {
  const int64_t pairs = (L.n + 1) / 2, items = L.batch * pairs * L.k;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < items; t += stride) {
    const int64_t q = t / L.k, j = t - q * L.k, b = q / pairs, p = q - b * pairs;  // two divisions, not three
    const int64_t column = b * L.k + j;
    double z[2];
    gaussian_pair(seed, offset + uint64_t(column), uint64_t(p), z[0], z[1]);
    T* o = out + (b * L.n + 2 * p) * L.k + j;
    for (int h = 0; h < 2 && 2 * p + h < L.n; ++h) {
      const double v = norms ? sphere_entry(z[h], 2 * p + h, norms[column]) : z[h];
      o[h * L.k] = from_double<T>(v);
    }
  }
}

// Sphere, pass 1: a warp per (column, chunk of 256 entries) writes the chunk's sum of squares.
__global__ void sphere_partials_kernel(double* __restrict__ partial, ProbeLayout L, uint64_t seed, uint64_t offset) {
  const int lane = threadIdx.x & 31;
  const int64_t chunks = (L.n + kNormChunk - 1) / kNormChunk, tasks = L.batch * L.k * chunks;
  const int64_t nwarps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t task = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; task < tasks; task += nwarps) {
    const int64_t column = task / chunks, chunk = task % chunks;
    double s = lane_sum_squares(seed, offset + uint64_t(column), L.n, chunk, lane);
    for (int off = kNormLanes / 2; off >= 1; off /= 2) s = pmath::add(s, __shfl_xor_sync(kFullMask, s, off));
    if (lane == 0) partial[task] = s;
  }
}

// Sphere, pass 2 (one launch per 512-fold of the tree): a block per (column, group) takes the
// column's chunk sums at first + m * stride, m < 512, runs those nine levels of the aligned
// tree (probe_math step 3) in shared memory and leaves the sum at `first`; the last launch,
// whose single group spans the column, writes the norm instead.
constexpr int kTreeFanIn = 2 * kThreads;

__global__ void sphere_tree_kernel(double* __restrict__ partial, double* __restrict__ norms, int64_t columns,
                                   int64_t chunks, int64_t stride, int64_t groups) {
  __shared__ double v[kTreeFanIn];
  for (int64_t task = blockIdx.x; task < columns * groups; task += gridDim.x) {
    const int64_t column = task / groups, first = (task % groups) * kTreeFanIn * stride;
    double* base = partial + column * chunks + first;
    const int64_t left = (chunks - first + stride - 1) / stride;
    const int count = left < kTreeFanIn ? int(left) : kTreeFanIn;
    for (int m = threadIdx.x; m < kTreeFanIn; m += blockDim.x) v[m] = m < count ? base[m * stride] : 0.0;
    __syncthreads();
    for (int width = 1; width < kTreeFanIn; width *= 2) {
      const int m = int(threadIdx.x) * 2 * width;
      if (m + width < count) v[m] = pmath::add(v[m], v[m + width]);
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if (groups == 1)
        norms[column] = pmath::sqrt(v[0]);
      else
        base[0] = v[0];
    }
    __syncthreads();  // v is refilled for the next task
  }
}

}  // namespace

void probes_cuda(const ArrayView& out, ProbeKind kind, uint64_t seed, uint64_t offset, double* workspace,
                 StreamHandle stream) {
  const ProbeLayout L = probe_layout(out);
  if (out.numel() == 0) return;
  CudaDeviceGuard guard(out.device);
  const cudaStream_t s = to_cuda_stream(stream);
  CK_DISPATCH_FLOATING(out.dtype, "out", T, [&] {
    T* o = out.ptr<T>();
    if (kind == ProbeKind::Rademacher) {
      if (L.k == 1) {
        const int64_t threads_needed = L.batch * ((L.n + 1023) / 1024) * 32;
        rademacher_vectors_kernel<T>
            <<<grid_for(threads_needed, kThreads), kThreads, 0, s>>>(o, L.batch, L.n, seed, offset);
      } else {
        const int64_t items = L.batch * ((L.n + 31) / 32) * L.k;
        rademacher_matrix_kernel<T><<<grid_for(items, kThreads), kThreads, 0, s>>>(o, L, seed, offset);
      }
      return;
    }
    const double* norms = nullptr;
    if (kind == ProbeKind::Sphere) {
      const int64_t columns = L.batch * L.k, chunks = (L.n + kNormChunk - 1) / kNormChunk;
      double* partial = workspace;
      double* column_norms = workspace + columns * chunks;
      sphere_partials_kernel<<<grid_for(columns * chunks * 32, kThreads), kThreads, 0, s>>>(partial, L, seed, offset);
      for (int64_t stride = 1;; stride *= kTreeFanIn) {
        const int64_t groups = (chunks + kTreeFanIn * stride - 1) / (kTreeFanIn * stride);
        sphere_tree_kernel<<<grid_for(columns * groups, 1), kThreads, 0, s>>>(partial, column_norms, columns, chunks,
                                                                              stride, groups);
        if (groups == 1) break;
      }
      norms = column_norms;
    }
    const int64_t items = L.batch * ((L.n + 1) / 2) * L.k;
    gaussian_kernel<T><<<grid_for(items, kThreads), kThreads, 0, s>>>(o, L, seed, offset, norms);
  });
  CK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace curvkit
