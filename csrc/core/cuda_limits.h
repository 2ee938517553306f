// Named CUDA limits and the launches that respect them (CUDA builds only): the grid's y and z
// dimensions hold at most 65535 blocks, so kernels that put one matrix per grid row launch in
// chunks of that many matrices (or loop over matrices with a grid stride); cuBLAS batch counts
// are ints, and the batched products stay in chunks of the same size.
#pragma once
#include <algorithm>
#include <cstdint>

namespace curvkit::cuda {

// gridDim.y and gridDim.z at most (gridDim.x goes to 2^31 - 1).
constexpr int64_t kMaxGridY = 65535;

// Matrices per cuBLAS batched call (its batch counts are ints; well inside them).
constexpr int64_t kMaxBatchChunk = 65535;

// Matrices per call for the kernels that take the matrix from blockIdx.y without a grid stride.
constexpr int64_t kMaxMatricesPerCall = kMaxGridY;

// The largest n with n * n within the 32-bit range: one matrix for cuBLAS and cuSOLVER.
constexpr int64_t kMaxMatrixSide = 46340;

// Blocks along y for `count` matrices with a grid stride over them (at least 1).
inline unsigned grid_y(int64_t count) { return unsigned(std::max<int64_t>(1, std::min(count, kMaxGridY))); }

// Blocks for a block-per-matrix kernel that strides over `count` matrices along x: capped at the
// same count as along y, so a launch covers the same matrices whichever dimension carries them.
inline unsigned blocks_per_matrix(int64_t count) { return grid_y(count); }

// f(start, size) for consecutive chunks of at most `chunk` items covering [0, count).
template <class F>
void for_each_chunk(int64_t count, int64_t chunk, F&& f) {
  for (int64_t start = 0; start < count; start += chunk) f(start, std::min(chunk, count - start));
}

// f(start, grid_rows) over `count` matrices, one grid row (blockIdx.y) per matrix, in launches
// of at most kMaxGridY rows.
template <class F>
void for_each_grid_chunk(int64_t count, F&& f) {
  for_each_chunk(count, kMaxGridY, [&](int64_t start, int64_t size) { f(start, unsigned(size)); });
}

}  // namespace curvkit::cuda
