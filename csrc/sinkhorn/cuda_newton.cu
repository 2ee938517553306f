// Sinkhorn family, CUDA: the Newton phase of Sinkhorn-Newton-Sparse (float64), one problem at a
// time, on the CPU's schedule (sinkhorn/schedule.h). The plan's row and column sums and a
// histogram of log P in two passes; the global threshold that keeps the wanted entries read off
// the histogram on the device; the sparse plan built as CSR by rows (a warp per row, ballots keep
// the columns in order) and its transpose by a stable radix sort of the column indices (CUB), so
// S and S^T hold the same numbers; Jacobi-preconditioned CG on the Schur complement with its
// scalars on the device and a host check every kCheckEvery CG steps; a host-driven line search
// (one read-back per trial). Sums go in a fixed order: the same bits every run.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/check.h"
#include "core/cuda_utils.h"
#include "core/dispatch.h"
#include "core/interrupt.h"
#include "core/linalg_cuda.h"
#include "sinkhorn/cuda_solver.cuh"

namespace curvkit::sinkhorn_impl {
namespace on_device {
namespace {

using cuda::DeviceBuffer;
using namespace sns_schedule;

constexpr int kVectorThreads = 1024;  // the single-block kernels over one problem's vectors

// log P_ij of potentials f_i, g_j: the same expression in every kernel, so the row and column
// passes agree on which entries pass a threshold.
__device__ __forceinline__ double log_plan(double fi, double gj, double cij, double eps) {
  return (fi + gj - cij) / eps;
}

// Row pass of the plan of problem p at (f, g): row sums r and, when `histogram`, the count of log P
// per bin (added to it). A warp per row.
template <class S>
__global__ void plan_rows_kernel(Costs<S> cost, int64_t p, const double* f, const double* g, double eps, double* r,
                                 unsigned long long* histogram) {
  __shared__ unsigned int bins[kBins];
  if (histogram) {
    for (int k = threadIdx.x; k < kBins; k += blockDim.x) bins[k] = 0;
    __syncthreads();
  }
  const int lane = threadIdx.x % 32;
  for (int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; i < cost.n;
       i += int64_t(gridDim.x) * kWarpsPerBlock) {
    double s = 0;
    if (f[i] > -INFINITY)
      for (int64_t j = lane; j < cost.m; j += 32) {
        const double z = log_plan(f[i], g[j], cost(p, i, j), eps);
        s += exp(z);
        if (histogram) {
          const int k = log_bin(z);
          if (k >= 0) atomicAdd(&bins[k], 1u);
        }
      }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFullMask, s, o);
    if (lane == 0) r[i] = s;
  }
  if (histogram) {
    __syncthreads();
    for (int k = threadIdx.x; k < kBins; k += blockDim.x)
      if (bins[k]) atomicAdd(&histogram[k], static_cast<unsigned long long>(bins[k]));
  }
}

// Column sums of the plan of problem p at (f, g) (column_block()).
template <class S>
__global__ void plan_cols_kernel(Costs<S> cost, int64_t p, const double* f, const double* g, double eps, double* c) {
  const int64_t j = int64_t(blockIdx.x) * 32 + threadIdx.x;
  double s = 0;
  if (j < cost.m)
    for (int64_t i = threadIdx.y; i < cost.n; i += kRowGroups)
      if (f[i] > -INFINITY) s += exp(log_plan(f[i], g[j], cost(p, i, j), eps));
  s = column_sum(s);
  if (threadIdx.y == 0 && j < cost.m) c[j] = s;
}

// {marginal error, sum of the plan, dual value <a, f> + <b, g> - eps sum P} from the sums (one block).
__global__ void plan_summary_kernel(const double* a, const double* b, const double* f, const double* g, const double* r,
                                    const double* c, int64_t n, int64_t m, double eps, double* out) {
  double err = 0, total = 0, dual = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    err += fabs(a[i] - r[i]);
    total += r[i];
    dual += a[i] > 0 ? a[i] * f[i] : 0.0;
  }
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    err += fabs(b[j] - c[j]);
    dual += b[j] > 0 ? b[j] * g[j] : 0.0;
  }
  err = cuda::block_sum(err);
  total = cuda::block_sum(total);
  dual = cuda::block_sum(dual);
  if (threadIdx.x == 0) {
    out[0] = err;
    out[1] = total;
    out[2] = dual - eps * total;
  }
}

__global__ void threshold_kernel(const unsigned long long* histogram, int64_t keep, double* threshold) {
  *threshold = threshold_for(histogram, keep);
}

// The entries of problem p's plan with log P >= *threshold, by rows: without kFill, the count per
// row; with it, their columns (ascending), rows and values at row_ptr. A warp per row; a ballot per
// 32 columns places each kept entry.
template <class S, bool kFill>
__global__ void sparse_rows_kernel(Costs<S> cost, int64_t p, const double* f, const double* g, double eps,
                                   const double* threshold, int64_t* counts, const int64_t* row_ptr, int32_t* cols,
                                   int32_t* rows, double* vals) {
  const int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= cost.n) return;
  const double th = *threshold;
  const bool live = f[i] > -INFINITY;
  int64_t at = kFill ? row_ptr[i] : 0;
  for (int64_t j0 = 0; j0 < cost.m; j0 += 32) {
    const int64_t j = j0 + lane;
    const double z = live && j < cost.m ? log_plan(f[i], g[j], cost(p, i, j), eps) : -INFINITY;
    const bool keep = z >= th;
    const unsigned mask = __ballot_sync(kFullMask, keep);
    if (kFill && keep) {
      const int64_t k = at + __popc(mask & ((1u << lane) - 1u));
      cols[k] = int32_t(j);
      rows[k] = int32_t(i);
      vals[k] = exp(z);
    }
    at += __popc(mask);
  }
  if (!kFill && lane == 0) counts[i] = at;
}

__global__ void column_counts_kernel(const int32_t* cols, int64_t nnz, int64_t* counts) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz; k += int64_t(gridDim.x) * blockDim.x)
    atomicAdd(reinterpret_cast<unsigned long long*>(counts + cols[k]), 1ull);
}

__global__ void iota_kernel(int32_t* v, int64_t count) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < count; k += int64_t(gridDim.x) * blockDim.x)
    v[k] = int32_t(k);
}

__global__ void gather_transpose_kernel(const int32_t* order, const int32_t* rows, const double* vals, int64_t nnz,
                                        int32_t* rows_t, double* vals_t) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz; k += int64_t(gridDim.x) * blockDim.x) {
    rows_t[k] = rows[order[k]];
    vals_t[k] = vals[order[k]];
  }
}

// y = S v by rows of a CSR matrix, a warp per row, and one of the epilogues the CG needs.
enum class Epilogue {
  Plain,      // y = S v
  DivideBy,   // y = (S v) / d
  Schur,      // y = d w - S v (the Schur complement's product: w the CG direction)
  Direction,  // y = (eps w - S v) / d (df from dg: w the gradient in f)
};

template <Epilogue kEpilogue>
__global__ void spmv_kernel(const int64_t* ptr, const int32_t* idx, const double* val, const double* v, int64_t rows,
                            const double* d, const double* w, double eps, double* y, const int* done) {
  if (done && *done) return;
  const int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= rows) return;
  double s = 0;
  for (int64_t k = ptr[i] + lane; k < ptr[i + 1]; k += 32) s += val[k] * v[idx[k]];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFullMask, s, o);
  if (lane != 0) return;
  if constexpr (kEpilogue == Epilogue::Plain) y[i] = s;
  if constexpr (kEpilogue == Epilogue::DivideBy) y[i] = s / d[i];
  if constexpr (kEpilogue == Epilogue::Schur) y[i] = d[i] * w[i] - s;
  if constexpr (kEpilogue == Epilogue::Direction) y[i] = (eps * w[i] - s) / d[i];
}

// The Newton system's pieces from the plan's sums: gradients, shifted diagonals, t = grad_f / dr.
__global__ void newton_setup_kernel(const double* a, const double* b, const double* r, const double* c, int64_t n,
                                    int64_t m, double shift_r, double shift_c, double* grad_f, double* grad_g,
                                    double* dr, double* dc, double* t) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n + m; k += int64_t(gridDim.x) * blockDim.x) {
    if (k < n) {
      grad_f[k] = a[k] - r[k];
      dr[k] = r[k] + shift_r;
      t[k] = grad_f[k] / dr[k];
    } else {
      const int64_t j = k - n;
      grad_g[j] = b[j] - c[j];
      dc[j] = c[j] + shift_c;
    }
  }
}

// The Schur complement's right side rhs = eps (grad_g - S^T Dr^-1 grad_f) (u = S^T Dr^-1 grad_f
// given) and its Jacobi preconditioner 1 / (dc_j - sum_i S_ij^2 / dr_i). A warp per column.
__global__ void schur_setup_kernel(const int64_t* col_ptr, const int32_t* rows_t, const double* vals_t,
                                   const double* dr, const double* dc, const double* grad_g, const double* u, int64_t m,
                                   double eps, double* rhs, double* precond) {
  const int64_t j = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (j >= m) return;
  double s = 0;
  for (int64_t k = col_ptr[j] + lane; k < col_ptr[j + 1]; k += 32) s += vals_t[k] * vals_t[k] / dr[rows_t[k]];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFullMask, s, o);
  if (lane == 0) {
    rhs[j] = eps * (grad_g[j] - u[j]);
    precond[j] = 1.0 / fmax(dc[j] - s, 1e-300);
  }
}

// CG's scalars, on the device.
struct CgScalars {
  double rz, stop;
  int done, steps;
};

// CG from dg = 0: residual rhs, z = M rhs, direction z (one block).
__global__ void cg_start_kernel(const double* rhs, const double* precond, int64_t m, double cg_tol, double* res,
                                double* z, double* dir, double* dg, CgScalars* cg) {
  double rz = 0, rr = 0;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    res[j] = rhs[j];
    z[j] = precond[j] * rhs[j];
    dir[j] = z[j];
    dg[j] = 0;
    rz += res[j] * z[j];
    rr += rhs[j] * rhs[j];
  }
  rz = cuda::block_sum(rz);
  rr = cuda::block_sum(rr);
  if (threadIdx.x == 0) {
    cg->rz = rz;
    cg->stop = cg_tol * sqrt(rr);
    cg->done = !(sqrt(rr) > cg->stop);
    cg->steps = 0;
  }
}

// One CG step given q = A dir (one block); sets done when the residual meets the stop or the
// curvature along dir is not positive.
__global__ void cg_step_kernel(const double* q, const double* precond, int64_t m, double* dir, double* dg, double* res,
                               double* z, CgScalars* cg) {
  if (cg->done) return;
  const double rz = cg->rz, stop = cg->stop;
  double pq = 0;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) pq += dir[j] * q[j];
  pq = cuda::block_sum(pq);
  if (!(pq > 0)) {
    if (threadIdx.x == 0) cg->done = 1;
    return;
  }
  const double alpha = rz / pq;
  double rz_next = 0, rr = 0;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    dg[j] += alpha * dir[j];
    res[j] -= alpha * q[j];
    z[j] = precond[j] * res[j];
    rz_next += res[j] * z[j];
    rr += res[j] * res[j];
  }
  rz_next = cuda::block_sum(rz_next);
  rr = cuda::block_sum(rr);
  const double beta = rz_next / rz;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) dir[j] = z[j] + beta * dir[j];
  if (threadIdx.x == 0) {
    cg->rz = rz_next;
    cg->steps += 1;
    cg->done = !(sqrt(rr) > stop);
  }
}

// <u, v> + <w, x> (one block).
__global__ void two_dots_kernel(const double* u, const double* v, int64_t n, const double* w, const double* x,
                                int64_t m, double* out) {
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += u[i] * v[i];
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) s += w[j] * x[j];
  s = cuda::block_sum(s);
  if (threadIdx.x == 0) *out = s;
}

// (ft, gt) = (f, g) + alpha (df, dg).
__global__ void trial_kernel(const double* f, const double* g, const double* df, const double* dg, double alpha,
                             int64_t n, int64_t m, double* ft, double* gt) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n + m; k += int64_t(gridDim.x) * blockDim.x) {
    if (k < n)
      ft[k] = f[k] + alpha * df[k];
    else
      gt[k - n] = g[k - n] + alpha * dg[k - n];
  }
}

// Device buffers of one type that grow on demand.
template <class T>
class Growing {
 public:
  T* at_least(int64_t count, cudaStream_t stream) {
    if (count > capacity_ || !buffer_) {
      capacity_ = std::max<int64_t>({count, 2 * capacity_, 1});
      buffer_ = std::make_unique<DeviceBuffer>(sizeof(T) * size_t(capacity_), stream);
    }
    return buffer_->as<T>();
  }

 private:
  std::unique_ptr<DeviceBuffer> buffer_;
  int64_t capacity_ = 0;
};

// ptr[0] = 0, ptr[k + 1] = counts[0] + ... + counts[k] for k < count (CUB's scan).
void prefix_sums(const int64_t* counts, int64_t* ptr, int64_t count, Growing<unsigned char>& temp,
                 cudaStream_t stream) {
  CK_CUDA_CHECK(cudaMemsetAsync(ptr, 0, sizeof(int64_t), stream));
  size_t bytes = 0;
  CK_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, bytes, counts, ptr + 1, int(count), stream));
  void* scratch = temp.at_least(int64_t(bytes) + 1, stream);
  CK_CUDA_CHECK(cub::DeviceScan::InclusiveSum(scratch, bytes, counts, ptr + 1, int(count), stream));
}

// The entries of problem p's plan at (f, g) with log P >= *threshold, by rows: their count per
// row, row_ptr, and the total (one read-back).
template <class S>
int64_t count_sparse_rows(const Costs<S>& costs, int64_t p, const double* f, const double* g, double eps,
                          const double* threshold, int64_t* counts, int64_t* row_ptr, Growing<unsigned char>& temp,
                          cudaStream_t stream) {
  const unsigned row_blocks = unsigned((costs.n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  sparse_rows_kernel<S, false>
      <<<row_blocks, kThreads, 0, stream>>>(costs, p, f, g, eps, threshold, counts, nullptr, nullptr, nullptr, nullptr);
  prefix_sums(counts, row_ptr, costs.n, temp, stream);
  int64_t nnz = 0;
  CK_CUDA_CHECK(cudaMemcpyAsync(&nnz, row_ptr + costs.n, sizeof nnz, cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  return nnz;
}

// Their columns (ascending in each row), rows and values at row_ptr.
template <class S>
void fill_sparse_rows(const Costs<S>& costs, int64_t p, const double* f, const double* g, double eps,
                      const double* threshold, const int64_t* row_ptr, int32_t* cols, int32_t* rows, double* vals,
                      cudaStream_t stream) {
  const unsigned row_blocks = unsigned((costs.n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  sparse_rows_kernel<S, true>
      <<<row_blocks, kThreads, 0, stream>>>(costs, p, f, g, eps, threshold, nullptr, row_ptr, cols, rows, vals);
}

// The sums of the plan at one pair of potentials.
struct PlanSummary {
  double* r;                      // row sums (n)
  double* c;                      // column sums (m)
  unsigned long long* histogram;  // log P per bin
  double* values;                 // {error, total, dual}
  double error = 0, total = 0, dual = 0;
};

// The Newton phase of the problems of one batch, one at a time: the same schedule as the CPU's
// (sinkhorn/schedule.h), with the passes over the plan, the sparse Hessian and the CG on the device.
template <class S>
class NewtonSolver {
 public:
  NewtonSolver(const Costs<S>& costs, const State& st, double eps, const SinkhornOptions& o, int* running_count,
               double* error, cudaStream_t stream)
      : costs_(costs),
        st_(st),
        n_(costs.n),
        m_(costs.m),
        eps_(eps),
        o_(o),
        running_count_(running_count),
        error_(error),
        stream_(stream),
        vectors_(sizeof(double) * size_t(7 * n_ + 13 * m_ + 16), stream),
        indices_(sizeof(int64_t) * size_t(2 * (n_ + m_) + 4), stream),
        histograms_(sizeof(unsigned long long) * 2 * kBins, stream),
        cg_(sizeof(CgScalars), stream) {
    double* v = vectors_.as<double>();
    auto take = [&v](int64_t count) {
      double* out = v;
      v += count;
      return out;
    };
    cur_ = {take(n_), take(m_), histograms_.as<unsigned long long>(), take(4)};
    trial_ = {take(n_), take(m_), histograms_.as<unsigned long long>() + kBins, take(4)};
    grad_f_ = take(n_), dr_ = take(n_), t_ = take(n_), df_ = take(n_), ft_ = take(n_);
    grad_g_ = take(m_), dc_ = take(m_), u_ = take(m_), rhs_ = take(m_), precond_ = take(m_), res_ = take(m_);
    z_ = take(m_), dir_ = take(m_), q_ = take(m_), dg_ = take(m_), gt_ = take(m_);
    scalars_ = take(4);  // threshold, slope
    int64_t* k = indices_.as<int64_t>();
    row_counts_ = k, row_ptr_ = k + n_ + 1, col_counts_ = row_ptr_ + n_ + 1, col_ptr_ = col_counts_ + m_ + 1;
  }

  // Newton steps for problem p from its potentials until tol or max_newton attempts; returns
  // the steps accepted.
  int64_t run(int64_t p, double mass) {
    const State one = st_.at(p, n_, m_);
    f_ = one.f;
    g_ = one.g;
    a_ = one.a;
    b_ = one.b;
    p_ = p;
    steps_ = 0;
    double density = o_.density > 0 ? o_.density : sns_default_density(n_, m_);
    plan_pass(f_, g_, cur_);
    double window_error = cur_.error;
    int64_t attempts = 0;
    while (cur_.error > o_.tol && attempts < o_.max_newton) {
      if (interrupted()) break;
      ++attempts;
      const double shift = newton_shift(cur_.error, mass);
      newton_setup_kernel<<<grid_for(n_ + m_, kThreads), kThreads, 0, stream_>>>(
          a_, b_, cur_.r, cur_.c, n_, m_, shift * mass / double(n_), shift * mass / double(m_), grad_f_, grad_g_, dr_,
          dc_, t_);
      const int64_t keep = std::max<int64_t>(1, int64_t(std::ceil(density * double(n_) * double(m_))));
      threshold_kernel<<<1, 1, 0, stream_>>>(cur_.histogram, keep, scalars_);
      double slope = 0;
      const bool built = build_sparse();
      if (built && !direction(cg_tolerance(cur_.error, mass), cg_max_steps(m_), slope)) continue;  // interrupted
      if (built && take_step(slope, mass, density, window_error)) continue;
      if (built && density < 1) {
        density = std::min(1.0, 4 * density);
        continue;
      }
      // Newton cannot ascend here (or its Hessian would not fit 32-bit indices): Sinkhorn moves on.
      if (!fall_back(one)) break;
    }
    return steps_;
  }

 private:
  // The line search along (df, dg): halvings until the dual ascends enough (accept_step); on
  // success the potentials move and the density follows density_after_step.
  bool take_step(double slope, double mass, double& density, double& window_error) {
    const double noise = 1e-14 * (std::fabs(cur_.dual) + eps_ * cur_.total);  // the dual's rounding
    double alpha = 1;
    for (int h = 0; h <= kMaxHalvings && slope > 0; ++h, alpha *= 0.5) {
      trial_kernel<<<grid_for(n_ + m_, kThreads), kThreads, 0, stream_>>>(f_, g_, df_, dg_, alpha, n_, m_, ft_, gt_);
      plan_pass(ft_, gt_, trial_);
      if (!(trial_.dual > -INFINITY) || trial_.dual != trial_.dual) continue;
      if (accept_step(trial_.dual, cur_.dual, alpha, slope, noise, trial_.error, cur_.error)) {
        density = density_after_step(density, ++steps_, alpha, trial_.error, cur_.error, mass, window_error);
        CK_CUDA_CHECK(cudaMemcpyAsync(f_, ft_, sizeof(double) * size_t(n_), cudaMemcpyDeviceToDevice, stream_));
        CK_CUDA_CHECK(cudaMemcpyAsync(g_, gt_, sizeof(double) * size_t(m_), cudaMemcpyDeviceToDevice, stream_));
        std::swap(cur_, trial_);
        return true;
      }
    }
    return false;
  }

  // kFallbackIterations Sinkhorn iterations of the problem (fewer if its budget ends first);
  // false when its budget is spent.
  bool fall_back(const State& one) {
    int64_t done = 0;
    CK_CUDA_CHECK(cudaMemcpyAsync(&done, one.iterations, sizeof done, cudaMemcpyDeviceToHost, stream_));
    CK_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const int64_t budget = std::min(kFallbackIterations, o_.max_iters - done);
    if (budget <= 0) return false;
    restart_problem(one, stream_);
    sinkhorn_phase<S, double>(costs_.one(p_), one, 1, eps_, Decision{Handoff::Never, o_.tol, 0, done + budget},
                              error_ + p_, running_count_, stream_);
    plan_pass(f_, g_, cur_);
    return true;
  }

  // The plan's sums at (f, g) into `out`, read back (one synchronization).
  void plan_pass(const double* f, const double* g, PlanSummary& out) {
    CK_CUDA_CHECK(cudaMemsetAsync(out.histogram, 0, sizeof(unsigned long long) * kBins, stream_));
    const unsigned row_blocks = unsigned((n_ + kWarpsPerBlock - 1) / kWarpsPerBlock);
    plan_rows_kernel<S><<<row_blocks, kThreads, 0, stream_>>>(costs_, p_, f, g, eps_, out.r, out.histogram);
    plan_cols_kernel<S><<<column_grid(m_), column_block(), 0, stream_>>>(costs_, p_, f, g, eps_, out.c);
    plan_summary_kernel<<<1, kVectorThreads, 0, stream_>>>(a_, b_, f, g, out.r, out.c, n_, m_, eps_, out.values);
    CK_CUDA_CHECK(cudaGetLastError());
    double host[3];
    CK_CUDA_CHECK(cudaMemcpyAsync(host, out.values, sizeof host, cudaMemcpyDeviceToHost, stream_));
    CK_CUDA_CHECK(cudaStreamSynchronize(stream_));
    out.error = host[0];
    out.total = host[1];
    out.dual = host[2];
  }

  // The sparse plan at the threshold in scalars_[0], by rows and by columns; false when it would
  // hold more entries than 32-bit indices address.
  bool build_sparse() {
    const int64_t nnz =
        count_sparse_rows(costs_, p_, f_, g_, eps_, scalars_, row_counts_, row_ptr_, temp_buffer_, stream_);
    if (nnz > INT32_MAX) return false;
    cols_ = cols_buffer_.at_least(nnz, stream_);
    rows_ = rows_buffer_.at_least(nnz, stream_);
    vals_ = vals_buffer_.at_least(nnz, stream_);
    rows_t_ = rows_t_buffer_.at_least(nnz, stream_);
    vals_t_ = vals_t_buffer_.at_least(nnz, stream_);
    int32_t* order = order_buffer_.at_least(2 * nnz, stream_);
    int32_t* sorted_cols = sorted_cols_buffer_.at_least(nnz, stream_);
    fill_sparse_rows(costs_, p_, f_, g_, eps_, scalars_, row_ptr_, cols_, rows_, vals_, stream_);
    // The transpose: the entries sorted by column, stably, so rows stay ascending in each column.
    CK_CUDA_CHECK(cudaMemsetAsync(col_counts_, 0, sizeof(int64_t) * size_t(m_), stream_));
    column_counts_kernel<<<grid_for(nnz, kThreads), kThreads, 0, stream_>>>(cols_, nnz, col_counts_);
    prefix_sums(col_counts_, col_ptr_, m_, temp_buffer_, stream_);
    iota_kernel<<<grid_for(nnz, kThreads), kThreads, 0, stream_>>>(order, nnz);
    int bits = 1;
    while ((int64_t(1) << bits) < m_) ++bits;
    size_t bytes = 0;
    CK_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, cols_, sorted_cols, order, order + nnz, int(nnz), 0,
                                                  bits, stream_));
    void* temp = temp_buffer_.at_least(int64_t(bytes) + 1, stream_);
    CK_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, bytes, cols_, sorted_cols, order, order + nnz, int(nnz), 0,
                                                  bits, stream_));
    gather_transpose_kernel<<<grid_for(nnz, kThreads), kThreads, 0, stream_>>>(order + nnz, rows_, vals_, nnz, rows_t_,
                                                                               vals_t_);
    CK_CUDA_CHECK(cudaGetLastError());
    return true;
  }

  // The Newton direction (df, dg) = eps M^-1 (grad_f, grad_g), M = [[Dr, S], [S^T, Dc]], by CG
  // on the Schur complement Dc - S^T Dr^-1 S; `slope` = <grad, direction>. False if interrupted.
  bool direction(double cg_tol, int64_t cg_max, double& slope) {
    const unsigned row_blocks = unsigned((n_ + kWarpsPerBlock - 1) / kWarpsPerBlock);
    const unsigned col_blocks = unsigned((m_ + kWarpsPerBlock - 1) / kWarpsPerBlock);
    CgScalars* cg = cg_.as<CgScalars>();
    const int* done = &cg->done;
    spmv_kernel<Epilogue::Plain>
        <<<col_blocks, kThreads, 0, stream_>>>(col_ptr_, rows_t_, vals_t_, t_, m_, nullptr, nullptr, 0, u_, nullptr);
    schur_setup_kernel<<<col_blocks, kThreads, 0, stream_>>>(col_ptr_, rows_t_, vals_t_, dr_, dc_, grad_g_, u_, m_,
                                                             eps_, rhs_, precond_);
    cg_start_kernel<<<1, kVectorThreads, 0, stream_>>>(rhs_, precond_, m_, cg_tol, res_, z_, dir_, dg_, cg);
    for (int64_t launched = 0; launched < cg_max;) {
      const int64_t burst = std::min(kCheckEvery, cg_max - launched);
      for (int64_t k = 0; k < burst; ++k) {
        // q = Dc dir - S^T Dr^-1 S dir
        spmv_kernel<Epilogue::DivideBy>
            <<<row_blocks, kThreads, 0, stream_>>>(row_ptr_, cols_, vals_, dir_, n_, dr_, nullptr, 0, t_, done);
        spmv_kernel<Epilogue::Schur>
            <<<col_blocks, kThreads, 0, stream_>>>(col_ptr_, rows_t_, vals_t_, t_, m_, dc_, dir_, 0, q_, done);
        cg_step_kernel<<<1, kVectorThreads, 0, stream_>>>(q_, precond_, m_, dir_, dg_, res_, z_, cg);
      }
      CK_CUDA_CHECK(cudaGetLastError());
      launched += burst;
      int finished = 0;
      CK_CUDA_CHECK(cudaMemcpyAsync(&finished, done, sizeof finished, cudaMemcpyDeviceToHost, stream_));
      CK_CUDA_CHECK(cudaStreamSynchronize(stream_));
      if (finished) break;
      if (interrupted()) return false;
    }
    // df = Dr^-1 (eps grad_f - S dg)
    spmv_kernel<Epilogue::Direction>
        <<<row_blocks, kThreads, 0, stream_>>>(row_ptr_, cols_, vals_, dg_, n_, dr_, grad_f_, eps_, df_, nullptr);
    two_dots_kernel<<<1, kVectorThreads, 0, stream_>>>(grad_f_, df_, n_, grad_g_, dg_, m_, scalars_ + 1);
    CK_CUDA_CHECK(cudaGetLastError());
    CK_CUDA_CHECK(cudaMemcpyAsync(&slope, scalars_ + 1, sizeof slope, cudaMemcpyDeviceToHost, stream_));
    CK_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return true;
  }

  Costs<S> costs_;
  State st_;
  int64_t n_, m_, p_ = 0, steps_ = 0;
  double eps_;
  const SinkhornOptions& o_;
  int* running_count_;
  double* error_;
  cudaStream_t stream_;
  DeviceBuffer vectors_, indices_, histograms_, cg_;
  PlanSummary cur_{}, trial_{};
  double *f_ = nullptr, *g_ = nullptr, *a_ = nullptr, *b_ = nullptr;
  double *grad_f_, *dr_, *t_, *df_, *ft_, *grad_g_, *dc_, *u_, *rhs_, *precond_, *res_, *z_, *dir_, *q_, *dg_, *gt_;
  double* scalars_;
  int64_t *row_counts_, *row_ptr_, *col_counts_, *col_ptr_;
  Growing<int32_t> cols_buffer_, rows_buffer_, rows_t_buffer_, order_buffer_, sorted_cols_buffer_;
  Growing<double> vals_buffer_, vals_t_buffer_;
  Growing<unsigned char> temp_buffer_;
  int32_t *cols_ = nullptr, *rows_ = nullptr, *rows_t_ = nullptr;
  double *vals_ = nullptr, *vals_t_ = nullptr;
};
}  // namespace

// Potentials of problem `index` in float64, multiplied by scale.
template <class S>
__global__ void scaled_potentials_kernel(const S* f, const S* g, int64_t n, int64_t m, double scale, double* fd,
                                         double* gd) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n + m; k += int64_t(gridDim.x) * blockDim.x) {
    if (k < n)
      fd[k] = to_double(f[k]) * scale;
    else
      gd[k - n] = to_double(g[k - n]) * scale;
  }
}

template <class S>
CsrPlan sparse_plan(const OTProblems& ps, const ArrayView& f, const ArrayView& g, int64_t index, double reg,
                    double threshold, cudaStream_t stream) {
  const int scale_exponent = -std::ilogb(reg);
  const double scale = std::ldexp(1.0, scale_exponent), eps = std::ldexp(reg, scale_exponent);
  const Costs<S> costs = Costs<S>::of(ps, scale);
  const int64_t n = costs.n, m = costs.m;
  DeviceBuffer doubles(sizeof(double) * size_t(n + m + 1), stream);
  DeviceBuffer indices(sizeof(int64_t) * size_t(2 * n + 1), stream);
  double* fd = doubles.as<double>();
  double* gd = fd + n;
  double* log_threshold = gd + m;
  int64_t* counts = indices.as<int64_t>();
  int64_t* row_ptr = counts + n;
  const double host_threshold = std::log(threshold);
  CK_CUDA_CHECK(cudaMemcpyAsync(log_threshold, &host_threshold, sizeof(double), cudaMemcpyHostToDevice, stream));
  scaled_potentials_kernel<S><<<grid_for(n + m, kThreads), kThreads, 0, stream>>>(
      f.ptr<S>() + index * n, g.ptr<S>() + index * m, n, m, scale, fd, gd);
  Growing<unsigned char> temp;
  const int64_t nnz = count_sparse_rows(costs, index, fd, gd, eps, log_threshold, counts, row_ptr, temp, stream);
  CsrPlan plan;
  plan.indptr.resize(size_t(n + 1));
  CK_CUDA_CHECK(
      cudaMemcpyAsync(plan.indptr.data(), row_ptr, sizeof(int64_t) * size_t(n + 1), cudaMemcpyDeviceToHost, stream));
  Growing<int32_t> cols, rows;
  Growing<double> vals;
  int32_t* c = cols.at_least(nnz, stream);
  double* v = vals.at_least(nnz, stream);
  fill_sparse_rows(costs, index, fd, gd, eps, log_threshold, row_ptr, c, rows.at_least(nnz, stream), v, stream);
  CK_CUDA_CHECK(cudaGetLastError());
  std::vector<int32_t> host_cols(static_cast<size_t>(nnz));
  plan.values.resize(static_cast<size_t>(nnz));
  CK_CUDA_CHECK(cudaMemcpyAsync(host_cols.data(), c, sizeof(int32_t) * size_t(nnz), cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaMemcpyAsync(plan.values.data(), v, sizeof(double) * size_t(nnz), cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  plan.indices.assign(host_cols.begin(), host_cols.end());
  return plan;
}

template <class S>
std::vector<int64_t> newton_phase(const Costs<S>& costs, const State& st, double eps, const SinkhornOptions& o,
                                  const std::vector<int>& codes, const std::vector<double>& masses, int* running_count,
                                  double* error, cudaStream_t stream) {
  std::vector<int64_t> steps(codes.size(), -1);
  if (std::count(codes.begin(), codes.end(), int(kHanded)) == 0) return steps;
  NewtonSolver<S> newton(costs, st, eps, o, running_count, error, stream);
  for (size_t p = 0; p < codes.size() && !interrupted(); ++p)
    if (codes[p] == kHanded) steps[p] = newton.run(int64_t(p), masses[p]);
  return steps;
}

#define CK_NEWTON_PHASE(S)                                                                                          \
  template std::vector<int64_t> newton_phase<S>(const Costs<S>&, const State&, double, const SinkhornOptions&,      \
                                                const std::vector<int>&, const std::vector<double>&, int*, double*, \
                                                cudaStream_t);
CK_NEWTON_PHASE(float)
CK_NEWTON_PHASE(double)
CK_NEWTON_PHASE(half_t)
CK_NEWTON_PHASE(bfloat16_t)
#undef CK_NEWTON_PHASE

}  // namespace on_device

CsrPlan sparse_plan_cuda(const OTProblems& problems, const ArrayView& f, const ArrayView& g, int64_t index, double reg,
                         double threshold, StreamHandle stream) {
  CudaDeviceGuard guard(problems.a.device);
  CsrPlan plan;
  CK_DISPATCH_FLOATING(problems.a.dtype, "a", S, [&] {
    plan = on_device::sparse_plan<S>(problems, f, g, index, reg, threshold, to_cuda_stream(stream));
  });
  return plan;
}

}  // namespace curvkit::sinkhorn_impl
