// M-FAC family, CUDA kernels: the passes over G (float64 accumulation, per-block partial sums
// added in a fixed order by sum_slots), cuBLAS / cuSOLVER for the float64 m x m factor, and the
// row-parallel rank-one update. The factor is row-major lower (ld m), which cuBLAS sees as the
// column-major upper factor U = L^T.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/check.h"
#include "core/cuda_utils.h"
#include "core/dispatch.h"
#include "core/linalg_cuda.h"
#include "mfac/mfac.h"

namespace curvkit::mfac {
namespace {

using cuda::DeviceBuffer;

constexpr int kThreads = 256;

// Rows of G in age order p: slot (base + p) % m.
struct Rows {
  int64_t base, count, m;
  __host__ __device__ int64_t slot(int64_t p) const { return (base + p) % m; }
};

__host__ __device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ double wide(float v) { return v; }
__device__ __forceinline__ double wide(double v) { return v; }

template <class S>
__device__ __forceinline__ double load_wide(const S* p) {
  return wide(cuda::load(p));
}

// Columns per block of a pass: at least 4096, at most 4096 chunks in all.
int64_t chunk_columns(int64_t d) {
  const int64_t c = std::max<int64_t>(4096, (d + 4095) / 4096);
  return (c + kThreads - 1) / kThreads * kThreads;
}

// partial[(i * k + q) * chunks + c] = G[rows(i), chunk c] . X[chunk c, q]; optionally the chunk
// of `row` (length d) is written into slot `target` of G in the same pass.
template <class S>
__global__ void gram_partial_kernel(S* G, int64_t d, Rows rows, const S* __restrict__ X, int64_t k, int64_t chunk,
                                    int64_t chunks, double* __restrict__ partial, int64_t target,
                                    const S* __restrict__ row) {
  const int64_t c = blockIdx.x, j0 = c * chunk, j1 = lmin(d, j0 + chunk);
  for (int64_t i = 0; i < rows.count; ++i) {
    const S* g = G + rows.slot(i) * d;
    for (int64_t q = 0; q < k; ++q) {
      double s = 0;
      for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) s += load_wide(g + j) * load_wide(X + j * k + q);
      s = cuda::block_sum(s);
      if (threadIdx.x == 0) partial[(i * k + q) * chunks + c] = s;
    }
  }
  if (target >= 0)
    for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) G[target * d + j] = row[j];
}

// Y (n, k) = G[rows] X, float64.
template <class S>
void gram_product(cudaStream_t stream, S* G, int64_t d, Rows rows, const S* X, int64_t k, double* Y,
                  int64_t target = -1, const S* row = nullptr) {
  const int64_t chunk = chunk_columns(d), chunks = std::max<int64_t>(1, (d + chunk - 1) / chunk);
  DeviceBuffer partial(sizeof(double) * size_t(std::max<int64_t>(1, rows.count * k * chunks)), stream);
  gram_partial_kernel<S>
      <<<unsigned(chunks), kThreads, 0, stream>>>(G, d, rows, X, k, chunk, chunks, partial.as<double>(), target, row);
  CK_CUDA_CHECK(cudaGetLastError());
  if (rows.count * k > 0) cuda::sum_slots(stream, partial.as<double>(), chunks, rows.count * k, Y, sizeof(double));
}

// out[j, q] = (X[j, q] - sum_i G[rows(i), j] W[i, q]) / damp, a thread per column, four
// vectors per pass.
template <class S>
__global__ void finish_kernel(const S* __restrict__ G, int64_t d, Rows rows, const double* __restrict__ W,
                              const S* __restrict__ X, int64_t k, double damp, S* __restrict__ out) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < d; j += int64_t(gridDim.x) * blockDim.x) {
    for (int64_t q0 = 0; q0 < k; q0 += 4) {
      double acc[4] = {0, 0, 0, 0};
      const int64_t nq = lmin(4, k - q0);
      for (int64_t i = 0; i < rows.count; ++i) {
        const double g = load_wide(G + rows.slot(i) * d + j);
        for (int64_t q = 0; q < nq; ++q) acc[q] += g * W[i * k + q0 + q];
      }
      for (int64_t q = 0; q < nq; ++q)
        cuda::store(out + j * k + q0 + q, cuda::acc_t<S>((load_wide(X + j * k + q0 + q) - acc[q]) / damp));
    }
  }
}

// ---- The factor

cublasHandle_t blas(cudaStream_t stream) { return cublas_handle(stream); }

// x <- L^-1 x on the leading n x n block (ld m).
void forward(cudaStream_t stream, const double* L, int64_t m, int64_t n, double* x) {
  if (n > 0)
    CK_CUBLAS_CHECK(
        cublasDtrsv(blas(stream), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T, CUBLAS_DIAG_NON_UNIT, int(n), L, int(m), x, 1));
}

// Y (n, k) row-major <- (L L^T)^-1 Y. Row-major Y is the column-major k x n Y^T: solve from the right.
void cholesky_solve(cudaStream_t stream, const double* L, int64_t m, int64_t n, double* Y, int64_t k) {
  if (n == 0 || k == 0) return;
  const double one = 1.0;
  cublasHandle_t h = blas(stream);
  CK_CUBLAS_CHECK(cublasDtrsm(h, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, int(k),
                              int(n), &one, L, int(m), Y, int(k)));
  CK_CUBLAS_CHECK(cublasDtrsm(h, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T, CUBLAS_DIAG_NON_UNIT, int(k),
                              int(n), &one, L, int(m), Y, int(k)));
}

// L (m x m) = lower triangle of scale * damp * I + K[rows, rows], zero elsewhere.
__global__ void capacitance_kernel(const double* __restrict__ K, int64_t m, Rows rows, double shift,
                                   double* __restrict__ L) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < m * m; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = t / m, q = t % m;
    double v = 0;
    if (p < rows.count && q <= p) v = K[rows.slot(p) * m + rows.slot(q)] + (p == q ? shift : 0.0);
    L[t] = v;
  }
}

__global__ void zero_upper_kernel(double* L, int64_t m, int64_t n) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n * n; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = t / n, q = t % n;
    if (q > p) L[p * m + q] = 0;
  }
}

// Cholesky of the capacitance matrix from K into L; cuSOLVER's status into *info (on the device).
void factor(cudaStream_t stream, const double* K, int64_t m, Rows rows, double shift, double* L, int* info) {
  capacitance_kernel<<<grid_for(m * m, kThreads), kThreads, 0, stream>>>(K, m, rows, shift, L);
  CK_CUDA_CHECK(cudaGetLastError());
  const int64_t n = rows.count;
  if (n == 0) return;
  cusolverDnHandle_t h = cusolver_handle(stream);
  int lwork = 0;
  CK_CUSOLVER_CHECK(cusolverDnDpotrf_bufferSize(h, CUBLAS_FILL_MODE_UPPER, int(n), L, int(m), &lwork));
  DeviceBuffer work(sizeof(double) * size_t(std::max(lwork, 1)), stream);
  CK_CUSOLVER_CHECK(cusolverDnDpotrf(h, CUBLAS_FILL_MODE_UPPER, int(n), L, int(m), work.as<double>(), lwork, info));
  zero_upper_kernel<<<grid_for(n * n, kThreads), kThreads, 0, stream>>>(L, m, n);
  CK_CUDA_CHECK(cudaGetLastError());
}

// factor(), then its status read back (one synchronization).
bool refactor(cudaStream_t stream, const double* K, int64_t m, Rows rows, double shift, double* L) {
  DeviceBuffer info(sizeof(int), stream);
  CK_CUDA_CHECK(cudaMemsetAsync(info.as<int>(), 0, sizeof(int), stream));
  factor(stream, K, m, rows, shift, L, info.as<int>());
  return cuda::copy_to_host(stream, info.as<int>(), 1)[0] == 0;
}

// The upper triangle of row-major K from its lower one.
__global__ void mirror_kernel(double* K, int64_t m) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < m * m; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t / m, j = t % m;
    if (j > i) K[t] = K[j * m + i];
  }
}

// p = L[1:n, 0]; then (after p <- L22^-1 p) sigma, diag and coef of the closed-form update.
__global__ void first_column_kernel(const double* L, int64_t m, int64_t r, double* p) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < r; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = L[(i + 1) * m];
}

__global__ void rotation_kernel(const double* p, int64_t r, double* diag, double* coef) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double sigma = 1;
  for (int64_t k = 0; k < r; ++k) {
    const double next = sigma + p[k] * p[k];
    diag[k] = sqrt(next / sigma);
    coef[k] = p[k] / sqrt(sigma * next);
    sigma = next;
  }
}

// Row i of the updated trailing factor, written shifted to row i, columns 0..i of `out`.
__global__ void update_rows_kernel(const double* __restrict__ L, int64_t m, int64_t r, const double* __restrict__ p,
                                   const double* __restrict__ diag, const double* __restrict__ coef,
                                   double* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < r; i += int64_t(gridDim.x) * blockDim.x) {
    const double* row = L + (i + 1) * m + 1;
    double* o = out + i * m;
    double suffix = 0;
    for (int64_t k = i; k >= 0; --k) {
      const double old = row[k];
      o[k] = old * diag[k] + coef[k] * suffix;
      suffix += old * p[k];
    }
    for (int64_t k = i + 1; k < m; ++k) o[k] = 0;
  }
}

// Drops the oldest gradient (row and column 0) from L by the rank-one update of cpu.cpp.
void remove_first(cudaStream_t stream, double* L, int64_t m, int64_t n) {
  if (n <= 1) {
    CK_CUDA_CHECK(cudaMemsetAsync(L, 0, sizeof(double) * size_t(m * m), stream));
    return;
  }
  const int64_t r = n - 1;
  DeviceBuffer vec(sizeof(double) * size_t(3 * r), stream), scratch(sizeof(double) * size_t(m * m), stream);
  double* p = vec.as<double>();
  first_column_kernel<<<grid_for(r, kThreads), kThreads, 0, stream>>>(L, m, r, p);
  forward(stream, L + m + 1, m, r, p);
  rotation_kernel<<<1, 1, 0, stream>>>(p, r, p + r, p + 2 * r);
  CK_CUDA_CHECK(cudaMemsetAsync(scratch.as<double>(), 0, sizeof(double) * size_t(m * m), stream));
  update_rows_kernel<<<grid_for(r, 64), 64, 0, stream>>>(L, m, r, p, p + r, p + 2 * r, scratch.as<double>());
  CK_CUDA_CHECK(cudaGetLastError());
  CK_CUDA_CHECK(
      cudaMemcpyAsync(L, scratch.as<double>(), sizeof(double) * size_t(m * m), cudaMemcpyDeviceToDevice, stream));
}

// c[p] = K[rows(p), target] (the new gradient's products in age order).
__global__ void gram_column_kernel(const double* K, int64_t m, Rows rows, int64_t target, double* c) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < rows.count; p += int64_t(gridDim.x) * blockDim.x)
    c[p] = K[rows.slot(p) * m + target];
}

// Row n of L: r = L^-1 c (already solved into c), pivot = shift + ||g||^2 - r.r. The exact
// pivot is a Schur complement of shift * I + K, so at least shift: clamping there costs only
// rounding and keeps the factor positive without a host round trip.
__global__ void append_kernel(double* L, int64_t m, int64_t n, const double* c, const double* norm2, double shift) {
  const double rr = cuda::block_sum([&] {
    double s = 0;
    for (int64_t p = threadIdx.x; p < n; p += blockDim.x) s += c[p] * c[p];
    return s;
  }());
  for (int64_t p = threadIdx.x; p < n; p += blockDim.x) L[n * m + p] = c[p];
  if (threadIdx.x == 0) L[n * m + n] = sqrt(fmax(shift + *norm2 - rr, shift));
}

// K[target, rows] = K[rows, target] = dots; K[target, target] = norm2.
__global__ void gram_store_kernel(double* K, int64_t m, Rows rows, int64_t target, const double* dots,
                                  const double* norm2) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p <= rows.count;
       p += int64_t(gridDim.x) * blockDim.x) {
    if (p == rows.count) {
      K[target * m + target] = *norm2;
    } else {
      const int64_t s = rows.slot(p);
      K[target * m + s] = K[s * m + target] = dots[p];
    }
  }
}

// Squared norm and finiteness of a vector: partial[c] per block, flag set on NaN/Inf.
template <class S>
__global__ void norm_kernel(const S* __restrict__ g, int64_t d, int64_t chunk, double* partial, int* nonfinite) {
  const int64_t c = blockIdx.x, j0 = c * chunk, j1 = lmin(d, j0 + chunk);
  double s = 0;
  bool bad = false;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const double v = load_wide(g + j);
    bad |= !isfinite(v);
    s += v * v;
  }
  s = cuda::block_sum(s);
  if (bad) atomicExch(nonfinite, 1);
  if (threadIdx.x == 0) partial[c] = s;
}

// ||g||^2 into *norm2 (device) and whether g is finite (read back: one synchronization).
template <class S>
bool squared_norm(cudaStream_t stream, const S* g, int64_t d, double* norm2, double* host_norm2) {
  const int64_t chunk = chunk_columns(d), chunks = std::max<int64_t>(1, (d + chunk - 1) / chunk);
  DeviceBuffer partial(sizeof(double) * size_t(chunks), stream), flag(sizeof(int), stream);
  CK_CUDA_CHECK(cudaMemsetAsync(flag.as<int>(), 0, sizeof(int), stream));
  norm_kernel<S><<<unsigned(chunks), kThreads, 0, stream>>>(g, d, chunk, partial.as<double>(), flag.as<int>());
  CK_CUDA_CHECK(cudaGetLastError());
  cuda::sum_slots(stream, partial.as<double>(), chunks, 1, norm2, sizeof(double));
  *host_norm2 = cuda::copy_to_host(stream, norm2, 1)[0];
  return cuda::copy_to_host(stream, flag.as<int>(), 1)[0] == 0;
}

// diag(F^-1) over column chunks: Z = L^-1 G[rows, chunk] (float64), then (1 - colsum Z^2) / damp.
template <class S>
__global__ void widen_rows_kernel(const S* __restrict__ G, int64_t d, Rows rows, int64_t j0, int64_t width,
                                  double* __restrict__ Z) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < rows.count * width;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = t / width, j = t % width;
    Z[t] = load_wide(G + rows.slot(p) * d + j0 + j);
  }
}

template <class S>
__global__ void diag_finish_kernel(const double* __restrict__ Z, int64_t n, int64_t width, double damp,
                                   S* __restrict__ out) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < width; j += int64_t(gridDim.x) * blockDim.x) {
    double s = 0;
    for (int64_t p = 0; p < n; ++p) s += Z[p * width + j] * Z[p * width + j];
    cuda::store(out + j, cuda::acc_t<S>((1.0 - s) / damp));
  }
}

template <class S>
void inverse_diag(cudaStream_t stream, const S* G, int64_t d, Rows rows, const double* L, int64_t m, double damp,
                  S* out) {
  const int64_t n = rows.count;
  const int64_t width = std::min<int64_t>(d, std::max<int64_t>(256, (int64_t(1) << 22) / std::max<int64_t>(n, 1)));
  if (width == 0) return;
  DeviceBuffer z(sizeof(double) * size_t(std::max<int64_t>(n, 1) * width), stream);
  const double one = 1.0;
  for (int64_t j0 = 0; j0 < d; j0 += width) {
    const int64_t w = std::min(width, d - j0);
    widen_rows_kernel<S><<<grid_for(n * w, kThreads), kThreads, 0, stream>>>(G, d, rows, j0, w, z.as<double>());
    if (n > 0)
      CK_CUBLAS_CHECK(cublasDtrsm(blas(stream), CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N,
                                  CUBLAS_DIAG_NON_UNIT, int(w), int(n), &one, L, int(m), z.as<double>(), int(w)));
    diag_finish_kernel<S><<<grid_for(w, kThreads), kThreads, 0, stream>>>(z.as<double>(), n, w, damp, out + j0);
    CK_CUDA_CHECK(cudaGetLastError());
  }
}

// K (m x m, full) = g g^T in float64 for a contiguous (m, d) g, a column chunk at a time: the
// row-major (m, w) chunk is the column-major w x m A, and A^T A lands in the column-major upper
// (= row-major lower) triangle, mirrored after.
template <class S>
void gram_matrix(cudaStream_t stream, const S* g, int64_t m, int64_t d, double* K) {
  CK_CUDA_CHECK(cudaMemsetAsync(K, 0, sizeof(double) * size_t(m * m), stream));
  if (m == 0 || d == 0) return;
  const Rows rows{0, m, m};
  const int64_t width = std::min<int64_t>(d, std::max<int64_t>(256, (int64_t(1) << 22) / m));
  DeviceBuffer chunk(sizeof(double) * size_t(m * width), stream);
  const double one = 1.0;
  for (int64_t j0 = 0; j0 < d; j0 += width) {
    const int64_t w = std::min(width, d - j0);
    widen_rows_kernel<S><<<grid_for(m * w, kThreads), kThreads, 0, stream>>>(g, d, rows, j0, w, chunk.as<double>());
    CK_CUDA_CHECK(cudaGetLastError());
    CK_CUBLAS_CHECK(cublasDsyrk(blas(stream), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T, int(m), int(w), &one,
                                chunk.as<double>(), int(w), &one, K, int(m)));
  }
  mirror_kernel<<<grid_for(m * m, kThreads), kThreads, 0, stream>>>(K, m);
  CK_CUDA_CHECK(cudaGetLastError());
}

template <class S>
void woodbury_apply(cudaStream_t stream, const S* G, int64_t d, Rows rows, const double* L, int64_t m, double damp,
                    const S* X, int64_t k, S* out) {
  DeviceBuffer y(sizeof(double) * size_t(std::max<int64_t>(1, rows.count * k)), stream);
  gram_product<S>(stream, const_cast<S*>(G), d, rows, X, k, y.as<double>());
  cholesky_solve(stream, L, m, rows.count, y.as<double>(), k);
  finish_kernel<S><<<grid_for(d, kThreads), kThreads, 0, stream>>>(G, d, rows, y.as<double>(), X, k, damp, out);
  CK_CUDA_CHECK(cudaGetLastError());
}

int64_t columns(const ArrayView& x) { return x.ndim() == 2 ? x.size(1) : 1; }

Rows window_rows(const Capacitance& cap, int64_t m) { return {cap.slots.empty() ? 0 : cap.slots[0], cap.n, m}; }

[[noreturn]] void throw_breakdown(const Capacitance& cap) {
  throw ValueError(cat("the capacitance matrix damp*c*I + G G^T (", cap.n, " x ", cap.n, ", c = ", cap.scale,
                       ", damp = ", cap.damp,
                       ") is not positive definite in float64: 'damp' is too small for the gradients' norms"));
}

template <class S>
__global__ void nonfinite_kernel(const S* __restrict__ a, int64_t size, int* flag) {
  bool bad = false;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < size; t += int64_t(gridDim.x) * blockDim.x)
    bad |= !isfinite(load_wide(a + t));
  if (bad) atomicExch(flag, 1);
}

template <class S>
bool all_finite(cudaStream_t stream, const S* a, int64_t size) {
  DeviceBuffer flag(sizeof(int), stream);
  CK_CUDA_CHECK(cudaMemsetAsync(flag.as<int>(), 0, sizeof(int), stream));
  nonfinite_kernel<S><<<grid_for(size, kThreads), kThreads, 0, stream>>>(a, size, flag.as<int>());
  CK_CUDA_CHECK(cudaGetLastError());
  return cuda::copy_to_host(stream, flag.as<int>(), 1)[0] == 0;
}

template <class S>
__global__ void widen_kernel(const S* __restrict__ a, int64_t size, double* __restrict__ out) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < size; t += int64_t(gridDim.x) * blockDim.x)
    out[t] = load_wide(a + t);
}

__global__ void entries_kernel(const double* __restrict__ V, int64_t m, int64_t d, const int64_t* __restrict__ rows,
                               const int64_t* __restrict__ cols, int64_t count, double damp, double* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t e = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; e < count; e += warps) {
    const int64_t r = rows[e], c = cols[e];
    double s = 0;
    for (int64_t p = lane; p < m; p += 32) s += V[p * d + r] * V[p * d + c];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) out[e] = ((r == c ? 1.0 : 0.0) - s) / damp;
  }
}

}  // namespace

// ---- Sliding window

FisherWindowState push_cuda(const FisherWindowArrays& w, const FisherWindowState& state, const FisherWindowOptions& o,
                            const ArrayView& g, StreamHandle stream_handle) {
  CudaDeviceGuard guard(w.G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = w.G.size(0), d = w.G.size(1), n = state.size;
  const bool full = n == m;
  const int64_t target = full ? state.oldest : n;
  FisherWindowState next = state;
  next.size = full ? m : n + 1;
  next.oldest = full ? (state.oldest + 1) % m : 0;
  next.count = state.count + 1;
  next.since_refactor = state.since_refactor + 1;
  const Capacitance cap = window_capacitance(next, m, o);
  const double old_scale = fisher_window_scale(m, n, o.normalize), shift = cap.scale * o.damp;
  double* K = w.gram.ptr<double>();
  double* L = w.factor.ptr<double>();
  CK_DISPATCH_FLOATING(w.G.dtype, "G", S, [&] {
    S* G = w.G.ptr<S>();
    const S* gp = g.ptr<const S>();
    DeviceBuffer scalars(sizeof(double) * size_t(m + 1), stream);
    double* norm2 = scalars.as<double>();
    double* dots = norm2 + 1;
    double host_norm2 = 0;
    CK_CHECK_VALUE(squared_norm<S>(stream, gp, d, norm2, &host_norm2),
                   "argument 'g' contains NaN or Inf; the window is unchanged");
    const double kappa = host_norm2 / shift;
    CK_CHECK_VALUE(kappa <= kMaxKappa, "argument 'g' has ||g||^2 / (c * damp) = ", kappa, " > ", kMaxKappa,
                   ": 'damp' (", o.damp, ") is too small for float64 to hold the capacitance matrix positive ",
                   "definite; the window is unchanged");
    const Rows kept{state.oldest + (full ? 1 : 0), full ? n - 1 : n, m};
    gram_product<S>(stream, G, d, kept, gp, 1, dots, target, gp);
    gram_store_kernel<<<grid_for(kept.count + 1, kThreads), kThreads, 0, stream>>>(K, m, kept, target, dots, norm2);
    CK_CUDA_CHECK(cudaGetLastError());
    const int64_t every = o.refactor_every > 0 ? o.refactor_every : m;
    if (cap.scale != old_scale || next.since_refactor >= every) {
      if (!refactor(stream, K, m, window_rows(cap, m), shift, L)) throw_breakdown(cap);
      next.since_refactor = 0;
    } else {
      if (full) remove_first(stream, L, m, n);
      DeviceBuffer c(sizeof(double) * size_t(std::max<int64_t>(1, kept.count)), stream);
      gram_column_kernel<<<grid_for(kept.count, kThreads), kThreads, 0, stream>>>(K, m, kept, target, c.as<double>());
      forward(stream, L, m, kept.count, c.as<double>());
      append_kernel<<<1, kThreads, 0, stream>>>(L, m, kept.count, c.as<double>(), norm2, shift);
      CK_CUDA_CHECK(cudaGetLastError());
    }
  });
  return next;
}

void ihvp_cuda(const FisherWindowArrays& w, const Capacitance& cap, const ArrayView& x, const ArrayView& out,
               StreamHandle stream_handle) {
  CudaDeviceGuard guard(w.G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = w.G.size(0);
  CK_DISPATCH_FLOATING(w.G.dtype, "G", S, [&] {
    woodbury_apply<S>(stream, w.G.ptr<const S>(), w.G.size(1), window_rows(cap, m), w.factor.ptr<const double>(), m,
                      cap.damp, x.ptr<const S>(), columns(x), out.ptr<S>());
  });
}

void diag_cuda(const FisherWindowArrays& w, const Capacitance& cap, const ArrayView& out, StreamHandle stream_handle) {
  CudaDeviceGuard guard(w.G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = w.G.size(0);
  CK_DISPATCH_FLOATING(w.G.dtype, "G", S, [&] {
    inverse_diag<S>(stream, w.G.ptr<const S>(), w.G.size(1), window_rows(cap, m), w.factor.ptr<const double>(), m,
                    cap.damp, out.ptr<S>());
  });
}

void refactor_cuda(const FisherWindowArrays& w, const Capacitance& cap, StreamHandle stream_handle) {
  CudaDeviceGuard guard(w.G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = w.G.size(0);
  if (!refactor(stream, w.gram.ptr<const double>(), m, window_rows(cap, m), cap.scale * cap.damp,
                w.factor.ptr<double>()))
    throw_breakdown(cap);
}

// ---- Static

void static_cuda(const ArrayView& G, const ArrayView* x, const ArrayView* out, const ArrayView* diag,
                 const ArrayView* V, double damp, StreamHandle stream_handle) {
  CudaDeviceGuard guard(G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = G.size(0), d = G.size(1);
  CK_CHECK_VALUE(m <= cuda::kMaxMatrixSide, "the number of gradients m (", m, ") exceeds ", cuda::kMaxMatrixSide,
                 " on CUDA");
  const double scale = double(std::max<int64_t>(m, 1));
  const Rows rows{0, m, std::max<int64_t>(m, 1)};
  CK_DISPATCH_FLOATING(G.dtype, "G", S, [&] {
    const S* g = G.ptr<const S>();
    CK_CHECK_VALUE(all_finite<S>(stream, g, m * d), "argument 'G' contains NaN or Inf");
    if (x) CK_CHECK_VALUE(all_finite<S>(stream, x->ptr<const S>(), x->numel()), "argument 'x' contains NaN or Inf");
    DeviceBuffer kbuf(sizeof(double) * size_t(std::max<int64_t>(1, 2 * m * m)), stream);
    double* K = kbuf.as<double>();
    double* L = K + m * m;
    gram_matrix<S>(stream, g, m, d, K);
    const std::vector<double> k_host = cuda::copy_to_host(stream, K, m * m);
    for (int64_t i = 0; i < m; ++i) {
      const double kappa = k_host[size_t(i * m + i)] / (scale * damp);
      CK_CHECK_VALUE(kappa <= kMaxKappa, "argument 'damp' (", damp, ") is too small: gradient ", i,
                     " has ||g||^2 / (m * damp) = ", kappa, " > ", kMaxKappa);
    }
    Capacitance cap;
    cap.n = m;
    cap.damp = damp;
    cap.scale = scale;
    if (!refactor(stream, K, std::max<int64_t>(m, 1), rows, scale * damp, L)) throw_breakdown(cap);
    if (x) woodbury_apply<S>(stream, g, d, rows, L, m, damp, x->ptr<const S>(), columns(*x), out->ptr<S>());
    if (diag) inverse_diag<S>(stream, g, d, rows, L, m, damp, diag->ptr<S>());
    if (V && m > 0 && d > 0) {
      CK_CHECK_VALUE(d <= INT32_MAX, "the dimension d (", d, ") exceeds cuBLAS's 2^31-1");
      widen_kernel<S><<<grid_for(m * d, kThreads), kThreads, 0, stream>>>(g, m * d, V->ptr<double>());
      CK_CUDA_CHECK(cudaGetLastError());
      const double one = 1.0;
      CK_CUBLAS_CHECK(cublasDtrsm(blas(stream), CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N,
                                  CUBLAS_DIAG_NON_UNIT, int(d), int(m), &one, L, int(m), V->ptr<double>(), int(d)));
    }
  });
}

void entries_cuda(const ArrayView& V, const ArrayView& rows, const ArrayView& cols, const ArrayView& out, double damp,
                  StreamHandle stream_handle) {
  CudaDeviceGuard guard(V.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = V.size(0), d = V.size(1), count = rows.numel();
  const std::vector<int64_t> r = cuda::copy_to_host(stream, rows.ptr<const int64_t>(), count);
  const std::vector<int64_t> c = cuda::copy_to_host(stream, cols.ptr<const int64_t>(), count);
  for (int64_t e = 0; e < count; ++e) {
    CK_CHECK_VALUE(r[size_t(e)] >= 0 && r[size_t(e)] < d, "argument 'rows' entry ", e, " (", r[size_t(e)],
                   ") is outside [0, ", d - 1, "]");
    CK_CHECK_VALUE(c[size_t(e)] >= 0 && c[size_t(e)] < d, "argument 'cols' entry ", e, " (", c[size_t(e)],
                   ") is outside [0, ", d - 1, "]");
  }
  if (count == 0) return;
  entries_kernel<<<grid_for(count * 32, kThreads), kThreads, 0, stream>>>(
      V.ptr<const double>(), m, d, rows.ptr<const int64_t>(), cols.ptr<const int64_t>(), count, damp,
      out.ptr<double>());
  CK_CUDA_CHECK(cudaGetLastError());
}

void blocks_cuda(const ArrayView& G, const ArrayView* x, const ArrayView* out, const ArrayView* diag, double damp,
                 int64_t block, StreamHandle stream_handle) {
  CudaDeviceGuard guard(G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = G.size(0), d = G.size(1), k = x ? columns(*x) : 0;
  const int64_t count = d > 0 ? (d + block - 1) / block : 0, widest = std::min(block, d);
  CK_CHECK_VALUE(m <= cuda::kMaxMatrixSide, "the number of gradients m (", m, ") exceeds ", cuda::kMaxMatrixSide,
                 " on CUDA");
  const Rows rows{0, m, std::max<int64_t>(m, 1)};
  const double shift = double(std::max<int64_t>(m, 1)) * damp;
  CK_DISPATCH_FLOATING(G.dtype, "G", S, [&] {
    const S* g = G.ptr<const S>();
    CK_CHECK_VALUE(all_finite<S>(stream, g, m * d), "argument 'G' contains NaN or Inf");
    if (x) CK_CHECK_VALUE(all_finite<S>(stream, x->ptr<const S>(), x->numel()), "argument 'x' contains NaN or Inf");
    if (count == 0) return;
    // Every block through the Woodbury route on a contiguous copy of its columns; the factor's
    // status per block lands in `infos`, read back once at the end.
    DeviceBuffer gb(sizeof(S) * size_t(std::max<int64_t>(1, m * widest)), stream);
    DeviceBuffer kl(sizeof(double) * size_t(std::max<int64_t>(1, 2 * m * m)), stream);
    DeviceBuffer infos(sizeof(int) * size_t(count), stream);
    CK_CUDA_CHECK(cudaMemsetAsync(infos.as<int>(), 0, sizeof(int) * size_t(count), stream));
    double* K = kl.as<double>();
    double* L = K + m * m;
    for (int64_t b = 0; b < count; ++b) {
      const int64_t b0 = b * block, bw = std::min(block, d - b0);
      if (m > 0)
        CK_CUDA_CHECK(cudaMemcpy2DAsync(gb.as<S>(), sizeof(S) * size_t(bw), g + b0, sizeof(S) * size_t(d),
                                        sizeof(S) * size_t(bw), size_t(m), cudaMemcpyDeviceToDevice, stream));
      gram_matrix<S>(stream, gb.as<S>(), m, bw, K);
      factor(stream, K, std::max<int64_t>(m, 1), rows, shift, L, infos.as<int>() + b);
      if (x)
        woodbury_apply<S>(stream, gb.as<S>(), bw, rows, L, m, damp, x->ptr<const S>() + b0 * k, k,
                          out->ptr<S>() + b0 * k);
      if (diag) inverse_diag<S>(stream, gb.as<S>(), bw, rows, L, m, damp, diag->ptr<S>() + b0);
    }
    const std::vector<int> status = cuda::copy_to_host(stream, infos.as<int>(), count);
    for (int64_t b = 0; b < count; ++b)
      CK_CHECK_VALUE(status[size_t(b)] == 0, "block ", b, " of F is not positive definite in float64: 'damp' (", damp,
                     ") is too small for the gradients' norms");
  });
}

}  // namespace curvkit::mfac
