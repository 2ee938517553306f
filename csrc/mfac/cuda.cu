// M-FAC family, CUDA kernels: the passes over G (float64 accumulation, per-block partial sums
// added in a fixed order by sum_slots), cuBLAS / cuSOLVER for the float64 m x m factor, and the
// row-parallel rank-one update. The factor is row-major lower (ld m), which cuBLAS sees as the
// column-major upper factor U = L^T.
//
// A push never waits for the host: its checks (finite g, kappa, the factor of a refactorization)
// run on the device and write the window's status word (mfac.h: WindowFault); every write a push
// makes to the window is a kernel that first reads that word, so a refused push (and every push
// after it, until the word is read) changes nothing. ihvp and diag read the word back together
// with their result's finiteness check: one synchronization per result.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
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
  // (base + p) mod m without a 64-bit division (per element in finish_kernel): base <= m and
  // p < m, so one subtraction is enough.
  __host__ __device__ int64_t slot(int64_t p) const {
    const int64_t s = base + p;
    return s >= m ? s - m : s;
  }
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

// True while no push since the status word was last read has been refused.
__device__ __forceinline__ bool window_ok(const int64_t* status) {
  return status == nullptr || status[0] == kFaultNone;
}

// Rows of G a block of gram_partial_kernel takes: a warp each.
constexpr int kGramRows = kThreads / 32;

// partial[(i * k + q) * chunks + c] = G[rows(i), chunk c] . X[chunk c, q]: a warp per row, the
// block's kGramRows rows (blockIdx.y) over one chunk of columns (blockIdx.x), so that a pass over
// G keeps every multiprocessor full of loads (a block walking all m rows of its chunk, with a
// block-wide reduction per row, reached 584-616 GB/s of the H200's 4.8 TB/s). Optionally the
// chunk of `row` (length d) is written into slot `target` of G by the blocks of the first row
// group, when the push is accepted (status); target is never one of `rows`.
template <class S>
__global__ void gram_partial_kernel(S* G, int64_t d, Rows rows, const S* __restrict__ X, int64_t k, int64_t chunk,
                                    int64_t chunks, double* __restrict__ partial, int64_t target,
                                    const S* __restrict__ row, const int64_t* status) {
  const int64_t c = blockIdx.x, j0 = c * chunk, j1 = lmin(d, j0 + chunk);
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.y) * kGramRows + (threadIdx.x >> 5);
  if (i < rows.count) {
    const S* g = G + rows.slot(i) * d;
    for (int64_t q = 0; q < k; ++q) {
      double s = 0;
#pragma unroll 4
      for (int64_t j = j0 + lane; j < j1; j += 32) s += load_wide(g + j) * load_wide(X + j * k + q);
      s = cuda::warp_sum(s);
      if (lane == 0) partial[(i * k + q) * chunks + c] = s;
    }
  }
  if (blockIdx.y == 0 && target >= 0 && window_ok(status))
    for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) G[target * d + j] = row[j];
}

// Y (n, k) = G[rows] X, float64; with a target, `row` is written into that slot of G in the same
// pass when the push is accepted (status).
template <class S>
void gram_product(cudaStream_t stream, S* G, int64_t d, Rows rows, const S* X, int64_t k, double* Y,
                  int64_t target = -1, const S* row = nullptr, const int64_t* status = nullptr) {
  const int64_t chunk = chunk_columns(d), chunks = std::max<int64_t>(1, (d + chunk - 1) / chunk);
  const int64_t groups = std::max<int64_t>(1, (rows.count + kGramRows - 1) / kGramRows);
  DeviceBuffer partial(sizeof(double) * size_t(std::max<int64_t>(1, rows.count * k * chunks)), stream);
  gram_partial_kernel<S><<<dim3(unsigned(chunks), unsigned(groups)), kThreads, 0, stream>>>(
      G, d, rows, X, k, chunk, chunks, partial.as<double>(), target, row, status);
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

// ---- The status word

// A push's verdict before it writes anything: the first refusal since the word was last read is
// recorded; an accepted push is counted.
__global__ void push_gate_kernel(int64_t* status, const int* nonfinite, const double* norm2, double shift) {
  if (threadIdx.x != 0 || blockIdx.x != 0 || status[0] != kFaultNone) return;
  if (*nonfinite != 0)
    status[0] = kFaultNonFinite;
  else if (!(*norm2 <= kMaxKappa * shift))
    status[0] = kFaultKappa;
  else
    status[1] += 1;
}

// A refactorization inside an accepted push that broke down.
__global__ void breakdown_gate_kernel(int64_t* status, const int* info) {
  if (threadIdx.x == 0 && blockIdx.x == 0 && status[0] == kFaultNone && *info != 0) status[0] = kFaultBreakdown;
}

// dst = src (or 0 without src) when the push is accepted.
__global__ void commit_kernel(const double* __restrict__ src, double* __restrict__ dst, int64_t count,
                              const int64_t* status) {
  if (!window_ok(status)) return;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < count; t += int64_t(gridDim.x) * blockDim.x)
    dst[t] = src ? src[t] : 0.0;
}

void commit(cudaStream_t stream, const double* src, double* dst, int64_t count, const int64_t* status) {
  commit_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(src, dst, count, status);
  CK_CUDA_CHECK(cudaGetLastError());
}

// report[1], report[2] = the status word, which is cleared (it has been read).
__global__ void take_status_kernel(int64_t* status, int64_t* report) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  report[1] = status[0];
  report[2] = status[1];
  status[0] = kFaultNone;
  status[1] = 0;
}

// report[0] = 1 if a[0..size) holds NaN or Inf (every writer stores the same 1).
template <class S>
__global__ void nonfinite_report_kernel(const S* __restrict__ a, int64_t size, int64_t* report) {
  bool bad = false;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < size; t += int64_t(gridDim.x) * blockDim.x)
    bad |= !isfinite(load_wide(a + t));
  if (bad) report[0] = 1;
}

// The one read-back of a result call: whether out is finite, and the window's status (read and
// cleared) when there is one. With a status both are returned (out is meaningless when a push
// was refused; the caller reports either); without one a non-finite result throws.
template <class S>
WindowStatus finish_result(cudaStream_t stream, const S* out, int64_t size, int64_t* status, double damp,
                           const char* what, const char* dtype) {
  DeviceBuffer report(sizeof(int64_t) * 3, stream);
  CK_CUDA_CHECK(cudaMemsetAsync(report.as<int64_t>(), 0, sizeof(int64_t) * 3, stream));
  if (size > 0) {
    nonfinite_report_kernel<S><<<grid_for(size, kThreads), kThreads, 0, stream>>>(out, size, report.as<int64_t>());
    CK_CUDA_CHECK(cudaGetLastError());
  }
  if (status) take_status_kernel<<<1, 1, 0, stream>>>(status, report.as<int64_t>());
  CK_CUDA_CHECK(cudaGetLastError());
  const std::vector<int64_t> host = cuda::copy_to_host(stream, report.as<int64_t>(), 3);
  const WindowStatus result{host[1], host[2], host[0] == 0};
  if (status) return result;
  CK_CHECK_VALUE(host[0] == 0, "the result of ", what, " is not finite in ", dtype,
                 ": argument 'x' holds NaN or Inf, or |x| / damp (argument 'damp' = ", damp, ") overflows the dtype");
  return result;
}

// Cholesky of the capacitance matrix into L when the push is accepted: factored aside, a
// breakdown recorded in the status word (L then stays as it was), no read-back.
void refactor_gated(cudaStream_t stream, const double* K, int64_t m, Rows rows, double shift, double* L,
                    int64_t* status) {
  DeviceBuffer scratch(sizeof(double) * size_t(m * m), stream), info(sizeof(int), stream);
  CK_CUDA_CHECK(cudaMemsetAsync(info.as<int>(), 0, sizeof(int), stream));
  factor(stream, K, m, rows, shift, scratch.as<double>(), info.as<int>());
  breakdown_gate_kernel<<<1, 1, 0, stream>>>(status, info.as<int>());
  CK_CUDA_CHECK(cudaGetLastError());
  commit(stream, scratch.as<double>(), L, m * m, status);
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

// Drops the oldest gradient (row and column 0) from L by the rank-one update of cpu.cpp,
// written back only when the push is accepted.
void remove_first(cudaStream_t stream, double* L, int64_t m, int64_t n, const int64_t* status) {
  if (n <= 1) {
    commit(stream, nullptr, L, m * m, status);
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
  commit(stream, scratch.as<double>(), L, m * m, status);
}

// c[p] = K[rows(p), target] (the new gradient's products in age order).
__global__ void gram_column_kernel(const double* K, int64_t m, Rows rows, int64_t target, double* c) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < rows.count; p += int64_t(gridDim.x) * blockDim.x)
    c[p] = K[rows.slot(p) * m + target];
}

// Row n of L: r = L^-1 c (already solved into c), pivot = shift + ||g||^2 - r.r. The exact
// pivot is a Schur complement of shift * I + K, so at least shift: clamping there costs only
// rounding and keeps the factor positive without a host round trip.
__global__ void append_kernel(double* L, int64_t m, int64_t n, const double* c, const double* norm2, double shift,
                              const int64_t* status) {
  if (!window_ok(status)) return;  // the same word for every thread: all return, or none
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
                                  const double* norm2, const int64_t* status) {
  if (!window_ok(status)) return;
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

// ||g||^2 into *norm2 and a NaN or Inf of g into *nonfinite (set, never cleared here), both on the
// device: no read-back.
template <class S>
void squared_norm(cudaStream_t stream, const S* g, int64_t d, double* norm2, int* nonfinite) {
  const int64_t chunk = chunk_columns(d), chunks = std::max<int64_t>(1, (d + chunk - 1) / chunk);
  DeviceBuffer partial(sizeof(double) * size_t(chunks), stream);
  norm_kernel<S><<<unsigned(chunks), kThreads, 0, stream>>>(g, d, chunk, partial.as<double>(), nonfinite);
  CK_CUDA_CHECK(cudaGetLastError());
  cuda::sum_slots(stream, partial.as<double>(), chunks, 1, norm2, sizeof(double));
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

namespace {

// The next state after a push into a window of capacity m (the host's bookkeeping; the device
// may still refuse the push, see the status word).
FisherWindowState next_state(const FisherWindowState& state, int64_t m) {
  const bool full = state.size == m;
  FisherWindowState next = state;
  next.size = full ? m : state.size + 1;
  next.oldest = full ? (state.oldest + 1) % m : 0;
  next.count = state.count + 1;
  next.since_refactor = state.since_refactor + 1;
  return next;
}

// Once the gate has judged the push and `dots` (the new row's products with the kept rows, in
// age order) and `norm2` are on the device: the Gram matrix and the factor follow, every write
// gated by the status word. The factor: the rank-one removal and the append (O(m^2)), or a
// refactorization from K when c changed or the period came.
void advance_window(cudaStream_t stream, double* K, double* L, int64_t m, const FisherWindowState& state,
                    FisherWindowState& next, const FisherWindowOptions& o, Rows kept, int64_t target,
                    const double* dots, const double* norm2, int64_t* status) {
  const Capacitance cap = window_capacitance(next, m, o);
  const double old_scale = fisher_window_scale(m, state.size, o.normalize), shift = cap.scale * o.damp;
  gram_store_kernel<<<grid_for(kept.count + 1, kThreads), kThreads, 0, stream>>>(K, m, kept, target, dots, norm2,
                                                                                 status);
  CK_CUDA_CHECK(cudaGetLastError());
  const int64_t every = o.refactor_every > 0 ? o.refactor_every : m;
  if (cap.scale != old_scale || next.since_refactor >= every) {
    refactor_gated(stream, K, m, window_rows(cap, m), shift, L, status);
    next.since_refactor = 0;
    return;
  }
  if (state.size == m) remove_first(stream, L, m, state.size, status);
  DeviceBuffer c(sizeof(double) * size_t(std::max<int64_t>(1, kept.count)), stream);
  gram_column_kernel<<<grid_for(kept.count, kThreads), kThreads, 0, stream>>>(K, m, kept, target, c.as<double>());
  CK_CUDA_CHECK(cudaGetLastError());
  forward(stream, L, m, kept.count, c.as<double>());
  append_kernel<<<1, kThreads, 0, stream>>>(L, m, kept.count, c.as<double>(), norm2, shift, status);
  CK_CUDA_CHECK(cudaGetLastError());
}

// The slots that stay after a push, in age order.
Rows kept_rows(const FisherWindowState& state, int64_t m) {
  const bool full = state.size == m;
  return {state.oldest + (full ? 1 : 0), full ? state.size - 1 : state.size, m};
}

}  // namespace

FisherWindowState push_cuda(const FisherWindowArrays& w, const FisherWindowState& state, const FisherWindowOptions& o,
                            const ArrayView& g, StreamHandle stream_handle) {
  CudaDeviceGuard guard(w.G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = w.G.size(0), d = w.G.size(1);
  const int64_t target = state.size == m ? state.oldest : state.size;
  FisherWindowState next = next_state(state, m);
  const double shift = window_capacitance(next, m, o).scale * o.damp;
  int64_t* status = w.status.ptr<int64_t>();
  CK_DISPATCH_FLOATING(w.G.dtype, "G", S, [&] {
    S* G = w.G.ptr<S>();
    const S* gp = g.ptr<const S>();
    DeviceBuffer scalars(sizeof(double) * size_t(m + 1), stream), flag(sizeof(int), stream);
    double* norm2 = scalars.as<double>();
    double* dots = norm2 + 1;
    CK_CUDA_CHECK(cudaMemsetAsync(flag.as<int>(), 0, sizeof(int), stream));
    squared_norm<S>(stream, gp, d, norm2, flag.as<int>());
    push_gate_kernel<<<1, 1, 0, stream>>>(status, flag.as<int>(), norm2, shift);
    CK_CUDA_CHECK(cudaGetLastError());
    const Rows kept = kept_rows(state, m);
    gram_product<S>(stream, G, d, kept, gp, 1, dots, target, gp, status);
    advance_window(stream, w.gram.ptr<double>(), w.factor.ptr<double>(), m, state, next, o, kept, target, dots, norm2,
                   status);
  });
  return next;
}

WindowStatus ihvp_cuda(const FisherWindowArrays& w, const Capacitance& cap, const ArrayView& x, const ArrayView& out,
                       StreamHandle stream_handle) {
  CudaDeviceGuard guard(w.G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = w.G.size(0);
  return CK_DISPATCH_FLOATING(w.G.dtype, "G", S, [&] {
    woodbury_apply<S>(stream, w.G.ptr<const S>(), w.G.size(1), window_rows(cap, m), w.factor.ptr<const double>(), m,
                      cap.damp, x.ptr<const S>(), columns(x), out.ptr<S>());
    return finish_result<S>(stream, out.ptr<const S>(), out.numel(), w.status.ptr<int64_t>(), cap.damp, "ihvp",
                            out.dtype.name().c_str());
  });
}

WindowStatus diag_cuda(const FisherWindowArrays& w, const Capacitance& cap, const ArrayView& out,
                       StreamHandle stream_handle) {
  CudaDeviceGuard guard(w.G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = w.G.size(0);
  return CK_DISPATCH_FLOATING(w.G.dtype, "G", S, [&] {
    inverse_diag<S>(stream, w.G.ptr<const S>(), w.G.size(1), window_rows(cap, m), w.factor.ptr<const double>(), m,
                    cap.damp, out.ptr<S>());
    return finish_result<S>(stream, out.ptr<const S>(), out.numel(), w.status.ptr<int64_t>(), cap.damp, "diag",
                            out.dtype.name().c_str());
  });
}

WindowStatus status_cuda(const ArrayView& status, StreamHandle stream_handle) {
  CudaDeviceGuard guard(status.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  DeviceBuffer report(sizeof(int64_t) * 3, stream);
  take_status_kernel<<<1, 1, 0, stream>>>(status.ptr<int64_t>(), report.as<int64_t>());
  CK_CUDA_CHECK(cudaGetLastError());
  const std::vector<int64_t> host = cuda::copy_to_host(stream, report.as<int64_t>(), 3);
  return {host[1], host[2]};
}

void refactor_cuda(const FisherWindowArrays& w, const Capacitance& cap, StreamHandle stream_handle) {
  CudaDeviceGuard guard(w.G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = w.G.size(0);
  if (!refactor(stream, w.gram.ptr<const double>(), m, window_rows(cap, m), cap.scale * cap.damp,
                w.factor.ptr<double>()))
    throw_breakdown(cap);
}

// ---- Compressed (sparse) window

namespace {

constexpr int kSelectThreads = 256;

// |v| as the bits of a non-negative double: ordered as the magnitudes are.
__device__ __forceinline__ unsigned long long magnitude_key(double v) {
  return static_cast<unsigned long long>(__double_as_longlong(fabs(v)));
}

// Exclusive prefix sum of v over the block in thread order and, in *total, the block's sum
// (every thread calls it; blockDim.x a multiple of 32).
__device__ int block_exclusive_scan(int v, int* total) {
  __shared__ int warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += other;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int offset = 0, sum = 0;
  for (int w = 0; w < int(blockDim.x >> 5); ++w) {
    if (w < warp) offset += warp_totals[w];
    sum += warp_totals[w];
  }
  __syncthreads();
  *total = sum;
  return offset + inclusive - v;
}

// acc = error + g in float64; *nonfinite set if g or the sum holds NaN or Inf.
template <class S, class E>
__global__ void feedback_kernel(const E* __restrict__ err, const S* __restrict__ g, int64_t d, double* __restrict__ acc,
                                int* nonfinite) {
  bool bad = false;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < d; j += int64_t(gridDim.x) * blockDim.x) {
    const double gj = load_wide(g + j), a = double(err[j]) + gj;
    bad |= !isfinite(gj) || !isfinite(a);
    acc[j] = a;
  }
  if (bad) atomicExch(nonfinite, 1);
}

// The k largest |acc| of each selection block (ties to the smaller index), ascending, as absolute
// int32 columns: one thread block per selection block. A radix select over the 64-bit keys, a
// byte at a time from the top, finds the k-th largest key T; then one ordered pass keeps the keys
// above T and the first ones equal to T, in index order (block-wide scans).
__global__ void select_kernel(const double* __restrict__ acc, int64_t d, int64_t block, int64_t k,
                              int32_t* __restrict__ chosen) {
  __shared__ unsigned int hist[256];
  __shared__ unsigned long long prefix_shared;
  __shared__ long long need_shared, base_out, base_equal;
  const int64_t blocks = (d + block - 1) / block, per_full = lmin(k, block);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t b0 = b * block, b1 = lmin(d, b0 + block);
    const int64_t kb = lmin(k, b1 - b0);
    int32_t* out = chosen + b * per_full;
    unsigned long long prefix = 0, mask = 0;
    long long need = kb;  // the rank of T among the keys that match the prefix, from the top
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      for (int64_t j = b0 + threadIdx.x; j < b1; j += blockDim.x) {
        const unsigned long long key = magnitude_key(acc[j]);
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        long long above = 0;
        int digit = 255;
        for (; digit > 0; --digit) {
          if (above + (long long)hist[digit] >= need) break;
          above += hist[digit];
        }
        prefix_shared = prefix | (static_cast<unsigned long long>(digit) << shift);
        need_shared = need - above;
      }
      __syncthreads();
      prefix = prefix_shared;
      need = need_shared;
      mask |= 255ull << shift;
    }
    const unsigned long long T = prefix;
    if (threadIdx.x == 0) base_out = base_equal = 0;
    __syncthreads();
    for (int64_t t0 = b0; t0 < b1; t0 += blockDim.x) {
      const int64_t j = t0 + threadIdx.x;
      const unsigned long long key = j < b1 ? magnitude_key(acc[j]) : 0;
      const int equal = j < b1 && key == T, greater = j < b1 && key > T;
      int total_equal = 0, total_take = 0;
      const int equal_rank = block_exclusive_scan(equal, &total_equal);
      const int take = greater || (equal && base_equal + equal_rank < need);
      const int position = block_exclusive_scan(take, &total_take);
      if (take) out[base_out + position] = int32_t(j);
      __syncthreads();
      if (threadIdx.x == 0) {
        base_out += total_take;
        base_equal += total_equal;
      }
      __syncthreads();
    }
  }
}

// The new row: values[t] = acc[chosen[t]] in the storage dtype, and z (dense, zeroed before) the
// stored values in float64.
template <class S>
__global__ void gather_kernel(const double* __restrict__ acc, const int32_t* __restrict__ chosen, int64_t nnz,
                              S* __restrict__ values, double* __restrict__ z) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < nnz; t += int64_t(gridDim.x) * blockDim.x) {
    const int32_t j = chosen[t];
    cuda::store(values + t, cuda::acc_t<S>(acc[j]));
    z[j] = load_wide(values + t);
  }
}

// dots[p] = row(rows(p)) . z for the kept rows: a thread block per row.
template <class S>
__global__ void sparse_dots_kernel(const int32_t* __restrict__ I, const S* __restrict__ V, int64_t nnz, Rows rows,
                                   const double* __restrict__ z, double* __restrict__ dots) {
  for (int64_t p = blockIdx.x; p < rows.count; p += gridDim.x) {
    const int64_t s = rows.slot(p);
    double acc = 0;
    for (int64_t t = threadIdx.x; t < nnz; t += blockDim.x) acc += load_wide(V + s * nnz + t) * z[I[s * nnz + t]];
    acc = cuda::block_sum(acc);
    if (threadIdx.x == 0) dots[p] = acc;
  }
}

// On an accepted push: the error keeps what was not stored (the stored values' rounding
// included), and the new row goes into slot `target`.
template <class S, class E>
__global__ void sparse_commit_kernel(const double* __restrict__ acc, const double* __restrict__ z, int64_t d,
                                     E* __restrict__ err, const int32_t* __restrict__ chosen,
                                     const S* __restrict__ values, int64_t nnz, int32_t* __restrict__ I,
                                     S* __restrict__ V, int64_t target, const int64_t* status) {
  if (!window_ok(status)) return;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < d; j += int64_t(gridDim.x) * blockDim.x) {
    err[j] = E(acc[j] - z[j]);
    if (j < nnz) {
      I[target * nnz + j] = chosen[j];
      V[target * nnz + j] = values[j];
    }
  }
}

// Y (n, k) = the rows `rows` of the sparse window times X (d, k): a thread block per (row, column).
template <class S>
__global__ void sparse_times_kernel(const int32_t* __restrict__ I, const S* __restrict__ V, int64_t nnz, Rows rows,
                                    const S* __restrict__ X, int64_t k, double* __restrict__ Y) {
  for (int64_t e = blockIdx.x; e < rows.count * k; e += gridDim.x) {
    const int64_t p = e / k, q = e % k, s = rows.slot(p);
    double acc = 0;
    for (int64_t t = threadIdx.x; t < nnz; t += blockDim.x)
      acc += load_wide(V + s * nnz + t) * load_wide(X + int64_t(I[s * nnz + t]) * k + q);
    acc = cuda::block_sum(acc);
    if (threadIdx.x == 0) Y[e] = acc;
  }
}

// acc (d, k) += sum_p row(rows(p))^T W[p, :]: float64 atomics (each row's columns are distinct;
// rows overlap), so the sum's order, and its last float64 bits, vary from run to run, far below
// the storage dtype's rounding.
template <class S>
__global__ void sparse_scatter_kernel(const int32_t* __restrict__ I, const S* __restrict__ V, int64_t nnz, Rows rows,
                                      const double* __restrict__ W, int64_t k, double* __restrict__ acc) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < rows.count * nnz;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = e / nnz, t = e % nnz, s = rows.slot(p);
    const double v = load_wide(V + s * nnz + t);
    const int64_t j = I[s * nnz + t];
    for (int64_t q = 0; q < k; ++q) atomicAdd(acc + j * k + q, v * W[p * k + q]);
  }
}

// out = (X - acc) / damp in the storage dtype.
template <class S>
__global__ void sparse_finish_kernel(const S* __restrict__ X, const double* __restrict__ acc, int64_t size, double damp,
                                     S* __restrict__ out) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < size; t += int64_t(gridDim.x) * blockDim.x)
    cuda::store(out + t, cuda::acc_t<S>((load_wide(X + t) - acc[t]) / damp));
}

}  // namespace

FisherWindowState sparse_push_cuda(const SparseWindowArrays& w, const FisherWindowState& state,
                                   const FisherWindowOptions& o, const SparseOptions& so, const ArrayView& g,
                                   StreamHandle stream_handle) {
  CudaDeviceGuard guard(w.values.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = w.indices.size(0), nnz = w.indices.size(1), d = w.error.size(0);
  const int64_t block = so.block > 0 ? std::min(so.block, d) : d;
  const int64_t target = state.size == m ? state.oldest : state.size;
  FisherWindowState next = next_state(state, m);
  const double shift = window_capacitance(next, m, o).scale * o.damp;
  int64_t* status = w.status.ptr<int64_t>();
  CK_DISPATCH_FLOATING(w.values.dtype, "values", S, [&] {
    CK_DISPATCH_COMPUTE(w.values.dtype, E, [&] {
      const S* gp = g.ptr<const S>();
      DeviceBuffer acc(sizeof(double) * size_t(d), stream), z(sizeof(double) * size_t(d), stream);
      DeviceBuffer chosen(sizeof(int32_t) * size_t(std::max<int64_t>(nnz, 1)), stream);
      DeviceBuffer values(sizeof(S) * size_t(std::max<int64_t>(nnz, 1)), stream);
      DeviceBuffer scalars(sizeof(double) * size_t(m + 1), stream), flag(sizeof(int), stream);
      double* norm2 = scalars.as<double>();
      double* dots = norm2 + 1;
      CK_CUDA_CHECK(cudaMemsetAsync(flag.as<int>(), 0, sizeof(int), stream));
      CK_CUDA_CHECK(cudaMemsetAsync(z.as<double>(), 0, sizeof(double) * size_t(d), stream));
      feedback_kernel<S, E><<<grid_for(d, kThreads), kThreads, 0, stream>>>(w.error.ptr<const E>(), gp, d,
                                                                            acc.as<double>(), flag.as<int>());
      const int64_t selection_blocks = (d + block - 1) / block;
      select_kernel<<<unsigned(std::min<int64_t>(selection_blocks, int64_t(1) << 20)), kSelectThreads, 0, stream>>>(
          acc.as<double>(), d, block, so.k_per_block, chosen.as<int32_t>());
      gather_kernel<S><<<grid_for(nnz, kThreads), kThreads, 0, stream>>>(acc.as<double>(), chosen.as<int32_t>(), nnz,
                                                                         values.as<S>(), z.as<double>());
      CK_CUDA_CHECK(cudaGetLastError());
      squared_norm<S>(stream, values.as<S>(), nnz, norm2, flag.as<int>());  // Inf after rounding is refused too
      push_gate_kernel<<<1, 1, 0, stream>>>(status, flag.as<int>(), norm2, shift);
      const Rows kept = kept_rows(state, m);
      sparse_dots_kernel<S><<<grid_for(kept.count * kThreads, kThreads), kThreads, 0, stream>>>(
          w.indices.ptr<const int32_t>(), w.values.ptr<const S>(), nnz, kept, z.as<double>(), dots);
      sparse_commit_kernel<S, E><<<grid_for(d, kThreads), kThreads, 0, stream>>>(
          acc.as<double>(), z.as<double>(), d, w.error.ptr<E>(), chosen.as<int32_t>(), values.as<S>(), nnz,
          w.indices.ptr<int32_t>(), w.values.ptr<S>(), target, status);
      CK_CUDA_CHECK(cudaGetLastError());
      advance_window(stream, w.gram.ptr<double>(), w.factor.ptr<double>(), m, state, next, o, kept, target, dots, norm2,
                     status);
    });
  });
  return next;
}

WindowStatus sparse_ihvp_cuda(const SparseWindowArrays& w, const Capacitance& cap, const ArrayView& x,
                              const ArrayView& out, StreamHandle stream_handle) {
  CudaDeviceGuard guard(w.values.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = w.indices.size(0), nnz = w.indices.size(1), d = w.error.size(0), k = columns(x);
  const Rows rows = window_rows(cap, m);
  return CK_DISPATCH_FLOATING(w.values.dtype, "values", S, [&] {
    const int32_t* I = w.indices.ptr<const int32_t>();
    const S* V = w.values.ptr<const S>();
    const S* X = x.ptr<const S>();
    DeviceBuffer y(sizeof(double) * size_t(std::max<int64_t>(1, rows.count * k)), stream);
    DeviceBuffer acc(sizeof(double) * size_t(std::max<int64_t>(1, d * k)), stream);
    CK_CUDA_CHECK(cudaMemsetAsync(acc.as<double>(), 0, sizeof(double) * size_t(d * k), stream));
    if (rows.count * k > 0) {
      sparse_times_kernel<S><<<grid_for(rows.count * k * kThreads, kThreads), kThreads, 0, stream>>>(I, V, nnz, rows, X,
                                                                                                     k, y.as<double>());
      CK_CUDA_CHECK(cudaGetLastError());
      cholesky_solve(stream, w.factor.ptr<const double>(), m, rows.count, y.as<double>(), k);
      sparse_scatter_kernel<S><<<grid_for(rows.count * nnz, kThreads), kThreads, 0, stream>>>(
          I, V, nnz, rows, y.as<double>(), k, acc.as<double>());
      CK_CUDA_CHECK(cudaGetLastError());
    }
    sparse_finish_kernel<S>
        <<<grid_for(d * k, kThreads), kThreads, 0, stream>>>(X, acc.as<double>(), d * k, cap.damp, out.ptr<S>());
    CK_CUDA_CHECK(cudaGetLastError());
    return finish_result<S>(stream, out.ptr<const S>(), out.numel(), w.status.ptr<int64_t>(), cap.damp, "ihvp",
                            out.dtype.name().c_str());
  });
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
    if (x) {
      woodbury_apply<S>(stream, g, d, rows, L, m, damp, x->ptr<const S>(), columns(*x), out->ptr<S>());
      finish_result<S>(stream, out->ptr<const S>(), out->numel(), nullptr, damp, "fisher_ihvp",
                       out->dtype.name().c_str());
    }
    if (diag) {
      inverse_diag<S>(stream, g, d, rows, L, m, damp, diag->ptr<S>());
      finish_result<S>(stream, diag->ptr<const S>(), diag->numel(), nullptr, damp, "fisher_inverse_diag",
                       diag->dtype.name().c_str());
    }
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

namespace {

// ---- Blockwise, batched: the blocks of a group of `nb` consecutive blocks of width bw
// (column-major views of a row-major (m, nb bw) float64 copy of their columns: block j is the
// bw x m matrix at column offset j bw, leading dimension nb bw), every step one batched call.

__global__ void pointers_kernel(double** ptrs, double* base, int64_t stride, int64_t count) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += int64_t(gridDim.x) * blockDim.x)
    ptrs[j] = base + j * stride;
}

// A device array of `count` pointers base + j * stride.
struct Pointers {
  DeviceBuffer buffer;
  Pointers(cudaStream_t stream, double* base, int64_t stride, int64_t count)
      : buffer(sizeof(double*) * size_t(std::max<int64_t>(count, 1)), stream) {
    pointers_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(buffer.as<double*>(), base, stride, count);
    CK_CUDA_CHECK(cudaGetLastError());
  }
  double** get() const { return buffer.as<double*>(); }
};

// Adds `value` to the diagonals of `count` consecutive n x n matrices; with `identity`, each
// matrix is first set to zero (so it becomes value * I).
__global__ void diagonal_kernel(double* a, int64_t n, int64_t count, double value, bool identity) {
  const int64_t total = identity ? count * n * n : count * n;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    if (identity) {
      const int64_t e = t % (n * n);
      a[t] = e % n == e / n ? value : 0.0;
    } else {
      a[(t / n) * n * n + (t % n) * (n + 1)] += value;
    }
  }
}

// out[t] = scale * Y[t] in the storage dtype.
template <class S>
__global__ void narrow_kernel(const double* __restrict__ Y, int64_t size, double scale, S* __restrict__ out) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < size; t += int64_t(gridDim.x) * blockDim.x)
    cuda::store(out + t, cuda::acc_t<S>(Y[t] * scale));
}

// out[t] = scale * x[t] (no gradients: F = damp I).
template <class S>
__global__ void scale_kernel(const S* __restrict__ x, int64_t size, double scale, S* __restrict__ out) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < size; t += int64_t(gridDim.x) * blockDim.x)
    cuda::store(out + t, cuda::acc_t<S>((x ? load_wide(x + t) : 1.0) * scale));
}

// diag of (L L^T)^-1 from Z = L^-1 (count consecutive n x n column-major): column sums of Z^2.
template <class S>
__global__ void inverse_column_norms_kernel(const double* __restrict__ Z, int64_t n, int64_t count,
                                            S* __restrict__ out) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < count * n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const double* col = Z + (t / n) * n * n + (t % n) * n;
    double s = 0;
    for (int64_t r = 0; r < n; ++r) s += col[r] * col[r];
    cuda::store(out + t, cuda::acc_t<S>(s));
  }
}

// The first block (of the whole call) whose factorization failed: min over failing indices.
__global__ void record_failure_kernel(const int* infos, int64_t count, int64_t first, unsigned long long* failed) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += int64_t(gridDim.x) * blockDim.x)
    if (infos[j] != 0) atomicMin(failed, static_cast<unsigned long long>(first + j));
}

void trsm_batched(cudaStream_t stream, cublasSideMode_t side, cublasOperation_t op, int64_t rows, int64_t cols,
                  double** A, int64_t lda, double** B, int64_t ldb, int64_t count) {
  const double one = 1.0;
  CK_CUBLAS_CHECK(cublasDtrsmBatched(blas(stream), side, CUBLAS_FILL_MODE_LOWER, op, CUBLAS_DIAG_NON_UNIT, int(rows),
                                     int(cols), &one, A, int(lda), B, int(ldb), int(count)));
}

// One group: blocks [first, first + nb) of width bw starting at column c0 = first * block.
template <class S>
void block_group(cudaStream_t stream, const S* g, int64_t m, int64_t d, int64_t c0, int64_t nb, int64_t bw, const S* X,
                 int64_t k, S* out, S* diag, double damp, int64_t first, unsigned long long* failed) {
  using cuda::Op;
  using cuda::Stack;
  const DType f64 = DType::float64();
  const int64_t w = nb * bw;
  const bool dense = bw <= m;  // as on the CPU: the smaller of the B x B and m x m systems
  const int64_t n = dense ? bw : m;
  DeviceBuffer gw(sizeof(double) * size_t(m * w), stream), sys(sizeof(double) * size_t(nb * n * n), stream);
  DeviceBuffer infos(sizeof(int) * size_t(nb), stream);
  double* A = gw.as<double>();
  double* F = sys.as<double>();
  widen_rows_kernel<S><<<grid_for(m * w, kThreads), kThreads, 0, stream>>>(g, d, Rows{0, m, m}, c0, w, A);
  CK_CUDA_CHECK(cudaGetLastError());
  const Stack blocks{A, w, bw};
  if (dense)  // F_j = A_j A_j^T / m + damp I (bw x bw)
    cuda::gemm(stream, f64, Op::N, Op::T, int(bw), int(bw), int(m), 1.0 / double(m), blocks, blocks, 0.0,
               Stack{F, bw, bw * bw}, nb);
  else  // C_j = A_j^T A_j + m damp I (m x m)
    cuda::gemm(stream, f64, Op::T, Op::N, int(m), int(m), int(bw), 1.0, blocks, blocks, 0.0, Stack{F, m, m * m}, nb);
  diagonal_kernel<<<grid_for(nb * n, kThreads), kThreads, 0, stream>>>(F, n, nb, dense ? damp : double(m) * damp,
                                                                       false);
  CK_CUDA_CHECK(cudaGetLastError());
  const Pointers factors(stream, F, n * n, nb);
  CK_CUSOLVER_CHECK(cusolverDnDpotrfBatched(cusolver_handle(stream), CUBLAS_FILL_MODE_LOWER, int(n), factors.get(),
                                            int(n), infos.as<int>(), int(nb)));
  record_failure_kernel<<<grid_for(nb, kThreads), kThreads, 0, stream>>>(infos.as<int>(), nb, first, failed);
  CK_CUDA_CHECK(cudaGetLastError());
  if (X && k > 0) {  // (d, 0) vectors: nothing to solve (cuBLAS refuses a leading dimension 0)
    // The group's rows of X, float64: block j is the k x bw column-major X_j^T (ld k).
    DeviceBuffer xw(sizeof(double) * size_t(w * k), stream);
    double* Xd = xw.as<double>();
    widen_kernel<S><<<grid_for(w * k, kThreads), kThreads, 0, stream>>>(X + c0 * k, w * k, Xd);
    CK_CUDA_CHECK(cudaGetLastError());
    const Pointers rhs(stream, Xd, bw * k, nb);
    if (dense) {
      // X_j^T <- X_j^T L^-T L^-1 = (F_j^-1 X_j)^T.
      trsm_batched(stream, CUBLAS_SIDE_RIGHT, CUBLAS_OP_T, k, bw, factors.get(), n, rhs.get(), k, nb);
      trsm_batched(stream, CUBLAS_SIDE_RIGHT, CUBLAS_OP_N, k, bw, factors.get(), n, rhs.get(), k, nb);
      narrow_kernel<S><<<grid_for(w * k, kThreads), kThreads, 0, stream>>>(Xd, w * k, 1.0, out + c0 * k);
    } else {
      // Y_j = C_j^-1 A_j^T X_j (m x k), then X_j^T - Y_j^T A_j^T, over damp.
      DeviceBuffer yw(sizeof(double) * size_t(nb * m * k), stream);
      double* Y = yw.as<double>();
      cuda::gemm(stream, f64, Op::T, Op::T, int(m), int(k), int(bw), 1.0, blocks, Stack{Xd, k, bw * k}, 0.0,
                 Stack{Y, m, m * k}, nb);
      const Pointers ys(stream, Y, m * k, nb);
      trsm_batched(stream, CUBLAS_SIDE_LEFT, CUBLAS_OP_N, m, k, factors.get(), n, ys.get(), m, nb);
      trsm_batched(stream, CUBLAS_SIDE_LEFT, CUBLAS_OP_T, m, k, factors.get(), n, ys.get(), m, nb);
      cuda::gemm(stream, f64, Op::T, Op::T, int(k), int(bw), int(m), -1.0, Stack{Y, m, m * k}, blocks, 1.0,
                 Stack{Xd, k, bw * k}, nb);
      narrow_kernel<S><<<grid_for(w * k, kThreads), kThreads, 0, stream>>>(Xd, w * k, 1.0 / damp, out + c0 * k);
    }
    CK_CUDA_CHECK(cudaGetLastError());
  }
  if (diag) {
    if (dense) {
      // Z_j = L_j^-1; diag(F_j^-1) = column sums of Z_j^2.
      DeviceBuffer zw(sizeof(double) * size_t(nb * n * n), stream);
      double* Z = zw.as<double>();
      diagonal_kernel<<<grid_for(nb * n * n, kThreads), kThreads, 0, stream>>>(Z, n, nb, 1.0, true);
      CK_CUDA_CHECK(cudaGetLastError());
      const Pointers zs(stream, Z, n * n, nb);
      trsm_batched(stream, CUBLAS_SIDE_LEFT, CUBLAS_OP_N, n, n, factors.get(), n, zs.get(), n, nb);
      inverse_column_norms_kernel<S><<<grid_for(nb * n, kThreads), kThreads, 0, stream>>>(Z, n, nb, diag + c0);
    } else {
      // A_j <- A_j L_j^-T (in place); diag = (1 - row sums of its squares) / damp.
      const Pointers as(stream, A, bw, nb);
      trsm_batched(stream, CUBLAS_SIDE_RIGHT, CUBLAS_OP_T, bw, m, factors.get(), n, as.get(), w, nb);
      diag_finish_kernel<S><<<grid_for(w, kThreads), kThreads, 0, stream>>>(A, m, w, damp, diag + c0);
    }
    CK_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

void blocks_cuda(const ArrayView& G, const ArrayView* x, const ArrayView* out, const ArrayView* diag, double damp,
                 int64_t block, StreamHandle stream_handle) {
  CudaDeviceGuard guard(G.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t m = G.size(0), d = G.size(1), k = x ? columns(*x) : 0;
  const int64_t width = std::min(block, d), full = d > 0 ? d / width : 0, rest = d > 0 ? d - full * width : 0;
  CK_CHECK_VALUE(m <= cuda::kMaxMatrixSide, "the number of gradients m (", m, ") exceeds ", cuda::kMaxMatrixSide,
                 " on CUDA");
  CK_CHECK_VALUE(width <= cuda::kMaxMatrixSide, "argument 'block_size' (", block, ") exceeds ", cuda::kMaxMatrixSide,
                 " on CUDA");
  CK_CHECK_VALUE(k <= INT_MAX, "argument 'x' has more than 2^31-1 columns");
  CK_DISPATCH_FLOATING(G.dtype, "G", S, [&] {
    const S* g = G.ptr<const S>();
    CK_CHECK_VALUE(all_finite<S>(stream, g, m * d), "argument 'G' contains NaN or Inf");
    if (x) CK_CHECK_VALUE(all_finite<S>(stream, x->ptr<const S>(), x->numel()), "argument 'x' contains NaN or Inf");
    if (d == 0) return;
    S* o = x ? out->ptr<S>() : diag->ptr<S>();
    const int64_t size = x ? d * k : d;
    if (m == 0) {  // F = damp I
      scale_kernel<S>
          <<<grid_for(size, kThreads), kThreads, 0, stream>>>(x ? x->ptr<const S>() : nullptr, size, 1.0 / damp, o);
      CK_CUDA_CHECK(cudaGetLastError());
    } else {
      DeviceBuffer failed(sizeof(unsigned long long), stream);
      CK_CUDA_CHECK(cudaMemsetAsync(failed.as<unsigned long long>(), 0xff, sizeof(unsigned long long), stream));
      // Groups of blocks sized so that their float64 copies and systems stay near 2^25 doubles.
      const int64_t n = width <= m ? width : m;
      const int64_t per_block = m * width + 2 * n * n + (x ? (width + m) * k : 0);
      const int64_t group = std::max<int64_t>(1, std::min<int64_t>(full, (int64_t(1) << 25) / per_block));
      for (int64_t b = 0; b < full; b += group) {
        const int64_t nb = std::min(group, full - b);
        block_group<S>(stream, g, m, d, b * width, nb, width, x ? x->ptr<const S>() : nullptr, k,
                       x ? out->ptr<S>() : nullptr, diag ? diag->ptr<S>() : nullptr, damp, b,
                       failed.as<unsigned long long>());
      }
      if (rest > 0)
        block_group<S>(stream, g, m, d, full * width, 1, rest, x ? x->ptr<const S>() : nullptr, k,
                       x ? out->ptr<S>() : nullptr, diag ? diag->ptr<S>() : nullptr, damp, full,
                       failed.as<unsigned long long>());
      const unsigned long long first = cuda::copy_to_host(stream, failed.as<unsigned long long>(), 1)[0];
      CK_CHECK_VALUE(first == ~0ull, "block ", first, " of F is not positive definite in float64: 'damp' (", damp,
                     ") is too small for the gradients' norms");
    }
    finish_result<S>(stream, o, size, nullptr, damp, x ? "fisher_ihvp" : "fisher_inverse_diag", G.dtype.name().c_str());
  });
}

}  // namespace curvkit::mfac
