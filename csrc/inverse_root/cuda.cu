// Inverse roots and eigendecompositions on CUDA.
//
// The matrices of a call (a batch, or a ragged list of batches) are grouped by size and compute
// dtype; each group is one contiguous stack, and every product is one batched cuBLAS call over
// it. The layout is column-major (cuBLAS's); A, the roots and Newton's M are symmetric, so only
// eigenvectors need a transpose on the way out.
//
// Newton: each matrix's state (RootState) lives on the device. A matrix that stops (converged,
// diverged or growing) is frozen: its M' becomes I, so X and M stay bit-identical while the
// others go on, and the host looks at the number of active matrices every 4 steps only. The
// verdict is the true residual max|X^p (A + eps I) - I| of the final X, as on the CPU.
// Eigh: cuSOLVER's batched syev (or a warm-start basis refined on the device), the eigenvalues
// floored and shifted as on the CPU, the root rebuilt as (V D)(V D)^T with the symmetric product.
// The failure policy is the CPU's (inverse_root.h): float64 eigh for Newton failures, then init.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <map>
#include <type_traits>
#include <vector>

#include "core/dispatch.h"
#include "core/linalg_cuda.h"
#include "core/matrix_utils.h"
#include "inverse_root/inverse_root.h"

namespace curvkit {
namespace {

using cuda::DeviceBuffer;
using cuda::MatrixStats;
using cuda::Op;
using cuda::Stack;

// One matrix's iteration, on the device. distance and residual are nonnegative doubles
// maximized by atomicMax on their bit patterns.
struct RootState {
  double previous;  // last max|M - I|
  double distance;  // this step's max|M - I|
  double residual;  // max|X^p A_r - I| of the result
  int iterations;
  int active;       // still iterating
  int revert;       // 1: the error grew, restore the previous iterate (2 once done)
  int finite;       // X holds no NaN or Inf
  int ok;           // eigh: decomposed, not singular, not indefinite
  int pad;
};

constexpr int kThreads = 256;

// Blocks for per-element work over `count` n x n matrices: x over columns, y over matrices.
dim3 matrix_grid(int64_t n, int64_t count, int64_t max_columns) {
  return dim3(unsigned(std::max<int64_t>(1, std::min(n, max_columns))), unsigned(std::min<int64_t>(count, 65535)));
}

// Folds v (>= 0) of every thread of the block into *target with one atomic. Every thread of
// the block calls it.
__device__ void block_max_into(double v, double* target) {
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

__global__ void reset_states_kernel(RootState* st, int64_t count) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < count) st[b] = RootState{INFINITY, 0.0, 0.0, 0, 0, 0, 1, 1, 0};
}

template <class T>
__global__ void fill_kernel(T* x, int64_t total, T value) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = value;
}

// One power step's normalization, a block per matrix: v <- u / ||u||, rayleigh = u . v (v of
// unit norm before the step, so u . v = v^T A v).
template <class T>
__global__ void power_normalize_kernel(const T* u, T* v, double* rayleigh, int64_t n, int64_t count) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    const T* ub = u + b * n;
    T* vb = v + b * n;
    double norm2 = 0, dot = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const double x = ub[i];
      norm2 += x * x;
      dot += x * double(vb[i]);
    }
    norm2 = cuda::block_sum(norm2);
    dot = cuda::block_sum(dot);
    const double inv = norm2 > 0 && norm2 <= DBL_MAX ? 1.0 / sqrt(norm2) : 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) vb[i] = T(double(ub[i]) * inv);
    if (threadIdx.x == 0) rayleigh[b] = inv > 0 ? dot : 0.0;
  }
}

// Cold start of Newton: lambda = min(bound, 1.25 rayleigh) (the bound alone if the power steps
// gave nothing), z = (p + 1) / (2 lambda), X_0 = z^(1/p) I, M_0 = z A_r. A matrix with no
// positive lambda (zero) is not started and fails the verdict. Warm matrices (X_0 = init,
// already loaded) only get their state; their M_0 = init^p A_r is computed by the caller.
template <class T>
__global__ void newton_start_kernel(const T* a, T* x, T* m, RootState* st, const double* rayleigh,
                                    const MatrixStats* stats, int64_t n, int64_t count, int p, double eps, bool warm) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    const double bound = fmin(sqrt(stats[b].frobenius2), stats[b].max_row_sum) + eps;
    const double lambda = rayleigh[b] > 0 ? fmin(bound, 1.25 * rayleigh[b]) : bound;
    const bool good = warm || (lambda > 0 && lambda <= DBL_MAX);
    const double z = good && !warm ? (p + 1) / (2 * lambda) : 0.0;
    const T diagonal = T(pow(z, 1.0 / p));
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      st[b].active = good;
      st[b].finite = good;
    }
    if (warm) continue;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
      const int64_t col = b * n * n + j * n;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        x[col + i] = i == j ? diagonal : T(0);
        m[col + i] = T(z * double(a[col + i]));
      }
    }
  }
}

// max|M - I| per matrix into the state's distance (or residual); NaN and Inf count as Inf.
template <class T>
__global__ void identity_distance_kernel(const T* m, RootState* st, int64_t n, int64_t count, bool residual) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    double local = 0;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
      const T* col = m + b * n * n + j * n;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const double d = fabs(double(col[i]) - (i == j ? 1.0 : 0.0));
        local = fmax(local, d <= DBL_MAX ? d : INFINITY);
      }
    }
    block_max_into(local, residual ? &st[b].residual : &st[b].distance);
  }
}

// The CPU's stopping rule per matrix (root_newton in cpu.cpp): stop at rounding level, when the
// error stalls once small, at max_iters, or when it grows by more than 1.2x in the convergent
// region (then the previous iterate is restored); also when M is no longer finite, and then X
// counts as not finite (the CPU iterates on until X is NaN: stored as zeros either way). Counts
// the matrices that go on.
__global__ void newton_watch_kernel(RootState* st, int64_t count, double stop, double stall, int max_iters,
                                    int* active) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= count) return;
  RootState& s = st[b];
  if (s.revert == 1) s.revert = 2;
  if (s.active) {
    const double r = s.distance;
    if (s.previous < 1 && r > 1.2 * s.previous) {
      s.active = 0;
      s.revert = 1;
    } else if (!(r <= DBL_MAX)) {
      s.active = 0;
      s.finite = 0;
    } else if (r <= stop || (s.previous < stall && r >= s.previous) || s.iterations >= max_iters) {
      s.active = 0;
    } else {
      s.previous = r;
      ++s.iterations;
      atomicAdd(active, 1);
    }
  }
  s.distance = 0;
}

// X <- the previous iterate, for the matrices whose error just grew.
template <class T>
__global__ void revert_kernel(T* x, const T* previous, const RootState* st, int64_t n, int64_t count) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    if (st[b].revert != 1) continue;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x)
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) x[b * n * n + j * n + i] = previous[b * n * n + j * n + i];
  }
}

// M' = ((p + 1) I - M) / p for active matrices, I for the others.
template <class T>
__global__ void newton_step_kernel(const T* m, T* mp, const RootState* st, int64_t n, int64_t count, int p) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    const bool active = st[b].active;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
      const int64_t col = b * n * n + j * n;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const double id = i == j ? 1.0 : 0.0;
        mp[col + i] = T(active ? (id * (p + 1) - double(m[col + i])) / p : id);
      }
    }
  }
}

// X <- (X + X^T) / 2 (symmetric in exact arithmetic), and whether X is finite.
template <class T>
__global__ void symmetrize_kernel(T* x, RootState* st, int64_t n, int64_t count) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    T* m = x + b * n * n;
    bool finite = true;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x)
      for (int64_t i = j + threadIdx.x; i < n; i += blockDim.x) {  // (i, j) on or below the diagonal
        const T v = T(0.5 * double(m[j * n + i]) + 0.5 * double(m[i * n + j]));
        finite &= fabs(double(v)) <= DBL_MAX;
        m[j * n + i] = v;
        m[i * n + j] = v;
      }
    if (!finite) st[b].finite = 0;
  }
}

// Eigenvectors (columns of v) scaled by lambda^(-1/(2p)), lambda = max(w, 0) + eps, exact zeros
// by 0 (the pseudo-inverse); the CPU's verdict (root_from_eigenpairs in cpu.cpp) into ok. A
// failed decomposition (info: cuSOLVER's, or finite_verdict_kernel's) gives V = 0, so X = 0, as
// the CPU leaves it (root_eigh).
template <class T>
__global__ void eigen_scale_kernel(T* v, const T* w, const int* info, RootState* st, int64_t n, int64_t count, int p,
                                   double eps, double unit) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    const T* wb = w + b * n;
    const bool decomposed = info[b] == 0;
    const double top = fmax(double(wb[n - 1]), 0.0);
    const double zero = double(n) * unit * (top + eps);
    bool ok = decomposed && double(wb[0]) >= -sqrt(unit) * top;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
      const double wj = wb[j];
      const double lambda = (wj > 0 ? wj : 0.0) + eps;
      ok &= lambda > zero;
      const double s = lambda > 0 ? pow(lambda, -0.5 / p) : 0.0;
      T* col = v + b * n * n + j * n;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) col[i] = decomposed ? T(double(col[i]) * s) : T(0);
    }
    if (!ok && threadIdx.x == 0) st[b].ok = 0;
  }
}

// dst (row-major, dtype D) = src (column-major): transposed for eigenvectors, as is for
// symmetric roots. A matrix whose state says it is not finite is written as zeros.
template <class T, class D>
__global__ void store_matrices_kernel(const T* src, D* dst, const RootState* st, int64_t n, int64_t count,
                                      bool transpose) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    const bool zero = st && !st[b].finite;
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x)  // row i of dst
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const double v = double(src[b * n * n + (transpose ? j * n + i : i * n + j)]);
        dst[b * n * n + i * n + j] = from_double<D>(zero || !(fabs(v) <= DBL_MAX) ? 0.0 : v);
      }
  }
}

// Eigenvalues, n per matrix; zeros for a matrix whose info is nonzero.
template <class T, class D>
__global__ void store_values_kernel(const T* src, D* dst, const int* info, int64_t n, int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_double<D>(info[i / n] != 0 ? 0.0 : double(src[i]));
}

// ---- Warm-started eigenbases: the Ogita-Aishima refinement of refine_eigenbasis (cpu.cpp)
// on the device, S = V^T A V, R = I - V^T V, d_i = s_ii / (1 - r_ii), V <- V (I + E).

// One matrix's refinement. off, off_r and scale are maxima (atomicMax on the bits of
// nonnegative doubles), the flags ORs, all reset by the watch each step; ||E||_F^2 is summed
// by the watch from the blocks' slots.
struct RefineState {
  double previous_off;
  double off, off_r, scale;
  int steps, evaluations;
  int active;        // needs another evaluation
  int apply;         // this step's correction is applied
  int fell_back;     // too far off: decomposed by cuSOLVER instead
  int coupled;       // eigenvalues that mixed (the CPU separates them in place; here: cuSOLVER)
  int higher_order;  // a pair outside the first-order regime got E_ij = r_ij / 2
  int nonfinite;
};

__global__ void refine_reset_kernel(RefineState* rs, const int* warm, int64_t count) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < count) rs[b] = RefineState{INFINITY, 0, 0, 0, 0, 0, warm[b], 0, !warm[b], 0, 0, 0};
}

// d_i = s_ii / (1 - r_ii) and max |d|, a block per matrix.
template <class T>
__global__ void refine_eigenvalues_kernel(const T* s, const T* r, T* d, RefineState* rs, int64_t n, int64_t count) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    double local = 0;
    bool finite = true;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const T di = T(double(s[b * n * n + i * n + i]) / (1 - double(r[b * n * n + i * n + i])));
      d[b * n + i] = di;
      finite &= fabs(double(di)) <= DBL_MAX;
      local = fmax(local, fabs(double(di)));
    }
    if (!finite) rs[b].nonfinite = 1;
    block_max_into(finite ? local : 0.0, &rs[b].scale);
  }
}

// E (column-major, E(i, j) at j n + i) and the step's reductions, as in refine_eigenbasis;
// this block's share of ||E||_F^2 goes to its slot, correction2[b * gridDim.x + blockIdx.x].
template <class T>
__global__ void refine_correction_kernel(const T* s, const T* r, const T* d, T* e, RefineState* rs,
                                         double* correction2, int64_t n, int64_t count, double floor_r) {
  constexpr double coupled_ratio = 0.1;
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    const double floor_s = floor_r * rs[b].scale;
    double off = 0, off_r = 0, e2 = 0;
    bool coupled = false, higher = false, finite = true;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
      const double dj = d[b * n + j];
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const int64_t at = b * n * n + j * n + i;
        const double sij = s[at], rij = r[at], di = d[b * n + i], gap = dj - di;
        finite &= fabs(sij) <= DBL_MAX && fabs(rij) <= DBL_MAX;
        const double coupling = fabs(sij) + fmax(fabs(di), fabs(dj)) * fabs(rij);
        const bool first_order = i != j && gap != 0 && coupling <= coupled_ratio * fabs(gap);
        const T eij = T(first_order ? (sij + dj * rij) / gap : rij / 2);
        e[at] = eij;
        e2 += double(eij) * double(eij);
        if (i != j) {
          off = fmax(off, fabs(sij));
          coupled |= fabs(sij) > floor_s && fabs(sij) > coupled_ratio * fabs(gap);
          higher |= !first_order;
        }
        off_r = fmax(off_r, fabs(rij));
      }
    }
    if (!finite) rs[b].nonfinite = 1;
    if (coupled) rs[b].coupled = 1;
    if (higher) rs[b].higher_order = 1;
    block_max_into(finite ? off : 0.0, &rs[b].off);
    block_max_into(finite ? off_r : 0.0, &rs[b].off_r);
    const double total = cuda::block_sum(e2);
    if (threadIdx.x == 0) correction2[b * gridDim.x + blockIdx.x] = total;
  }
}

// The decisions of refine_eigenbasis per matrix; counts the matrices that need another
// evaluation. A correction with ||E||_F^2 <= u in the first-order regime is applied and ends
// the refinement (its S and R are at rounding level unseen).
__global__ void refine_watch_kernel(RefineState* rs, const double* correction2, int slots, int64_t count,
                                    double floor_r, double unit, int max_steps, int* active) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= count) return;
  RefineState& s = rs[b];
  s.apply = 0;
  if (s.active) {
    ++s.evaluations;
    const double floor_s = floor_r * s.scale;
    if (s.nonfinite || !(s.scale <= DBL_MAX)) {
      s.active = 0;
      s.fell_back = 1;
    } else if (s.off <= floor_s && s.off_r <= floor_r) {
      s.active = 0;
    } else if (s.steps == max_steps || s.off > s.previous_off || s.off_r > 0.25 || s.coupled) {
      s.active = 0;
      s.fell_back = 1;
    } else {
      s.previous_off = s.off;
      ++s.steps;
      s.apply = 1;
      double e2 = 0;  // in slot order
      for (int k = 0; k < slots; ++k) e2 += correction2[b * slots + k];
      if (!s.higher_order && e2 <= unit) s.active = 0;
      else atomicAdd(active, 1);
    }
  }
  s.off = s.off_r = s.scale = 0;
  s.coupled = s.higher_order = s.nonfinite = 0;
}

// E <- 0 for the matrices whose correction is not applied (their V stays bit-identical).
template <class T>
__global__ void refine_mask_kernel(T* e, const RefineState* rs, int64_t n, int64_t count) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    if (rs[b].apply) continue;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x)
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) e[b * n * n + j * n + i] = T(0);
  }
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

template <class T> cudaDataType solver_type() { return std::is_same<T, double>::value ? CUDA_R_64F : CUDA_R_32F; }

// ---- QR-based routines (orthonormalize "qr", SOAP's eigenbasis refresh)

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
__global__ void store_columns_kernel(const T* src, D* dst, int64_t rows, int64_t cols, int64_t count,
                                     const int* info, OnFailure failure) {
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

// ||A||_F^2 per matrix of `size` elements, a block per matrix (Inf or NaN when A is not finite).
template <class T>
__global__ void frobenius2_kernel(const T* a, double* out, int64_t size, int64_t count) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    double local = 0;
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
      const double x = a[b * size + i];
      local += x * x;
    }
    local = cuda::block_sum(local);
    if (threadIdx.x == 0) out[b] = local;
  }
}

// After geqrf: sign(R_jj) per column, and the CPU's verdict (qr_positive in cpu.cpp): LAPACK
// succeeded, A finite, every |R_jj| > m u ||A||_F (full column rank). A block per matrix.
template <class T>
__global__ void qr_signs_kernel(const T* a, T* sign, const int* info, const double* norm2, int* good, int64_t m,
                                int64_t k, int64_t count, double unit) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    const double floor = double(m) * unit * sqrt(norm2[b]);
    bool ok = true;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const double r = a[b * m * k + j * m + j];
      sign[b * k + j] = r < 0 ? T(-1) : T(1);
      ok &= fabs(r) > floor;
    }
    ok = __syncthreads_and(ok);
    if (threadIdx.x == 0) good[b] = ok && info[b] == 0 && norm2[b] <= DBL_MAX;
  }
}

template <class T>
__global__ void apply_signs_kernel(T* a, const T* sign, int64_t m, int64_t k, int64_t count) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y)
    for (int64_t j = blockIdx.x; j < k; j += gridDim.x)
      for (int64_t i = threadIdx.x; i < m; i += blockDim.x) a[b * m * k + j * m + i] *= sign[b * k + j];
}

cusolverStatus_t orgqr_buffer_size(cusolverDnHandle_t h, int m, int k, const float* a, const float* tau, int* lwork) {
  return cusolverDnSorgqr_bufferSize(h, m, k, k, a, m, tau, lwork);
}
cusolverStatus_t orgqr_buffer_size(cusolverDnHandle_t h, int m, int k, const double* a, const double* tau, int* lwork) {
  return cusolverDnDorgqr_bufferSize(h, m, k, k, a, m, tau, lwork);
}
cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int k, float* a, const float* tau, float* work, int lwork,
                       int* info) {
  return cusolverDnSorgqr(h, m, k, k, a, m, tau, work, lwork, info);
}
cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int k, double* a, const double* tau, double* work, int lwork,
                       int* info) {
  return cusolverDnDorgqr(h, m, k, k, a, m, tau, work, lwork, info);
}

// Householder QR of each column-major m x k matrix (m >= k) in place, keeping Q with column j
// multiplied by sign(R_jj): the Gram-Schmidt basis, continuous in the input. Per matrix (on
// the host): whether it succeeded with full column rank. cuSOLVER has no batched QR for
// general sizes: one geqrf and one orgqr call per matrix, all queued on the stream.
template <class T>
std::vector<bool> qr_positive(cudaStream_t stream, T* a, int64_t m, int64_t k, int64_t count) {
  std::vector<bool> ok(static_cast<size_t>(count));
  if (count == 0) return ok;
  CK_CHECK_VALUE(m * k <= INT32_MAX, "argument 'Q': a ", m, " x ", k, " matrix is too large for cuSOLVER's QR");
  const cudaDataType t = solver_type<T>();
  const int64_t mk = m * k;
  DeviceBuffer tau(sizeof(T) * size_t(count * k), stream), sign(sizeof(T) * size_t(count * k), stream),
      info(sizeof(int) * size_t(2 * count), stream), norm2(sizeof(double) * size_t(count), stream),
      good(sizeof(int) * size_t(count), stream);
  frobenius2_kernel<<<unsigned(std::min<int64_t>(count, 65535)), kThreads, 0, stream>>>(a, norm2.as<double>(), mk,
                                                                                        count);
  CK_CUDA_CHECK(cudaGetLastError());
  cusolverDnHandle_t handle = cusolver_handle(stream);
  const SolverParams params;
  size_t device_bytes = 0, host_bytes = 0;
  CK_CUSOLVER_CHECK(cusolverDnXgeqrf_bufferSize(handle, params, m, k, t, a, m, t, tau.as<T>(), t, &device_bytes,
                                                &host_bytes));
  int lwork = 0;
  CK_CUSOLVER_CHECK(orgqr_buffer_size(handle, int(m), int(k), a, tau.as<T>(), &lwork));
  DeviceBuffer work(std::max(device_bytes, sizeof(T) * size_t(lwork)), stream);
  std::vector<char> host(host_bytes);
  int* infos = info.as<int>();
  for (int64_t b = 0; b < count; ++b)
    CK_CUSOLVER_CHECK(cusolverDnXgeqrf(handle, params, m, k, t, a + b * mk, m, t, tau.as<T>() + b * k, t,
                                       work.as<void>(), device_bytes, host.data(), host_bytes, infos + b));
  qr_signs_kernel<<<unsigned(std::min<int64_t>(count, 65535)), kThreads, 0, stream>>>(
      a, sign.as<T>(), infos, norm2.as<double>(), good.as<int>(), m, k, count, unit_roundoff<T>());
  CK_CUDA_CHECK(cudaGetLastError());
  for (int64_t b = 0; b < count; ++b)
    CK_CUSOLVER_CHECK(orgqr(handle, int(m), int(k), a + b * mk, tau.as<T>() + b * k, work.as<T>(), lwork,
                            infos + count + b));
  apply_signs_kernel<<<matrix_grid(k, count, 1024), kThreads, 0, stream>>>(a, sign.as<T>(), m, k, count);
  CK_CUDA_CHECK(cudaGetLastError());
  std::vector<int> flags(static_cast<size_t>(2 * count));
  std::vector<int> verdict(static_cast<size_t>(count));
  CK_CUDA_CHECK(cudaMemcpyAsync(flags.data(), infos, sizeof(int) * flags.size(), cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaMemcpyAsync(verdict.data(), good.as<int>(), sizeof(int) * verdict.size(), cudaMemcpyDeviceToHost,
                                stream));
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));  // also keeps the host workspace alive long enough
  for (int64_t b = 0; b < count; ++b) ok[size_t(b)] = verdict[size_t(b)] && flags[size_t(count + b)] == 0;
  return ok;
}

// d_j = q_j . (A Q)_j per column (column-major n x k each), a block per (column, matrix).
template <class T>
__global__ void column_dots_kernel(const T* q, const T* aq, double* d, int64_t n, int64_t k, int64_t count) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y)
    for (int64_t j = blockIdx.x; j < k; j += gridDim.x) {
      double local = 0;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        local += double(q[b * n * k + j * n + i]) * double(aq[b * n * k + j * n + i]);
      local = cuda::block_sum(local);
      if (threadIdx.x == 0) d[b * k + j] = local;
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
    store_columns_kernel<<<matrix_grid(cols, count, 1024), kThreads, 0, stream>>>(src, out.ptr<D>(), rows, cols,
                                                                                  count, info, failure);
  });
  CK_CUDA_CHECK(cudaGetLastError());
}

// ---- host side

template <class T> constexpr DType dtype_of() { return std::is_same<T, double>::value ? DType::float64() : DType::float32(); }

// fn(double()) for float64 data, fn(float()) for every other dtype: the compute type.
template <class F>
void with_compute_type(DType dtype, F&& fn) {
  if (dtype == DType::float64()) fn(double());
  else fn(float());
}

// One input's matrices (or one matrix of it, for fallbacks) within a group.
struct Segment {
  ArrayView a, out;
  const ArrayView* init;   // null: cold start
  const ArrayView* basis;  // eigh: a basis to refine (written back), or null
  RootStatus* status;      // count entries
  int64_t count;
};

int64_t matrices_in(const ArrayView& a) { return a.size(-1) ? leading_count(a) : 0; }

// Matrix b of a C-contiguous (..., n, n) stack, as a (1, n, n) view.
ArrayView matrix_view(const ArrayView& a, int64_t b) {
  const int64_t n = a.size(-1);
  ArrayView v = a;
  v.data = static_cast<char*>(a.data) + b * n * n * a.dtype.itemsize();
  v.shape = {1, n, n};
  v.strides = {n * n, n, 1};
  return v;
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

// cuSOLVER's batched syev on a contiguous stack (column-major, eigenvectors overwrite a,
// eigenvalues ascending in w, info per matrix), in chunks within its 32-bit size limit.
template <class T>
void syev_batched(cudaStream_t stream, T* a, T* w, int* info, int64_t n, int64_t count) {
  CK_CHECK_VALUE(n * n <= INT32_MAX, "argument 'A': matrix dimension ", n, " is too large for cuSOLVER's eigh");
  const int64_t chunk = std::max<int64_t>(1, INT32_MAX / (n * n));
  const cudaDataType t = solver_type<T>();
  cusolverDnHandle_t handle = cusolver_handle(stream);
  const SolverParams params;
  for (int64_t start = 0; start < count; start += chunk) {
    const int64_t batch = std::min(chunk, count - start);
    T* ab = a + start * n * n;
    T* wb = w + start * n;
    size_t device_bytes = 0, host_bytes = 0;
    CK_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(handle, params, CUSOLVER_EIG_MODE_VECTOR,
                                                        CUBLAS_FILL_MODE_LOWER, n, t, ab, n, t, wb, t, &device_bytes,
                                                        &host_bytes, batch));
    DeviceBuffer work(device_bytes, stream);
    std::vector<char> host(host_bytes);
    CK_CUSOLVER_CHECK(cusolverDnXsyevBatched(handle, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, t,
                                             ab, n, t, wb, t, work.as<void>(), device_bytes, host.data(), host_bytes,
                                             info + start, batch));
    if (host_bytes) CK_CUDA_CHECK(cudaStreamSynchronize(stream));  // the host workspace must outlive the call
  }
}

// Eigenpairs of `count` symmetric n x n matrices a (column-major, not modified): eigenvalues
// ascending in w, eigenvectors in v's columns, info per matrix (device, nonzero: cuSOLVER
// failed). Where warm[b], v holds a basis to refine on the device first (at most
// kMaxRefineSteps steps; eigenvalues that mixed send the matrix to cuSOLVER, where the CPU
// separates them in place); the others, and the refinements that fail, go to cuSOLVER's syev
// (gathered into one batch). Per matrix on the host: refinement steps (-1: syev), whether a
// refinement fell back, and the products spent (a symmetric product counts its fraction).
struct EigenpairsInfo {
  std::vector<int> steps;
  std::vector<char> fell_back;
  std::vector<double> products;
};

constexpr int kMaxRefineSteps = 8;  // as on the CPU

template <class T>
EigenpairsInfo eigenpairs(cudaStream_t stream, const T* a, T* v, T* w, int* info, const std::vector<char>& warm,
                          int64_t n, int64_t count) {
  const int64_t nn = n * n;
  const int ni = int(n);
  const size_t bytes = size_t(count * nn) * sizeof(T);
  EigenpairsInfo out{std::vector<int>(size_t(count), -1), std::vector<char>(size_t(count), 0),
                     std::vector<double>(size_t(count), 0.0)};
  CK_CUDA_CHECK(cudaMemsetAsync(info, 0, sizeof(int) * size_t(count), stream));
  const bool any_warm = std::any_of(warm.begin(), warm.end(), [](char c) { return c != 0; });
  std::vector<int64_t> decompose;  // matrices for cuSOLVER
  if (any_warm) {
    const double f = cuda::symmetric_product_fraction(ni);
    const double floor_r = 4 * std::sqrt(double(n)) * unit_roundoff<T>();
    DeviceBuffer av(bytes, stream), sm(bytes, stream), rm(bytes, stream), em(bytes, stream), v0(bytes, stream),
        flags(sizeof(int) * size_t(count), stream), states(sizeof(RefineState) * size_t(count) + sizeof(int), stream);
    RefineState* rs = states.as<RefineState>();
    int* active = reinterpret_cast<int*>(rs + count);
    std::vector<int> warm_int(warm.begin(), warm.end());
    cuda::copy_to_device(stream, flags.as<void>(), warm_int.data(), sizeof(int) * warm_int.size());
    const unsigned per_state = unsigned((count + 127) / 128);
    refine_reset_kernel<<<per_state, 128, 0, stream>>>(rs, flags.as<int>(), count);
    CK_CUDA_CHECK(cudaGetLastError());
    const DType dt = dtype_of<T>();
    const Stack sa{const_cast<T*>(a), n, nn}, sv{v, n, nn}, sav{av.as<T>(), n, nn}, ss{sm.as<T>(), n, nn},
        sr{rm.as<T>(), n, nn}, se{em.as<T>(), n, nn}, sv0{v0.as<T>(), n, nn};
    const dim3 elements = matrix_grid(n, count, 1024), reduce = matrix_grid(n, count, 32);
    DeviceBuffer correction2(sizeof(double) * reduce.x * size_t(count), stream);  // slots of ||E||_F^2
    for (int it = 0;; ++it) {
      cuda::gemm(stream, dt, Op::N, Op::N, ni, ni, ni, 1.0, sa, sv, 0.0, sav, count);               // A V
      // S = V^T A V and -V^T V, then mirrored even where symmetric_product runs one plain product:
      // E_ij + E_ji = r_ij needs s_ij = s_ji to the last bit (refine_eigenbasis in cpu.cpp)
      cuda::symmetric_product(stream, dt, Op::T, Op::N, ni, ni, 1.0, sv, sav, 0.0, ss, count, false);
      cuda::symmetric_product(stream, dt, Op::T, Op::N, ni, ni, -1.0, sv, sv, 0.0, sr, count, false);
      cuda::mirror_lower(stream, dt, ss, ni, count);
      cuda::mirror_lower(stream, dt, sr, ni, count);
      cuda::scale_add_identity(stream, dt, sr, sr, ni, count, 1.0, 1.0);                          // I - V^T V
      refine_eigenvalues_kernel<<<unsigned(std::min<int64_t>(count, 65535)), kThreads, 0, stream>>>(
          sm.as<T>(), rm.as<T>(), w, rs, n, count);
      refine_correction_kernel<<<reduce, kThreads, 0, stream>>>(sm.as<T>(), rm.as<T>(), w, em.as<T>(), rs,
                                                               correction2.as<double>(), n, count, floor_r);
      CK_CUDA_CHECK(cudaMemsetAsync(active, 0, sizeof(int), stream));
      refine_watch_kernel<<<per_state, 128, 0, stream>>>(rs, correction2.as<double>(), int(reduce.x), count, floor_r,
                                                         unit_roundoff<T>(), kMaxRefineSteps, active);
      refine_mask_kernel<<<elements, kThreads, 0, stream>>>(em.as<T>(), rs, n, count);
      CK_CUDA_CHECK(cudaGetLastError());
      CK_CUDA_CHECK(cudaMemcpyAsync(v0.as<void>(), v, bytes, cudaMemcpyDeviceToDevice, stream));
      cuda::gemm(stream, dt, Op::N, Op::N, ni, ni, ni, 1.0, sv0, se, 1.0, sv, count);  // V <- V + V E
      // the host looks every 4 steps
      if ((it % 4 == 3 || it >= kMaxRefineSteps) && cuda::read_counter(stream, active) == 0) break;
    }
    const std::vector<RefineState> host = cuda::copy_to_host(stream, rs, count);
    for (int64_t b = 0; b < count; ++b) {
      const RefineState& h = host[size_t(b)];
      if (!warm[size_t(b)]) continue;
      out.products[size_t(b)] = h.evaluations * (1 + 2 * f) + h.steps;
      out.fell_back[size_t(b)] = char(h.fell_back);
      if (!h.fell_back) out.steps[size_t(b)] = h.steps;
    }
  }
  for (int64_t b = 0; b < count; ++b)
    if (out.steps[size_t(b)] < 0) decompose.push_back(b);
  if (int64_t(decompose.size()) == count) {  // all of them: cuSOLVER in place
    CK_CUDA_CHECK(cudaMemcpyAsync(v, a, bytes, cudaMemcpyDeviceToDevice, stream));
    syev_batched(stream, v, w, info, n, count);
  } else if (!decompose.empty()) {  // cuSOLVER for the rest, gathered into one batch
    const int64_t k = int64_t(decompose.size());
    DeviceBuffer g(sizeof(T) * size_t(k * nn), stream), gw(sizeof(T) * size_t(k * n), stream),
        gi(sizeof(int) * size_t(k), stream);
    for (int64_t q = 0; q < k; ++q)
      CK_CUDA_CHECK(cudaMemcpyAsync(g.as<T>() + q * nn, a + decompose[size_t(q)] * nn, sizeof(T) * size_t(nn),
                                    cudaMemcpyDeviceToDevice, stream));
    syev_batched(stream, g.as<T>(), gw.as<T>(), gi.as<int>(), n, k);
    for (int64_t q = 0; q < k; ++q) {
      const int64_t b = decompose[size_t(q)];
      CK_CUDA_CHECK(cudaMemcpyAsync(v + b * nn, g.as<T>() + q * nn, sizeof(T) * size_t(nn), cudaMemcpyDeviceToDevice,
                                    stream));
      CK_CUDA_CHECK(cudaMemcpyAsync(w + b * n, gw.as<T>() + q * n, sizeof(T) * size_t(n), cudaMemcpyDeviceToDevice,
                                    stream));
      CK_CUDA_CHECK(cudaMemcpyAsync(info + b, gi.as<int>() + q, sizeof(int), cudaMemcpyDeviceToDevice, stream));
    }
  }
  if (any_warm) {  // refined eigenpairs come unsorted: ascending, eigenvectors alike
    DeviceBuffer order(sizeof(int64_t) * size_t(count * n), stream), sorted(sizeof(T) * size_t(count * n), stream),
        vs(bytes, stream);
    sort_kernel<<<unsigned(std::min<int64_t>(count, 65535)), kThreads, 0, stream>>>(
        w, order.as<int64_t>(), sorted.as<T>(), n, count, false);
    permute_columns_kernel<<<matrix_grid(n, count, 1024), kThreads, 0, stream>>>(v, vs.as<T>(), order.as<int64_t>(),
                                                                                n, n, count);
    CK_CUDA_CHECK(cudaGetLastError());
    CK_CUDA_CHECK(cudaMemcpyAsync(v, vs.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream));
    CK_CUDA_CHECK(cudaMemcpyAsync(w, sorted.as<void>(), sizeof(T) * size_t(count * n), cudaMemcpyDeviceToDevice,
                                  stream));
  }
  return out;
}

// One group: matrices of size n computed in T, from every segment, written to the segments'
// outputs with their statuses (before the failure policy, which the caller applies).
template <class T>
void run_group(int64_t n, const std::vector<Segment>& segments, const RootOptions& o, cudaStream_t stream) {
  int64_t count = 0;
  for (const Segment& s : segments) count += s.count;
  const int64_t nn = n * n;
  const size_t bytes = size_t(count * nn) * sizeof(T);
  const bool newton = o.method == RootMethod::Newton;
  DeviceBuffer a(bytes, stream), x(bytes, stream), m(bytes, stream), s0(bytes, stream), s1(bytes, stream),
      s2(bytes, stream), s3(newton ? bytes : 0, stream), s4(newton ? bytes : 0, stream),
      stats(sizeof(MatrixStats) * size_t(count), stream), state(sizeof(RootState) * size_t(count) + sizeof(int), stream),
      vectors(sizeof(T) * size_t(count) * 2 * size_t(n) + sizeof(double) * size_t(count), stream);
  RootState* st = state.as<RootState>();
  int* active = reinterpret_cast<int*>(st + count);
  const dim3 elements = matrix_grid(n, count, 1024), reduce = matrix_grid(n, count, 32);
  const unsigned per_state = unsigned((count + 127) / 128);
  reset_states_kernel<<<per_state, 128, 0, stream>>>(st, count);
  CK_CUDA_CHECK(cudaGetLastError());

  // A_r = (A + A^T)/2 + eps I; warm starts into X.
  bool any_warm = false;
  int64_t first = 0;
  for (const Segment& s : segments) {
    cuda::load_symmetric(stream, s.a, a.as<T>() + first * nn, stats.as<MatrixStats>() + first);
    if (s.init && newton) {
      DeviceBuffer init_stats(sizeof(MatrixStats) * size_t(s.count), stream);
      cuda::load_symmetric(stream, *s.init, x.as<T>() + first * nn, init_stats.as<MatrixStats>());
      any_warm = true;
    }
    first += s.count;
  }
  const int ni = int(n);
  const Stack stack_a{a.as<void>(), n, nn};
  cuda::scale_add_identity(stream, dtype_of<T>(), stack_a, stack_a, ni, count, 1.0, o.eps);
  const Products<T> products{stream, ni, count, !any_warm};
  T* xp = x.as<T>();
  T* mp = m.as<T>();
  EigenpairsInfo refined;
  DeviceBuffer info(newton ? 0 : sizeof(int) * size_t(count), stream);

  if (newton) {
    // Largest-eigenvalue estimate: 10 power steps from the normalized ones vector.
    T* v = vectors.as<T>();
    T* u = v + count * n;
    double* rayleigh = reinterpret_cast<double*>(u + count * n);
    fill_kernel<<<grid_for(count * n, kThreads), kThreads, 0, stream>>>(v, count * n, T(1.0 / std::sqrt(double(n))));
    CK_CUDA_CHECK(cudaGetLastError());
    for (int k = 0; k < 10; ++k) {
      cuda::gemm(stream, dtype_of<T>(), Op::N, Op::N, ni, 1, ni, 1.0, stack_a, {v, n, n}, 0.0, {u, n, n}, count);
      power_normalize_kernel<<<unsigned(std::min<int64_t>(count, 65535)), kThreads, 0, stream>>>(u, v, rayleigh, n,
                                                                                                 count);
      CK_CUDA_CHECK(cudaGetLastError());
    }
    first = 0;
    for (const Segment& s : segments) {
      const int64_t off = first * nn;
      newton_start_kernel<<<matrix_grid(n, s.count, 1024), kThreads, 0, stream>>>(
          a.as<T>() + off, xp + off, mp + off, st + first, rayleigh + first, stats.as<MatrixStats>() + first, n,
          s.count, o.p, o.eps, s.init != nullptr);
      CK_CUDA_CHECK(cudaGetLastError());
      first += s.count;
    }
    T* scratch[3] = {s0.as<T>(), s1.as<T>(), s2.as<T>()};
    T* previous = s3.as<T>();
    T* mprime = s4.as<T>();
    if (any_warm) {  // M_0 = X_0^p A_r (z A_r up to rounding for the cold matrices)
      T* power = products.power(xp, o.p, scratch);
      products.multiply(power, a.as<T>(), mp, false);
    }
    const double unit = unit_roundoff<T>(), stop = 10 * std::sqrt(double(n)) * unit;
    for (int it = 0;; ++it) {
      identity_distance_kernel<<<reduce, kThreads, 0, stream>>>(mp, st, n, count, false);
      CK_CUDA_CHECK(cudaMemsetAsync(active, 0, sizeof(int), stream));
      newton_watch_kernel<<<per_state, 128, 0, stream>>>(st, count, stop, std::sqrt(unit), o.max_iters, active);
      revert_kernel<<<elements, kThreads, 0, stream>>>(xp, previous, st, n, count);
      CK_CUDA_CHECK(cudaGetLastError());
      // the host looks every 4 steps, not every step
      if ((it % 4 == 3 || it >= o.max_iters) && cuda::read_counter(stream, active) == 0) break;
      newton_step_kernel<<<elements, kThreads, 0, stream>>>(mp, mprime, st, n, count, o.p);
      CK_CUDA_CHECK(cudaGetLastError());
      products.multiply(xp, mprime, previous, true);  // X <- X M'
      std::swap(xp, previous);
      T* power = products.power(mprime, o.p, scratch);  // M <- M'^p M
      T* next = power == scratch[0] ? scratch[1] : scratch[0];
      products.multiply(power, mp, next, true);
      // the buffers of M and of the new M trade places
      for (T*& q : scratch)
        if (q == next) q = mp;
      mp = next;
    }
  } else {
    // Eigh: V D with D = diag(lambda^(-1/(2p))) from the eigenpairs of A (eps taken back out,
    // then applied after flooring, as on the CPU), X = (V D)(V D)^T. Bases are refined.
    T* v = s0.as<T>();
    T* w = vectors.as<T>();
    T* plain = s1.as<T>();
    cuda::scale_add_identity(stream, dtype_of<T>(), stack_a, {plain, n, nn}, ni, count, 1.0, -o.eps);
    std::vector<char> warm(size_t(count), 0);
    first = 0;
    for (const Segment& s : segments) {
      if (s.basis) {
        load_columns(stream, *s.basis, v + first * nn, n, n, s.count);
        std::fill(warm.begin() + first, warm.begin() + first + s.count, 1);
      }
      first += s.count;
    }
    refined = eigenpairs(stream, plain, v, w, info.as<int>(), warm, n, count);
    finite_verdict_kernel<<<unsigned(std::min<int64_t>(count, 65535)), kThreads, 0, stream>>>(v, w, info.as<int>(), n,
                                                                                             count);
    first = 0;
    for (const Segment& s : segments) {
      if (s.basis)  // a failed decomposition leaves the caller's basis as it was, as on the CPU
        store_columns(stream, v + first * nn, *s.basis, n, n, s.count, info.as<int>() + first, OnFailure::Skip);
      first += s.count;
    }
    eigen_scale_kernel<<<elements, kThreads, 0, stream>>>(v, w, info.as<int>(), st, n, count, o.p, o.eps,
                                                          unit_roundoff<T>());
    CK_CUDA_CHECK(cudaGetLastError());
    cuda::symmetric_product(stream, dtype_of<T>(), Op::N, Op::T, ni, ni, 1.0, {v, n, nn}, {v, n, nn}, 0.0,
                            {xp, n, nn}, count);
  }

  symmetrize_kernel<<<elements, kThreads, 0, stream>>>(xp, st, n, count);
  CK_CUDA_CHECK(cudaGetLastError());
  if (newton || o.compute_residual) {  // max|X^p A_r - I|
    T* scratch[3] = {s0.as<T>(), s1.as<T>(), s2.as<T>()};  // free now (M is no longer needed)
    T* power = products.power(xp, o.p, scratch);
    T* product = power == scratch[2] ? scratch[1] : scratch[2];
    products.multiply(power, a.as<T>(), product, false);
    identity_distance_kernel<<<reduce, kThreads, 0, stream>>>(product, st, n, count, true);
    CK_CUDA_CHECK(cudaGetLastError());
  }
  first = 0;
  for (const Segment& s : segments) {
    CK_DISPATCH_FLOATING(s.out.dtype, "out", D, [&] {
      store_matrices_kernel<<<matrix_grid(n, s.count, 1024), kThreads, 0, stream>>>(
          xp + first * nn, s.out.ptr<D>(), st + first, n, s.count, false);
    });
    CK_CUDA_CHECK(cudaGetLastError());
    first += s.count;
  }

  // Products per matrix, as on the CPU; a symmetric product counts its fraction of a plain one.
  const double f = products.symmetric ? cuda::symmetric_product_fraction(ni) : 1.0, powers = power_products(o.p);
  const double residual_products = newton ? powers * f + 1 : 0.0;  // eigh's is information, not counted
  const double start_products = newton ? (any_warm ? powers * f + 1 : 0.0) : cuda::symmetric_product_fraction(ni);
  const std::vector<RootState> host = cuda::copy_to_host(stream, st, count);
  first = 0;
  for (const Segment& s : segments) {
    for (int64_t b = 0; b < s.count; ++b) {
      const RootState& h = host[size_t(first + b)];
      RootStatus& status = s.status[b];
      status = RootStatus{};
      status.method = o.method;
      status.iterations = newton ? h.iterations : 0;
      const bool measured = newton || o.compute_residual;
      // a non-finite Newton iterate is not measured (the CPU returns before); eigh's is Inf
      status.residual = !measured ? -1.0 : (h.finite ? h.residual : (newton ? -1.0 : INFINITY));
      status.converged = h.finite && (newton ? h.residual <= o.tol : h.ok);
      status.products = start_products + residual_products + (newton ? h.iterations * (powers + 2) * f : 0.0);
      if (!newton && s.basis) {
        const size_t k = size_t(first + b);
        status.iterations = std::max(refined.steps[k], 0);
        status.fell_back = refined.fell_back[k];
        status.products += refined.products[k];
      }
    }
    first += s.count;
  }
}

// The group's matrices by compute dtype.
void run_group_any(bool f64, int64_t n, const std::vector<Segment>& segments, const RootOptions& o,
                   cudaStream_t stream) {
  if (f64) run_group<double>(n, segments, o, stream);
  else run_group<float>(n, segments, o, stream);
}

// out matrix b <- (init + init^T)/2 (what is kept when everything fails).
void store_init(const ArrayView& init, const ArrayView& out, int64_t b, cudaStream_t stream) {
  const int64_t n = init.size(-1);
  DeviceBuffer x(sizeof(double) * size_t(n * n), stream), stats(sizeof(MatrixStats), stream);
  cuda::load_symmetric(stream, matrix_view(init, b), x.as<double>(), stats.as<MatrixStats>());
  const ArrayView target = matrix_view(out, b);
  CK_DISPATCH_FLOATING(out.dtype, "out", D, [&] {
    store_matrices_kernel<<<matrix_grid(n, 1, 1024), kThreads, 0, stream>>>(x.as<double>(), target.ptr<D>(), nullptr,
                                                                           n, 1, false);
  });
  CK_CUDA_CHECK(cudaGetLastError());
}


}  // namespace

void matrix_inverse_root_cuda(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                              const std::vector<const ArrayView*>& inits, const std::vector<const ArrayView*>& bases,
                              const RootOptions& o, std::vector<std::vector<RootStatus>>& status,
                              StreamHandle stream_handle) {
  status.assign(inputs.size(), {});
  if (inputs.empty()) return;
  CudaDeviceGuard guard(inputs[0].device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);

  // Every input (and init) checked finite and symmetric before anything is written.
  int64_t total = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t n = inputs[i].size(-1);
    CK_CHECK_VALUE(n <= 46340, "argument 'A': matrix dimension ", n, " is too large for one CUDA matrix");
    total += matrices_in(inputs[i]) * (inits[i] ? 2 : 1);
  }
  {
    DeviceBuffer stats(sizeof(MatrixStats) * size_t(total), stream);
    int64_t first = 0;
    for (size_t i = 0; i < inputs.size(); ++i)
      for (const ArrayView* a : {&inputs[i], inits[i]}) {
        if (!a) continue;
        cuda::load_symmetric<double>(stream, *a, nullptr, stats.as<MatrixStats>() + first);
        first += matrices_in(*a);
      }
    const std::vector<MatrixStats> host = cuda::copy_to_host(stream, stats.as<MatrixStats>(), total);
    first = 0;
    for (size_t i = 0; i < inputs.size(); ++i)
      for (const ArrayView* a : {&inputs[i], inits[i]}) {
        if (!a) continue;
        cuda::validate_symmetric(*a, host.data() + first, a == inits[i] ? "init" : "A");
        first += matrices_in(*a);
      }
  }

  // Groups by (n, float64); 0 x 0 matrices have their (empty) root.
  std::map<std::pair<int64_t, bool>, std::vector<Segment>> groups;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t n = inputs[i].size(-1), count = leading_count(inputs[i]);
    RootStatus empty;
    empty.converged = true;
    status[i].assign(size_t(count), n ? RootStatus{} : empty);
    if (n == 0 || count == 0) continue;
    groups[{n, inputs[i].dtype == DType::float64()}].push_back(
        Segment{inputs[i], outputs[i], inits[i], bases[i], status[i].data(), count});
  }
  for (auto& [key, segments] : groups) {
    run_group_any(key.second, key.first, segments, o, stream);
    // The failure policy: Newton failures again by eigh in float64 (without init); what still
    // fails keeps init where given.
    std::vector<Segment> retry;
    for (const Segment& s : segments)
      for (int64_t b = 0; b < s.count; ++b)
        if (!s.status[b].converged && o.method == RootMethod::Newton && o.fallback)
          retry.push_back(Segment{matrix_view(s.a, b), matrix_view(s.out, b), nullptr, nullptr, nullptr, 1});
    std::vector<RootStatus> retried(retry.size());
    for (size_t k = 0; k < retry.size(); ++k) retry[k].status = &retried[k];
    if (!retry.empty()) {
      RootOptions o64 = o;
      o64.method = RootMethod::Eigh;  // the residual reported as the caller asked, as on the CPU
      run_group_any(true, key.first, retry, o64, stream);
    }
    size_t k = 0;
    for (const Segment& s : segments)
      for (int64_t b = 0; b < s.count; ++b) {
        RootStatus& st = s.status[b];
        if (!st.converged && o.method == RootMethod::Newton && o.fallback) {
          RootStatus fallback = retried[k++];
          fallback.iterations = st.iterations;
          fallback.products += st.products;
          fallback.fell_back = true;
          if (fallback.converged || !s.init) {
            st = fallback;
            continue;
          }
        }
        if (!st.converged && s.init) {
          store_init(*s.init, s.out, b, stream);
          st.kept_init = true;
        }
      }
  }
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void eigh_cuda(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& values,
               const std::vector<ArrayView>& vectors, const std::vector<const ArrayView*>& bases,
               std::vector<std::vector<bool>>& ok, std::vector<std::vector<int>>& steps, StreamHandle stream_handle) {
  ok.assign(inputs.size(), {});
  steps.assign(inputs.size(), {});
  if (inputs.empty()) return;
  CudaDeviceGuard guard(inputs[0].device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  for (size_t i = 0; i < inputs.size(); ++i) {
    ok[i].assign(size_t(leading_count(inputs[i])), true);
    steps[i].assign(ok[i].size(), -1);
    const int64_t count = matrices_in(inputs[i]);
    if (count == 0) continue;
    DeviceBuffer stats(sizeof(MatrixStats) * size_t(count), stream);
    cuda::load_symmetric<double>(stream, inputs[i], nullptr, stats.as<MatrixStats>());
    cuda::check_symmetric(stream, inputs[i], stats.as<MatrixStats>(), "A");
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t n = inputs[i].size(-1), count = matrices_in(inputs[i]);
    if (count == 0) continue;
    auto solve = [&](auto tag) {
      using T = decltype(tag);
      DeviceBuffer a(sizeof(T) * size_t(count * n * n), stream), v(sizeof(T) * size_t(count * n * n), stream),
          w(sizeof(T) * size_t(count * n), stream), info(sizeof(int) * size_t(count), stream),
          stats(sizeof(MatrixStats) * size_t(count), stream);
      cuda::load_symmetric(stream, inputs[i], a.as<T>(), stats.as<MatrixStats>());
      if (bases[i]) load_columns(stream, *bases[i], v.as<T>(), n, n, count);
      const EigenpairsInfo refined = eigenpairs(stream, a.as<T>(), v.as<T>(), w.as<T>(), info.as<int>(),
                                                std::vector<char>(size_t(count), bases[i] ? 1 : 0), n, count);
      finite_verdict_kernel<<<unsigned(std::min<int64_t>(count, 65535)), kThreads, 0, stream>>>(
          v.as<T>(), w.as<T>(), info.as<int>(), n, count);
      store_columns(stream, v.as<T>(), vectors[i], n, n, count, info.as<int>(), OnFailure::Zero);
      CK_DISPATCH_FLOATING(values[i].dtype, "out", D, [&] {
        store_values_kernel<<<grid_for(count * n, kThreads), kThreads, 0, stream>>>(w.as<T>(), values[i].ptr<D>(),
                                                                                      info.as<int>(), n, count * n);
      });
      CK_CUDA_CHECK(cudaGetLastError());
      const std::vector<int> host = cuda::copy_to_host(stream, info.as<int>(), count);
      for (int64_t b = 0; b < count; ++b) {
        ok[i][size_t(b)] = host[size_t(b)] == 0;
        steps[i][size_t(b)] = refined.steps[size_t(b)];
      }
    };
    with_compute_type(inputs[i].dtype, solve);
  }
}

namespace {

// Matrices in a (..., m, k) stack of bases (m >= k, checked), with `ok` sized for them.
int64_t bases_in(const ArrayView& q, std::vector<bool>& ok) {
  const int64_t m = q.size(-2), k = q.size(-1), count = m > 0 && k > 0 ? q.numel() / (m * k) : 0;
  CK_CHECK_VALUE(k <= m, "argument 'Q' must have at least as many rows as columns, got ", m, " x ", k);
  ok.assign(size_t(count), true);
  return count;
}

}  // namespace

void orthonormalize_qr_cuda(const ArrayView& q, std::vector<bool>& ok, StreamHandle stream_handle) {
  const int64_t m = q.size(-2), k = q.size(-1), count = bases_in(q, ok);
  if (count == 0) return;
  CudaDeviceGuard guard(q.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  auto solve = [&](auto tag) {
    using T = decltype(tag);
    DeviceBuffer a(sizeof(T) * size_t(count * m * k), stream);
    load_columns(stream, q, a.as<T>(), m, k, count);
    ok = qr_positive(stream, a.as<T>(), m, k, count);
    store_columns(stream, a.as<T>(), q, m, k, count);
    CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  };
  with_compute_type(q.dtype, solve);
}

void eigenbasis_update_cuda(const ArrayView& a_in, const ArrayView& q, const ArrayView& q_out,
                            const ArrayView& estimates, const ArrayView& perm, std::vector<bool>& ok,
                            StreamHandle stream_handle) {
  const int64_t n = q.size(-2), k = q.size(-1), count = bases_in(q, ok);
  if (count == 0) return;
  CudaDeviceGuard guard(q.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  auto solve = [&](auto tag) {
    using T = decltype(tag);
    DeviceBuffer a(sizeof(T) * size_t(count * n * n), stream), qc(sizeof(T) * size_t(count * n * k), stream),
        aq(sizeof(T) * size_t(count * n * k), stream), d(sizeof(double) * size_t(count * k), stream),
        order(sizeof(int64_t) * size_t(count * k), stream), stats(sizeof(MatrixStats) * size_t(count), stream);
    cuda::load_symmetric(stream, a_in, a.as<T>(), stats.as<MatrixStats>());
    cuda::check_symmetric(stream, a_in, stats.as<MatrixStats>(), "A");
    load_columns(stream, q, qc.as<T>(), n, k, count);
    cuda::gemm(stream, dtype_of<T>(), Op::N, Op::N, int(n), int(k), int(n), 1.0, {a.as<T>(), n, n * n},
               {qc.as<T>(), n, n * k}, 0.0, {aq.as<T>(), n, n * k}, count);  // A Q
    column_dots_kernel<<<matrix_grid(k, count, 1024), kThreads, 0, stream>>>(qc.as<T>(), aq.as<T>(), d.as<double>(),
                                                                            n, k, count);
    CK_CUDA_CHECK(cudaGetLastError());
    CK_DISPATCH_FLOATING(estimates.dtype, "out", D, [&] {
      sort_kernel<<<unsigned(std::min<int64_t>(count, 65535)), kThreads, 0, stream>>>(
          d.as<double>(), order.as<int64_t>(), estimates.ptr<D>(), k, count, true);
    });
    permute_columns_kernel<<<matrix_grid(k, count, 1024), kThreads, 0, stream>>>(aq.as<T>(), qc.as<T>(),
                                                                                order.as<int64_t>(), n, k, count);
    CK_CUDA_CHECK(cudaGetLastError());
    ok = qr_positive(stream, qc.as<T>(), n, k, count);
    store_columns(stream, qc.as<T>(), q_out, n, k, count);
    CK_CUDA_CHECK(cudaMemcpyAsync(perm.data, order.as<int64_t>(), sizeof(int64_t) * size_t(count * k),
                                  cudaMemcpyDeviceToHost, stream));
    CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  };
  with_compute_type(q.dtype, solve);
}

}  // namespace curvkit
