// Shared by the inverse-root CUDA sources (cuda_roots.cu: matrix_inverse_root; cuda_eigh.cu:
// eigh and the warm-started eigenpairs the roots use; cuda_qr.cu: orthonormalize and the
// eigenbasis refresh): launch sizes, block reductions, cuSOLVER's parameter object, the
// column-major loads and stores of stacks, the finite verdict of eigenpairs, the stable sort
// and column permutation of eigen- and basis estimates, and the batched products of a group.
//
// Layout: column-major (cuBLAS's), one contiguous stack per group of matrices of one size and
// compute type. Everything but eigenpairs has internal linkage (an unnamed namespace): each .cu
// file compiles its own copy of these kernels, so the one-definition rule holds and no template
// kernel stub is shared between translation units.
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "core/dispatch.h"
#include "core/linalg_cuda.h"
#include "core/numerics.h"
#include "inverse_root/inverse_root.h"

namespace curvkit {
namespace inverse_root_cuda {

// Eigenpairs of `count` symmetric n x n matrices a (column-major, not modified): eigenvalues
// ascending in w, eigenvectors in v's columns, info per matrix (device, nonzero: cuSOLVER
// failed). Where warm[b], v holds a basis to refine on the device first (at most
// numerics::kMaxRefineSteps steps; eigenvalues that mixed send the matrix to cuSOLVER, where the
// CPU separates them in place); the others, and the refinements that fail, go to cuSOLVER's syev
// (gathered into one batch). Per matrix on the host: refinement steps (-1: syev), whether a
// refinement fell back, and the products spent (a symmetric product counts its fraction).
struct EigenpairsInfo {
  std::vector<int> steps;
  std::vector<char> fell_back;
  std::vector<double> products;
};

template <class T>
EigenpairsInfo eigenpairs(cudaStream_t stream, const T* a, T* v, T* w, int* info, const std::vector<char>& warm,
                          int64_t n, int64_t count);

}  // namespace inverse_root_cuda

namespace {

using cuda::DeviceBuffer;
using cuda::MatrixStats;
using cuda::Op;
using cuda::Stack;
using inverse_root_cuda::eigenpairs;
using inverse_root_cuda::EigenpairsInfo;

constexpr int kThreads = 256;

// Blocks for per-element work over `count` n x n matrices: x over columns, y over matrices.
inline dim3 matrix_grid(int64_t n, int64_t count, int64_t max_columns) {
  return dim3(unsigned(std::max<int64_t>(1, std::min(n, max_columns))), cuda::grid_y(count));
}

// Folds v (>= 0) of every thread of the block into *target with one atomic. Every thread of
// the block calls it.
__device__ inline void block_max_into(double v, double* target) {
  __shared__ double warp_max[32];
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x >> 5); ++w) v = fmax(v, warp_max[w]);
    if (v > 0) atomicMax(reinterpret_cast<unsigned long long*>(target), __double_as_longlong(v));
  }
  __syncthreads();
}

// cuSOLVER's parameter object of the 64-bit API, for a scope.
class SolverParams {
 public:
  SolverParams() { CK_CUSOLVER_CHECK(cusolverDnCreateParams(&params_)); }
  ~SolverParams() { cusolverDnDestroyParams(params_); }
  SolverParams(const SolverParams&) = delete;
  SolverParams& operator=(const SolverParams&) = delete;
  operator cusolverDnParams_t() const { return params_; }

 private:
  cusolverDnParams_t params_ = nullptr;
};

// ---- Stacks in and out, eigenpair verdicts, sorts

// dst (column-major rows x cols, compute type T) = src (row-major, any dtype), per matrix.
template <class S, class T>
__global__ void load_columns_kernel(const S* src, T* dst, int64_t rows, int64_t cols, int64_t count) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y)
    for (int64_t j = blockIdx.x; j < cols; j += gridDim.x)
      for (int64_t i = threadIdx.x; i < rows; i += blockDim.x)
        dst[b * rows * cols + j * rows + i] = T(to_double(src[b * rows * cols + i * cols + j]));
}

// What store_columns does with a matrix whose info is nonzero (a failed decomposition).
enum class OnFailure { Write, Zero, Skip };

// dst (row-major, dtype D) = src (column-major rows x cols), per matrix as `failure` says.
template <class T, class D>
__global__ void store_columns_kernel(const T* src, D* dst, int64_t rows, int64_t cols, int64_t count, const int* info,
                                     OnFailure failure) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    const bool failed = info && info[b] != 0;
    if (failed && failure == OnFailure::Skip) continue;
    const bool zero = failed && failure == OnFailure::Zero;
    for (int64_t j = blockIdx.x; j < cols; j += gridDim.x)
      for (int64_t i = threadIdx.x; i < rows; i += blockDim.x)
        dst[b * rows * cols + i * cols + j] = from_double<D>(zero ? 0.0 : double(src[b * rows * cols + j * rows + i]));
  }
}

// info[b] <- 1 where cuSOLVER succeeded but left a non-finite eigenvalue or eigenvector (the
// CPU's verdict in eigh_cpu), a block per matrix.
template <class T>
__global__ void finite_verdict_kernel(const T* v, const T* w, int* info, int64_t n, int64_t count) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    bool bad = false;
    for (int64_t i = threadIdx.x; i < n * n; i += blockDim.x) bad |= !(fabs(double(v[b * n * n + i])) <= DBL_MAX);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) bad |= !(fabs(double(w[b * n + i])) <= DBL_MAX);
    bad = __syncthreads_or(bad);
    if (bad && threadIdx.x == 0 && info[b] == 0) info[b] = 1;
  }
}

// The order of d (descending or ascending), stable (ties keep column order): perm[rank of j]
// = j; a block per matrix, k^2 comparisons (k is a matrix side). sorted[r] = d[perm[r]] in D.
// NaN ranks last, so that perm is a permutation whatever d holds (the verdict is elsewhere).
template <class S, class D>
__global__ void sort_kernel(const S* d, int64_t* perm, D* sorted, int64_t k, int64_t count, bool descending) {
  const double last = descending ? -INFINITY : INFINITY;
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x)
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const double value = double(d[b * k + j]);
      const double dj = value == value ? value : last;
      int64_t rank = 0;
      for (int64_t i = 0; i < k; ++i) {
        const double x = double(d[b * k + i]);
        const double di = x == x ? x : last;
        rank += (descending ? di > dj : di < dj) || (di == dj && i < j);
      }
      perm[b * k + rank] = j;
      sorted[b * k + rank] = from_double<D>(value);
    }
}

// dst column r = src column perm[r] (column-major n x k).
template <class T>
__global__ void permute_columns_kernel(const T* src, T* dst, const int64_t* perm, int64_t n, int64_t k, int64_t count) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y)
    for (int64_t r = blockIdx.x; r < k; r += gridDim.x) {
      const int64_t j = perm[b * k + r];
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[b * n * k + r * n + i] = src[b * n * k + j * n + i];
    }
}

// Row-major (..., rows, cols) q into a new column-major stack of T.
template <class T>
void load_columns(cudaStream_t stream, const ArrayView& q, T* dst, int64_t rows, int64_t cols, int64_t count) {
  CK_DISPATCH_FLOATING(q.dtype, "Q", S, [&] {
    load_columns_kernel<<<matrix_grid(cols, count, 1024), kThreads, 0, stream>>>(q.ptr<const S>(), dst, rows, cols,
                                                                                 count);
  });
  CK_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void store_columns(cudaStream_t stream, const T* src, const ArrayView& out, int64_t rows, int64_t cols, int64_t count,
                   const int* info = nullptr, OnFailure failure = OnFailure::Write) {
  CK_DISPATCH_FLOATING(out.dtype, "out", D, [&] {
    store_columns_kernel<<<matrix_grid(cols, count, 1024), kThreads, 0, stream>>>(src, out.ptr<D>(), rows, cols, count,
                                                                                  info, failure);
  });
  CK_CUDA_CHECK(cudaGetLastError());
}

// The batched products of one group: c = a b for every matrix, only the lower blocks computed
// when the result is known to be symmetric (both factors commuting symmetric matrices).
template <class T>
struct Products {
  cudaStream_t stream;
  int n;
  int64_t count;
  bool symmetric;

  void multiply(const T* a, const T* b, T* c, bool commuting) const {
    const int64_t nn = int64_t(n) * n;
    const Stack sa{const_cast<T*>(a), n, nn}, sb{const_cast<T*>(b), n, nn}, sc{c, n, nn};
    if (symmetric && commuting)
      cuda::symmetric_product(stream, dtype_of<T>(), Op::N, Op::N, n, n, 1.0, sa, sb, 0.0, sc, count);
    else
      cuda::gemm(stream, dtype_of<T>(), Op::N, Op::N, n, n, n, 1.0, sa, sb, 0.0, sc, count);
  }

  // b^p in one of the three scratch buffers (or b itself for p = 1); b is not modified.
  T* power(T* b, int p, T* const scratch[3]) const {
    std::vector<T*> free(scratch, scratch + 3);
    auto take = [&] {
      T* q = free.back();
      free.pop_back();
      return q;
    };
    T* square = b;  // b^(2^k)
    T* result = nullptr;
    for (int e = p; e > 0; e >>= 1) {
      if (e & 1) {
        if (result) {
          T* q = take();
          multiply(result, square, q, true);
          if (result != square && result != b) free.push_back(result);
          result = q;
        } else {
          result = square;
        }
      }
      if (e > 1) {
        T* q = take();
        multiply(square, square, q, true);
        if (square != result && square != b) free.push_back(square);
        square = q;
      }
    }
    return result;
  }
};

// Matrices in a (..., n, n) input (none when n = 0).
inline int64_t matrices_in(const ArrayView& a) { return a.size(-1) ? leading_count(a) : 0; }

}  // namespace
}  // namespace curvkit
