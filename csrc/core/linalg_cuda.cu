#include "core/linalg_cuda.h"

#include <algorithm>
#include <cfloat>
#include <cstdlib>
#include <cstring>

#include <math_constants.h>

#include "core/dispatch.h"
#include "core/numerics.h"

namespace curvkit::cuda {

DeviceBuffer::DeviceBuffer(size_t bytes, cudaStream_t stream) : allocator_(workspace_allocator()), stream_(stream) {
  if (bytes == 0) return;
  if (allocator_)
    ptr_ = allocator_->allocate(bytes);
  else
    CK_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
}

DeviceBuffer::~DeviceBuffer() {
  if (!ptr_) return;
  if (allocator_)
    allocator_->release(ptr_);
  else
    cudaFreeAsync(ptr_, stream_);
}

namespace {

// Host words carried to the device as a kernel parameter (under the 4 KiB parameter limit).
struct HostWords {
  static constexpr int kCapacity = 496;
  uint64_t word[kCapacity];
};

// Writes `bytes` bytes: whole words where dst is 8-byte aligned, single bytes otherwise.
__global__ void write_words_kernel(char* dst, HostWords words, int bytes) {
  const int aligned_words = reinterpret_cast<uintptr_t>(dst) % 8 == 0 ? bytes / 8 : 0;
  for (int i = threadIdx.x; i < aligned_words; i += blockDim.x) reinterpret_cast<uint64_t*>(dst)[i] = words.word[i];
  const auto* src = reinterpret_cast<const char*>(words.word);
  for (int i = 8 * aligned_words + threadIdx.x; i < bytes; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

void copy_to_device(cudaStream_t stream, void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  constexpr size_t kChunk = sizeof(HostWords), kByParameter = 16 * kChunk;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  CK_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;  // then by parameter at any size
  if (bytes > kByParameter && !capturing) {
    CK_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
    return;
  }
  for (size_t done = 0; done < bytes; done += kChunk) {
    HostWords words;
    const size_t n = std::min(kChunk, bytes - done);
    std::memcpy(words.word, static_cast<const char*>(src) + done, n);
    write_words_kernel<<<1, 256, 0, stream>>>(static_cast<char*>(dst) + done, words, int(n));
    CK_CUDA_CHECK(cudaGetLastError());
  }
}

cudaDataType data_type(DType dt) {
  if (dt == DType::float64()) return CUDA_R_64F;
  if (dt == DType::float32()) return CUDA_R_32F;
  if (dt == DType::float16()) return CUDA_R_16F;
  if (dt == DType::bfloat16()) return CUDA_R_16BF;
  throw TypeError(cat("no cuBLAS type for dtype ", dt.name()));
}

namespace {

cublasOperation_t op(Op o) { return o == Op::N ? CUBLAS_OP_N : CUBLAS_OP_T; }

int checked_int(int64_t v, const char* what) {
  CK_CHECK_VALUE(v >= 0 && v <= INT32_MAX, what, " ", v, " exceeds the 32-bit range of cuBLAS");
  return static_cast<int>(v);
}

// alpha and beta in the compute type's precision (float64 for float64, float32 otherwise).
struct Scalars {
  double d[2];
  float f[2];
  bool is_double;
  Scalars(DType dt, double alpha, double beta)
      : d{alpha, beta}, f{float(alpha), float(beta)}, is_double(dt == DType::float64()) {}
  const void* alpha() const { return is_double ? static_cast<const void*>(&d[0]) : &f[0]; }
  const void* beta() const { return is_double ? static_cast<const void*>(&d[1]) : &f[1]; }
  cublasComputeType_t compute() const { return is_double ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F; }
};

}  // namespace

void gemm(cudaStream_t stream, DType dtype, Op op_a, Op op_b, int m, int n, int k, double alpha, Stack a, Stack b,
          double beta, Stack c, int64_t batch) {
  if (batch == 0 || m == 0 || n == 0) return;
  const Scalars s(dtype, alpha, beta);
  const cudaDataType t = data_type(dtype);
  cublasHandle_t h = cublas_handle(stream);
  const int64_t item = dtype.itemsize();
  for_each_chunk(batch, kMaxBatchChunk, [&](int64_t start, int64_t count) {
    CK_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        h, op(op_a), op(op_b), m, n, k, s.alpha(), static_cast<char*>(a.ptr) + start * a.stride * item, t,
        checked_int(a.ld, "leading dimension"), a.stride, static_cast<char*>(b.ptr) + start * b.stride * item, t,
        checked_int(b.ld, "leading dimension"), b.stride, s.beta(), static_cast<char*>(c.ptr) + start * c.stride * item,
        t, checked_int(c.ld, "leading dimension"), c.stride, int(count), s.compute(), CUBLAS_GEMM_DEFAULT));
  });
}

void gemm_pointers(cudaStream_t stream, DType dtype, Op op_a, Op op_b, int m, int n, int k, double alpha,
                   const void* const* a, int64_t lda, const void* const* b, int64_t ldb, double beta, void* const* c,
                   int64_t ldc, int64_t batch) {
  if (batch == 0 || m == 0 || n == 0) return;
  const Scalars s(dtype, alpha, beta);
  const cudaDataType t = data_type(dtype);
  cublasHandle_t h = cublas_handle(stream);
  for_each_chunk(batch, kMaxBatchChunk, [&](int64_t start, int64_t count) {
    CK_CUBLAS_CHECK(cublasGemmBatchedEx(
        h, op(op_a), op(op_b), m, n, k, s.alpha(), a + start, t, checked_int(lda, "leading dimension"), b + start, t,
        checked_int(ldb, "leading dimension"), s.beta(), c + start, t, checked_int(ldc, "leading dimension"),
        int(count), s.compute(), CUBLAS_GEMM_DEFAULT));
  });
}

namespace {

// Blocks of the symmetric product: side T, nb = ceil(r / T) block rows, at most kMaxBlocks
// blocks on and below the diagonal.
constexpr int kMaxBlockRows = 16;
constexpr int kMaxBlocks = kMaxBlockRows * (kMaxBlockRows + 1) / 2;

int block_side(int r) {
  if (const char* env = std::getenv("CURVKIT_SYMMETRIC_BLOCK")) {  // for tuning runs
    const int t = std::atoi(env);
    if (t > 0) return t >= r ? 0 : std::max(t, (r + kMaxBlockRows - 1) / kMaxBlockRows);
  }
  if (r < 768) return 0;      // measured: below this a plain product is as fast
  const int t = (r + 7) / 8;  // 8 block rows: 36 of 64 blocks
  return std::max(256, (t + 127) / 128 * 128);
}

struct BlockTable {
  int count = 0;
  int64_t a[kMaxBlocks], b[kMaxBlocks], c[kMaxBlocks];  // byte offsets within one matrix
};

struct StackBytes {
  char* a;
  char* b;
  char* c;
  int64_t a_stride, b_stride, c_stride;  // bytes
};

__global__ void block_pointers_kernel(StackBytes s, BlockTable t, int64_t batch, const void** pa, const void** pb,
                                      void** pc) {
  const int64_t total = batch * t.count;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / t.count;
    const int blk = int(i % t.count);
    pa[i] = s.a + m * s.a_stride + t.a[blk];
    pb[i] = s.b + m * s.b_stride + t.b[blk];
    pc[i] = s.c + m * s.c_stride + t.c[blk];
  }
}

// Strict upper <- strict lower through square tiles in shared memory (coalesced both ways),
// and, when p is given, P = alpha C + diag I (all of it) from the same reads. A block of
// 32 x 8 threads per tile on or above the diagonal (blockIdx.x counts them column by column)
// of matrix blockIdx.y. Each thread first loads all its entries, so that a block keeps
// kTile^2 entries in flight: 64 x 64 tiles for 2-byte types, whose 32 x 32 tiles move half
// the bytes per round trip of a float one.
constexpr int kMirrorThreadsX = 32, kMirrorThreadsY = 8;

template <class T>
__host__ __device__ constexpr int mirror_tile() {
  return sizeof(T) == 2 ? 64 : 32;
}

template <class T>
__global__ void mirror_lower_kernel(T* __restrict__ c, int64_t ld, int64_t stride, int r, T* __restrict__ p,
                                    int64_t p_ld, int64_t p_stride, double alpha, double diag) {
  using A = acc_t<T>;
  constexpr int kTile = mirror_tile<T>(), kRows = kTile / kMirrorThreadsY, kCols = kTile / kMirrorThreadsX;
  __shared__ T tile[kTile][kTile + (sizeof(T) == 2 ? 2 : 1)];  // padded: both passes conflict-free
  T* m = c + int64_t(blockIdx.y) * stride;
  T* q = p ? p + int64_t(blockIdx.y) * p_stride : nullptr;
  // upper tile number L -> (bi, bj), bi <= bj, with L = bj (bj + 1) / 2 + bi
  const int64_t L = blockIdx.x;
  int64_t bj = int64_t((sqrt(8.0 * double(L) + 1.0) - 1.0) / 2.0);
  while (bj * (bj + 1) / 2 > L) --bj;
  while ((bj + 1) * (bj + 2) / 2 <= L) ++bj;
  const int64_t bi = L - bj * (bj + 1) / 2;
  const int tx = threadIdx.x, ty = threadIdx.y;
  // source: the lower tile, rows bj*kTile.., cols bi*kTile.., element (row, col) at m[row + col*ld]
  T v[kRows][kCols];
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
#pragma unroll
    for (int h = 0; h < kCols; ++h) {
      const int64_t row = bj * kTile + tx + h * kMirrorThreadsX, col = bi * kTile + ty + k * kMirrorThreadsY;
      if (row < r && col < r) v[k][h] = m[row + col * ld];
    }
  }
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
#pragma unroll
    for (int h = 0; h < kCols; ++h) {
      const int x = tx + h * kMirrorThreadsX, y = ty + k * kMirrorThreadsY;
      const int64_t row = bj * kTile + x, col = bi * kTile + y;
      if (row < r && col < r) {
        tile[y][x] = v[k][h];
        if (q && row >= col) store(q + row + col * p_ld, A(alpha) * load(&v[k][h]) + (row == col ? A(diag) : A(0)));
      }
    }
  }
  __syncthreads();
  // destination: the upper tile, rows bi*kTile.., cols bj*kTile.. (strictly above the diagonal)
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
#pragma unroll
    for (int h = 0; h < kCols; ++h) {
      const int x = tx + h * kMirrorThreadsX, y = ty + k * kMirrorThreadsY;
      const int64_t row = bi * kTile + x, col = bj * kTile + y;
      if (row < r && col < r && row < col) {
        const T w = tile[x][y];
        m[row + col * ld] = w;
        if (q) store(q + row + col * p_ld, A(alpha) * load(&w));
      }
    }
  }
}

// One block per column (blockIdx.x) of one matrix (blockIdx.y): coalesced, no divisions.
template <class T>
__global__ void scale_add_identity_kernel(const T* x, int64_t x_ld, int64_t x_stride, T* y, int64_t y_ld,
                                          int64_t y_stride, int r, double alpha, double diag) {
  using A = acc_t<T>;
  const int col = blockIdx.x;
  const T* src = x + int64_t(blockIdx.y) * x_stride + int64_t(col) * x_ld;
  T* dst = y + int64_t(blockIdx.y) * y_stride + int64_t(col) * y_ld;
  for (int row = threadIdx.x; row < r; row += blockDim.x)
    store(dst + row, A(alpha) * load(src + row) + (row == col ? A(diag) : A(0)));
}

template <class T>
__global__ void amax_kernel(const T* const* ptrs, int64_t size, double* amax, int* nonfinite) {
  const T* x = ptrs[blockIdx.y];
  double local = 0.0;
  bool finite = true;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size; i += int64_t(gridDim.x) * blockDim.x) {
    const double v = fabs(double(load(x + i)));
    finite &= v <= DBL_MAX;  // false for NaN and Inf
    local = v > local ? v : local;
  }
  // one atomic per block (per-warp atomics on one address per matrix serialize)
  __shared__ double warp_max[32];
  __shared__ int warp_bad;
  if (threadIdx.x == 0) warp_bad = 0;
  for (int o = 16; o > 0; o >>= 1) local = fmax(local, __shfl_xor_sync(0xffffffffu, local, o));
  __syncthreads();
  if (!__all_sync(0xffffffffu, finite) && (threadIdx.x & 31) == 0) warp_bad = 1;
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = local;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < int(blockDim.x / 32); ++w) local = fmax(local, warp_max[w]);
  if (warp_bad) {  // the max skips NaN: a non-finite matrix is marked by amax = Inf
    atomicOr(nonfinite, 1);
    local = CUDART_INF;
  }
  if (local > 0.0)  // nonnegative doubles order as their bit patterns
    atomicMax(reinterpret_cast<unsigned long long*>(amax + blockIdx.y), __double_as_longlong(local));
}

// This block's share of sum (x / amax)^2 into its slot, partial[matrix * gridDim.x + block].
template <class T>
__global__ void sumsq_kernel(const T* const* ptrs, int64_t size, const double* amax, double* partial) {
  const T* x = ptrs[blockIdx.y];
  const double m = amax[blockIdx.y];
  double local = 0.0;
  if (m > 0.0 && m <= DBL_MAX) {  // x / m, not x * (1 / m): 1 / m overflows for a subnormal m
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size; i += int64_t(gridDim.x) * blockDim.x) {
      const double v = double(load(x + i)) / m;
      local += v * v;
    }
  }
  local = block_sum(local);
  if (threadIdx.x == 0) partial[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = local;
}

// A warp per matrix; each lane adds a fixed stride of the slots, then a fixed shuffle tree.
__global__ void sum_slots_kernel(const double* partial, int64_t slots, int64_t count, char* out, size_t out_stride) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; b < count; b += warps) {
    double s = 0.0;
    for (int64_t k = lane; k < slots; k += 32) s += partial[b * slots + k];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) *reinterpret_cast<double*>(out + b * out_stride) = s;
  }
}

// row_sq[matrix * n + i]: row i's sum of squares (summed by sum_slots into frobenius2).
template <class S, class D>
__global__ void load_symmetric_kernel(const S* a, D* dst, int64_t n, MatrixStats* stats, double* row_sq) {
  // one warp per row i of matrix blockIdx.y
  const int64_t b = blockIdx.y, lane = threadIdx.x & 31;
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (i >= n) return;
  const S* m = a + b * n * n;
  double amax = 0, dmax = 0, sq = 0, row = 0;
  bool finite = true;
  for (int64_t j = lane; j < n; j += 32) {
    const double x = to_double(m[i * n + j]), y = to_double(m[j * n + i]);
    finite &= fabs(x) <= DBL_MAX;
    const double s = 0.5 * x + 0.5 * y;
    if (dst) dst[b * n * n + i * n + j] = D(s);
    amax = fmax(amax, fabs(x));
    dmax = fmax(dmax, fabs(x - y));
    sq += s * s;
    row += fabs(s);
  }
  for (int o = 16; o > 0; o >>= 1) {
    amax = fmax(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    dmax = fmax(dmax, __shfl_xor_sync(0xffffffffu, dmax, o));
    sq += __shfl_xor_sync(0xffffffffu, sq, o);
    row += __shfl_xor_sync(0xffffffffu, row, o);
  }
  finite = __all_sync(0xffffffffu, finite);
  if (lane != 0) return;
  MatrixStats* st = stats + b;
  if (!finite) atomicOr(&st->nonfinite, 1);
  auto max_bits = [](double* p, double v) {  // nonnegative doubles order as their bits
    if (v > 0) atomicMax(reinterpret_cast<unsigned long long*>(p), __double_as_longlong(v));
  };
  max_bits(&st->amax, amax);
  max_bits(&st->asymmetry, dmax);
  max_bits(&st->max_row_sum, row);
  row_sq[b * n + i] = sq;
}

// A block per matrix: its largest magnitude, then the scaling by 2^k.
template <class T>
__global__ void scale_to_unit_kernel(T* a, int64_t size, int64_t count, int* exponent) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    T* m = a + b * size;
    double amax = 0;
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) amax = fmax(amax, fabs(double(m[i])));
    amax = block_max(amax);
    const int k = amax > 0 && amax <= DBL_MAX ? numerics::even_scale_exponent(amax) : 0;
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) m[i] = T(ldexp(double(m[i]), k));
    if (threadIdx.x == 0) exponent[b] = k;
  }
}

// A block per matrix: finite, or zeroed with bad[b] = 1.
template <class T>
__global__ void zero_nonfinite_kernel(T* out, int64_t size, int64_t count, char* bad) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    T* m = out + b * size;
    bool finite = true;
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) finite &= fabs(to_double(m[i])) <= DBL_MAX;
    finite = __syncthreads_and(finite);
    if (!finite)
      for (int64_t i = threadIdx.x; i < size; i += blockDim.x) m[i] = from_double<T>(0.0);
    if (threadIdx.x == 0) bad[b] = !finite;
  }
}

}  // namespace

std::vector<char> zero_nonfinite(cudaStream_t stream, DType dtype, void* out, int64_t size, int64_t count) {
  if (count == 0 || size == 0) return std::vector<char>(size_t(std::max<int64_t>(count, 0)), 0);
  DeviceBuffer bad(size_t(count), stream);
  CK_DISPATCH_FLOATING(dtype, "out", T, [&] {
    zero_nonfinite_kernel<<<unsigned(std::min<int64_t>(count, 65535)), 256, 0, stream>>>(static_cast<T*>(out), size,
                                                                                         count, bad.as<char>());
  });
  CK_CUDA_CHECK(cudaGetLastError());
  return copy_to_host(stream, bad.as<char>(), count);
}

template <class T>
void scale_to_unit(cudaStream_t stream, T* a, int64_t size, int64_t count, int* exponent) {
  if (count == 0) return;
  scale_to_unit_kernel<<<unsigned(std::min<int64_t>(count, 65535)), 256, 0, stream>>>(a, size, count, exponent);
  CK_CUDA_CHECK(cudaGetLastError());
}

template void scale_to_unit<float>(cudaStream_t, float*, int64_t, int64_t, int*);
template void scale_to_unit<double>(cudaStream_t, double*, int64_t, int64_t, int*);

template <class D>
void load_symmetric(cudaStream_t stream, const ArrayView& a, D* dst, MatrixStats* stats) {
  const int64_t n = a.size(-1), count = n ? a.numel() / (n * n) : 0;
  if (count == 0) return;
  CK_CUDA_CHECK(cudaMemsetAsync(stats, 0, sizeof(MatrixStats) * size_t(count), stream));
  DeviceBuffer row_sq(sizeof(double) * size_t(n * count), stream);
  const unsigned blocks = unsigned((n * 32 + 255) / 256);
  for_each_grid_chunk(count, [&](int64_t start, unsigned rows) {
    CK_DISPATCH_FLOATING(a.dtype, "A", S, [&] {
      load_symmetric_kernel<<<dim3(blocks, rows), 256, 0, stream>>>(a.ptr<const S>() + start * n * n,
                                                                    dst ? dst + start * n * n : nullptr, n,
                                                                    stats + start, row_sq.as<double>() + start * n);
    });
    CK_CUDA_CHECK(cudaGetLastError());
  });
  sum_slots(stream, row_sq.as<double>(), n, count, &stats->frobenius2, sizeof(MatrixStats));
}

template void load_symmetric<float>(cudaStream_t, const ArrayView&, float*, MatrixStats*);
template void load_symmetric<double>(cudaStream_t, const ArrayView&, double*, MatrixStats*);

void validate_symmetric(const ArrayView& a, const MatrixStats* stats, const char* name) {
  const int64_t n = a.size(-1), count = n ? a.numel() / (n * n) : 0;
  for (int64_t b = 0; b < count; ++b) {
    const MatrixStats& s = stats[b];
    CK_CHECK_VALUE(!s.nonfinite, "argument '", name, "' contains NaN or Inf (matrix ", b, ")");
    CK_CHECK_VALUE(s.asymmetry <= symmetry_tolerance(a.dtype) * s.amax, "argument '", name,
                   "' must be symmetric: matrix ", b,
                   " has max|A - A^T| / max|A| = ", s.amax > 0 ? s.asymmetry / s.amax : 0.0);
  }
}

std::vector<MatrixStats> check_symmetric(cudaStream_t stream, const ArrayView& a, const MatrixStats* stats,
                                         const char* name) {
  const int64_t n = a.size(-1), count = n ? a.numel() / (n * n) : 0;
  std::vector<MatrixStats> host = copy_to_host(stream, stats, count);
  validate_symmetric(a, host.data(), name);
  return host;
}

double symmetric_product_fraction(int r) {
  const int t = block_side(r);
  if (t == 0) return 1.0;
  const int nb = (r + t - 1) / t;
  return double(nb) * (nb + 1) / 2 / (double(nb) * nb);
}

void symmetric_product(cudaStream_t stream, DType dtype, Op op_a, Op op_b, int r, int k, double alpha, Stack a, Stack b,
                       double beta, Stack c, int64_t batch, bool mirror) {
  if (batch == 0 || r == 0) return;
  const int t = block_side(r);
  if (t == 0) {
    gemm(stream, dtype, op_a, op_b, r, r, k, alpha, a, b, beta, c, batch);
    return;
  }
  const int nb = (r + t - 1) / t;
  const int64_t item = dtype.itemsize();
  // Blocks grouped by shape: full x full, last-row x full, last x last.
  BlockTable tables[3];
  int rows[3] = {0, 0, 0}, cols[3] = {0, 0, 0};
  for (int bi = 0; bi < nb; ++bi) {
    for (int bj = 0; bj <= bi; ++bj) {
      const int ri = std::min(t, r - bi * t), cj = std::min(t, r - bj * t);
      const int g = (ri == t && cj == t) ? 0 : (cj == t ? 1 : 2);
      BlockTable& table = tables[g];
      rows[g] = ri;
      cols[g] = cj;
      // op(A) rows bi*t.., op(B) columns bj*t.., C block (bi, bj)
      table.a[table.count] = item * bi * t * (op_a == Op::N ? 1 : a.ld);
      table.b[table.count] = item * bj * t * (op_b == Op::N ? b.ld : 1);
      table.c[table.count] = item * (bi * t + int64_t(bj) * t * c.ld);
      ++table.count;
    }
  }
  // One pointer table for the three groups: a workspace allocation is a call into the framework.
  const int64_t total = batch * (tables[0].count + tables[1].count + tables[2].count);
  DeviceBuffer ptrs(3 * size_t(total) * sizeof(void*), stream);
  const StackBytes sb{static_cast<char*>(a.ptr), static_cast<char*>(b.ptr), static_cast<char*>(c.ptr),
                      a.stride * item,           b.stride * item,           c.stride * item};
  int64_t first = 0;
  for (int g = 0; g < 3; ++g) {
    if (tables[g].count == 0) continue;
    const int64_t n = batch * tables[g].count;
    const void** pa = ptrs.as<const void*>() + first;
    const void** pb = pa + total;
    void** pc = ptrs.as<void*>() + 2 * total + first;
    block_pointers_kernel<<<grid_for(n, 256), 256, 0, stream>>>(sb, tables[g], batch, pa, pb, pc);
    CK_CUDA_CHECK(cudaGetLastError());
    gemm_pointers(stream, dtype, op_a, op_b, rows[g], cols[g], k, alpha, pa, a.ld, pb, b.ld, beta, pc, c.ld, n);
    first += n;
  }
  if (mirror) mirror_lower(stream, dtype, c, r, batch);
}

void mirror_lower(cudaStream_t stream, DType dtype, Stack c, int r, int64_t batch, const Stack* p, double alpha,
                  double diag) {
  if (batch == 0 || r == 0) return;
  const dim3 threads(kMirrorThreadsX, kMirrorThreadsY);
  CK_DISPATCH_FLOATING(dtype, "A", T, [&] {
    const int64_t tiles = (r + mirror_tile<T>() - 1) / mirror_tile<T>(), upper = tiles * (tiles + 1) / 2;
    CK_CHECK_VALUE(upper <= INT32_MAX, "matrix side ", r, " is too large for the mirror kernel's grid");
    for_each_grid_chunk(batch, [&](int64_t start, unsigned rows) {
      mirror_lower_kernel<<<dim3(unsigned(upper), rows), threads, 0, stream>>>(
          static_cast<T*>(c.ptr) + start * c.stride, c.ld, c.stride, r,
          p ? static_cast<T*>(p->ptr) + start * p->stride : nullptr, p ? p->ld : 0, p ? p->stride : 0, alpha, diag);
      CK_CUDA_CHECK(cudaGetLastError());
    });
  });
}

void scale_add_identity(cudaStream_t stream, DType dtype, Stack x, Stack y, int r, int64_t batch, double alpha,
                        double diag) {
  if (r == 0) return;
  for_each_grid_chunk(batch, [&](int64_t start, unsigned rows) {
    CK_DISPATCH_FLOATING(dtype, "A", T, [&] {
      scale_add_identity_kernel<<<dim3(unsigned(r), rows), 256, 0, stream>>>(
          static_cast<const T*>(x.ptr) + start * x.stride, x.ld, x.stride, static_cast<T*>(y.ptr) + start * y.stride,
          y.ld, y.stride, r, alpha, diag);
    });
    CK_CUDA_CHECK(cudaGetLastError());
  });
}

void scaled_norms(cudaStream_t stream, DType dtype, const void* const* ptrs, int64_t size, int64_t count, double* amax,
                  double* sumsq, int* nonfinite) {
  if (count == 0) return;
  CK_CUDA_CHECK(cudaMemsetAsync(amax, 0, sizeof(double) * size_t(count), stream));
  CK_CUDA_CHECK(cudaMemsetAsync(nonfinite, 0, sizeof(int), stream));
  if (size == 0) {  // empty matrices: nothing for sum_slots to add
    CK_CUDA_CHECK(cudaMemsetAsync(sumsq, 0, sizeof(double) * size_t(count), stream));
    return;
  }
  const unsigned per_matrix = unsigned(std::min<int64_t>((size + 255) / 256, std::max<int64_t>(1, 1024 / count)));
  DeviceBuffer partial(sizeof(double) * per_matrix * size_t(count), stream);
  for_each_grid_chunk(count, [&](int64_t start, unsigned rows) {
    const dim3 grid(per_matrix, rows);
    CK_DISPATCH_FLOATING(dtype, "G", T, [&] {
      const T* const* p = reinterpret_cast<const T* const*>(ptrs) + start;
      amax_kernel<<<grid, 256, 0, stream>>>(p, size, amax + start, nonfinite);
      sumsq_kernel<<<grid, 256, 0, stream>>>(p, size, amax + start, partial.as<double>() + start * per_matrix);
    });
    CK_CUDA_CHECK(cudaGetLastError());
  });
  sum_slots(stream, partial.as<double>(), per_matrix, count, sumsq, sizeof(double));
}

void sum_slots(cudaStream_t stream, const double* partial, int64_t slots, int64_t count, double* out,
               size_t out_stride) {
  if (count == 0) return;
  sum_slots_kernel<<<grid_for(count * 32, 256), 256, 0, stream>>>(partial, slots, count, reinterpret_cast<char*>(out),
                                                                  out_stride);
  CK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace curvkit::cuda
