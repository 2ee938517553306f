// Batched dense linear algebra on CUDA shared by the iterative matrix families (Newton–Schulz,
// inverse roots): cuBLAS products over stacks of matrices, the symmetric product that computes
// only the blocks on and below the diagonal (about half the flops of a plain product), and the
// small elementwise kernels around them. CUDA builds only.
//
// Everything here is column-major, as cuBLAS is: a row-major m x n array is the column-major
// n x m matrix (its transpose), which the callers use to avoid copies.
#pragma once
#include <cstdint>
#include <vector>

#include "core/array.h"
#include "core/cuda_utils.h"
#include "core/half.h"
#include "core/workspace.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace curvkit::cuda {

#ifdef __CUDACC__
// Fast loads and stores for compute kernels (not the bit-exact conversions of core/half.h):
// float64 works in double, every other dtype in float.
template <class T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <class T>
using acc_t = typename Acc<T>::type;

template <class T>
__device__ __forceinline__ acc_t<T> load(const T* p) {
  return *p;
}
template <>
__device__ __forceinline__ float load(const bfloat16_t* p) {
  return __uint_as_float(uint32_t(p->bits) << 16);
}
template <>
__device__ __forceinline__ float load(const half_t* p) {
  return __half2float(__ushort_as_half(p->bits));
}
template <class T>
__device__ __forceinline__ void store(T* p, acc_t<T> v) {
  *p = v;
}
template <>
__device__ __forceinline__ void store(bfloat16_t* p, float v) {
  p->bits = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <>
__device__ __forceinline__ void store(half_t* p, float v) {
  p->bits = __half_as_ushort(__float2half_rn(v));
}

// Sum of v over the warp in a fixed order (a butterfly), returned to every lane (all 32 call it).
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the block in a fixed order, returned to every thread (every thread calls it).
// Sums across blocks go through per-block slots and sum_slots, never float atomics: those add
// in the order the blocks finish, so results would change from run to run in the last bits.
__device__ inline double block_sum(double v) {
  __shared__ double per_warp[32];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) per_warp[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < int(blockDim.x >> 5); ++w) total += per_warp[w];
  __syncthreads();
  return total;
}

// max of v >= 0 over the block, returned to every thread (every thread calls it); NaN counts as
// Inf, so a non-finite entry is never dropped.
__device__ inline double block_max(double v) {
  __shared__ double warp_max[32];
  v = v == v ? v : INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = v;
  __syncthreads();
  double m = 0;
  for (int w = 0; w < int(blockDim.x >> 5); ++w) m = fmax(m, warp_max[w]);
  __syncthreads();
  return m;
}
#endif

// out[b] = sum over k < slots of partial[b * slots + k], in a fixed order, for b < count; out[b]
// lies at byte offset b * out_stride from out (a field of a per-matrix struct, or a plain array).
void sum_slots(cudaStream_t stream, const double* partial, int64_t slots, int64_t count, double* out,
               size_t out_stride);

// Stream-ordered device memory for one call's stream: from the installed workspace allocator
// (the caller's framework, core/workspace.h), else cudaMallocAsync / cudaFreeAsync.
class DeviceBuffer {
 public:
  DeviceBuffer(size_t bytes, cudaStream_t stream);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  WorkspaceAllocator* allocator_;
  cudaStream_t stream_;
};

// A stack of matrices: element pointer, leading dimension, distance between matrices.
struct Stack {
  void* ptr;
  int64_t ld;
  int64_t stride;
};

enum class Op { N, T };

// The CUDA data type of a dtype (cuBLAS, cuSOLVER); dtype_of<T>() (core/dispatch.h) for a
// compute type T.
cudaDataType data_type(DType dtype);

// C = alpha op(A) op(B) + beta C for each of `batch` matrices; op(A) m x k, op(B) k x n.
// dtype: float64 computes in float64; float32, float16 and bfloat16 in float32 (no TF32).
void gemm(cudaStream_t stream, DType dtype, Op op_a, Op op_b, int m, int n, int k, double alpha, Stack a, Stack b,
          double beta, Stack c, int64_t batch);

// The same product for matrices given by pointers (device arrays of `batch` pointers each).
void gemm_pointers(cudaStream_t stream, DType dtype, Op op_a, Op op_b, int m, int n, int k, double alpha,
                   const void* const* a, int64_t lda, const void* const* b, int64_t ldb, double beta, void* const* c,
                   int64_t ldc, int64_t batch);

// C = alpha op(A) op(B) + beta C for an r x r result known to be symmetric (X X^T, or the
// product of two commuting symmetric matrices): only the blocks on and below the diagonal are
// computed, in one pointer-array batched product, then the strict upper triangle is copied
// from the lower one (unless mirror is false: then only the lower triangle is valid). Small r
// uses one plain product.
void symmetric_product(cudaStream_t stream, DType dtype, Op op_a, Op op_b, int r, int k, double alpha, Stack a, Stack b,
                       double beta, Stack c, int64_t batch, bool mirror = true);

// Fraction of a plain product's flops that symmetric_product does for size r.
double symmetric_product_fraction(int r);

// Strict upper triangle <- strict lower triangle, for each r x r matrix of the stack; with p,
// also P = alpha C + diag I (whole matrices) from the same pass over C.
void mirror_lower(cudaStream_t stream, DType dtype, Stack c, int r, int64_t batch, const Stack* p = nullptr,
                  double alpha = 0, double diag = 0);

// Y = alpha X + diag * I (r x r each); Y may be X.
void scale_add_identity(cudaStream_t stream, DType dtype, Stack x, Stack y, int r, int64_t batch, double alpha,
                        double diag);

// Per matrix of `count` matrices of `size` elements given by pointers (dtype `dtype`): the
// largest magnitude and the sum of squares scaled by it, sum (x / amax)^2 (so that neither tiny
// nor huge entries under/overflow), in float64; nonfinite[0] is set to 1 if any entry is NaN
// or Inf, and such a matrix gets amax = Inf. amax, sumsq and nonfinite are device arrays,
// overwritten.
void scaled_norms(cudaStream_t stream, DType dtype, const void* const* ptrs, int64_t size, int64_t count, double* amax,
                  double* sumsq, int* nonfinite);

// Facts about each symmetric input matrix, gathered while loading it (load_symmetric).
struct MatrixStats {
  double amax;         // max |A_ij|
  double asymmetry;    // max |A_ij - A_ji|
  double frobenius2;   // ||(A + A^T)/2||_F^2
  double max_row_sum;  // ||(A + A^T)/2||_inf
  int nonfinite;       // 1 if A holds NaN or Inf
  int pad;
};

// Scales each of `count` matrices of `size` elements (float32 or float64, device) by 2^k, k the
// even exponent that brings its largest magnitude to [0.5, 2) (numerics::even_scale_exponent;
// exact), and writes k to exponent[b] (device; 0 for a zero or non-finite matrix): the CPU's
// guard against under- and overflow from the subnormals to DBL_MAX.
template <class T>
void scale_to_unit(cudaStream_t stream, T* a, int64_t size, int64_t count, int* exponent);

// Zeroes each of the `count` matrices of `size` elements at `out` (dtype `dtype`, device) that
// holds NaN or Inf, and says which on the host (synchronizes the stream): a result beyond the
// output dtype's range is a failure, never handed on as Inf (as store_matrix on the CPU).
std::vector<char> zero_nonfinite(cudaStream_t stream, DType dtype, void* out, int64_t size, int64_t count);

// dst (float32 or float64, `count` n x n matrices; may be null: stats only) = (A + A^T)/2 of
// the C-contiguous stack `a` (any float dtype, `count` = a's batch), with stats per matrix
// (device array). Then the host check that CPU inputs get (core/matrix_utils.h
// check_symmetric): NaN/Inf or an asymmetric matrix is a ValueError naming `name`;
// check_symmetric synchronizes the stream once and returns the stats on the host,
// validate_symmetric checks stats already on the host.
template <class D>
void load_symmetric(cudaStream_t stream, const ArrayView& a, D* dst, MatrixStats* stats);
std::vector<MatrixStats> check_symmetric(cudaStream_t stream, const ArrayView& a, const MatrixStats* stats,
                                         const char* name);
void validate_symmetric(const ArrayView& a, const MatrixStats* stats, const char* name);

// `count` elements of a device array, copied to the host once the stream's work before them
// is done (synchronizes the stream): per-matrix states, flags and stats.
template <class T>
std::vector<T> copy_to_host(cudaStream_t stream, const T* src, int64_t count) {
  std::vector<T> host(static_cast<size_t>(count));
  if (count == 0) return host;
  CK_CUDA_CHECK(cudaMemcpyAsync(host.data(), src, sizeof(T) * host.size(), cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

// A device int read on the host: how the iterative kernels' host loops see, every few steps,
// how many matrices are still active.
inline int read_counter(cudaStream_t stream, const int* counter) { return copy_to_host(stream, counter, 1)[0]; }

// Copies `bytes` of a host array to the device, stream-ordered; the host array may be freed
// on return. Up to 62 KiB (7936 pointers), and any size while the stream is being captured,
// travel as kernel parameters, 3968 bytes a launch: a CUDA graph records them by value (a copy
// from pageable memory cannot be captured), and they never wait on the stream. Larger copies
// are a cudaMemcpyAsync.
void copy_to_device(cudaStream_t stream, void* dst, const void* src, size_t bytes);

}  // namespace curvkit::cuda
