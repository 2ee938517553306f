// Inverse roots on CUDA (matrix_inverse_root_cuda).
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
// Eigh: cuSOLVER's batched syev (or a warm-start basis refined on the device: cuda_eigh.cu), the
// eigenvalues floored and shifted as on the CPU, the root rebuilt as (V D)(V D)^T with the
// symmetric product. The failure policy is the CPU's (inverse_root.h): float64 eigh for Newton
// failures, then init. The stopping rules and thresholds are the CPU's, from core/numerics.h.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <map>
#include <vector>

#include "core/interrupt.h"
#include "inverse_root/cuda_kernels.cuh"

namespace curvkit {
namespace {

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
  int ok;           // eigh: decomposed
  int unresolved;   // eigh: eigenvalues at or below numerics::singular_level
  double negative;  // eigh: numerics::negative_ratio, the eigenvalues floored to 0
};

__global__ void reset_states_kernel(RootState* st, int64_t count) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < count) st[b] = RootState{INFINITY, 0.0, 0.0, 0, 0, 0, 1, 1, 0, 0.0};
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
    const double lambda = numerics::newton_lambda(bound, rayleigh[b]);
    const bool good = warm || (lambda > 0 && lambda <= DBL_MAX);
    const double z = good && !warm ? numerics::newton_scale(p, lambda) : 0.0;
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

// max|M - I| per matrix into the state's distance (or residual); NaN and Inf count as Inf (the
// Frobenius distance of the sign iterations is identity_sum_squares_kernel in newton_schulz).
template <class T>
__global__ void identity_max_kernel(const T* m, RootState* st, int64_t n, int64_t count, bool residual) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    double local = 0;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
      const T* col = m + b * n * n + j * n;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        local = fmax(local, numerics::identity_gap(double(col[i]), i == j));
    }
    block_max_into(local, residual ? &st[b].residual : &st[b].distance);
  }
}

// The CPU's stopping rule per matrix (root_newton in cpu.cpp, numerics::newton_root_stops): stop
// at rounding level (`stop`), when the error stalls once small, at max_iters, or when it grows by
// more than 1.2x in the convergent region (then the previous iterate is restored); also when M
// is no longer finite, and then X counts as not finite (the CPU iterates on until X is NaN:
// stored as zeros either way). Counts the matrices that go on.
__global__ void newton_watch_kernel(RootState* st, int64_t count, double stop, double unit, int max_iters,
                                    int* active) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= count) return;
  RootState& s = st[b];
  if (s.revert == 1) s.revert = 2;
  if (s.active) {
    const double r = s.distance;
    if (numerics::error_grew(r, s.previous, s.iterations)) {
      s.active = 0;
      s.revert = 1;
    } else if (!(r <= DBL_MAX)) {
      s.active = 0;
      s.finite = 0;
    } else if (numerics::newton_root_stops(r, s.previous, stop, unit, s.iterations, max_iters)) {
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

// Eigenvectors (columns of v) scaled by numerics::eigen_factor (the floor, eps, the
// pseudo-inverse of unridged zeros), and the floor's report and verdict, as on the CPU
// (root_from_eigenpairs). A
// failed decomposition (info: cuSOLVER's, or finite_verdict_kernel's) gives V = 0, so X = 0, as
// the CPU leaves it (root_eigh).
template <class T>
__global__ void eigen_scale_kernel(T* v, const T* w, const int* info, RootState* st, int64_t n, int64_t count, int p,
                                   double eps, double unit) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    const T* wb = w + b * n;
    const bool decomposed = info[b] == 0;
    const double w_min = double(wb[0]), w_max = double(wb[n - 1]);
    const double level = numerics::singular_level(n, unit, fmax(w_max, 0.0), eps);
    const double negative = decomposed ? numerics::negative_ratio(w_min, w_max) : 0.0;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
      const double w_j = double(wb[j]);
      if (threadIdx.x == 0 && decomposed && numerics::floored_eigenvalue(w_j, eps) <= level)
        atomicAdd(&st[b].unresolved, 1);
      const double s = numerics::eigen_factor(w_j, eps, level, p);
      T* col = v + b * n * n + j * n;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) col[i] = decomposed ? T(double(col[i]) * s) : T(0);
    }
    if (threadIdx.x == 0 && blockIdx.x == 0) {
      st[b].negative = negative;
      if (!decomposed || numerics::clearly_indefinite(negative)) st[b].ok = 0;
    }
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

// ---- host side

// One input's matrices (or one matrix of it, for fallbacks) within a group.
struct Segment {
  ArrayView a, out;
  const ArrayView* init;   // null: cold start
  const ArrayView* basis;  // eigh: a basis to refine (written back), or null
  RootStatus* status;      // count entries
  int64_t count;
};

// Matrix b of a C-contiguous (..., n, n) stack, as a (1, n, n) view.
ArrayView matrix_view(const ArrayView& a, int64_t b) {
  const int64_t n = a.size(-1);
  ArrayView v = a;
  v.data = static_cast<char*>(a.data) + b * n * n * a.dtype.itemsize();
  v.shape = {1, n, n};
  v.strides = {n * n, n, 1};
  return v;
}

int64_t matrices_of(const std::vector<Segment>& segments) {
  int64_t count = 0;
  for (const Segment& s : segments) count += s.count;
  return count;
}

// One group: matrices of size n computed in T, from every segment, written to the segments'
// outputs with their statuses (before the failure policy, which the caller applies). run() takes
// the steps in order: load, Newton or Eigh, the verdict, the store, the statuses.
template <class T>
class RootGroup {
 public:
  RootGroup(int64_t n, const std::vector<Segment>& segments, const RootOptions& o, cudaStream_t stream)
      : segments_(segments),
        o_(o),
        stream_(stream),
        n_(n),
        nn_(n * n),
        count_(matrices_of(segments)),
        ni_(int(n)),
        newton_(o.method == RootMethod::Newton),
        bytes_(size_t(count_ * nn_) * sizeof(T)),
        a_(bytes_, stream),
        x_(bytes_, stream),
        m_(bytes_, stream),
        s0_(bytes_, stream),
        s1_(bytes_, stream),
        s2_(bytes_, stream),
        s3_(newton_ ? bytes_ : 0, stream),
        s4_(newton_ ? bytes_ : 0, stream),
        stats_(sizeof(MatrixStats) * size_t(count_), stream),
        state_(sizeof(RootState) * size_t(count_) + sizeof(int), stream),
        vectors_(sizeof(T) * size_t(count_) * 2 * size_t(n) + sizeof(double) * size_t(count_), stream),
        st_(state_.as<RootState>()),
        active_(reinterpret_cast<int*>(st_ + count_)),
        elements_(matrix_grid(n, count_, 1024)),
        reduce_(matrix_grid(n, count_, 32)),
        per_state_(unsigned((count_ + 127) / 128)),
        stack_a_{a_.as<void>(), n, nn_},
        xp_(x_.as<T>()),
        mp_(m_.as<T>()) {}

  void run() {
    reset_states_kernel<<<per_state_, 128, 0, stream_>>>(st_, count_);
    CK_CUDA_CHECK(cudaGetLastError());
    load();
    const Products<T> products{stream_, ni_, count_, !any_warm_};
    DeviceBuffer info(newton_ ? 0 : sizeof(int) * size_t(count_), stream_);
    if (newton_)
      newton(products);
    else
      eigh(info.as<int>());
    verdict(products);
    store();
    report(products);
  }

 private:
  bool measured() const { return newton_ || o_.compute_residual; }  // max|X^p A_r - I|

  // A_r = (A + A^T)/2 + eps I; warm starts into X.
  void load() {
    int64_t first = 0;
    for (const Segment& s : segments_) {
      cuda::load_symmetric(stream_, s.a, a_.as<T>() + first * nn_, stats_.as<MatrixStats>() + first);
      if (s.init && newton_) {
        DeviceBuffer init_stats(sizeof(MatrixStats) * size_t(s.count), stream_);
        cuda::load_symmetric(stream_, *s.init, x_.as<T>() + first * nn_, init_stats.as<MatrixStats>());
        any_warm_ = true;
      }
      first += s.count;
    }
    cuda::scale_add_identity(stream_, dtype_of<T>(), stack_a_, stack_a_, ni_, count_, 1.0, o_.eps);
  }

  // Largest-eigenvalue estimates for Newton's scaling: 10 power steps from the normalized ones
  // vector. Returns the Rayleigh quotients (device, one per matrix).
  const double* power_estimates() {
    T* v = vectors_.as<T>();
    T* u = v + count_ * n_;
    double* rayleigh = reinterpret_cast<double*>(u + count_ * n_);
    fill_kernel<<<grid_for(count_ * n_, kThreads), kThreads, 0, stream_>>>(v, count_ * n_,
                                                                           T(1.0 / std::sqrt(double(n_))));
    CK_CUDA_CHECK(cudaGetLastError());
    for (int k = 0; k < 10; ++k) {
      cuda::gemm(stream_, dtype_of<T>(), Op::N, Op::N, ni_, 1, ni_, 1.0, stack_a_, {v, n_, n_}, 0.0, {u, n_, n_},
                 count_);
      power_normalize_kernel<<<cuda::blocks_per_matrix(count_), kThreads, 0, stream_>>>(u, v, rayleigh, n_, count_);
      CK_CUDA_CHECK(cudaGetLastError());
    }
    return rayleigh;
  }

  // X_0, M_0 and the states: cold matrices from the power estimates, warm ones from init
  // (M_0 = init^p A_r).
  void newton_start(const Products<T>& products, const double* rayleigh, T* const scratch[3]) {
    int64_t first = 0;
    for (const Segment& s : segments_) {
      const int64_t off = first * nn_;
      newton_start_kernel<<<matrix_grid(n_, s.count, 1024), kThreads, 0, stream_>>>(
          a_.as<T>() + off, xp_ + off, mp_ + off, st_ + first, rayleigh + first, stats_.as<MatrixStats>() + first, n_,
          s.count, o_.p, o_.eps, s.init != nullptr);
      CK_CUDA_CHECK(cudaGetLastError());
      first += s.count;
    }
    if (any_warm_) {  // M_0 = X_0^p A_r (z A_r up to rounding for the cold matrices)
      T* power = products.power(xp_, o_.p, scratch);
      products.multiply(power, a_.as<T>(), mp_, false);
    }
  }

  // Coupled Newton: X <- X M', M <- M'^p M with M' = ((p + 1) I - M) / p, until every matrix's
  // watch has stopped it (the host looks every 4 steps, not every step).
  void newton(const Products<T>& products) {
    const double* rayleigh = power_estimates();
    T* scratch[3] = {s0_.as<T>(), s1_.as<T>(), s2_.as<T>()};
    newton_start(products, rayleigh, scratch);
    T* previous = s3_.as<T>();
    T* mprime = s4_.as<T>();
    const double unit = unit_roundoff<T>(), stop = numerics::newton_root_stop(n_, unit);
    for (int it = 0;; ++it) {
      identity_max_kernel<<<reduce_, kThreads, 0, stream_>>>(mp_, st_, n_, count_, false);
      CK_CUDA_CHECK(cudaMemsetAsync(active_, 0, sizeof(int), stream_));
      newton_watch_kernel<<<per_state_, 128, 0, stream_>>>(st_, count_, stop, unit, o_.max_iters, active_);
      revert_kernel<<<elements_, kThreads, 0, stream_>>>(xp_, previous, st_, n_, count_);
      CK_CUDA_CHECK(cudaGetLastError());
      if ((it % 4 == 3 || it >= o_.max_iters) && cuda::read_counter(stream_, active_) == 0) break;
      throw_if_interrupted();  // Ctrl-C: between steps (the host waits on the GPU every 4)
      newton_step_kernel<<<elements_, kThreads, 0, stream_>>>(mp_, mprime, st_, n_, count_, o_.p);
      CK_CUDA_CHECK(cudaGetLastError());
      products.multiply(xp_, mprime, previous, true);  // X <- X M'
      std::swap(xp_, previous);
      T* power = products.power(mprime, o_.p, scratch);  // M <- M'^p M
      T* next = power == scratch[0] ? scratch[1] : scratch[0];
      products.multiply(power, mp_, next, true);
      // the buffers of M and of the new M trade places
      for (T*& q : scratch)
        if (q == next) q = mp_;
      mp_ = next;
    }
  }

  // Eigh: V D with D = diag(lambda^(-1/(2p))) from the eigenpairs of A (eps taken back out,
  // then applied after flooring, as on the CPU), X = (V D)(V D)^T. Bases are refined, and
  // written back where the decomposition succeeded.
  void eigh(int* info) {
    T* v = s0_.as<T>();
    T* w = vectors_.as<T>();
    T* plain = s1_.as<T>();
    cuda::scale_add_identity(stream_, dtype_of<T>(), stack_a_, {plain, n_, nn_}, ni_, count_, 1.0, -o_.eps);
    std::vector<char> warm(size_t(count_), 0);
    int64_t first = 0;
    for (const Segment& s : segments_) {
      if (s.basis) {
        load_columns(stream_, *s.basis, v + first * nn_, n_, n_, s.count);
        std::fill(warm.begin() + first, warm.begin() + first + s.count, 1);
      }
      first += s.count;
    }
    refined_ = eigenpairs(stream_, plain, v, w, info, warm, n_, count_);
    finite_verdict_kernel<<<cuda::blocks_per_matrix(count_), kThreads, 0, stream_>>>(v, w, info, n_, count_);
    first = 0;
    for (const Segment& s : segments_) {
      if (s.basis)  // a failed decomposition leaves the caller's basis as it was, as on the CPU
        store_columns(stream_, v + first * nn_, *s.basis, n_, n_, s.count, info + first, OnFailure::Skip);
      first += s.count;
    }
    eigen_scale_kernel<<<elements_, kThreads, 0, stream_>>>(v, w, info, st_, n_, count_, o_.p, o_.eps,
                                                            unit_roundoff<T>());
    CK_CUDA_CHECK(cudaGetLastError());
    cuda::symmetric_product(stream_, dtype_of<T>(), Op::N, Op::T, ni_, ni_, 1.0, {v, n_, nn_}, {v, n_, nn_}, 0.0,
                            {xp_, n_, nn_}, count_);
  }

  // X <- (X + X^T)/2 and whether it is finite; then, where measured, max|X^p A_r - I|.
  void verdict(const Products<T>& products) {
    symmetrize_kernel<<<elements_, kThreads, 0, stream_>>>(xp_, st_, n_, count_);
    CK_CUDA_CHECK(cudaGetLastError());
    if (!measured()) return;
    T* scratch[3] = {s0_.as<T>(), s1_.as<T>(), s2_.as<T>()};  // free now (M is no longer needed)
    T* power = products.power(xp_, o_.p, scratch);
    T* product = power == scratch[2] ? scratch[1] : scratch[2];
    products.multiply(power, a_.as<T>(), product, false);
    identity_max_kernel<<<reduce_, kThreads, 0, stream_>>>(product, st_, n_, count_, true);
    CK_CUDA_CHECK(cudaGetLastError());
  }

  // X into the segments' outputs (zeros where not finite, or where the output dtype overflowed:
  // overflowed_ says which).
  void store() {
    int64_t first = 0;
    overflowed_.clear();
    for (const Segment& s : segments_) {
      CK_DISPATCH_FLOATING(s.out.dtype, "out", D, [&] {
        store_matrices_kernel<<<matrix_grid(n_, s.count, 1024), kThreads, 0, stream_>>>(
            xp_ + first * nn_, s.out.ptr<D>(), st_ + first, n_, s.count, false);
      });
      CK_CUDA_CHECK(cudaGetLastError());
      const std::vector<char> bad = cuda::zero_nonfinite(stream_, s.out.dtype, s.out.data, nn_, s.count);
      overflowed_.insert(overflowed_.end(), bad.begin(), bad.end());
      first += s.count;
    }
  }

  // Statuses, with the products per matrix as on the CPU; a symmetric product counts its
  // fraction of a plain one.
  void report(const Products<T>& products) const {
    const double f = products.symmetric ? cuda::symmetric_product_fraction(ni_) : 1.0, powers = power_products(o_.p);
    const double residual_products = newton_ ? powers * f + 1 : 0.0;  // eigh's is information, not counted
    const double start_products = newton_ ? (any_warm_ ? powers * f + 1 : 0.0) : cuda::symmetric_product_fraction(ni_);
    const std::vector<RootState> host = cuda::copy_to_host(stream_, st_, count_);
    int64_t first = 0;
    for (const Segment& s : segments_) {
      for (int64_t b = 0; b < s.count; ++b) {
        const RootState& h = host[size_t(first + b)];
        RootStatus& status = s.status[b];
        status = RootStatus{};
        status.method = o_.method;
        status.iterations = newton_ ? h.iterations : 0;
        // a non-finite Newton iterate is not measured (the CPU returns before); eigh's is Inf
        status.residual = !measured() ? -1.0 : (h.finite ? h.residual : (newton_ ? -1.0 : INFINITY));
        status.converged = h.finite && (newton_ ? h.residual <= *o_.tol : h.ok);
        status.negative = newton_ ? 0.0 : h.negative;
        status.unresolved = newton_ ? 0 : h.unresolved;
        if (overflowed_[size_t(first + b)]) {  // as on the CPU: a failure, zeros
          status.converged = false;
          status.residual = INFINITY;
        }
        status.products = start_products + residual_products + (newton_ ? h.iterations * (powers + 2) * f : 0.0);
        if (!newton_ && s.basis) {
          const size_t k = size_t(first + b);
          status.iterations = std::max(refined_.steps[k], 0);
          status.fell_back = refined_.fell_back[k];
          status.products += refined_.products[k];
        }
      }
      first += s.count;
    }
  }

  const std::vector<Segment>& segments_;
  const RootOptions& o_;
  const cudaStream_t stream_;
  const int64_t n_, nn_, count_;
  const int ni_;
  const bool newton_;
  const size_t bytes_;
  DeviceBuffer a_, x_, m_, s0_, s1_, s2_, s3_, s4_, stats_, state_, vectors_;
  RootState* const st_;
  int* const active_;
  const dim3 elements_, reduce_;
  const unsigned per_state_;
  const Stack stack_a_;
  T* xp_;  // X and M: their buffers change places with scratch ones as Newton goes
  T* mp_;
  bool any_warm_ = false;
  EigenpairsInfo refined_;
  std::vector<char> overflowed_;  // per matrix, by store()
};

// The group's matrices in the compute type of `dtype` (double for float64, float otherwise).
void run_group(DType dtype, int64_t n, const std::vector<Segment>& segments, const RootOptions& o,
               cudaStream_t stream) {
  CK_DISPATCH_COMPUTE(dtype, T, [&] { RootGroup<T>(n, segments, o, stream).run(); });
}

// out matrix b <- (init + init^T)/2 (what is kept when everything fails).
void store_init(const ArrayView& init, const ArrayView& out, int64_t b, cudaStream_t stream) {
  const int64_t n = init.size(-1);
  DeviceBuffer x(sizeof(double) * size_t(n * n), stream), stats(sizeof(MatrixStats), stream);
  cuda::load_symmetric(stream, matrix_view(init, b), x.as<double>(), stats.as<MatrixStats>());
  const ArrayView target = matrix_view(out, b);
  CK_DISPATCH_FLOATING(out.dtype, "out", D, [&] {
    store_matrices_kernel<<<matrix_grid(n, 1, 1024), kThreads, 0, stream>>>(x.as<double>(), target.ptr<D>(), nullptr, n,
                                                                            1, false);
  });
  CK_CUDA_CHECK(cudaGetLastError());
}

// Every input (and init) checked finite and symmetric before anything is written: one pass
// over all of them on the device, one synchronization.
void check_inputs(cudaStream_t stream, const std::vector<ArrayView>& inputs,
                  const std::vector<const ArrayView*>& inits) {
  int64_t total = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t n = inputs[i].size(-1);
    CK_CHECK_VALUE(n <= cuda::kMaxMatrixSide, "argument 'A': matrix dimension ", n,
                   " is too large for one CUDA matrix");
    total += matrices_in(inputs[i]) * (inits[i] ? 2 : 1);
  }
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

// The failure policy after a group ran: Newton failures again by eigh in float64 (without
// init); what still fails keeps init where given.
void apply_failure_policy(int64_t n, const std::vector<Segment>& segments, const RootOptions& o, cudaStream_t stream) {
  const bool retries = o.method == RootMethod::Newton && o.fallback;
  std::vector<Segment> retry;
  for (const Segment& s : segments)
    for (int64_t b = 0; b < s.count; ++b)
      if (!s.status[b].converged && retries)
        retry.push_back(Segment{matrix_view(s.a, b), matrix_view(s.out, b), nullptr, nullptr, nullptr, 1});
  std::vector<RootStatus> retried(retry.size());
  for (size_t k = 0; k < retry.size(); ++k) retry[k].status = &retried[k];
  if (!retry.empty()) {
    RootOptions o64 = o;
    o64.method = RootMethod::Eigh;  // the residual reported as the caller asked, as on the CPU
    run_group(DType::float64(), n, retry, o64, stream);
  }
  size_t k = 0;
  for (const Segment& s : segments)
    for (int64_t b = 0; b < s.count; ++b) {
      RootStatus& st = s.status[b];
      if (!st.converged && retries) {
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

}  // namespace

void matrix_inverse_root_cuda(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                              const std::vector<const ArrayView*>& inits, const std::vector<const ArrayView*>& bases,
                              const RootOptions& o, std::vector<std::vector<RootStatus>>& status,
                              StreamHandle stream_handle) {
  status.assign(inputs.size(), {});
  if (inputs.empty()) return;
  CudaDeviceGuard guard(inputs[0].device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  check_inputs(stream, inputs, inits);

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
    run_group(segments.front().a.dtype, key.first, segments, o, stream);  // the compute type of the key
    apply_failure_policy(key.first, segments, o, stream);
  }
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));
}

}  // namespace curvkit
