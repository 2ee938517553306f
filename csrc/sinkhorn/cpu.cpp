// Sinkhorn family, CPU: log-domain Sinkhorn and Sinkhorn-Newton-Sparse, one problem per task
// (a batch of small problems: one per thread; a large problem: its rows over the threads).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/dispatch.h"
#include "core/interrupt.h"
#include "core/matrix_utils.h"
#include "core/runtime.h"
#include "core/simd.h"
#include "sinkhorn/ot_math.h"
#include "sinkhorn/schedule.h"
#include "sinkhorn/sinkhorn.h"

namespace curvkit::sinkhorn_impl {
namespace {

using namespace sns_schedule;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- exp that vectorizes: x = k ln2 + r, |r| <= ln2 / 2, a Taylor polynomial for e^r (relative
// error below 2^-52 for double, 2^-23 for float) and 2^k from the bits. 0 below the smallest
// normal, inf above the largest finite result, NaN kept. The round-to-nearest of x / ln2 is the
// magic-number addition, whose low mantissa bits then hold k.
CK_INLINE double fast_exp(double x_in) {
  const double x = x_in < -708.0 ? -708.0 : (x_in > 709.0 ? 709.0 : x_in);  // k in [-1022, 1023]
  const double magic = 0x1.8p52, t = x * 1.4426950408889634 + magic, k = t - magic;
  const double r = (x - k * 0x1.62e42fee00000p-1) - k * 0x1.a39ef35793c76p-33;
  // Estrin's scheme: the Horner chain's 14 dependent multiply-adds made 4 levels deep, so the
  // loop is bound by throughput rather than latency.
  const double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
  const double p01 = 1.0 + r, p23 = 0.5 + r * (1.0 / 6.0), p45 = 1.0 / 24.0 + r * (1.0 / 120.0),
               p67 = 1.0 / 720.0 + r * (1.0 / 5040.0), p89 = 1.0 / 40320.0 + r * (1.0 / 362880.0),
               p1011 = 1.0 / 3628800.0 + r * (1.0 / 39916800.0), p1213 = 1.0 / 479001600.0 + r * (1.0 / 6227020800.0);
  const double q0 = p01 + r2 * p23, q1 = p45 + r2 * p67, q2 = p89 + r2 * p1011;
  const double q = (q0 + r4 * q1) + r8 * (q2 + r4 * p1213);
  uint64_t tb, mb;  // unsigned: a NaN's bits wrap harmlessly (its result is selected away)
  std::memcpy(&tb, &t, 8);
  std::memcpy(&mb, &magic, 8);
  const uint64_t scale_bits = ((tb - mb) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &scale_bits, 8);
  const double e = q * scale;
  return x_in < -708.0 ? 0.0 : (x_in > 709.0 ? kInf : (x_in != x_in ? x_in : e));
}

CK_INLINE float fast_exp(float x_in) {
  const float x = x_in < -87.0f ? -87.0f : (x_in > 88.0f ? 88.0f : x_in);  // k in [-126, 127]
  const float magic = 0x1.8p23f, t = x * 1.44269504f + magic, k = t - magic;
  const float r = (x - k * 0x1.62e400p-1f) - k * 0x1.7f7d1cp-20f;
  const float r2 = r * r, r4 = r2 * r2;
  const float q = ((1.0f + r) + r2 * (0.5f + r * (1.0f / 6.0f))) +
                  r4 * ((1.0f / 24.0f + r * (1.0f / 120.0f)) + r2 * (1.0f / 720.0f + r * (1.0f / 5040.0f)));
  uint32_t tb, mb;
  std::memcpy(&tb, &t, 4);
  std::memcpy(&mb, &magic, 4);
  const uint32_t scale_bits = ((tb - mb) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  const float e = q * scale;
  return x_in < -87.0f ? 0.0f : (x_in > 88.0f ? std::numeric_limits<float>::infinity() : (x_in != x_in ? x_in : e));
}

// ---- Inner loops over one row (SIMD clones)

// log sum_j exp(z_j) with z_j = (h_j - c_j) * inv_eps, z kept in `z`.
template <class T>
CK_INLINE T lse_body(const T* __restrict__ h, const T* __restrict__ c, T inv_eps, int64_t n, T* __restrict__ z) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) {
    z[j] = (h[j] - c[j]) * inv_eps;
    mx = z[j] > mx ? z[j] : mx;
  }
  if (!(mx > -std::numeric_limits<T>::infinity())) return mx;  // no mass on this row (or NaN)
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += fast_exp(z[j] - mx);
  return mx + std::log(s);
}
CK_SIMD_CLONES double row_lse(const double* h, const double* c, double inv_eps, int64_t n, double* z) {
  return lse_body(h, c, inv_eps, n, z);
}
CK_SIMD_CLONES float row_lse(const float* h, const float* c, float inv_eps, int64_t n, float* z) {
  return lse_body(h, c, inv_eps, n, z);
}

// out_j = sum_k term(x_k - YT[k][j]), finished; YT is (d, n).
CK_SIMD_CLONES void point_costs(const double* __restrict__ x, const double* __restrict__ YT, int64_t d, int64_t n,
                                GroundCost kind, double p, double* __restrict__ out) {
  std::fill(out, out + n, 0.0);
  for (int64_t k = 0; k < d; ++k) {
    const double xk = x[k];
    const double* __restrict__ row = YT + k * n;
    switch (kind) {
      case GroundCost::L1:
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out[j] += std::fabs(xk - row[j]);
        break;
      case GroundCost::PNorm:
        for (int64_t j = 0; j < n; ++j) out[j] += std::pow(std::fabs(xk - row[j]), p);
        break;
      default:
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out[j] += (xk - row[j]) * (xk - row[j]);
    }
  }
  if (kind == GroundCost::Euclidean)
    for (int64_t j = 0; j < n; ++j) out[j] = std::sqrt(out[j]);
}

// Row i of the plan: e_j = exp((fi + g_j - c_j) * inv_eps); returns sum_j e_j.
CK_SIMD_CLONES double plan_row(double fi, const double* __restrict__ g, const double* __restrict__ c, double inv_eps,
                               int64_t n, double* __restrict__ e) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    e[j] = fast_exp((fi + g[j] - c[j]) * inv_eps);
    s += e[j];
  }
  return s;
}

// ---- One problem

// The costs of one side's rows against the other side's columns: a row-major matrix in the
// storage type, or points (this side's in double (rows, d), the other's transposed (d, cols)).
template <class S>
struct CostRows {
  const S* K = nullptr;
  const double* X = nullptr;
  const double* YT = nullptr;
  int64_t rows = 0, cols = 0, d = 0;
  GroundCost kind = GroundCost::Matrix;
  double p = 2;
  double scale = 1;  // a power of two applied to every cost (Problem::scale)

  // Costs of row i in out[0..cols); `scratch` holds cols doubles.
  template <class T>
  void fill(int64_t i, T* out, double* scratch) const {
    if (K) {
      const S* row = K + i * cols;
      for (int64_t j = 0; j < cols; ++j) out[j] = T(to_double(row[j]) * scale);
    } else if constexpr (std::is_same_v<T, double>) {
      point_costs(X + i * d, YT, d, cols, kind, p, out);
      for (int64_t j = 0; j < cols; ++j) out[j] *= scale;
    } else {
      point_costs(X + i * d, YT, d, cols, kind, p, scratch);
      for (int64_t j = 0; j < cols; ++j) out[j] = T(scratch[j] * scale);
    }
  }
};

template <class S>
struct Problem {
  int64_t n = 0, m = 0;
  // Costs, potentials and eps are solved multiplied by scale = 2^k, which brings eps into
  // [1, 2): exact, and 1 / eps then never overflows (a subnormal reg) nor underflows.
  double eps = 0, mass = 0, scale = 1;
  std::vector<double> a, b, loga, logb;
  std::vector<S> CT;                 // matrix problems: C transposed
  std::vector<double> X, Y, XT, YT;  // point problems, in double
  CostRows<S> by_rows, by_cols;      // C and C^T
  int threads = 1;
};

constexpr double kParallelWork = 1 << 17;  // cost entries (times d for points) of one half-step

template <class S>
Problem<S> make_problem(const OTProblems& ps, int64_t index, double eps, int threads) {
  Problem<S> P;
  P.n = ps.a.size(1);
  P.m = ps.b.size(1);
  const int k = -std::ilogb(eps);
  P.scale = std::ldexp(1.0, k);
  P.eps = std::ldexp(eps, k);
  // A parallel region per half-step pays a barrier: worth it only for large problems (and on a
  // busy machine a descheduled worker stalls every barrier by a time slice).
  const double work = double(P.n) * double(P.m) * (ps.cost == GroundCost::Matrix ? 1.0 : double(ps.x.size(2)));
  P.threads = work >= kParallelWork ? threads : 1;
  const S* a = ps.a.ptr<S>() + index * P.n;
  const S* b = ps.b.ptr<S>() + index * P.m;
  P.a.resize(static_cast<size_t>(P.n));
  P.b.resize(static_cast<size_t>(P.m));
  double sa = 0, sb = 0;
  for (int64_t i = 0; i < P.n; ++i) sa += P.a[size_t(i)] = to_double(a[i]);
  for (int64_t j = 0; j < P.m; ++j) sb += P.b[size_t(j)] = to_double(b[j]);
  for (double& v : P.b) v *= sa / sb;  // the masses agree to the checked tolerance; make them equal
  P.mass = sa;
  P.loga.resize(P.a.size());
  P.logb.resize(P.b.size());
  for (size_t i = 0; i < P.a.size(); ++i) P.loga[i] = std::log(P.a[i]);
  for (size_t j = 0; j < P.b.size(); ++j) P.logb[j] = std::log(P.b[j]);
  const int64_t n = P.n, m = P.m;
  for (CostRows<S>* cr : {&P.by_rows, &P.by_cols}) {
    cr->kind = ps.cost;
    cr->p = ps.p;
    cr->scale = P.scale;
  }
  P.by_rows.rows = P.by_cols.cols = n;
  P.by_rows.cols = P.by_cols.rows = m;
  if (ps.cost == GroundCost::Matrix) {
    const S* C = ps.C.ptr<S>() + index * n * m;
    P.CT.resize(static_cast<size_t>(n * m));
    for (int64_t i0 = 0; i0 < n; i0 += 64)  // blocked transpose
      for (int64_t j0 = 0; j0 < m; j0 += 64)
        for (int64_t i = i0; i < std::min(n, i0 + 64); ++i)
          for (int64_t j = j0; j < std::min(m, j0 + 64); ++j) P.CT[size_t(j * n + i)] = C[i * m + j];
    P.by_rows.K = C;
    P.by_cols.K = P.CT.data();
  } else {
    const int64_t d = ps.x.size(2);
    const S* x = ps.x.ptr<S>() + index * n * d;
    const S* y = ps.y.ptr<S>() + index * m * d;
    P.X.resize(static_cast<size_t>(n * d));
    P.Y.resize(static_cast<size_t>(m * d));
    P.XT.resize(static_cast<size_t>(n * d));
    P.YT.resize(static_cast<size_t>(m * d));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < d; ++k) P.XT[size_t(k * n + i)] = P.X[size_t(i * d + k)] = to_double(x[i * d + k]);
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < d; ++k) P.YT[size_t(k * m + j)] = P.Y[size_t(j * d + k)] = to_double(y[j * d + k]);
    P.by_rows.X = P.X.data();
    P.by_rows.YT = P.YT.data();
    P.by_cols.X = P.Y.data();
    P.by_cols.YT = P.XT.data();
    P.by_rows.d = P.by_cols.d = d;
  }
  return P;
}

// Per-thread row buffers.
template <class T>
struct RowBuffers {
  std::vector<T> c, z;
  std::vector<double> scratch, e;
  explicit RowBuffers(int64_t len)
      : c(static_cast<size_t>(len)),
        z(static_cast<size_t>(len)),
        scratch(static_cast<size_t>(len)),
        e(static_cast<size_t>(len)) {}
};

// One Sinkhorn half-step over the rows of `cr`: out_i = eps log w_i - eps LSE_j((h_j - C_ij) / eps).
// With `old`, returns sum_i |w_i - (row sum of the plan (old, h))_i|, the row sums being
// w_i exp((old_i - out_i) / eps); rows of zero mass are skipped (their potential is -inf).
template <class S, class T>
double half_step(const CostRows<S>& cr, const T* h, const std::vector<double>& logw, const std::vector<double>& w,
                 double eps, const T* old, T* out, int threads) {
  const T inv_eps = T(1.0 / eps), teps = T(eps);
  double err = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(+ : err)
  {
    RowBuffers<T> buf(cr.cols);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < cr.rows; ++i) {
      if (w[size_t(i)] == 0) {
        out[i] = -std::numeric_limits<T>::infinity();
        continue;
      }
      cr.fill(i, buf.c.data(), buf.scratch.data());
      const T lse = row_lse(h, buf.c.data(), inv_eps, cr.cols, buf.z.data());
      out[i] = T(teps * (T(logw[size_t(i)]) - lse));
      if (old) err += std::fabs(w[size_t(i)] - w[size_t(i)] * std::exp((double(old[i]) - double(out[i])) / eps));
    }
  }
  return err;
}

struct PhaseResult {
  int64_t iterations = 0;
  double error = kInf;  // of the plan of the returned potentials
  bool converged = false, interrupted = false, handed_off = false;
};

// Sinkhorn iterations in compute type T from (f, g), at most `budget`; stops at tol (f, g then
// the iterate whose error met it), or when `handoff` says Newton should take over, or at `floor`
// (the float32 warm-up's end).
template <class S, class T>
PhaseResult sinkhorn_phase(const Problem<S>& P, std::vector<double>& f, std::vector<double>& g, int64_t budget,
                           double tol, Handoff handoff, double floor, int64_t done_before) {
  std::vector<T> fo(f.begin(), f.end()), fn(f.size()), gt(g.begin(), g.end()), gn(g.size());
  std::vector<double> history;
  PhaseResult r;
  for (int64_t it = 0; it < budget; ++it) {
    if (interrupted()) {
      r.interrupted = true;
      break;
    }
    r.error = half_step(P.by_rows, gt.data(), P.loga, P.a, P.eps, fo.data(), fn.data(), P.threads);
    if (!(r.error > tol)) {
      r.converged = !(r.error != r.error);
      break;
    }
    if (!(r.error > floor)) break;
    history.push_back(r.error);
    const double window_error = int64_t(history.size()) > kRateWindow ? history[history.size() - 1 - kRateWindow] : 0;
    r.handed_off = hand_over(handoff, r.error, window_error, done_before + it, tol);
    if (r.handed_off) break;
    std::swap(fo, fn);
    half_step<S, T>(P.by_cols, fo.data(), P.logb, P.b, P.eps, nullptr, gn.data(), P.threads);
    std::swap(gt, gn);
    ++r.iterations;
  }
  std::copy(fo.begin(), fo.end(), f.begin());
  std::copy(gt.begin(), gt.end(), g.begin());
  return r;
}

// ---- Newton (SNS), in float64

// The plan at (f, g): row sums r, column sums c, sum of entries, and optionally <C, P>, the
// plan itself (written in S) or a histogram of log P (sinkhorn/schedule.h).
struct PlanSums {
  std::vector<double> r, c;
  double total = 0, cost = 0;
  std::vector<int64_t> histogram;
};

template <class S>
PlanSums plan_pass(const Problem<S>& P, const std::vector<double>& f, const std::vector<double>& g, bool with_cost,
                   S* plan, bool with_histogram) {
  PlanSums s;
  s.r.assign(static_cast<size_t>(P.n), 0.0);
  s.c.assign(static_cast<size_t>(P.m), 0.0);
  if (with_histogram) s.histogram.assign(kBins, 0);
  const double inv_eps = 1.0 / P.eps;
  double total = 0, cost = 0;
#pragma omp parallel num_threads(P.threads) if (P.threads > 1) reduction(+ : total, cost)
  {
    RowBuffers<double> buf(P.m);
    std::vector<double> c(static_cast<size_t>(P.m), 0.0);
    std::vector<int64_t> hist(with_histogram ? kBins : 0, 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < P.n; ++i) {
      double* e = buf.e.data();
      if (!(f[size_t(i)] > -kInf)) {  // a row of zero mass
        std::fill(buf.e.begin(), buf.e.end(), 0.0);
      } else {
        P.by_rows.fill(i, buf.c.data(), buf.scratch.data());
        s.r[size_t(i)] = plan_row(f[size_t(i)], g.data(), buf.c.data(), inv_eps, P.m, e);
        total += s.r[size_t(i)];
        for (int64_t j = 0; j < P.m; ++j) c[size_t(j)] += e[j];
        if (with_cost)
          for (int64_t j = 0; j < P.m; ++j) cost += e[j] > 0 ? e[j] * buf.c[size_t(j)] : 0.0;
        if (with_histogram)
          for (int64_t j = 0; j < P.m; ++j) {
            const double z = (f[size_t(i)] + g[size_t(j)] - buf.c[size_t(j)]) * inv_eps;
            const int bin = log_bin(z);
            if (bin >= 0) ++hist[size_t(bin)];
          }
      }
      if (plan)
        for (int64_t j = 0; j < P.m; ++j) plan[i * P.m + j] = from_double<S>(e[j]);
    }
#pragma omp critical
    {
      for (int64_t j = 0; j < P.m; ++j) s.c[size_t(j)] += c[size_t(j)];
      for (size_t k = 0; k < hist.size(); ++k) s.histogram[k] += hist[k];
    }
  }
  s.total = total;
  s.cost = cost;
  return s;
}

double marginal_error(const std::vector<double>& a, const std::vector<double>& b, const PlanSums& s) {
  double err = 0;
  for (size_t i = 0; i < a.size(); ++i) err += std::fabs(a[i] - s.r[i]);
  for (size_t j = 0; j < b.size(); ++j) err += std::fabs(b[j] - s.c[j]);
  return err;
}

// <a, f> + <b, g> - eps sum P: the dual objective (zero-mass rows and columns contribute 0).
template <class S>
double dual_value(const Problem<S>& P, const std::vector<double>& f, const std::vector<double>& g, double total) {
  double v = 0;
  for (int64_t i = 0; i < P.n; ++i) v += P.a[size_t(i)] > 0 ? P.a[size_t(i)] * f[size_t(i)] : 0.0;
  for (int64_t j = 0; j < P.m; ++j) v += P.b[size_t(j)] > 0 ? P.b[size_t(j)] * g[size_t(j)] : 0.0;
  return v - P.eps * total;
}

// The sparse plan: CSR rows (n), and its transpose as CSR of P^T (m).
struct Sparse {
  std::vector<int64_t> row_ptr, col_ptr;
  std::vector<int32_t> cols, rows;
  std::vector<double> vals, tvals;
};

// Entries of the plan with log P >= threshold.
template <class S>
Sparse sparse_plan(const Problem<S>& P, const std::vector<double>& f, const std::vector<double>& g, double threshold) {
  const int threads = P.threads;
  std::vector<std::vector<int32_t>> cols(static_cast<size_t>(threads));
  std::vector<std::vector<double>> vals(static_cast<size_t>(threads));
  Sparse sp;
  sp.row_ptr.assign(static_cast<size_t>(P.n + 1), 0);
  const double inv_eps = 1.0 / P.eps;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num();
    RowBuffers<double> buf(P.m);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < P.n; ++i) {
      if (!(f[size_t(i)] > -kInf)) continue;
      P.by_rows.fill(i, buf.c.data(), buf.scratch.data());
      int64_t kept = 0;
      for (int64_t j = 0; j < P.m; ++j) {
        const double z = (f[size_t(i)] + g[size_t(j)] - buf.c[size_t(j)]) * inv_eps;
        if (z >= threshold) {
          cols[size_t(t)].push_back(int32_t(j));
          vals[size_t(t)].push_back(fast_exp(z));
          ++kept;
        }
      }
      sp.row_ptr[size_t(i + 1)] = kept;
    }
  }
  // static schedule: thread t holds a contiguous block of rows, in order
  for (int64_t i = 0; i < P.n; ++i) sp.row_ptr[size_t(i + 1)] += sp.row_ptr[size_t(i)];
  for (int t = 0; t < threads; ++t) {
    sp.cols.insert(sp.cols.end(), cols[size_t(t)].begin(), cols[size_t(t)].end());
    sp.vals.insert(sp.vals.end(), vals[size_t(t)].begin(), vals[size_t(t)].end());
  }
  const int64_t nnz = int64_t(sp.vals.size());
  sp.col_ptr.assign(static_cast<size_t>(P.m + 1), 0);
  for (int32_t j : sp.cols) ++sp.col_ptr[size_t(j) + 1];
  for (int64_t j = 0; j < P.m; ++j) sp.col_ptr[size_t(j + 1)] += sp.col_ptr[size_t(j)];
  sp.rows.resize(static_cast<size_t>(nnz));
  sp.tvals.resize(static_cast<size_t>(nnz));
  std::vector<int64_t> next(sp.col_ptr.begin(), sp.col_ptr.end() - 1);
  for (int64_t i = 0; i < P.n; ++i)
    for (int64_t k = sp.row_ptr[size_t(i)]; k < sp.row_ptr[size_t(i + 1)]; ++k) {
      const int64_t at = next[size_t(sp.cols[size_t(k)])]++;
      sp.rows[size_t(at)] = int32_t(i);
      sp.tvals[size_t(at)] = sp.vals[size_t(k)];
    }
  return sp;
}

// y = S v (rows) and y = S^T v (columns), over the threads when large.
void spmv(const std::vector<int64_t>& ptr, const std::vector<int32_t>& idx, const std::vector<double>& val,
          const double* v, double* y, int64_t rows, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1 && val.size() > (1u << 16)) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    double s = 0;
    for (int64_t k = ptr[size_t(i)]; k < ptr[size_t(i + 1)]; ++k) s += val[size_t(k)] * v[idx[size_t(k)]];
    y[i] = s;
  }
}

double dot(const std::vector<double>& x, const std::vector<double>& y) {
  double s = 0;
  for (size_t i = 0; i < x.size(); ++i) s += x[i] * y[i];
  return s;
}

// Newton direction (df, dg) = eps M^-1 (grad_f, grad_g), M = [[Dr, S], [S^T, Dc]] (diagonals
// shifted), by Jacobi-preconditioned CG on the Schur complement Dc - S^T Dr^-1 S.
void newton_direction(const Sparse& sp, const std::vector<double>& dr, const std::vector<double>& dc,
                      const std::vector<double>& grad_f, const std::vector<double>& grad_g, double eps, double cg_tol,
                      int64_t cg_max, int threads, std::vector<double>& df, std::vector<double>& dg) {
  const int64_t n = int64_t(dr.size()), m = int64_t(dc.size());
  std::vector<double> t(static_cast<size_t>(n)), u(static_cast<size_t>(m));
  // rhs = eps (grad_g - S^T Dr^-1 grad_f)
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = grad_f[size_t(i)] / dr[size_t(i)];
  spmv(sp.col_ptr, sp.rows, sp.tvals, t.data(), u.data(), m, threads);
  std::vector<double> rhs(static_cast<size_t>(m)), precond(static_cast<size_t>(m));
  for (int64_t j = 0; j < m; ++j) {
    rhs[size_t(j)] = eps * (grad_g[size_t(j)] - u[size_t(j)]);
    double s = 0;
    for (int64_t k = sp.col_ptr[size_t(j)]; k < sp.col_ptr[size_t(j + 1)]; ++k)
      s += sp.tvals[size_t(k)] * sp.tvals[size_t(k)] / dr[size_t(sp.rows[size_t(k)])];
    precond[size_t(j)] = 1.0 / std::max(dc[size_t(j)] - s, 1e-300);
  }
  auto apply = [&](const std::vector<double>& v, std::vector<double>& out) {
    spmv(sp.row_ptr, sp.cols, sp.vals, v.data(), t.data(), n, threads);
    for (int64_t i = 0; i < n; ++i) t[size_t(i)] /= dr[size_t(i)];
    spmv(sp.col_ptr, sp.rows, sp.tvals, t.data(), out.data(), m, threads);
    for (int64_t j = 0; j < m; ++j) out[size_t(j)] = dc[size_t(j)] * v[size_t(j)] - out[size_t(j)];
  };
  dg.assign(static_cast<size_t>(m), 0.0);
  std::vector<double> res = rhs, z(static_cast<size_t>(m)), p(static_cast<size_t>(m)), q(static_cast<size_t>(m));
  for (int64_t j = 0; j < m; ++j) z[size_t(j)] = precond[size_t(j)] * res[size_t(j)];
  p = z;
  double rz = dot(res, z);
  const double stop = cg_tol * std::sqrt(dot(rhs, rhs));
  for (int64_t it = 0; it < cg_max && std::sqrt(dot(res, res)) > stop; ++it) {
    apply(p, q);
    const double pq = dot(p, q);
    if (!(pq > 0)) break;
    const double alpha = rz / pq;
    for (int64_t j = 0; j < m; ++j) {
      dg[size_t(j)] += alpha * p[size_t(j)];
      res[size_t(j)] -= alpha * q[size_t(j)];
      z[size_t(j)] = precond[size_t(j)] * res[size_t(j)];
    }
    const double rz_next = dot(res, z);
    for (int64_t j = 0; j < m; ++j) p[size_t(j)] = z[size_t(j)] + (rz_next / rz) * p[size_t(j)];
    rz = rz_next;
  }
  // df = Dr^-1 (eps grad_f - S dg)
  df.assign(static_cast<size_t>(n), 0.0);
  spmv(sp.row_ptr, sp.cols, sp.vals, dg.data(), t.data(), n, threads);
  for (int64_t i = 0; i < n; ++i) df[size_t(i)] = (eps * grad_f[size_t(i)] - t[size_t(i)]) / dr[size_t(i)];
}

struct NewtonResult {
  int64_t steps = 0, sinkhorn_iterations = 0;
  double error = kInf;
  bool converged = false, interrupted = false;
};

// Newton steps from (f, g) until tol; a step the line search cannot make an ascent densifies the
// Hessian, and at full density hands back to Sinkhorn for kFallbackIterations.
template <class S>
NewtonResult newton_phase(const Problem<S>& P, std::vector<double>& f, std::vector<double>& g, const SinkhornOptions& o,
                          int64_t sinkhorn_budget) {
  NewtonResult res;
  double density = o.density > 0 ? o.density : sns_default_density(P.n, P.m);
  PlanSums cur = plan_pass<S>(P, f, g, false, nullptr, true);
  double err = marginal_error(P.a, P.b, cur), F = dual_value(P, f, g, cur.total);
  std::vector<double> grad_f(static_cast<size_t>(P.n)), grad_g(static_cast<size_t>(P.m)), dr(static_cast<size_t>(P.n)),
      dc(static_cast<size_t>(P.m)), df, dg;
  std::vector<double> ft(static_cast<size_t>(P.n)), gt(static_cast<size_t>(P.m));
  int64_t attempts = 0;
  double window_error = err;  // the error kStallSteps accepted steps ago
  while (err > o.tol && attempts < o.max_newton) {
    if (interrupted()) {
      res.interrupted = true;
      break;
    }
    ++attempts;
    for (int64_t i = 0; i < P.n; ++i) grad_f[size_t(i)] = P.a[size_t(i)] - cur.r[size_t(i)];
    for (int64_t j = 0; j < P.m; ++j) grad_g[size_t(j)] = P.b[size_t(j)] - cur.c[size_t(j)];
    const double shift = newton_shift(err, P.mass);
    for (int64_t i = 0; i < P.n; ++i) dr[size_t(i)] = cur.r[size_t(i)] + shift * P.mass / double(P.n);
    for (int64_t j = 0; j < P.m; ++j) dc[size_t(j)] = cur.c[size_t(j)] + shift * P.mass / double(P.m);
    const int64_t keep = std::max<int64_t>(1, int64_t(std::ceil(density * double(P.n) * double(P.m))));
    const Sparse sp = sparse_plan(P, f, g, threshold_for(cur.histogram.data(), keep));
    newton_direction(sp, dr, dc, grad_f, grad_g, P.eps, cg_tolerance(err, P.mass), cg_max_steps(P.m), P.threads, df,
                     dg);
    const double slope = dot(grad_f, df) + dot(grad_g, dg);
    double alpha = 1;
    bool accepted = false;
    PlanSums trial;
    double err_trial = kInf, F_trial = -kInf;
    // F's rounding: differences below it are noise.
    const double noise = 1e-14 * (std::fabs(F) + P.eps * cur.total);
    for (int h = 0; h <= kMaxHalvings && slope > 0; ++h, alpha *= 0.5) {
      for (int64_t i = 0; i < P.n; ++i) ft[size_t(i)] = f[size_t(i)] + alpha * df[size_t(i)];
      for (int64_t j = 0; j < P.m; ++j) gt[size_t(j)] = g[size_t(j)] + alpha * dg[size_t(j)];
      trial = plan_pass<S>(P, ft, gt, false, nullptr, true);
      err_trial = marginal_error(P.a, P.b, trial);
      F_trial = dual_value(P, ft, gt, trial.total);
      if (!(F_trial > -kInf) || F_trial != F_trial) continue;
      if (accept_step(F_trial, F, alpha, slope, noise, err_trial, err)) {
        accepted = true;
        break;
      }
    }
    if (accepted) {
      density = density_after_step(density, ++res.steps, alpha, err_trial, err, P.mass, window_error);
      f.swap(ft);
      g.swap(gt);
      cur = std::move(trial);
      err = err_trial;
      F = F_trial;
    } else if (density < 1) {
      density = std::min(1.0, 4 * density);
    } else {  // Newton cannot ascend here: Sinkhorn moves on
      const int64_t budget = std::min(kFallbackIterations, sinkhorn_budget - res.sinkhorn_iterations);
      if (budget <= 0) break;
      const PhaseResult s = sinkhorn_phase<S, double>(P, f, g, budget, o.tol, Handoff::Never, 0, kWarmup);
      res.sinkhorn_iterations += s.iterations;
      cur = plan_pass<S>(P, f, g, false, nullptr, true);
      err = marginal_error(P.a, P.b, cur);
      F = dual_value(P, f, g, cur.total);
    }
  }
  res.error = err;
  res.converged = err <= o.tol;
  return res;
}

template <class S>
void check_problem_values(const OTProblems& ps, int64_t index, const char* where) {
  const int64_t n = ps.a.size(1), m = ps.b.size(1);
  const S* a = ps.a.ptr<S>() + index * n;
  const S* b = ps.b.ptr<S>() + index * m;
  double sa = 0, sb = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = to_double(a[i]);
    CK_CHECK_VALUE(std::isfinite(v) && v >= 0, "argument 'a' must be finite and >= 0, got ", v, " at entry ", i, where,
                   index, ")");
    sa += v;
  }
  for (int64_t j = 0; j < m; ++j) {
    const double v = to_double(b[j]);
    CK_CHECK_VALUE(std::isfinite(v) && v >= 0, "argument 'b' must be finite and >= 0, got ", v, " at entry ", j, where,
                   index, ")");
    sb += v;
  }
  CK_CHECK_VALUE(sa > 0 && sb > 0, "arguments 'a' and 'b' must have positive mass, got ", sa, " and ", sb, where,
                 index);
  const double mass_tol = mass_tolerance(ps.a.dtype);
  CK_CHECK_VALUE(std::fabs(sa - sb) <= mass_tol * std::max(sa, sb), "arguments 'a' and 'b' must have the same mass, ",
                 "got ", sa, " and ", sb, where, index, "; relative tolerance ", mass_tol, ")");
  auto finite = [&](const ArrayView& v, int64_t count, const char* name) {
    const S* p = v.ptr<S>() + index * count;
    for (int64_t k = 0; k < count; ++k)
      CK_CHECK_VALUE(std::isfinite(to_double(p[k])), "argument '", name, "' must be finite, got ", to_double(p[k]),
                     " at flat entry ", k, where, index, ")");
  };
  if (ps.cost == GroundCost::Matrix) {
    finite(ps.C, n * m, "C");
  } else {
    finite(ps.x, n * ps.x.size(2), "x");
    finite(ps.y, m * ps.y.size(2), "y");
  }
}

template <class S>
void solve_one(const OTProblems& ps, const OTOutputs& out, int64_t index, const SinkhornOptions& o, int threads,
               SinkhornStatus& st) {
  const Problem<S> P = make_problem<S>(ps, index, o.reg, threads);
  std::vector<double> f(static_cast<size_t>(P.n), 0.0), g(static_cast<size_t>(P.m), 0.0);
  S* fo = out.f.ptr<S>() + index * P.n;
  S* go = out.g.ptr<S>() + index * P.m;
  if (o.warm_start) {
    for (int64_t i = 0; i < P.n; ++i) f[size_t(i)] = to_double(fo[i]) * P.scale;
    for (int64_t j = 0; j < P.m; ++j) g[size_t(j)] = to_double(go[j]) * P.scale;
  }
  const SinkhornMethod method = o.method == SinkhornMethod::Auto ? SinkhornMethod::SNS : o.method;
  const Handoff handoff = method == SinkhornMethod::Log     ? Handoff::Never
                          : o.method == SinkhornMethod::SNS ? Handoff::AfterWarmup
                                                            : Handoff::WhenSlow;
  PhaseResult r;
  if (o.float32_warmup) {
    // float32 rounds the plan's entries at 2^-24 relative: its error stalls near 1e-5 of the mass.
    r = sinkhorn_phase<S, float>(P, f, g, o.max_iters, o.tol, handoff, 1e-5 * P.mass, 0);
    st.iterations = r.iterations;
  }
  if (!r.converged && !r.handed_off && !r.interrupted) {
    r = sinkhorn_phase<S, double>(P, f, g, o.max_iters - st.iterations, o.tol, handoff, 0, st.iterations);
    st.iterations += r.iterations;
  }
  st.method = SinkhornMethod::Log;
  if (r.handed_off && !r.interrupted) {
    st.method = SinkhornMethod::SNS;
    const NewtonResult nr = newton_phase<S>(P, f, g, o, o.max_iters - st.iterations);
    st.iterations += nr.sinkhorn_iterations;
    st.newton_steps = nr.steps;
  }
  S* plan = out.plan ? out.plan->ptr<S>() + index * P.n * P.m : nullptr;
  const PlanSums s = plan_pass<S>(P, f, g, true, plan, false);
  st.marginal_error = marginal_error(P.a, P.b, s);
  st.cost = s.cost / P.scale;
  double objective = -P.eps * s.total;  // sum P (C + eps (log P - 1)) = <f, P1> + <g, P^T 1> - eps sum P
  for (int64_t i = 0; i < P.n; ++i) objective += s.r[size_t(i)] > 0 ? f[size_t(i)] * s.r[size_t(i)] : 0.0;
  for (int64_t j = 0; j < P.m; ++j) objective += s.c[size_t(j)] > 0 ? g[size_t(j)] * s.c[size_t(j)] : 0.0;
  st.objective = objective / P.scale;
  // The loop measured the error of the same plan; the final sums differ from its by rounding.
  st.converged = st.marginal_error <= o.tol || (r.converged && st.marginal_error <= o.tol + 1e3 * 0x1p-53 * P.mass);
  double shift = 0;
  if constexpr (ot_math::is_half_precision<S>) {
    double lo[2] = {kInf, kInf}, hi[2] = {-kInf, -kInf};
    for (int side = 0; side < 2; ++side)
      for (const double v : side == 0 ? f : g)
        if (std::isfinite(v)) lo[side] = std::min(lo[side], v), hi[side] = std::max(hi[side], v);
    if (hi[0] >= lo[0] && hi[1] >= lo[1]) shift = ot_math::balancing_shift(lo[0], hi[0], lo[1], hi[1]);
  }
  auto store = [&](double v, S& out) {
    out = from_double<S>(v / P.scale);
    st.potentials_overflow |= std::isfinite(v) && !std::isfinite(to_double(out));
  };
  for (int64_t i = 0; i < P.n; ++i) store(f[size_t(i)] + shift, fo[i]);
  for (int64_t j = 0; j < P.m; ++j) store(g[size_t(j)] - shift, go[j]);
  if (st.potentials_overflow) {  // never an Inf handed on: zeros, as for every family (a zero mass keeps -inf)
    for (int64_t i = 0; i < P.n; ++i) fo[i] = from_double<S>(std::isfinite(f[size_t(i)]) ? 0.0 : f[size_t(i)]);
    for (int64_t j = 0; j < P.m; ++j) go[j] = from_double<S>(std::isfinite(g[size_t(j)]) ? 0.0 : g[size_t(j)]);
  }
  st.converged = st.converged && !st.potentials_overflow;
}

}  // namespace

CsrPlan sparse_plan_cpu(const OTProblems& problems, const ArrayView& f, const ArrayView& g, int64_t index, double reg,
                        double threshold) {
  CsrPlan out;
  CK_DISPATCH_FLOATING(problems.a.dtype, "a", S, [&] {
    const double work = double(problems.a.size(1)) * double(problems.b.size(1));
    const Problem<S> P = make_problem<S>(problems, index, reg, work >= kParallelWork ? num_threads() : 1);
    std::vector<double> fd(static_cast<size_t>(P.n)), gd(static_cast<size_t>(P.m));
    for (int64_t i = 0; i < P.n; ++i) fd[size_t(i)] = to_double(f.ptr<S>()[index * P.n + i]) * P.scale;
    for (int64_t j = 0; j < P.m; ++j) gd[size_t(j)] = to_double(g.ptr<S>()[index * P.m + j]) * P.scale;
    const Sparse sp = sparse_plan(P, fd, gd, std::log(threshold));
    out.indptr = sp.row_ptr;
    out.indices.assign(sp.cols.begin(), sp.cols.end());
    out.values = sp.vals;
  });
  return out;
}

void solve_cpu(const std::vector<OTProblems>& problems, const std::vector<OTOutputs>& outputs, const SinkhornOptions& o,
               std::vector<std::vector<SinkhornStatus>>& status) {
  struct Task {
    size_t batch;
    int64_t index;
    double cost;
  };
  std::vector<Task> tasks;
  for (size_t k = 0; k < problems.size(); ++k) {
    const OTProblems& ps = problems[k];
    const int64_t count = ps.a.size(0), n = ps.a.size(1), m = ps.b.size(1);
    const double work = double(n) * double(m) * (ps.cost == GroundCost::Matrix ? 1.0 : double(ps.x.size(2)));
    const std::string where = problems.size() > 1 ? cat(" (list item ", k, ", problem ") : " (problem ";
    CK_DISPATCH_FLOATING(ps.a.dtype, "a", S, [&] {
      for (int64_t i = 0; i < count; ++i) check_problem_values<S>(ps, i, where.c_str());
    });
    status[k].assign(static_cast<size_t>(count), SinkhornStatus{});
    for (int64_t i = 0; i < count; ++i) tasks.push_back({k, i, work * 64});  // ~64 passes a solve
  }
  const int threads = num_threads();
  run_matrix_tasks(
      threads, int64_t(tasks.size()), [&](int64_t t) { return tasks[size_t(t)].cost; },
      [&](int64_t t, int /*slot*/) {
        const Task& task = tasks[size_t(t)];
        const int inner = omp_in_parallel() ? 1 : threads;
        CK_DISPATCH_FLOATING(problems[task.batch].a.dtype, "a", S, [&] {
          solve_one<S>(problems[task.batch], outputs[task.batch], task.index, o, inner,
                       status[task.batch][size_t(task.index)]);
        });
      });
}

}  // namespace curvkit::sinkhorn_impl
