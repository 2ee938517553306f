// Sinkhorn family, CUDA: log-domain Sinkhorn over every problem of a batch at once, in float64.
// One kernel per half-step (f: a warp per row; g: a thread per column, reading the rows of C
// coalesced), a kernel that decides each problem's convergence on the device (a problem that
// met tol stops updating), and a host check of "any problem still running" every kCheckEvery
// iterations: no host round trip per iteration. Sums go through block_sum in a fixed order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/check.h"
#include "core/cuda_utils.h"
#include "core/dispatch.h"
#include "core/interrupt.h"
#include "core/linalg_cuda.h"
#include "sinkhorn/ot_math.h"
#include "sinkhorn/sinkhorn.h"

namespace curvkit::sinkhorn_impl {
namespace {

using cuda::DeviceBuffer;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kCheckEvery = 16;

// The costs of one batch: C (B, n, m) or points x (B, n, d), y (B, m, d), in the storage type.
template <class S>
struct Costs {
  const S* C;
  const S* x;
  const S* y;
  int64_t n, m, d;
  GroundCost kind;
  double p;
  double scale;  // a power of two: costs, potentials and eps are solved multiplied by it

  __device__ double operator()(int64_t b, int64_t i, int64_t j) const {
    if (C) return to_double(C[(b * n + i) * m + j]) * scale;
    const S* xi = x + (b * n + i) * d;
    const S* yj = y + (b * m + j) * d;
    double s = 0;
    for (int64_t k = 0; k < d; ++k) s += ot_math::cost_term(kind, to_double(xi[k]) - to_double(yj[k]), p);
    return ot_math::cost_finish(kind, s) * scale;
  }
};

// Merges (max, sum of exp(z - max)) pairs.
__device__ __forceinline__ void lse_merge(double& mx, double& s, double mx2, double s2) {
  if (mx2 > mx) {
    s = s * exp(mx - mx2) + s2;
    mx = mx2;
  } else if (mx2 > -INFINITY) {
    s += s2 * exp(mx2 - mx);
  }
}

__device__ __forceinline__ void lse_add(double& mx, double& s, double z) {
  if (z > mx) {
    s = s * exp(mx - z) + 1.0;
    mx = z;
  } else if (z > -INFINITY) {
    s += exp(z - mx);
  }
}

struct State {
  double *f, *f_new, *g, *loga, *logb, *a, *b, *row_err;
  int* active;
  int64_t* iterations;
};

// f half-step: a warp per row of every running problem; f_new and the row's marginal error.
template <class S>
__global__ void f_step_kernel(Costs<S> cost, State st, int64_t B, double eps) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B * cost.n) return;
  const int64_t b = row / cost.n, i = row % cost.n;
  if (!st.active[b]) return;
  double mx = -INFINITY, s = 0;
  if (st.a[row] > 0)
    for (int64_t j = lane; j < cost.m; j += 32) lse_add(mx, s, (st.g[b * cost.m + j] - cost(b, i, j)) / eps);
  for (int o = 16; o > 0; o >>= 1) {
    const double mx2 = __shfl_xor_sync(0xffffffffu, mx, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(mx, s, mx2, s2);
  }
  if (lane == 0) {
    const double w = st.a[row];
    if (w > 0) {
      const double fresh = eps * (st.loga[row] - (mx + log(s)));
      st.f_new[row] = fresh;
      st.row_err[row] = fabs(w - w * exp((st.f[row] - fresh) / eps));
    } else {
      st.f_new[row] = -INFINITY;
      st.row_err[row] = 0;
    }
  }
}

// Per problem: the error of the plan (f, g); a problem whose error met tol (or is NaN) stops
// and keeps f, the others take f_new.
__global__ void decide_kernel(State st, int64_t n, double tol, double* error) {
  const int64_t b = blockIdx.x;
  if (!st.active[b]) return;
  double e = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) e += st.row_err[b * n + i];
  e = cuda::block_sum(e);
  const bool stop = !(e > tol);
  if (!stop)
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) st.f[b * n + i] = st.f_new[b * n + i];
  if (threadIdx.x == 0) {
    error[b] = e;
    if (stop) st.active[b] = 0;
  }
}

// g half-step: a thread per column of every running problem, over the rows in order.
template <class S>
__global__ void g_step_kernel(Costs<S> cost, State st, int64_t B, double eps) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= B * cost.m) return;
  const int64_t b = col / cost.m, j = col % cost.m;
  if (!st.active[b]) return;
  if (!(st.b[col] > 0)) {
    st.g[col] = -INFINITY;
    return;
  }
  double mx = -INFINITY, s = 0;
  for (int64_t i = 0; i < cost.n; ++i) lse_add(mx, s, (st.f[b * cost.n + i] - cost(b, i, j)) / eps);
  st.g[col] = eps * (st.logb[col] - (mx + log(s)));
  if (j == 0) ++st.iterations[b];
}

__global__ void count_active_kernel(const int* active, int64_t B, int* count) {
  int c = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) c += active[b];
  c = int(cuda::block_sum(double(c)));
  if (threadIdx.x == 0) *count = c;
}

// Marginals: sums, invalid entries, then the log marginals with b rescaled to a's mass.
template <class S>
__global__ void marginal_stats_kernel(const S* a, const S* b, int64_t n, int64_t m, double* stats) {
  const int64_t p = blockIdx.x;
  double sa = 0, sb = 0, bad_a = 0, bad_b = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double v = to_double(a[p * n + i]);
    sa += v;
    bad_a = fmax(bad_a, isfinite(v) && v >= 0 ? 0.0 : 1.0);
  }
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const double v = to_double(b[p * m + j]);
    sb += v;
    bad_b = fmax(bad_b, isfinite(v) && v >= 0 ? 0.0 : 1.0);
  }
  sa = cuda::block_sum(sa);
  sb = cuda::block_sum(sb);
  bad_a = cuda::block_max(bad_a);
  bad_b = cuda::block_max(bad_b);
  if (threadIdx.x == 0) {
    stats[p * 4 + 0] = sa;
    stats[p * 4 + 1] = sb;
    stats[p * 4 + 2] = bad_a;
    stats[p * 4 + 3] = bad_b;
  }
}

// The index of the first non-finite entry of v (count entries); *first is left as it was when none.
template <class S>
__global__ void first_nonfinite_kernel(const S* v, int64_t count, unsigned long long* first) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < count; k += int64_t(gridDim.x) * blockDim.x)
    if (!isfinite(to_double(v[k]))) atomicMin(first, (unsigned long long)k);
}

template <class S>
__global__ void init_kernel(const S* a, const S* b, const S* f0, const S* g0, const double* stats, int64_t B, int64_t n,
                            int64_t m, bool warm, double scale, State st) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < B * (n + m);
       k += int64_t(gridDim.x) * blockDim.x) {
    if (k < B * n) {
      const double v = to_double(a[k]);
      st.a[k] = v;
      st.loga[k] = log(v);
      st.f[k] = warm ? to_double(f0[k]) * scale : 0.0;
    } else {
      const int64_t q = k - B * n, p = q / m;
      const double v = to_double(b[q]) * (stats[p * 4 + 0] / stats[p * 4 + 1]);
      st.b[q] = v;
      st.logb[q] = log(v);
      st.g[q] = warm ? to_double(g0[q]) * scale : 0.0;
    }
    if (k < B) {
      st.active[k] = 1;
      st.iterations[k] = 0;
    }
  }
}

// Final pass, rows: row sums, <C, P> per row, the plan written when wanted.
template <class S>
__global__ void final_rows_kernel(Costs<S> cost, State st, int64_t B, double eps, S* plan, double* row_sum,
                                  double* row_cost) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B * cost.n) return;
  const int64_t b = row / cost.n, i = row % cost.n;
  double s = 0, c = 0;
  for (int64_t j = lane; j < cost.m; j += 32) {
    const double cij = cost(b, i, j), e = exp((st.f[row] + st.g[b * cost.m + j] - cij) / eps);
    s += e;
    c += e > 0 ? e * cij : 0.0;
    if (plan) plan[row * cost.m + j] = from_double<S>(e);
  }
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, o);
    c += __shfl_xor_sync(0xffffffffu, c, o);
  }
  if (lane == 0) {
    row_sum[row] = s;
    row_cost[row] = c;
  }
}

template <class S>
__global__ void final_cols_kernel(Costs<S> cost, State st, int64_t B, double eps, double* col_sum) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= B * cost.m) return;
  const int64_t b = col / cost.m, j = col % cost.m;
  double s = 0;
  for (int64_t i = 0; i < cost.n; ++i) s += exp((st.f[b * cost.n + i] + st.g[col] - cost(b, i, j)) / eps);
  col_sum[col] = s;
}

// Per problem: {marginal error, <C, P>, objective}, and the potentials stored in S.
template <class S>
__global__ void status_kernel(State st, const double* row_sum, const double* row_cost, const double* col_sum, int64_t n,
                              int64_t m, double eps, double scale, S* f_out, S* g_out, double* out) {
  const int64_t b = blockIdx.x;
  double err = 0, total = 0, cost = 0, fr = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t k = b * n + i;
    err += fabs(st.a[k] - row_sum[k]);
    total += row_sum[k];
    cost += row_cost[k];
    fr += row_sum[k] > 0 ? st.f[k] * row_sum[k] : 0.0;
    f_out[k] = from_double<S>(st.f[k] / scale);
  }
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const int64_t k = b * m + j;
    err += fabs(st.b[k] - col_sum[k]);
    fr += col_sum[k] > 0 ? st.g[k] * col_sum[k] : 0.0;
    g_out[k] = from_double<S>(st.g[k] / scale);
  }
  err = cuda::block_sum(err);
  total = cuda::block_sum(total);
  cost = cuda::block_sum(cost);
  fr = cuda::block_sum(fr);
  if (threadIdx.x == 0) {
    out[b * 3 + 0] = err;
    out[b * 3 + 1] = cost;
    out[b * 3 + 2] = fr - eps * total;
  }
}

template <class S>
void solve_batch(const OTProblems& ps, const OTOutputs& out, const SinkhornOptions& o, size_t position, bool list,
                 std::vector<SinkhornStatus>& status, cudaStream_t stream) {
  const int64_t B = ps.a.size(0), n = ps.a.size(1), m = ps.b.size(1);
  status.assign(size_t(B), SinkhornStatus{});
  if (B == 0) return;
  const std::string where = list ? cat(" (list item ", position, ", problem ") : " (problem ";
  // ---- checks of the values (one host synchronization)
  DeviceBuffer stats(sizeof(double) * size_t(B * 4) + sizeof(unsigned long long), stream);
  double* st4 = stats.as<double>();
  auto* first = reinterpret_cast<unsigned long long*>(st4 + B * 4);
  const S* values = ps.cost == GroundCost::Matrix ? ps.C.ptr<S>() : ps.x.ptr<S>();
  const int64_t count = ps.cost == GroundCost::Matrix ? B * n * m : B * n * ps.x.size(2);
  const unsigned long long none = ~0ull;
  CK_CUDA_CHECK(cudaMemcpyAsync(first, &none, sizeof none, cudaMemcpyHostToDevice, stream));
  marginal_stats_kernel<S><<<unsigned(B), kThreads, 0, stream>>>(ps.a.ptr<S>(), ps.b.ptr<S>(), n, m, st4);
  first_nonfinite_kernel<S><<<grid_for(count, kThreads), kThreads, 0, stream>>>(values, count, first);
  CK_CUDA_CHECK(cudaGetLastError());
  std::vector<double> host(size_t(B * 4));
  unsigned long long bad = 0;
  CK_CUDA_CHECK(cudaMemcpyAsync(host.data(), st4, sizeof(double) * host.size(), cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaMemcpyAsync(&bad, first, sizeof bad, cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  const double mass_tol = mass_tolerance(ps.a.dtype);
  for (int64_t p = 0; p < B; ++p) {
    const double sa = host[size_t(p * 4)], sb = host[size_t(p * 4 + 1)];
    CK_CHECK_VALUE(host[size_t(p * 4 + 2)] == 0, "argument 'a' must be finite and >= 0", where, p, ")");
    CK_CHECK_VALUE(host[size_t(p * 4 + 3)] == 0, "argument 'b' must be finite and >= 0", where, p, ")");
    CK_CHECK_VALUE(sa > 0 && sb > 0, "arguments 'a' and 'b' must have positive mass, got ", sa, " and ", sb, where, p,
                   ")");
    CK_CHECK_VALUE(std::fabs(sa - sb) <= mass_tol * std::max(sa, sb),
                   "arguments 'a' and 'b' must have the same mass, got ", sa, " and ", sb, where, p,
                   "; relative tolerance ", mass_tol, ")");
  }
  if (bad != none) {
    const int64_t per = count / B;
    CK_CHECK_VALUE(false, "argument '", ps.cost == GroundCost::Matrix ? "C" : "x", "' must be finite", where,
                   int64_t(bad) / per, ")");
  }
  if (ps.cost != GroundCost::Matrix) {
    const int64_t ycount = B * m * ps.y.size(2);
    CK_CUDA_CHECK(cudaMemcpyAsync(first, &none, sizeof none, cudaMemcpyHostToDevice, stream));
    first_nonfinite_kernel<S><<<grid_for(ycount, kThreads), kThreads, 0, stream>>>(ps.y.ptr<S>(), ycount, first);
    CK_CUDA_CHECK(cudaMemcpyAsync(&bad, first, sizeof bad, cudaMemcpyDeviceToHost, stream));
    CK_CUDA_CHECK(cudaStreamSynchronize(stream));
    CK_CHECK_VALUE(bad == none, "argument 'y' must be finite", where, int64_t(bad) / (ycount / B), ")");
  }
  // ---- state; scaled by 2^k so that eps lies in [1, 2) (1 / eps never overflows)
  const int scale_exponent = -std::ilogb(o.reg);
  const double scale = std::ldexp(1.0, scale_exponent), eps = std::ldexp(o.reg, scale_exponent);
  const size_t dn = size_t(B * n), dm = size_t(B * m), db = size_t(B);
  DeviceBuffer doubles(sizeof(double) * (5 * dn + 4 * dm + 4 * db), stream);
  DeviceBuffer ints(sizeof(int64_t) * db + sizeof(int) * (db + 1), stream);
  double* base = doubles.as<double>();
  State st;
  st.f = base;
  st.f_new = st.f + dn;
  st.loga = st.f_new + dn;
  st.a = st.loga + dn;
  st.row_err = st.a + dn;
  st.g = st.row_err + dn;
  st.logb = st.g + dm;
  st.b = st.logb + dm;
  double* col_sum = st.b + dm;
  double* error = col_sum + dm;
  double* results = error + db;  // 3 per problem
  st.iterations = ints.as<int64_t>();
  st.active = reinterpret_cast<int*>(st.iterations + db);
  int* active_count = st.active + db;
  init_kernel<S><<<grid_for(B * (n + m), kThreads), kThreads, 0, stream>>>(
      ps.a.ptr<S>(), ps.b.ptr<S>(), out.f.ptr<S>(), out.g.ptr<S>(), st4, B, n, m, o.warm_start, scale, st);
  const Costs<S> costs{ps.cost == GroundCost::Matrix ? ps.C.ptr<S>() : nullptr,
                       ps.cost == GroundCost::Matrix ? nullptr : ps.x.ptr<S>(),
                       ps.cost == GroundCost::Matrix ? nullptr : ps.y.ptr<S>(),
                       n,
                       m,
                       ps.cost == GroundCost::Matrix ? 1 : ps.x.size(2),
                       ps.cost,
                       ps.p,
                       scale};
  const unsigned row_blocks = unsigned((B * n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const unsigned col_blocks = unsigned((B * m + kThreads - 1) / kThreads);
  // ---- iterations
  for (int64_t it = 0; it < o.max_iters;) {
    const int64_t burst = std::min(kCheckEvery, o.max_iters - it);
    for (int64_t k = 0; k < burst; ++k) {
      f_step_kernel<S><<<row_blocks, kThreads, 0, stream>>>(costs, st, B, eps);
      decide_kernel<<<unsigned(B), kThreads, 0, stream>>>(st, n, o.tol, error);
      g_step_kernel<S><<<col_blocks, kThreads, 0, stream>>>(costs, st, B, eps);
    }
    CK_CUDA_CHECK(cudaGetLastError());
    it += burst;
    int running = 0;
    count_active_kernel<<<1, kThreads, 0, stream>>>(st.active, B, active_count);
    CK_CUDA_CHECK(cudaMemcpyAsync(&running, active_count, sizeof running, cudaMemcpyDeviceToHost, stream));
    CK_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (running == 0 || interrupted()) break;
  }
  throw_if_interrupted();
  // ---- the plan, its sums and the status (one more synchronization)
  S* plan = out.plan ? out.plan->ptr<S>() : nullptr;
  final_rows_kernel<S><<<row_blocks, kThreads, 0, stream>>>(costs, st, B, eps, plan, st.row_err, st.f_new);
  final_cols_kernel<S><<<col_blocks, kThreads, 0, stream>>>(costs, st, B, eps, col_sum);
  status_kernel<S><<<unsigned(B), kThreads, 0, stream>>>(st, st.row_err, st.f_new, col_sum, n, m, eps, scale,
                                                         out.f.ptr<S>(), out.g.ptr<S>(), results);
  CK_CUDA_CHECK(cudaGetLastError());
  std::vector<double> res(size_t(B * 3));
  std::vector<int64_t> iters(db);
  std::vector<int> act(db);
  CK_CUDA_CHECK(cudaMemcpyAsync(res.data(), results, sizeof(double) * res.size(), cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaMemcpyAsync(iters.data(), st.iterations, sizeof(int64_t) * db, cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaMemcpyAsync(act.data(), st.active, sizeof(int) * db, cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (int64_t p = 0; p < B; ++p) {
    SinkhornStatus& s = status[size_t(p)];
    s.method = SinkhornMethod::Log;
    s.iterations = iters[size_t(p)];
    s.marginal_error = res[size_t(p * 3)];
    s.cost = res[size_t(p * 3 + 1)] / scale;
    s.objective = res[size_t(p * 3 + 2)] / scale;
    const double mass = host[size_t(p * 4)];
    // The device stopped a problem on the same error up to rounding (column sums computed anew).
    s.converged =
        s.marginal_error <= o.tol || (act[size_t(p)] == 0 && s.marginal_error <= o.tol + 1e3 * 0x1p-53 * mass);
  }
}

}  // namespace

void solve_cuda(const std::vector<OTProblems>& problems, const std::vector<OTOutputs>& outputs,
                const SinkhornOptions& o, std::vector<std::vector<SinkhornStatus>>& status, StreamHandle handle) {
  CK_CHECK_VALUE(o.method != SinkhornMethod::SNS,
                 "method='sns' runs on the CPU only in this version; use method='log' (or 'auto') for CUDA arrays");
  CudaDeviceGuard guard(problems[0].a.device);
  const cudaStream_t stream = to_cuda_stream(handle);
  for (size_t k = 0; k < problems.size(); ++k)
    CK_DISPATCH_FLOATING(problems[k].a.dtype, "a", S, [&] {
      solve_batch<S>(problems[k], outputs[k], o, k, problems.size() > 1, status[k], stream);
    });
}

}  // namespace curvkit::sinkhorn_impl
