// Sinkhorn family, CUDA: the batch solver. Log-domain Sinkhorn over every problem of a batch at
// once: one kernel per half-step (f: a warp per row; g: 32 columns a block, their rows split over
// kRowGroups thread rows, each warp reading 32 consecutive costs of a row), in float32 arithmetic
// for the optional warm-up and float64 after it, and a kernel that decides each problem's fate on
// the device (met tol, float32's floor, out of budget, handed over to Newton by
// sinkhorn/schedule.h); the host asks whether any problem still runs every kCheckEvery
// iterations, never per iteration. Problems handed over go to the Newton phase (cuda_newton.cu);
// then one pass writes the plans, sums and potentials. Sums go in a fixed order (warp shuffles,
// block_sum, column_sum): the same bits every run.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
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
using sns_schedule::hand_over;
using sns_schedule::kRateWindow;

// Merges (max, sum of exp(z - max)) pairs.
template <class T>
__device__ __forceinline__ void lse_merge(T& mx, T& s, T mx2, T s2) {
  if (mx2 > mx) {
    s = s * exp(mx - mx2) + s2;
    mx = mx2;
  } else if (mx2 > -T(INFINITY)) {
    s += s2 * exp(mx2 - mx);
  }
}

template <class T>
__device__ __forceinline__ void lse_add(T& mx, T& s, T z) {
  if (z > mx) {
    s = s * exp(mx - z) + T(1);
    mx = z;
  } else if (z > -T(INFINITY)) {
    s += exp(z - mx);
  }
}

// f half-step in compute type T: a warp per row of every running problem; f_new and the row's
// marginal error (the plan (f, g) against a).
template <class S, class T>
__global__ void f_step_kernel(Costs<S> cost, State st, int64_t B, double eps) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B * cost.n) return;
  const int64_t b = row / cost.n, i = row % cost.n;
  if (st.code[b] != kRunning) return;
  const T teps = T(eps);
  T mx = -T(INFINITY), s = 0;
  if (st.a[row] > 0)
    for (int64_t j = lane; j < cost.m; j += 32) lse_add(mx, s, (T(st.g[b * cost.m + j]) - T(cost(b, i, j))) / teps);
  for (int o = 16; o > 0; o >>= 1) {
    const T mx2 = __shfl_xor_sync(kFullMask, mx, o), s2 = __shfl_xor_sync(kFullMask, s, o);
    lse_merge(mx, s, mx2, s2);
  }
  if (lane == 0) {
    const double w = st.a[row];
    if (w > 0) {
      const double fresh = eps * (st.loga[row] - (double(mx) + log(double(s))));
      st.f_new[row] = fresh;
      st.row_err[row] = fabs(w - w * exp((st.f[row] - fresh) / eps));
    } else {
      st.f_new[row] = -INFINITY;
      st.row_err[row] = 0;
    }
  }
}

// Per running problem: the error of the plan (f, g) and the problem's fate (sinkhorn/schedule.h,
// as the CPU's phase decides); a problem that goes on takes f_new, one that stops keeps f.
__global__ void decide_kernel(State st, int64_t n, Decision rule, double* error) {
  __shared__ int verdict;
  const int64_t b = blockIdx.x;
  if (st.code[b] != kRunning) return;
  double e = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) e += st.row_err[b * n + i];
  e = cuda::block_sum(e);
  if (threadIdx.x == 0) {
    int v = kRunning;
    if (!(e > rule.tol)) {
      v = kMetTol;  // NaN included: the final pass reports it
    } else if (!(e > rule.floor * st.stats[b * 4])) {
      v = kFloor;
    } else if (st.iterations[b] >= rule.max_iters) {
      v = kOutOfBudget;
    } else {
      const int64_t k = st.phase_steps[b];
      double* h = st.history + b * kHistory;
      h[k % kHistory] = e;
      const double window = k >= kRateWindow ? h[(k - kRateWindow) % kHistory] : 0.0;
      st.phase_steps[b] = k + 1;
      if (hand_over(rule.handoff, e, window, st.iterations[b], rule.tol)) v = kHanded;
    }
    verdict = v;
    error[b] = e;
    st.code[b] = v;
  }
  __syncthreads();
  if (verdict == kRunning)
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) st.f[b * n + i] = st.f_new[b * n + i];
}

// g half-step in compute type T over the columns of every running problem (column_block()).
template <class S, class T>
__global__ void g_step_kernel(Costs<S> cost, State st, int64_t B, double eps) {
  __shared__ T part_mx[kRowGroups][32], part_s[kRowGroups][32];
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const bool valid = col < B * cost.m;
  const int64_t b = valid ? col / cost.m : 0, j = valid ? col % cost.m : 0;
  const bool running = valid && st.code[b] == kRunning, live = running && st.b[col] > 0;
  const T teps = T(eps);
  T mx = -T(INFINITY), s = 0;
  if (live)
    for (int64_t i = threadIdx.y; i < cost.n; i += kRowGroups)
      lse_add(mx, s, (T(st.f[b * cost.n + i]) - T(cost(b, i, j))) / teps);
  part_mx[threadIdx.y][threadIdx.x] = mx;
  part_s[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || !running) return;
  for (int k = 1; k < kRowGroups; ++k) lse_merge(mx, s, part_mx[k][threadIdx.x], part_s[k][threadIdx.x]);
  st.g[col] = live ? eps * (st.logb[col] - (double(mx) + log(double(s)))) : -INFINITY;
  if (j == 0) ++st.iterations[b];
}

__global__ void count_running_kernel(const int* code, int64_t B, int* count) {
  int c = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) c += code[b] == kRunning;
  c = int(cuda::block_sum(double(c)));
  if (threadIdx.x == 0) *count = c;
}

// A new phase: problems stopped at the float32 floor run on; every phase's rate window restarts.
__global__ void next_phase_kernel(State st, int64_t B) {
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += int64_t(gridDim.x) * blockDim.x) {
    if (st.code[b] == kFloor) st.code[b] = kRunning;
    st.phase_steps[b] = 0;
  }
}

__global__ void restart_kernel(State one) {
  *one.code = kRunning;
  *one.phase_steps = 0;
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
__global__ void init_kernel(const S* a, const S* b, const S* f0, const S* g0, int64_t B, int64_t n, int64_t m,
                            bool warm, double scale, State st) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < B * (n + m);
       k += int64_t(gridDim.x) * blockDim.x) {
    if (k < B * n) {
      const double v = to_double(a[k]);
      st.a[k] = v;
      st.loga[k] = log(v);
      st.f[k] = warm ? to_double(f0[k]) * scale : 0.0;
    } else {
      const int64_t q = k - B * n, p = q / m;
      const double v = to_double(b[q]) * (st.stats[p * 4 + 0] / st.stats[p * 4 + 1]);
      st.b[q] = v;
      st.logb[q] = log(v);
      st.g[q] = warm ? to_double(g0[q]) * scale : 0.0;
    }
    if (k < B) {
      st.code[k] = kRunning;
      st.iterations[k] = 0;
      st.phase_steps[k] = 0;
    }
  }
}

// ---- The final pass

// Rows: row sums, <C, P> per row, the plan written when wanted.
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
    s += __shfl_xor_sync(kFullMask, s, o);
    c += __shfl_xor_sync(kFullMask, c, o);
  }
  if (lane == 0) {
    row_sum[row] = s;
    row_cost[row] = c;
  }
}

// Column sums of every problem's plan (column_block()).
template <class S>
__global__ void final_cols_kernel(Costs<S> cost, State st, int64_t B, double eps, double* col_sum) {
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const bool valid = col < B * cost.m;
  const int64_t b = valid ? col / cost.m : 0, j = valid ? col % cost.m : 0;
  double s = 0;
  if (valid)
    for (int64_t i = threadIdx.y; i < cost.n; i += kRowGroups)
      s += exp((st.f[b * cost.n + i] + st.g[col] - cost(b, i, j)) / eps);
  s = column_sum(s);
  if (threadIdx.y == 0 && valid) col_sum[col] = s;
}

// The largest v over the block (-inf when none), to every thread (every thread calls it).
__device__ double block_signed_max(double v) {
  __shared__ double warp_max[32];
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = v;
  __syncthreads();
  double m = -INFINITY;
  for (int w = 0; w < int(blockDim.x >> 5); ++w) m = fmax(m, warp_max[w]);
  __syncthreads();
  return m;
}

// Per problem: {marginal error, <C, P>, objective, potentials overflow}, and the potentials stored
// in S, balanced for half precision (ot_math::balancing_shift); a finite potential beyond S's
// range is flagged and the problem's potentials are written as zeros.
template <class S>
__global__ void status_kernel(State st, const double* row_sum, const double* row_cost, const double* col_sum, int64_t n,
                              int64_t m, double eps, double scale, S* f_out, S* g_out, double* out) {
  const int64_t b = blockIdx.x;
  double shift = 0;
  if constexpr (ot_math::is_half_precision<S>) {
    double f_hi = -INFINITY, f_lo = -INFINITY, g_hi = -INFINITY, g_lo = -INFINITY;  // lo: the max of -v
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (isfinite(st.f[b * n + i])) f_hi = fmax(f_hi, st.f[b * n + i]), f_lo = fmax(f_lo, -st.f[b * n + i]);
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x)
      if (isfinite(st.g[b * m + j])) g_hi = fmax(g_hi, st.g[b * m + j]), g_lo = fmax(g_lo, -st.g[b * m + j]);
    f_hi = block_signed_max(f_hi);
    f_lo = block_signed_max(f_lo);
    g_hi = block_signed_max(g_hi);
    g_lo = block_signed_max(g_lo);
    if (f_hi >= -f_lo && g_hi >= -g_lo) shift = ot_math::balancing_shift(-f_lo, f_hi, -g_lo, g_hi);
  }
  double err = 0, total = 0, cost = 0, fr = 0, overflow = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t k = b * n + i;
    err += fabs(st.a[k] - row_sum[k]);
    total += row_sum[k];
    cost += row_cost[k];
    fr += row_sum[k] > 0 ? st.f[k] * row_sum[k] : 0.0;
    const double v = (st.f[k] + shift) / scale;
    f_out[k] = from_double<S>(v);
    overflow = fmax(overflow, isfinite(v) && !isfinite(to_double(f_out[k])) ? 1.0 : 0.0);
  }
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const int64_t k = b * m + j;
    err += fabs(st.b[k] - col_sum[k]);
    fr += col_sum[k] > 0 ? st.g[k] * col_sum[k] : 0.0;
    const double v = (st.g[k] - shift) / scale;
    g_out[k] = from_double<S>(v);
    overflow = fmax(overflow, isfinite(v) && !isfinite(to_double(g_out[k])) ? 1.0 : 0.0);
  }
  err = cuda::block_sum(err);
  total = cuda::block_sum(total);
  cost = cuda::block_sum(cost);
  fr = cuda::block_sum(fr);
  overflow = cuda::block_max(overflow);
  if (overflow > 0) {  // never an Inf handed on: zeros, as for every family (a zero mass keeps -inf)
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (isfinite(st.f[b * n + i])) f_out[b * n + i] = from_double<S>(0.0);
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x)
      if (isfinite(st.g[b * m + j])) g_out[b * m + j] = from_double<S>(0.0);
  }
  if (threadIdx.x == 0) {
    out[b * 4 + 0] = err;
    out[b * 4 + 1] = cost;
    out[b * 4 + 2] = fr - eps * total;
    out[b * 4 + 3] = overflow;
  }
}

// Checks the values of a batch: marginals valid with equal masses, costs or points finite (one
// host synchronization, two with points). Returns the per-problem stats (the mass of a first).
template <class S>
std::vector<double> check_values(const OTProblems& ps, const std::string& where, double* stats,
                                 unsigned long long* first, cudaStream_t stream) {
  const int64_t B = ps.a.size(0), n = ps.a.size(1), m = ps.b.size(1);
  const S* values = ps.cost == GroundCost::Matrix ? ps.C.ptr<S>() : ps.x.ptr<S>();
  const int64_t count = ps.cost == GroundCost::Matrix ? B * n * m : B * n * ps.x.size(2);
  const unsigned long long none = ~0ull;
  CK_CUDA_CHECK(cudaMemcpyAsync(first, &none, sizeof none, cudaMemcpyHostToDevice, stream));
  marginal_stats_kernel<S><<<unsigned(B), kThreads, 0, stream>>>(ps.a.ptr<S>(), ps.b.ptr<S>(), n, m, stats);
  first_nonfinite_kernel<S><<<grid_for(count, kThreads), kThreads, 0, stream>>>(values, count, first);
  CK_CUDA_CHECK(cudaGetLastError());
  std::vector<double> host(size_t(B * 4));
  unsigned long long bad = 0;
  CK_CUDA_CHECK(cudaMemcpyAsync(host.data(), stats, sizeof(double) * host.size(), cudaMemcpyDeviceToHost, stream));
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
  return host;
}

}  // namespace

template <class S, class T>
void sinkhorn_phase(const Costs<S>& costs, const State& st, int64_t B, double eps, const Decision& rule, double* error,
                    int* running_count, cudaStream_t stream) {
  const unsigned row_blocks = unsigned((B * costs.n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  // Each problem stops by its budget at the latest: max_iters + 1 decisions.
  for (int64_t it = 0; it <= rule.max_iters; it += kCheckEvery) {
    for (int64_t k = 0; k < kCheckEvery; ++k) {
      f_step_kernel<S, T><<<row_blocks, kThreads, 0, stream>>>(costs, st, B, eps);
      decide_kernel<<<unsigned(B), kThreads, 0, stream>>>(st, costs.n, rule, error);
      g_step_kernel<S, T><<<column_grid(B * costs.m), column_block(), 0, stream>>>(costs, st, B, eps);
    }
    CK_CUDA_CHECK(cudaGetLastError());
    int running = 0;
    count_running_kernel<<<1, kThreads, 0, stream>>>(st.code, B, running_count);
    CK_CUDA_CHECK(cudaMemcpyAsync(&running, running_count, sizeof running, cudaMemcpyDeviceToHost, stream));
    CK_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (running == 0 || interrupted()) break;
  }
}

void restart_problem(const State& one, cudaStream_t stream) { restart_kernel<<<1, 1, 0, stream>>>(one); }

#define CK_SINKHORN_PHASE(S)                                                                                        \
  template void sinkhorn_phase<S, double>(const Costs<S>&, const State&, int64_t, double, const Decision&, double*, \
                                          int*, cudaStream_t);
CK_SINKHORN_PHASE(float)
CK_SINKHORN_PHASE(double)
CK_SINKHORN_PHASE(half_t)
CK_SINKHORN_PHASE(bfloat16_t)
#undef CK_SINKHORN_PHASE

namespace {

template <class S>
void solve_batch(const OTProblems& ps, const OTOutputs& out, const SinkhornOptions& o, size_t position, bool list,
                 std::vector<SinkhornStatus>& status, cudaStream_t stream) {
  const int64_t B = ps.a.size(0), n = ps.a.size(1), m = ps.b.size(1);
  status.assign(size_t(B), SinkhornStatus{});
  if (B == 0) return;
  const std::string where = list ? cat(" (list item ", position, ", problem ") : " (problem ";
  DeviceBuffer check(sizeof(double) * size_t(B * 4) + sizeof(unsigned long long), stream);
  double* stats = check.as<double>();
  const std::vector<double> host =
      check_values<S>(ps, where, stats, reinterpret_cast<unsigned long long*>(stats + B * 4), stream);
  // ---- state; scaled by 2^k so that eps lies in [1, 2) (1 / eps never overflows)
  const int scale_exponent = -std::ilogb(o.reg);
  const double scale = std::ldexp(1.0, scale_exponent), eps = std::ldexp(o.reg, scale_exponent);
  const size_t dn = size_t(B * n), dm = size_t(B * m), db = size_t(B);
  DeviceBuffer doubles(sizeof(double) * (5 * dn + 4 * dm + (5 + kHistory) * db), stream);
  DeviceBuffer ints(sizeof(int64_t) * 2 * db + sizeof(int) * (db + 1), stream);
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
  double* results = error + db;  // 4 per problem
  st.history = results + 4 * db;
  st.stats = stats;
  st.iterations = ints.as<int64_t>();
  st.phase_steps = st.iterations + db;
  st.code = reinterpret_cast<int*>(st.phase_steps + db);
  int* running_count = st.code + db;
  init_kernel<S><<<grid_for(B * (n + m), kThreads), kThreads, 0, stream>>>(
      ps.a.ptr<S>(), ps.b.ptr<S>(), out.f.ptr<S>(), out.g.ptr<S>(), B, n, m, o.warm_start, scale, st);
  const Costs<S> costs = Costs<S>::of(ps, scale);
  // ---- Sinkhorn: the float32 warm-up (float32 rounds the plan's entries at 2^-24 relative: its
  // error stalls near 1e-5 of the mass), then float64
  const Handoff handoff = o.method == SinkhornMethod::Log   ? Handoff::Never
                          : o.method == SinkhornMethod::SNS ? Handoff::AfterWarmup
                                                            : Handoff::WhenSlow;
  if (o.float32_warmup) {
    sinkhorn_phase<S, float>(costs, st, B, eps, Decision{handoff, o.tol, 1e-5, o.max_iters}, error, running_count,
                             stream);
    next_phase_kernel<<<grid_for(B, kThreads), kThreads, 0, stream>>>(st, B);
  }
  if (!interrupted())
    sinkhorn_phase<S, double>(costs, st, B, eps, Decision{handoff, o.tol, 0, o.max_iters}, error, running_count,
                              stream);
  // ---- Newton for the problems handed over
  std::vector<int> codes(db);
  CK_CUDA_CHECK(cudaMemcpyAsync(codes.data(), st.code, sizeof(int) * db, cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> masses(db);
  for (int64_t p = 0; p < B; ++p) masses[size_t(p)] = host[size_t(p * 4)];
  const std::vector<int64_t> newton_steps =
      interrupted() ? std::vector<int64_t>(db, -1)
                    : newton_phase<S>(costs, st, eps, o, codes, masses, running_count, error, stream);
  throw_if_interrupted();
  // ---- the plan, its sums and the status (one more synchronization)
  S* plan = out.plan ? out.plan->ptr<S>() : nullptr;
  const unsigned row_blocks = unsigned((B * n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  final_rows_kernel<S><<<row_blocks, kThreads, 0, stream>>>(costs, st, B, eps, plan, st.row_err, st.f_new);
  final_cols_kernel<S><<<column_grid(B * m), column_block(), 0, stream>>>(costs, st, B, eps, col_sum);
  status_kernel<S><<<unsigned(B), kThreads, 0, stream>>>(st, st.row_err, st.f_new, col_sum, n, m, eps, scale,
                                                         out.f.ptr<S>(), out.g.ptr<S>(), results);
  CK_CUDA_CHECK(cudaGetLastError());
  std::vector<double> res(size_t(B * 4));
  std::vector<int64_t> iters(db);
  CK_CUDA_CHECK(cudaMemcpyAsync(res.data(), results, sizeof(double) * res.size(), cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaMemcpyAsync(iters.data(), st.iterations, sizeof(int64_t) * db, cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (int64_t p = 0; p < B; ++p) {
    SinkhornStatus& s = status[size_t(p)];
    const bool newton_ran = newton_steps[size_t(p)] >= 0;
    s.method = newton_ran ? SinkhornMethod::SNS : SinkhornMethod::Log;
    s.newton_steps = std::max<int64_t>(0, newton_steps[size_t(p)]);
    s.iterations = iters[size_t(p)];
    s.marginal_error = res[size_t(p * 4)];
    s.cost = res[size_t(p * 4 + 1)] / scale;
    s.objective = res[size_t(p * 4 + 2)] / scale;
    const double mass = host[size_t(p * 4)];
    // The device stopped a problem on the same error up to rounding (column sums computed anew).
    s.potentials_overflow = res[size_t(p * 4 + 3)] > 0;
    s.converged = !s.potentials_overflow &&
                  (s.marginal_error <= o.tol ||
                   (!newton_ran && codes[size_t(p)] == kMetTol && s.marginal_error <= o.tol + 1e3 * 0x1p-53 * mass));
  }
}

}  // namespace
}  // namespace on_device

void solve_cuda(const std::vector<OTProblems>& problems, const std::vector<OTOutputs>& outputs,
                const SinkhornOptions& o, std::vector<std::vector<SinkhornStatus>>& status, StreamHandle handle) {
  CudaDeviceGuard guard(problems[0].a.device);
  const cudaStream_t stream = to_cuda_stream(handle);
  for (size_t k = 0; k < problems.size(); ++k)
    CK_DISPATCH_FLOATING(problems[k].a.dtype, "a", S, [&] {
      on_device::solve_batch<S>(problems[k], outputs[k], o, k, problems.size() > 1, status[k], stream);
    });
}

}  // namespace curvkit::sinkhorn_impl
