// Newton–Schulz family on CUDA: polar (standard and Gram routes) and the coupled square root,
// on cuBLAS through core/linalg_cuda (symmetric products computed by lower blocks).
//
// polar: matrices of one shape and dtype pair, across all inputs, are iterated as one stack,
// so a model's many layers cost a few batched products per step rather than a loop. Float64
// computes in float64, float32 in float32 (no TF32), and float16/bfloat16 keep their iterates
// in their own type with float32 accumulation, as Muon does on GPUs. One host synchronization
// per call: the NaN/Inf check of the inputs, before anything is written; none when the caller
// turns the check off (then the call can be captured in a CUDA graph).
#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include <cfloat>

#include <math_constants.h>

#include "core/dispatch.h"
#include "core/interrupt.h"
#include "core/linalg_cuda.h"
#include "core/numerics.h"
#include "newton_schulz/newton_schulz.h"

namespace curvkit {
namespace {

using cuda::DeviceBuffer;
using cuda::Op;
using cuda::Stack;

// X_b = G_b / ((norm_scale + eps) ||G_b||_F), computed as (G / amax) / ((norm_scale + eps) sqrt(sum (G/amax)^2))
// so that any scale of G gives the same X; without normalization, G_b / its RMS singular value
// ||G_b||_F / sqrt(r), computed alike; 0 for G = 0; NaN for a G holding NaN or Inf (reached
// only unchecked, check_finite false: the iteration then spreads it to the whole result).
// Matrix blockIdx.y; the scale in float64, so a half input is scaled before it is rounded.
template <class S, class T>
__global__ void normalize_kernel(const S* const* g, T* x, int64_t size, int64_t r, const double* amax,
                                 const double* sumsq, double norm_scale_eps, bool normalize) {
  const int64_t b = blockIdx.y;
  const double m = amax[b];
  const bool finite = m <= DBL_MAX;  // scaled_norms marks NaN/Inf with amax = Inf
  const double f = m > 0.0 ? 1.0 / (normalize ? norm_scale_eps * sqrt(sumsq[b]) : sqrt(sumsq[b] / double(r))) : 0.0;
  const S* src = g[b];
  T* dst = x + b * size;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < size; e += int64_t(gridDim.x) * blockDim.x) {
    const double v = double(cuda::load(src + e));
    cuda::store(dst + e, cuda::acc_t<T>(!finite ? CUDART_NAN : m > 0.0 ? (v / m) * f : 0.0));
  }
}

// out_b = beta out_b + alpha X_b; as in BLAS, beta = 0 does not read out and alpha = 0 not X.
template <class T, class D>
__global__ void combine_kernel(const T* x, D* const* out, int64_t size, double alpha, double beta) {
  const int64_t b = blockIdx.y;
  D* dst = out[b];
  const T* src = x + b * size;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < size; e += int64_t(gridDim.x) * blockDim.x) {
    const double v = alpha == 0.0 ? 0.0 : alpha * double(cuda::load(src + e));
    cuda::store(dst + e, cuda::acc_t<D>(beta == 0.0 ? v : beta * double(cuda::load(dst + e)) + v));
  }
}

// Grid for the per-matrix kernels above: enough blocks per matrix to fill the device.
dim3 matrix_grid(int64_t size, int64_t count) {
  return dim3(unsigned(std::min<int64_t>((size + 255) / 256, std::max<int64_t>(1, 2048 / count))), unsigned(count));
}

struct PolarGroup {
  int64_t m, n;
  DType in_dtype, out_dtype;
  std::vector<const void*> in;
  std::vector<void*> out;
  int64_t r() const { return std::min(m, n); }
  int64_t c() const { return std::max(m, n); }
  bool tall() const { return m > n; }
};

// One stack of `count` matrices X (row-major m x n; column-major n x m) in dtype dt.
struct PolarStack {
  cudaStream_t stream;
  DType dt;
  int r, c;
  bool tall;
  int64_t count;
  int64_t size() const { return int64_t(r) * c; }
  Stack x(void* p) const { return {p, tall ? r : c, size()}; }
  Stack sq(void* p) const { return {p, r, int64_t(r) * r}; }
  // A = X X^T on the short side (r x r); only its lower triangle when mirror is false.
  void gram(void* x_ptr, void* a, bool mirror = true) const {
    if (tall)
      cuda::symmetric_product(stream, dt, Op::N, Op::T, r, c, 1.0, x(x_ptr), x(x_ptr), 0.0, sq(a), count, mirror);
    else
      cuda::symmetric_product(stream, dt, Op::T, Op::N, r, c, 1.0, x(x_ptr), x(x_ptr), 0.0, sq(a), count, mirror);
  }
  // dst = F X for the symmetric r x r factor F (X P for a tall X).
  void apply(void* f, void* x_ptr, void* dst) const {
    if (tall)
      cuda::gemm(stream, dt, Op::N, Op::N, r, c, r, 1.0, sq(f), x(x_ptr), 0.0, x(dst), count);
    else
      cuda::gemm(stream, dt, Op::N, Op::N, c, r, r, 1.0, x(x_ptr), sq(f), 0.0, x(dst), count);
  }
  // P = a I + b A + c A^2, from A's lower triangle (A is made whole in the same pass).
  void polynomial(const PolarStep& s, void* a, void* p) const {
    const Stack ps = sq(p);
    cuda::mirror_lower(stream, dt, sq(a), r, count, &ps, s.b, s.a);
    cuda::symmetric_product(stream, dt, Op::N, Op::N, r, r, s.c, sq(a), sq(a), 1.0, ps, count);
  }
  // dst = F G for two commuting symmetric r x r matrices (the product is symmetric).
  void product(void* f, void* g, void* dst) const {
    cuda::symmetric_product(stream, dt, Op::N, Op::N, r, r, 1.0, sq(f), sq(g), 0.0, sq(dst), count);
  }
};

template <class T>
void* offset(void* p, int64_t elements) {
  return static_cast<T*>(p) + elements;
}

void polar_group(const PolarGroup& g, const PolarOptions& o, cudaStream_t stream, const double* amax,
                 const double* sumsq, const void* const* in_ptrs, void* const* out_ptrs) {
  // The compute dtype (see the top of this file). The Gram route squares the spectrum, which
  // half-precision storage cannot carry (measured: 0.13 off the float64 iteration for bfloat16
  // at 32 x 32): it computes half inputs in float32.
  const bool half = g.in_dtype == DType::bfloat16() || g.in_dtype == DType::float16();
  const DType dt = half && o.method == PolarMethod::Gram ? DType::float32() : g.in_dtype;
  const int64_t count = int64_t(g.in.size());
  if (o.alpha == 0.0) {  // out = beta out: as in BLAS, a zero factor reads nothing
    CK_DISPATCH_FLOATING(g.out_dtype, "out", D, [&] {
      combine_kernel<<<matrix_grid(g.m * g.n, count), 256, 0, stream>>>(
          static_cast<const D*>(nullptr), reinterpret_cast<D* const*>(out_ptrs), g.m * g.n, 0.0, o.beta);
    });
    CK_CUDA_CHECK(cudaGetLastError());
    return;
  }
  const PolarStack s{stream, dt, int(g.r()), int(g.c()), g.tall(), count};
  const size_t item = size_t(dt.itemsize());
  const size_t x_bytes = size_t(s.size()) * count * item, sq_bytes = size_t(s.r) * s.r * count * item;
  const bool gram_route = o.method == PolarMethod::Gram;
  DeviceBuffer xa(x_bytes, stream), xb(x_bytes, stream), a(sq_bytes, stream), p(sq_bytes, stream);
  DeviceBuffer q(gram_route ? sq_bytes : 0, stream), t(gram_route ? sq_bytes : 0, stream),
      u(gram_route ? sq_bytes : 0, stream);
  void *x = xa.as<void>(), *x2 = xb.as<void>(), *pa = a.as<void>(), *pp = p.as<void>();
  void *pq = q.as<void>(), *pt = t.as<void>(), *pu = u.as<void>();

  CK_DISPATCH_FLOATING(g.in_dtype, "G", S, [&] {
    CK_DISPATCH_FLOATING(dt, "G", T, [&] {
      normalize_kernel<<<matrix_grid(s.size(), count), 256, 0, stream>>>(reinterpret_cast<const S* const*>(in_ptrs),
                                                                         static_cast<T*>(x), s.size(), s.r, amax, sumsq,
                                                                         o.norm_scale + o.norm_eps, o.normalize);
    });
  });
  CK_CUDA_CHECK(cudaGetLastError());

  const size_t steps = o.steps.size();
  void* factor = nullptr;  // the result is factor * x (nullptr: x itself, no steps)
  if (steps > 0 && o.method == PolarMethod::Standard) {
    for (size_t k = 0; k < steps; ++k) {
      s.gram(x, pa, false);
      s.polynomial(o.steps[k], pa, pp);
      if (k + 1 == steps) break;
      s.apply(pp, x, x2);
      std::swap(x, x2);
    }
    factor = pp;
  } else if (steps > 0) {  // Gram route: A and Q = P_{k-1} ... P_0 on r x r matrices
    s.gram(x, pa);
    bool have_q = false;
    for (size_t k = 0; k < steps; ++k) {
      s.polynomial(o.steps[k], pa, pp);
      if (k + 1 == steps) break;
      if (have_q) {
        s.product(pp, pq, pt);
        std::swap(pq, pt);
      } else {
        CK_CUDA_CHECK(cudaMemcpyAsync(pq, pp, sq_bytes, cudaMemcpyDeviceToDevice, stream));
        have_q = true;
      }
      if (o.restart_after > 0 && (int(k) + 1) % o.restart_after == 0) {  // X = Q X_0, A = X X^T, Q = I
        s.apply(pq, x, x2);
        std::swap(x, x2);
        s.gram(x, pa);
        have_q = false;
        continue;
      }
      s.product(pp, pp, pt);  // P^2
      s.product(pa, pt, pu);  // A P^2
      std::swap(pa, pu);
    }
    if (have_q) {
      s.product(pp, pq, pt);
      std::swap(pp, pt);
    }
    factor = pp;
  }

  // out = beta out + alpha F X, fused into the last product when out has the compute dtype.
  if (factor && g.out_dtype == dt) {
    std::vector<const void*> host(2 * size_t(count));
    for (int64_t b = 0; b < count; ++b) {
      host[size_t(b)] = static_cast<const char*>(factor) + size_t(b) * s.r * s.r * item;
      host[size_t(count + b)] = static_cast<const char*>(x) + size_t(b) * s.size() * item;
    }
    DeviceBuffer ptrs(host.size() * sizeof(void*), stream);
    cuda::copy_to_device(stream, ptrs.as<void>(), host.data(), host.size() * sizeof(void*));
    const void* const* pf = ptrs.as<const void*>();
    const void* const* px = pf + count;
    if (s.tall)
      cuda::gemm_pointers(stream, dt, Op::N, Op::N, s.r, s.c, s.r, o.alpha, pf, s.r, px, s.r, o.beta, out_ptrs, s.r,
                          count);
    else
      cuda::gemm_pointers(stream, dt, Op::N, Op::N, s.c, s.r, s.r, o.alpha, px, s.c, pf, s.r, o.beta, out_ptrs, s.c,
                          count);
    return;
  }
  if (factor) {
    s.apply(factor, x, x2);
    x = x2;
  }
  CK_DISPATCH_FLOATING(dt, "G", T, [&] {
    CK_DISPATCH_FLOATING(g.out_dtype, "out", D, [&] {
      combine_kernel<<<matrix_grid(s.size(), count), 256, 0, stream>>>(
          static_cast<const T*>(x), reinterpret_cast<D* const*>(out_ptrs), s.size(), o.alpha, o.beta);
    });
  });
  CK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void polar_cuda(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                const PolarOptions& options, StreamHandle stream_handle) {
  CudaDeviceGuard guard(inputs[0].device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  // Group every matrix of every input by (m, n, input dtype, output dtype), at most
  // kMaxGroup matrices a group (the kernels put the matrix index in the grid's y dimension).
  constexpr size_t kMaxGroup = size_t(cuda::kMaxMatricesPerCall);
  std::map<std::tuple<int64_t, int64_t, int, int, int, int, size_t>, PolarGroup> groups;
  std::map<std::tuple<int64_t, int64_t, int, int, int, int>, size_t> group_matrices;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const ArrayView &g = inputs[i], &out = outputs[i];
    const int64_t m = g.size(-2), n = g.size(-1);
    if (m == 0 || n == 0) continue;
    CK_CHECK_VALUE(std::max(m, n) <= INT32_MAX, "argument 'G': matrix dimension ", std::max(m, n),
                   " exceeds the 32-bit range of cuBLAS");
    const int64_t batch = g.numel() / (m * n);
    const auto shape_key =
        std::make_tuple(m, n, int(g.dtype.code), int(g.dtype.bits), int(out.dtype.code), int(out.dtype.bits));
    for (int64_t b = 0; b < batch; ++b) {
      const size_t index = group_matrices[shape_key]++;
      const auto key = std::tuple_cat(shape_key, std::make_tuple(index / kMaxGroup));
      PolarGroup& grp = groups.try_emplace(key, PolarGroup{m, n, g.dtype, out.dtype, {}, {}}).first->second;
      grp.in.push_back(static_cast<const char*>(g.data) + b * m * n * g.dtype.itemsize());
      grp.out.push_back(static_cast<char*>(out.data) + b * m * n * out.dtype.itemsize());
    }
  }
  if (groups.empty()) return;

  // Pointers and norms of every matrix, then one check for NaN/Inf before anything is written.
  std::vector<const void*> host;
  for (auto& [key, grp] : groups) host.insert(host.end(), grp.in.begin(), grp.in.end());
  for (auto& [key, grp] : groups) host.insert(host.end(), grp.out.begin(), grp.out.end());
  const int64_t total = int64_t(host.size() / 2);
  DeviceBuffer ptrs(host.size() * sizeof(void*), stream), norms(2 * size_t(total) * sizeof(double), stream),
      flags(sizeof(int) * groups.size(), stream);
  cuda::copy_to_device(stream, ptrs.as<void>(), host.data(), host.size() * sizeof(void*));
  const void* const* in_ptrs = ptrs.as<const void*>();
  void* const* out_ptrs = ptrs.as<void*>() + total;
  double* amax = norms.as<double>();
  double* sumsq = amax + total;
  int64_t first = 0;
  int gi = 0;
  for (auto& [key, grp] : groups) {
    cuda::scaled_norms(stream, grp.in_dtype, in_ptrs + first, grp.m * grp.n, int64_t(grp.in.size()), amax + first,
                       sumsq + first, flags.as<int>() + gi++);
    first += int64_t(grp.in.size());
  }
  if (options.check_finite) {
    // An output that is read (beta != 0: polar_update_'s param) is an input too: its flags follow
    // the inputs', its norms go to scratch.
    const bool read_out = options.beta != 0.0;
    const int64_t group_count = int64_t(groups.size());
    DeviceBuffer out_flags(read_out ? sizeof(int) * groups.size() : 0, stream),
        scratch(read_out ? 2 * size_t(total) * sizeof(double) : 0, stream);
    if (read_out) {
      first = 0;
      gi = 0;
      for (auto& [key, grp] : groups) {
        cuda::scaled_norms(stream, grp.out_dtype, reinterpret_cast<const void* const*>(out_ptrs + first), grp.m * grp.n,
                           int64_t(grp.out.size()), scratch.as<double>() + first, scratch.as<double>() + total + first,
                           out_flags.as<int>() + gi++);
        first += int64_t(grp.out.size());
      }
    }
    const std::vector<int> nonfinite = cuda::copy_to_host(stream, flags.as<int>(), group_count);
    for (int f : nonfinite) CK_CHECK_VALUE(f == 0, "argument '", options.in_name, "' contains NaN or Inf");
    if (read_out)
      for (int f : cuda::copy_to_host(stream, out_flags.as<int>(), group_count))
        CK_CHECK_VALUE(f == 0, "argument '", options.out_name, "' contains NaN or Inf");
  }

  first = 0;
  for (auto& [key, grp] : groups) {
    polar_group(grp, options, stream, amax + first, sumsq + first, in_ptrs + first, out_ptrs + first);
    first += int64_t(grp.in.size());
  }
}

namespace {

// The coupled square-root iteration of each matrix, tracked on the device (the rule of
// ConvergenceWatch in core/matrix_utils.h, numerics::sign_verdict, per matrix, so that the host
// never waits on it).
struct SqrtState {
  double scale;     // c = min(||A||_F, ||A||_inf)
  double previous;  // last ||I - Z Y||_F / sqrt(n)
  double residual;  // sum of squares of c Y^2 - A after the loop
  int iterations, active, converged;
  int finite;    // kFiniteY | kFiniteZ while Y (the square root, or Lyapunov's C) and Z are finite
  int exponent;  // the input was scaled by 2^exponent (cuda::scale_to_unit)
  int pad;
};

constexpr int kFiniteY = 1, kFiniteZ = 2, kAllFinite = kFiniteY | kFiniteZ;

// Sums over the n x n entries of each matrix: up to kSlots blocks a matrix, each block's share in
// its own slot, added in a fixed order (cuda::block_sum), so that every run gives the same bits.
constexpr int kSlots = 64;

dim3 per_matrix_grid(int64_t nn, int64_t count) {
  return dim3(unsigned(std::min<int64_t>((nn + 255) / 256, kSlots)), unsigned(count));
}

// The device side of a batch of sign iterations (square root, Lyapunov), in one buffer: the
// per-matrix states, kSlots partial sums a matrix, and the count of matrices still active.
struct SignWatch {
  static size_t bytes(int64_t count) {
    return (sizeof(SqrtState) + sizeof(double) * kSlots) * size_t(count) + sizeof(int);
  }
  SignWatch(void* p, int64_t count)
      : state(static_cast<SqrtState*>(p)),
        partial(reinterpret_cast<double*>(state + count)),
        active(reinterpret_cast<int*>(partial + kSlots * count)) {}
  SqrtState* state;
  double* partial;
  int* active;
};
static_assert(sizeof(SqrtState) % alignof(double) == 0, "the partial sums follow the states");

// From 2^k A (k = exponent[b]) and its stats: Y_0 = 2^k A / c, Z_0 = I.
__global__ void sqrt_start_kernel(const double* a, const cuda::MatrixStats* stats, const int* exponent, double* y,
                                  double* z, SqrtState* state, int64_t n, int64_t count) {
  const int64_t nn = n * n, total = nn * count;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / nn, e = i % nn;
    const double c = fmin(sqrt(stats[b].frobenius2), stats[b].max_row_sum);
    y[i] = c > 0 ? a[i] / c : 0.0;
    z[i] = c > 0 && e % (n + 1) == 0 ? 1.0 : 0.0;
    if (e == 0) state[b] = SqrtState{c, INFINITY, 0.0, 0, c > 0, 0, kAllFinite, exponent[b], 0};
  }
}

// Sum of squares of I - M per matrix, this block's share into its slot of `partial` (the max
// distance of the inverse roots is identity_max_kernel in inverse_root/cuda_roots.cu).
__global__ void identity_sum_squares_kernel(const double* m, double* partial, int64_t n) {
  const int64_t b = blockIdx.y, nn = n * n;
  double local = 0.0;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < nn; e += int64_t(gridDim.x) * blockDim.x) {
    const double d = numerics::identity_difference(m[b * nn + e], e % (n + 1) == 0);
    local += d * d;
  }
  local = cuda::block_sum(local);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = local;
}

// One thread per matrix: stop when the distance reaches rounding level or stops falling once
// small (converged), exceeds 2 (diverged), or the steps reach numerics::sign_step_limit
// (stalled: a singular input); count the matrices still active.
__global__ void sqrt_watch_kernel(SqrtState* state, const double* partial, int slots, int64_t n, int64_t count,
                                  int* active) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= count) return;
  SqrtState& s = state[b];
  if (s.active) {
    double distance = 0.0;  // the blocks' shares of identity_sum_squares_kernel, in slot order
    for (int k = 0; k < slots; ++k) distance += partial[b * slots + k];
    const double r = numerics::rms_distance(distance, n);
    const double unit = unit_roundoff<double>();
    const numerics::SignVerdict verdict =
        numerics::sign_verdict(r, s.previous, unit, s.iterations, numerics::sign_step_limit(n, unit));
    if (verdict == numerics::SignVerdict::Diverged || verdict == numerics::SignVerdict::Stalled) {
      s.active = 0;
    } else if (verdict == numerics::SignVerdict::Converged) {
      s.active = 0;
      s.converged = 1;
    } else {
      s.previous = r;
      ++s.iterations;
      atomicAdd(active, 1);
    }
  }
}

// T = (3I - M)/2 for active matrices, I for the others (so their Y and Z stay bit-identical).
__global__ void sqrt_step_kernel(const double* m, double* t, const SqrtState* state, int64_t n, int64_t count) {
  const int64_t nn = n * n, total = nn * count;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / nn, e = i % nn;
    const double id = e % (n + 1) == 0 ? 1.0 : 0.0;
    t[i] = state[b].active ? 1.5 * id - 0.5 * m[i] : id;
  }
}

// Sum of squares of c Y^2 - A (this block's share into its slot of `partial`) and finiteness
// of Y (and Z), per matrix.
__global__ void sqrt_residual_kernel(const double* y2, const double* a, const double* y, const double* z,
                                     SqrtState* state, double* partial, int64_t n) {
  const int64_t b = blockIdx.y, nn = n * n;
  const double c = state[b].scale;
  double local = 0.0;
  bool finite_y = true, finite_z = true;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < nn; e += int64_t(gridDim.x) * blockDim.x) {
    const double d = c * y2[b * nn + e] - a[b * nn + e];
    local += d * d;
    finite_y &= fabs(y[b * nn + e]) <= DBL_MAX;
    finite_z &= z == nullptr || fabs(z[b * nn + e]) <= DBL_MAX;
  }
  local = cuda::block_sum(local);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = local;
  finite_y = __all_sync(0xffffffffu, finite_y);
  finite_z = __all_sync(0xffffffffu, finite_z);
  if ((threadIdx.x & 31) != 0) return;
  if (!finite_y || !finite_z) atomicAnd(&state[b].finite, (finite_y ? kFiniteY : 0) | (finite_z ? kFiniteZ : 0));
}

// out = factor(c) * src in the output dtype, unscaled (sqrt(A) = 2^(-k/2) sqrt(2^k A), k even);
// a matrix with any non-finite value becomes zeros, as on the CPU (never hand on NaN or Inf).
template <class D>
__global__ void sqrt_store_kernel(const double* src, D* out, const SqrtState* state, int64_t nn, int64_t count,
                                  bool inverse) {
  const int64_t total = nn * count;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const SqrtState& s = state[i / nn];
    const double c = s.scale;
    const double f = c > 0 && (s.finite & (inverse ? kFiniteZ : kFiniteY))
                         ? (inverse ? ldexp(1.0 / sqrt(c), s.exponent / 2) : ldexp(sqrt(c), -s.exponent / 2))
                         : 0.0;
    out[i] = from_double<D>(f > 0 ? f * src[i] : 0.0);
  }
}

// Lyapunov start: B_0 = S/s, C_0 = C/s with s = ||S||_F (X is unchanged by the scaling); a
// zero S is not iterated (X = 0, not converged).
__global__ void lyapunov_start_kernel(double* y, double* z, const cuda::MatrixStats* stats, SqrtState* state,
                                      int64_t nn, int64_t count) {
  const int64_t total = nn * count;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / nn;
    const double s = sqrt(stats[b].frobenius2);
    y[i] = s > 0 ? y[i] / s : 0.0;
    z[i] = s > 0 ? z[i] / s : 0.0;
    if (i % nn == 0) state[b] = SqrtState{s, INFINITY, 0.0, 0, s > 0, 0, kAllFinite};
  }
}

// C (any dtype, not symmetrized) into float64.
template <class S>
__global__ void to_double_kernel(const S* src, double* dst, int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = to_double(src[i]);
}

// next <- current for the matrices that stopped (their C must not move).
__global__ void keep_stopped_kernel(const double* current, double* next, const SqrtState* state, int64_t nn,
                                    int64_t count) {
  const int64_t total = nn * count;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    if (!state[i / nn].active) next[i] = current[i];
}

// X' = C / 2, zero for a matrix with non-finite entries (which clears state.finite).
__global__ void lyapunov_solution_kernel(const double* z, double* x, SqrtState* state, int64_t nn, int64_t count) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    bool finite = true;
    for (int64_t e = threadIdx.x; e < nn; e += blockDim.x) finite &= fabs(z[b * nn + e]) <= DBL_MAX;
    finite = __syncthreads_and(finite);
    for (int64_t e = threadIdx.x; e < nn; e += blockDim.x) x[b * nn + e] = finite ? 0.5 * z[b * nn + e] : 0.0;
    if (threadIdx.x == 0 && !finite) state[b].finite = 0;
  }
}

// What the Lyapunov verdict needs, per matrix (sums of squares): of the residual R, of C', of
// X', and of B - I (B the sign iterate).
struct LyapunovNorms {
  double residual, c, x, sign;
};

// A block per matrix, summed in a fixed order (cuda::block_sum).
__global__ void lyapunov_norms_kernel(const double* r, const double* c, const double* x, const double* b_sign,
                                      LyapunovNorms* norms, int64_t n, int64_t count) {
  const int64_t nn = n * n;
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    double rr = 0, cc = 0, xx = 0, bb = 0;
    for (int64_t e = threadIdx.x; e < nn; e += blockDim.x) {
      const int64_t i = b * nn + e;
      const double d = numerics::identity_difference(b_sign[i], e % (n + 1) == 0);
      rr += r[i] * r[i];
      cc += c[i] * c[i];
      xx += x[i] * x[i];
      bb += d * d;
    }
    rr = cuda::block_sum(rr);
    cc = cuda::block_sum(cc);
    xx = cuda::block_sum(xx);
    bb = cuda::block_sum(bb);
    if (threadIdx.x == 0) norms[b] = {rr, cc, xx, bb};
  }
}

// out = 2^(k - j) X' in the output dtype (S' = 2^k S, C' = 2^j C).
template <class D>
__global__ void lyapunov_store_kernel(const double* x, D* out, const int* s_exponent, const int* c_exponent, int64_t nn,
                                      int64_t count) {
  const int64_t total = nn * count;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_double<D>(ldexp(x[i], s_exponent[i / nn] - c_exponent[i / nn]));
}

// One step of the sign iterations' watch (square root, Lyapunov), from M (Z Y, or B^2): each
// active matrix's distance of M to I decides whether it goes on, and T = (3I - M)/2 is formed
// for those that do. False once the host, looking every 4 steps, sees no matrix active.
bool watch_and_step(cudaStream_t stream, const double* m, double* t, const SignWatch& watch, int64_t n, int64_t count,
                    int it) {
  const int64_t nn = n * n;
  const dim3 per_matrix = per_matrix_grid(nn, count);
  identity_sum_squares_kernel<<<per_matrix, 256, 0, stream>>>(m, watch.partial, n);
  CK_CUDA_CHECK(cudaMemsetAsync(watch.active, 0, sizeof(int), stream));
  sqrt_watch_kernel<<<unsigned((count + 127) / 128), 128, 0, stream>>>(watch.state, watch.partial, int(per_matrix.x), n,
                                                                       count, watch.active);
  CK_CUDA_CHECK(cudaGetLastError());
  if (it % 4 == 3 && cuda::read_counter(stream, watch.active) == 0) return false;
  sqrt_step_kernel<<<grid_for(nn * count, 256), 256, 0, stream>>>(m, t, watch.state, n, count);
  CK_CUDA_CHECK(cudaGetLastError());
  return true;
}

// Scales each symmetric n x n matrix of `a` (float64, device) to a largest entry near 1
// (cuda::scale_to_unit; the exponents to `exponent`) and recomputes `stats` for the scaled
// matrices: returned on the host too.
std::vector<cuda::MatrixStats> scale_symmetric(cudaStream_t stream, double* a, const Device& device, int64_t n,
                                               int64_t count, cuda::MatrixStats* stats, int* exponent) {
  cuda::scale_to_unit(stream, a, n * n, count, exponent);
  const ArrayView scaled{a, DType::float64(), device, {count, n, n}, {n * n, n, 1}, true};
  cuda::load_symmetric<double>(stream, scaled, nullptr, stats);
  return cuda::copy_to_host(stream, stats, count);
}

// The limits of one call of the sign iterations: each matrix within cuBLAS's 32-bit sizes, and
// one grid row per matrix (no chunking).
void check_sign_batch(int64_t n, int64_t count, const char* name) {
  CK_CHECK_VALUE(n <= cuda::kMaxMatrixSide, "argument '", name, "': matrix dimension ", n,
                 " is too large for one CUDA matrix");
  CK_CHECK_VALUE(count <= cuda::kMaxMatricesPerCall, "argument '", name, "': at most ", cuda::kMaxMatricesPerCall,
                 " matrices per call on CUDA");
}

}  // namespace

void matrix_sqrt_cuda(const ArrayView& a, const ArrayView* sqrt_out, const ArrayView* inv_out, const SqrtOptions& o,
                      SqrtStatus* status, StreamHandle stream_handle) {
  CK_CHECK_VALUE(o.method == SqrtMethod::NewtonSchulz, "argument 'method': only 'newton_schulz' (or 'auto') ",
                 "runs on CUDA arrays so far");
  const int64_t n = a.size(-1), count = n ? a.numel() / (n * n) : 0;
  if (count == 0) return;
  check_sign_batch(n, count, "A");
  CudaDeviceGuard guard(a.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t nn = n * n, total = nn * count;
  const size_t bytes = size_t(total) * sizeof(double);
  // Everything in float64 for every input dtype, as on the CPU (float64 products run at the
  // float32 rate on H100-class GPUs).
  DeviceBuffer a64(bytes, stream), y(bytes, stream), z(bytes, stream), m(bytes, stream), t(bytes, stream),
      u(bytes, stream), stats(sizeof(cuda::MatrixStats) * size_t(count), stream),
      state(SignWatch::bytes(count), stream), exponent(sizeof(int) * size_t(count), stream);
  cuda::load_symmetric(stream, a, a64.as<double>(), stats.as<cuda::MatrixStats>());
  cuda::check_symmetric(stream, a, stats.as<cuda::MatrixStats>(), "A");
  // Work on 2^k A with max|2^k A| near 1, as on the CPU: c, its square and the residual then
  // neither underflow (1e-300) nor overflow (1e300). The stats are those of 2^k A.
  const std::vector<cuda::MatrixStats> host_stats =
      scale_symmetric(stream, a64.as<double>(), a.device, n, count, stats.as<cuda::MatrixStats>(), exponent.as<int>());
  const SignWatch watch(state.as<void>(), count);
  SqrtState* st = watch.state;
  sqrt_start_kernel<<<grid_for(total, 256), 256, 0, stream>>>(a64.as<double>(), stats.as<cuda::MatrixStats>(),
                                                              exponent.as<int>(), y.as<double>(), z.as<double>(), st, n,
                                                              count);
  CK_CUDA_CHECK(cudaGetLastError());

  const DType f64 = DType::float64();
  const Stack sm{m.as<void>(), n, nn}, stt{t.as<void>(), n, nn};
  const int ni = int(n);
  void *py = y.as<void>(), *pz = z.as<void>(), *pu = u.as<void>();
  for (int it = 0; it < o.max_iters && !interrupted(); ++it) {  // the host waits on the GPU every 4 steps
    cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, 1.0, {pz, n, nn}, {py, n, nn}, 0.0, sm, count);  // Z Y
    if (!watch_and_step(stream, m.as<double>(), t.as<double>(), watch, n, count, it)) break;
    cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, 1.0, {py, n, nn}, stt, 0.0, {pu, n, nn}, count);  // Y T
    std::swap(py, pu);
    cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, 1.0, stt, {pz, n, nn}, 0.0, {pu, n, nn}, count);  // T Z
    std::swap(pz, pu);
  }
  throw_if_interrupted();
  // Verdict: residual of S = sqrt(c) Y against A, finiteness.
  cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, 1.0, {py, n, nn}, {py, n, nn}, 0.0, sm, count);
  const dim3 per_matrix = per_matrix_grid(nn, count);
  sqrt_residual_kernel<<<per_matrix, 256, 0, stream>>>(m.as<double>(), a64.as<double>(), static_cast<double*>(py),
                                                       inv_out ? static_cast<double*>(pz) : nullptr, st, watch.partial,
                                                       n);
  CK_CUDA_CHECK(cudaGetLastError());
  cuda::sum_slots(stream, watch.partial, per_matrix.x, count, &st->residual, sizeof(SqrtState));
  const auto store = [&](const ArrayView* out, const void* src, bool inverse) {
    if (!out) return;
    CK_DISPATCH_FLOATING(out->dtype, "out", D, [&] {
      sqrt_store_kernel<<<grid_for(total, 256), 256, 0, stream>>>(static_cast<const double*>(src), out->ptr<D>(), st,
                                                                  nn, count, inverse);
    });
    CK_CUDA_CHECK(cudaGetLastError());
  };
  store(sqrt_out, py, false);
  store(inv_out, pz, true);
  // the inverse root of a tiny A can overflow a float32 output: a failure, zeros
  const auto overflowed = [&](const ArrayView* out) {
    return out ? cuda::zero_nonfinite(stream, out->dtype, out->data, nn, count) : std::vector<char>(size_t(count), 0);
  };
  const std::vector<char> sqrt_overflow = overflowed(sqrt_out), inv_overflow = overflowed(inv_out);
  const std::vector<SqrtState> host = cuda::copy_to_host(stream, st, count);
  for (int64_t b = 0; b < count; ++b) {
    const SqrtState& s = host[size_t(b)];
    SqrtStatus& out = status[b];
    out.iterations = s.iterations;
    if (s.scale == 0) {  // sqrt(0) = 0; no inverse
      out.residual = 0;
      out.converged = inv_out == nullptr;
      continue;
    }
    out.residual = s.finite & kFiniteY ? std::sqrt(s.residual / host_stats[size_t(b)].frobenius2) : INFINITY;
    if (sqrt_overflow[size_t(b)] || inv_overflow[size_t(b)]) out.residual = INFINITY;
    out.converged = s.converged && s.finite == kAllFinite && out.residual <= o.tol;
  }
}

void solve_lyapunov_cuda(const ArrayView& s_in, const ArrayView& c_in, const ArrayView& x_out, int max_iters,
                         std::vector<SqrtStatus>& status, StreamHandle stream_handle) {
  const int64_t n = s_in.size(-1), count = leading_count(s_in);
  status.assign(size_t(count), SqrtStatus{n == 0, 0, 0.0});  // 0 x 0: solved
  if (count == 0 || n == 0) return;
  check_sign_batch(n, count, "S");
  CudaDeviceGuard guard(s_in.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t nn = n * n, total = nn * count;
  const size_t bytes = size_t(total) * sizeof(double), stats_bytes = sizeof(cuda::MatrixStats) * size_t(count),
               exponent_bytes = sizeof(int) * size_t(count);
  // In float64 for every dtype, as on the CPU. The matrix-sign iteration on [[B, C], [0, -B]]:
  // B <- B T, C <- C T - B (B C - C B) / 2 with T = (3I - B^2)/2; X = C/2 at convergence.
  DeviceBuffer y(bytes, stream), z(bytes, stream), m(bytes, stream), t(bytes, stream), u(bytes, stream),
      p(bytes, stream), s_scaled(bytes, stream), c_scaled(bytes, stream), s_stats(stats_bytes, stream),
      c_stats(stats_bytes, stream), s_exponent(exponent_bytes, stream), c_exponent(exponent_bytes, stream),
      norms(sizeof(LyapunovNorms) * size_t(count), stream), state(SignWatch::bytes(count), stream);
  cuda::MatrixStats *ss = s_stats.as<cuda::MatrixStats>(), *cs = c_stats.as<cuda::MatrixStats>();
  cuda::load_symmetric(stream, s_in, s_scaled.as<double>(), ss);
  cuda::load_symmetric<double>(stream, c_in, nullptr, cs);  // C's largest entry and finiteness
  const std::vector<cuda::MatrixStats> s_host = cuda::check_symmetric(stream, s_in, ss, "S");
  const std::vector<cuda::MatrixStats> c_host = cuda::copy_to_host(stream, cs, count);
  for (int64_t b = 0; b < count; ++b)
    CK_CHECK_VALUE(!c_host[size_t(b)].nonfinite, "argument 'C' contains NaN or Inf (matrix ", b, ")");
  CK_DISPATCH_FLOATING(c_in.dtype, "C", S, [&] {
    to_double_kernel<<<grid_for(total, 256), 256, 0, stream>>>(c_in.ptr<const S>(), c_scaled.as<double>(), total);
  });
  CK_CUDA_CHECK(cudaGetLastError());
  // S' = 2^k S and C' = 2^j C with largest entries near 1 (exact), as on the CPU, so that the
  // iteration and the residual neither underflow nor overflow; X = 2^(k - j) X'.
  scale_symmetric(stream, s_scaled.as<double>(), s_in.device, n, count, ss, s_exponent.as<int>());
  cuda::scale_to_unit(stream, c_scaled.as<double>(), nn, count, c_exponent.as<int>());
  CK_CUDA_CHECK(cudaMemcpyAsync(y.as<void>(), s_scaled.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream));
  CK_CUDA_CHECK(cudaMemcpyAsync(z.as<void>(), c_scaled.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream));
  const SignWatch watch(state.as<void>(), count);
  SqrtState* st = watch.state;
  lyapunov_start_kernel<<<grid_for(total, 256), 256, 0, stream>>>(y.as<double>(), z.as<double>(), ss, st, nn, count);
  CK_CUDA_CHECK(cudaGetLastError());
  const DType f64 = DType::float64();
  const int ni = int(n);
  void *py = y.as<void>(), *pz = z.as<void>(), *pu = u.as<void>(), *pm = m.as<void>(), *pt = t.as<void>(),
       *pp = p.as<void>();
  auto stack = [&](void* ptr) { return Stack{ptr, n, nn}; };
  for (int it = 0; it < max_iters && !interrupted(); ++it) {
    cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, 1.0, stack(py), stack(py), 0.0, stack(pm), count);   // B^2
    if (!watch_and_step(stream, m.as<double>(), t.as<double>(), watch, n, count, it)) break;               // T
    cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, 1.0, stack(py), stack(pz), 0.0, stack(pp), count);   // B C
    cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, -1.0, stack(pz), stack(py), 1.0, stack(pp), count);  // - C B
    cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, 1.0, stack(pz), stack(pt), 0.0, stack(pu), count);   // C T
    cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, -0.5, stack(py), stack(pp), 1.0, stack(pu), count);  // - B P / 2
    keep_stopped_kernel<<<grid_for(total, 256), 256, 0, stream>>>(static_cast<double*>(pz), static_cast<double*>(pu),
                                                                  st, nn, count);
    CK_CUDA_CHECK(cudaGetLastError());
    std::swap(pz, pu);
    cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, 1.0, stack(py), stack(pt), 0.0, stack(pu), count);  // B T
    std::swap(py, pu);
  }
  throw_if_interrupted();
  // The verdict, as on the CPU (lyapunov_one in cpu.cpp): the true residual R = S'X' + X'S' - C'
  // of the X' returned, B = sign(S) at I (S positive definite), a small backward error.
  const unsigned per_matrix = unsigned(std::min<int64_t>(count, 65535));
  lyapunov_solution_kernel<<<per_matrix, 256, 0, stream>>>(static_cast<double*>(pz), static_cast<double*>(pm), st, nn,
                                                           count);  // X' into m
  CK_CUDA_CHECK(cudaGetLastError());
  CK_CUDA_CHECK(cudaMemcpyAsync(pt, c_scaled.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream));
  const Stack sx = stack(pm), sr = stack(pt), s_prime = stack(s_scaled.as<void>());
  cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, 1.0, s_prime, sx, -1.0, sr, count);  // S'X' - C'
  cuda::gemm(stream, f64, Op::N, Op::N, ni, ni, ni, 1.0, sx, s_prime, 1.0, sr, count);   // + X'S'
  lyapunov_norms_kernel<<<per_matrix, 256, 0, stream>>>(static_cast<double*>(pt), c_scaled.as<double>(),
                                                        static_cast<double*>(pm), static_cast<double*>(py),
                                                        norms.as<LyapunovNorms>(), n, count);
  CK_CUDA_CHECK(cudaGetLastError());
  CK_DISPATCH_FLOATING(x_out.dtype, "out", D, [&] {
    lyapunov_store_kernel<<<grid_for(total, 256), 256, 0, stream>>>(
        static_cast<double*>(pm), x_out.ptr<D>(), s_exponent.as<int>(), c_exponent.as<int>(), nn, count);
  });
  CK_CUDA_CHECK(cudaGetLastError());
  const std::vector<char> overflow = cuda::zero_nonfinite(stream, x_out.dtype, x_out.data, nn, count);
  const std::vector<LyapunovNorms> norm = cuda::copy_to_host(stream, norms.as<LyapunovNorms>(), count);
  const std::vector<SqrtState> host = cuda::copy_to_host(stream, st, count);
  for (int64_t b = 0; b < count; ++b) {
    const SqrtState& h = host[size_t(b)];
    SqrtStatus& out = status[size_t(b)];
    out.iterations = h.iterations;
    if (s_host[size_t(b)].amax == 0 || c_host[size_t(b)].amax == 0) {  // C = 0: X = 0, solved; S = 0: no solution
      const bool zero_c = c_host[size_t(b)].amax == 0;
      out.converged = zero_c;
      out.residual = zero_c ? 0.0 : 1.0;
      continue;
    }
    const LyapunovNorms& q = norm[size_t(b)];
    const double r = std::sqrt(q.residual), c_norm = std::sqrt(q.c);
    const double backward = r / (2 * h.scale * std::sqrt(q.x) + c_norm);
    out.residual = h.finite && !overflow[size_t(b)] ? r / c_norm : INFINITY;  // X overflowed the output dtype
    out.converged = h.converged && h.finite && !overflow[size_t(b)] && numerics::definite_sign(q.sign) &&
                    backward <= std::sqrt(unit_roundoff<double>());
  }
}

}  // namespace curvkit
