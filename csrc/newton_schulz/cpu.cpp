#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "core/blas.h"
#include "core/dispatch.h"
#include "core/matrix_utils.h"
#include "core/runtime.h"
#include "core/team_blas.h"
#include "newton_schulz/newton_schulz.h"

namespace curvkit {
namespace {

// One matrix of one input: where it is and its shape.
struct PolarTask {
  size_t input;  // which entry of the input list
  const ArrayView* in;
  const ArrayView* out;
  int64_t index;  // position within its batch
  int64_t m, n;
  // X_0 = 2^exponent G * inv_scale: the power of two (exact) brings the largest entry to [1, 2),
  // so that neither a subnormal G (1 / amax overflows) nor a huge one under/overflows.
  int exponent = 0;
  double inv_scale = 0.0;  // 1 / ((norm_scale + eps) ||2^exponent G||_F) (see measure); 0 for G = 0
  bool finite = true;
  int64_t r() const { return std::min(m, n); }
  int64_t c() const { return std::max(m, n); }
  bool tall() const { return m > n; }
  double cost() const { return double(r()) * double(r()) * double(c()); }
};

template <class S>
void measure(PolarTask& t, const PolarOptions& o) {
  const S* g = t.in->ptr<const S>() + t.index * t.m * t.n;
  const int64_t size = t.m * t.n;
  double amax = 0.0;
  bool finite = true;
  for (int64_t i = 0; i < size; ++i) {
    const double v = std::fabs(to_double(g[i]));
    finite &= v <= DBL_MAX;  // false for NaN and Inf (a max reduction may drop NaN)
    amax = std::max(amax, v);
  }
  if (!finite) {
    t.finite = false;
    return;
  }
  if (amax == 0.0) return;
  t.exponent = -std::ilogb(amax);
  double sum = 0.0;
  with_pow2(t.exponent, [&](auto pow2) {
    for (int64_t i = 0; i < size; ++i) {
      const double v = pow2(to_double(g[i]));
      sum += v * v;
    }
  });
  // Without normalization, G / (its RMS singular value ||G||_F / sqrt(r)).
  t.inv_scale =
      o.normalize ? 1.0 / ((o.norm_scale + o.norm_eps) * std::sqrt(sum)) : 1.0 / std::sqrt(sum / double(t.r()));
}

// Working storage for one thread, reused across its matrices.
template <class T>
struct Workspace {
  std::vector<T> x, x2, a, p, q, t;
  void reserve(int64_t size, int64_t r) {
    for (auto* v : {&x, &x2}) v->resize(size_t(size));
    for (auto* v : {&a, &p, &q, &t}) v->resize(size_t(r * r));
  }
};

// The short-side Gram matrix and the product with a symmetric r x r matrix, for a wide X
// (r x c, row-major) or a tall one (c x r, row-major: the product is then X P).
// Products run on a team of `threads` (team_blas).
template <class T>
struct Shape {
  int r, c;
  bool tall;
  int threads;
  void gram(const T* x, T* a) const {
    team_blas::syrk(threads, tall, r, c, T(1), x, tall ? r : c, T(0), a, r);
    team_blas::mirror_lower(threads, a, r);
  }
  void apply(const T* p, const T* x, T* dst, T alpha, T beta) const {
    if (tall)
      team_blas::symm(threads, false, c, r, alpha, p, r, x, r, beta, dst, r);
    else
      team_blas::symm(threads, true, r, c, alpha, p, r, x, c, beta, dst, c);
  }
  void gemmt(T alpha, const T* a, const T* b, T* dst) const {
    team_blas::gemmt(threads, false, r, alpha, a, b, T(0), dst);
  }
};

// P = a I + b A + c A^2, A full; uses t for A^2. P's lower triangle, the whole of it with `full`
// (symm reads the lower triangle only; the Gram route's general products read all of P).
template <class T>
void step_polynomial(const PolarStep& s, const T* a, T* p, T* t, int r, int threads, bool full) {
  team_blas::syrk(threads, false, r, r, T(1), a, r, T(0), t, r);  // A A^T = A^2, lower
  team_blas::run(threads, team_blas::kFlopsPerCopiedEntry * r * r / 2, [&](int th, int parts) {
    for (int64_t i = team_blas::triangle_band(r, parts, th); i < team_blas::triangle_band(r, parts, th + 1); ++i)
      for (int64_t j = 0; j <= i; ++j)
        p[i * r + j] = T(s.c) * t[i * r + j] + T(s.b) * a[i * r + j] + (i == j ? T(s.a) : T(0));
  });
  if (full) team_blas::mirror_lower(threads, p, r);
}

// Runs the iteration on ws.x (X_0, normalized) and leaves the final symmetric factor F in
// ws.p and the matrix it multiplies in ws.x: the result is F * ws.x (apply()).
template <class T>
void iterate(const Shape<T>& sh, const PolarOptions& o, Workspace<T>& ws) {
  const int r = sh.r;
  const size_t steps = o.steps.size();
  if (o.method == PolarMethod::Standard) {
    for (size_t k = 0; k < steps && !interrupted(); ++k) {
      sh.gram(ws.x.data(), ws.a.data());
      step_polynomial(o.steps[k], ws.a.data(), ws.p.data(), ws.t.data(), r, sh.threads, false);
      if (k + 1 == steps) return;  // the caller applies the last P
      sh.apply(ws.p.data(), ws.x.data(), ws.x2.data(), T(1), T(0));
      std::swap(ws.x, ws.x2);
    }
    return;
  }
  // Gram route: iterate A and Q = P_{k-1} ... P_0 on r x r matrices.
  sh.gram(ws.x.data(), ws.a.data());
  bool have_q = false;
  for (size_t k = 0; k < steps; ++k) {
    step_polynomial(o.steps[k], ws.a.data(), ws.p.data(), ws.t.data(), r, sh.threads, true);
    if (k + 1 == steps || interrupted()) break;
    if (have_q) {
      sh.gemmt(T(1), ws.p.data(), ws.q.data(), ws.t.data());  // P Q, symmetric
      team_blas::mirror_lower(sh.threads, ws.t.data(), r);
      std::swap(ws.q, ws.t);
    } else {
      ws.q = ws.p;
      have_q = true;
    }
    if (o.restart_after > 0 && (int(k) + 1) % o.restart_after == 0) {  // X = Q X_0, A = X X^T, Q = I
      sh.apply(ws.q.data(), ws.x.data(), ws.x2.data(), T(1), T(0));
      std::swap(ws.x, ws.x2);
      sh.gram(ws.x.data(), ws.a.data());
      have_q = false;
      continue;
    }
    team_blas::syrk(sh.threads, false, r, r, T(1), ws.p.data(), r, T(0), ws.t.data(), r);  // P^2
    team_blas::mirror_lower(sh.threads, ws.t.data(), r);
    sh.gemmt(T(1), ws.a.data(), ws.t.data(), ws.x2.data());  // A P^2, symmetric
    std::copy_n(ws.x2.data(), size_t(r) * r, ws.a.data());
    team_blas::mirror_lower(sh.threads, ws.a.data(), r);
  }
  if (have_q) {  // F = P Q (only its lower triangle is read by symm)
    sh.gemmt(T(1), ws.p.data(), ws.q.data(), ws.t.data());
    std::swap(ws.p, ws.t);
  }
}

template <class T, class S, class D>
void polar_one(const PolarTask& t, const PolarOptions& o, Workspace<T>& ws, int threads) {
  const int64_t size = t.m * t.n;
  const S* g = t.in->ptr<const S>() + t.index * size;
  D* out = t.out->ptr<D>() + t.index * size;
  const Shape<T> sh{blas::dim(t.r(), "matrix dimension"), blas::dim(t.c(), "matrix dimension"), t.tall(), threads};
  // a zero factor gives beta out (as in BLAS, it reads nothing); unchecked NaN/Inf input, NaN
  if (o.alpha == 0.0 || !t.finite) {
    const double v = o.alpha == 0.0 ? 0.0 : std::numeric_limits<double>::quiet_NaN();
    for (int64_t i = 0; i < size; ++i) out[i] = from_double<D>(o.beta == 0.0 ? v : o.beta * to_double(out[i]) + v);
    return;
  }
  if (t.inv_scale == 0.0 || o.steps.empty()) {  // G = 0 gives 0 (no steps: X_0)
    for (int64_t i = 0; i < size; ++i) {
      const double x0 = o.steps.empty() ? std::ldexp(to_double(g[i]), t.exponent) * t.inv_scale : 0.0;
      out[i] = from_double<D>(o.beta == 0.0 ? o.alpha * x0 : o.beta * to_double(out[i]) + o.alpha * x0);
    }
    return;
  }
  ws.reserve(size, t.r());
  T* x = ws.x.data();
  const double inv_scale = t.inv_scale;
  with_pow2(t.exponent, [&](auto pow2) {
    for (int64_t i = 0; i < size; ++i) x[i] = T(pow2(to_double(g[i])) * inv_scale);
  });
  iterate(sh, o, ws);
  if constexpr (std::is_same_v<T, D>) {
    sh.apply(ws.p.data(), ws.x.data(), out, T(o.alpha), T(o.beta));  // fused into the last product
  } else {
    sh.apply(ws.p.data(), ws.x.data(), ws.x2.data(), T(1), T(0));
    for (int64_t i = 0; i < size; ++i) {
      const double v = o.alpha * double(ws.x2[size_t(i)]);
      out[i] = from_double<D>(o.beta == 0.0 ? v : o.beta * to_double(out[i]) + v);
    }
  }
}

template <class T>
void run(const PolarTask& t, const PolarOptions& o, Workspace<T>& ws, int threads) {
  CK_DISPATCH_FLOATING(t.in->dtype, "G", S, [&] {
    CK_DISPATCH_FLOATING(t.out->dtype, "out", D, [&] { polar_one<T, S, D>(t, o, ws, threads); });
  });
}

}  // namespace

void polar_cpu(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
               const PolarOptions& options) {
  std::vector<PolarTask> tasks;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const ArrayView& g = inputs[i];
    const int64_t m = g.size(-2), n = g.size(-1), batch = m * n ? g.numel() / (m * n) : 0;
    blas::dim(std::min(m, n), "matrix dimension");
    blas::dim(std::max(m, n), "matrix dimension");
    for (int64_t b = 0; b < batch; ++b) tasks.push_back({i, &g, &outputs[i], b, m, n});
  }
  const int64_t count = int64_t(tasks.size());
  const int threads = num_threads();

#pragma omp parallel for schedule(dynamic) num_threads(threads) if (count > 1)
  for (int64_t i = 0; i < count; ++i) {
    CK_DISPATCH_FLOATING(tasks[i].in->dtype, "G", S, [&] { measure<S>(tasks[i], options); });
  }
  for (int64_t i = 0; i < count && options.check_finite; ++i) {
    CK_CHECK_VALUE(tasks[i].finite, "argument '", options.in_name, "' contains NaN or Inf (matrix ", tasks[i].index,
                   " of input ", tasks[i].input, ")");
    // An output that is read (beta != 0: polar_update_'s param) is an input too.
    if (options.beta != 0.0) check_finite_matrix(*tasks[i].out, tasks[i].index, options.out_name);
  }

  // one workspace per slot of run_matrix_tasks, sized from the same snapshot it runs on
  std::tuple<std::vector<Workspace<float>>, std::vector<Workspace<double>>> ws{size_t(threads), size_t(threads)};
  SingleThreadedBlas single;  // a matrix's products run on curvkit's OpenMP team (team_blas)
  run_matrix_tasks(
      threads, count, [&](int64_t i) { return tasks[size_t(i)].cost(); },
      [&](int64_t i, int slot) {
        const PolarTask& t = tasks[size_t(i)];
        CK_DISPATCH_COMPUTE(t.in->dtype, T, [&] {
          run<T>(t, options, std::get<std::vector<Workspace<T>>>(ws)[size_t(slot)], threads);
        });
      });
}

}  // namespace curvkit

// ---------------------------------------------------------------------------------------
// Square roots of symmetric positive (semi)definite matrices, and the Lyapunov solve.

namespace curvkit {
namespace {

template <class T>
struct SqrtWork {
  std::vector<T> a, y, z, m, t, u, p, q;
  // The buffers given, n x n each: a call sizes only those its method uses (eight 512^2 float64
  // buffers zeroed per call were a tenth of an eigh square root).
  template <class... V>
  void size(int64_t n, V*... v) {
    (v->resize(size_t(n * n)), ...);
  }
};

// Coupled Newton-Schulz: y = A/c -> (A/c)^{1/2}, z = I -> (A/c)^{-1/2}. Plain products on
// purpose: the iteration is stable because Y = A Z holds through it, and forcing Y and Z
// symmetric separately (half-flop symmetric products) breaks that and diverges once the
// small eigenvalues converge (measured: cond 1e6 blows up at step 19).
template <class T>
void sqrt_newton_schulz(int n, double c, int max_iters, SqrtWork<T>& w, SqrtStatus& st, bool& ok) {
  for (int64_t i = 0; i < int64_t(n) * n; ++i) {
    w.y[size_t(i)] = T(double(w.a[size_t(i)]) / c);
    w.z[size_t(i)] = T(i % (n + 1) == 0 ? 1 : 0);
  }
  w.size(n, &w.m, &w.u);
  ConvergenceWatch watch(unit_roundoff<T>(), n);
  for (st.iterations = 0; st.iterations < max_iters && !interrupted(); ++st.iterations) {
    blas::gemm(n, n, n, T(1), w.z.data(), w.y.data(), T(0), w.m.data());  // Z Y
    if (watch.done(identity_distance(w.m.data(), n))) break;
    for (int64_t i = 0; i < int64_t(n) * n; ++i)
      w.t[size_t(i)] = T(-0.5) * w.m[size_t(i)] + T(i % (n + 1) == 0 ? 1.5 : 0);
    blas::gemm(n, n, n, T(1), w.y.data(), w.t.data(), T(0), w.u.data());
    std::swap(w.y, w.u);
    blas::gemm(n, n, n, T(1), w.t.data(), w.z.data(), T(0), w.u.data());
    std::swap(w.z, w.u);
  }
  ok = watch.converged;
}

// [5/5] Pade approximant of sqrt(1 - z) (exact coefficients): y = S / sqrt(c), z = S^{-1} sqrt(c).
constexpr double kPadeP[6] = {1.0, -11.0 / 4, 11.0 / 4, -77.0 / 64, 55.0 / 256, -11.0 / 1024};
constexpr double kPadeQ[6] = {1.0, -9.0 / 4, 7.0 / 4, -35.0 / 64, 15.0 / 256, -1.0 / 1024};

template <class T>
void sqrt_pade(int n, double c, bool want_inverse, SqrtWork<T>& w, bool& ok) {
  const int64_t nn = int64_t(n) * n;
  w.size(n, &w.p, &w.q);
  std::vector<T> powers[6];
  for (auto& v : powers) v.assign(size_t(nn), T(0));
  for (int64_t i = 0; i < nn; ++i)
    powers[1][size_t(i)] = T((i % (n + 1) == 0 ? 1.0 : 0.0) - double(w.a[size_t(i)]) / c);
  blas::syrk(false, n, n, T(1), powers[1].data(), n, T(0), powers[2].data(), n);  // M M^T = M^2
  blas::mirror_lower(powers[2].data(), n);
  blas::gemmt(n, T(1), powers[2].data(), powers[1].data(), T(0), powers[3].data());
  blas::mirror_lower(powers[3].data(), n);
  blas::syrk(false, n, n, T(1), powers[2].data(), n, T(0), powers[4].data(), n);
  blas::mirror_lower(powers[4].data(), n);
  blas::gemmt(n, T(1), powers[4].data(), powers[1].data(), T(0), powers[5].data());
  blas::mirror_lower(powers[5].data(), n);
  for (int64_t i = 0; i < nn; ++i) {
    double p = i % (n + 1) == 0 ? kPadeP[0] : 0, q = i % (n + 1) == 0 ? kPadeQ[0] : 0;
    for (int d = 1; d <= 5; ++d) {
      p += kPadeP[d] * double(powers[d][size_t(i)]);
      q += kPadeQ[d] * double(powers[d][size_t(i)]);
    }
    w.p[size_t(i)] = T(p);
    w.q[size_t(i)] = T(q);
  }
  w.y = w.p;  // Q^{-1} P
  w.t = w.q;
  ok = blas::posv(n, w.t.data(), w.y.data()) == 0;
  if (want_inverse) {  // P^{-1} Q
    w.z = w.q;
    w.t = w.p;
    ok &= blas::posv(n, w.t.data(), w.z.data()) == 0;
  }
  symmetrize(w.y.data(), n);  // the solves leave rounding-level asymmetry
  if (want_inverse) symmetrize(w.z.data(), n);
}

// Eigendecomposition: y = S / sqrt(c), z = S^{-1} sqrt(c) from A/c = V diag(w) V^T, negative
// eigenvalues floored at 0 (a clearly indefinite A is not ok). floored: ||A/c - (A/c)_+||_F.
template <class T>
void sqrt_eigh(int n, double c, bool want_inverse, SqrtWork<T>& w, SqrtStatus& st, bool& ok, double& floored) {
  const int64_t nn = int64_t(n) * n;
  std::vector<T> values(static_cast<size_t>(n));
  w.size(n, &w.m);
  for (int64_t i = 0; i < nn; ++i) w.m[size_t(i)] = T(double(w.a[size_t(i)]) / c);
  ok = blas::syevd(n, w.m.data(), values.data()) == 0;
  st.negative = numerics::negative_ratio(double(values[0]), double(values[size_t(n - 1)]));
  ok &= !numerics::clearly_indefinite(st.negative);
  floored = 0;
  for (int64_t j = 0; j < n && values[size_t(j)] < 0; ++j) floored += double(values[size_t(j)]) * values[size_t(j)];
  floored = std::sqrt(floored);
  const double negligible = double(n) * unit_roundoff<T>() * std::max(double(values[size_t(n - 1)]), 0.0);
  for (int pass = 0; pass < (want_inverse ? 2 : 1); ++pass) {
    std::vector<T>& out = pass == 0 ? w.y : w.z;
    if (pass == 1 && double(values[0]) <= negligible) ok = false;  // singular: no inverse
    std::vector<double> factor(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j)
      factor[size_t(j)] =
          std::pow(std::max(double(values[size_t(j)]), pass == 0 ? 0.0 : negligible), pass == 0 ? 0.25 : -0.25);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) w.t[size_t(i * n + j)] = T(double(w.m[size_t(i * n + j)]) * factor[size_t(j)]);
    blas::syrk(false, n, n, T(1), w.t.data(), n, T(0), out.data(), n);
    blas::mirror_lower(out.data(), n);
  }
}

template <class T>
void sqrt_one(const ArrayView& a, int64_t index, const ArrayView* sqrt_out, const ArrayView* inv_out,
              const SqrtOptions& o, SqrtWork<T>& w, SqrtStatus& st) {
  const int n = blas::dim(a.size(-1), "matrix dimension");
  const int64_t nn = int64_t(n) * n;
  w.size(n, &w.a, &w.y, &w.z, &w.t);
  load_symmetrized(a, index, w.a.data());
  // Work on 2^k A with max|2^k A| near 1 (k even, exact): c below, its square and the residual
  // then neither underflow (A = 1e-300 I gave c = 0, "converged" zeros) nor overflow (1e300 gave
  // a NaN residual); sqrt(A) = 2^(-k/2) sqrt(2^k A).
  const double amax = max_abs(w.a.data(), nn);
  const int k = amax > 0 ? numerics::even_scale_exponent(amax) : 0;
  scale_pow2(w.a.data(), nn, k);
  // Scale: both ||A||_F and ||A||_inf bound the largest eigenvalue of symmetric A; the
  // smaller one puts the spectrum of A/c closest to 1 (near the identity ||A||_inf does).
  const double a_norm = frobenius(w.a.data(), nn), c = std::min(a_norm, max_row_sum(w.a.data(), n));
  st = SqrtStatus{};
  st.method = o.method;
  if (c == 0) {  // sqrt(0) = 0; no inverse
    std::fill(w.y.begin(), w.y.end(), T(0));
    if (sqrt_out) store_matrix(w.y.data(), *sqrt_out, index, 0.0);
    if (inv_out) store_matrix(w.y.data(), *inv_out, index, 0.0);
    st.converged = inv_out == nullptr;
    return;
  }
  // The requested method, then (with fallback) Eigh for a matrix it failed.
  bool ok = false;
  for (SqrtMethod method = o.method;; method = SqrtMethod::Eigh) {
    double floored = 0;  // ||A - A_+||_F / c: what Eigh's floor removed
    switch (method) {
      case SqrtMethod::NewtonSchulz: sqrt_newton_schulz(n, c, o.max_iters, w, st, ok); break;
      case SqrtMethod::Pade: sqrt_pade(n, c, inv_out != nullptr, w, ok); break;
      default: sqrt_eigh(n, c, inv_out != nullptr, w, st, ok, floored); break;
    }
    ok &= all_finite(w.y) && (!inv_out || all_finite(w.z));
    // residual ||S^2 - A||_F / ||A||_F with S = sqrt(c) y
    double r = std::numeric_limits<double>::infinity();
    if (all_finite(w.y)) {
      blas::syrk(false, n, n, T(1), w.y.data(), n, T(0), w.t.data(), n);
      double s = 0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j <= i; ++j) {
          const double d = c * double(w.t[size_t(i * n + j)]) - double(w.a[size_t(i * n + j)]);
          s += (i == j ? 1 : 2) * d * d;
        }
      r = std::sqrt(s) / a_norm;
    }
    st.residual = r;
    st.converged = ok && r <= o.tol + c * floored / a_norm;
    st.method = method;
    if (st.converged || method == SqrtMethod::Eigh || !o.fallback || interrupted()) break;
    st.fell_back = true;
  }
  if (!ok) {  // never hand on NaN or Inf: a failed matrix's non-finite output becomes zeros
    if (!all_finite(w.y)) std::fill(w.y.begin(), w.y.end(), T(0));
    if (!all_finite(w.z)) std::fill(w.z.begin(), w.z.end(), T(0));
  }
  bool stored = true;  // the inverse root of a tiny A can overflow a float32 output
  if (sqrt_out) stored &= store_matrix(w.y.data(), *sqrt_out, index, std::ldexp(std::sqrt(c), -k / 2));
  if (inv_out) stored &= store_matrix(w.z.data(), *inv_out, index, std::ldexp(1.0 / std::sqrt(c), k / 2));
  st.converged = st.converged && stored;
  if (!stored) st.residual = std::numeric_limits<double>::infinity();
}

}  // namespace

void matrix_sqrt_cpu(const ArrayView& a, const ArrayView* sqrt_out, const ArrayView* inv_out, const SqrtOptions& o,
                     SqrtStatus* status) {
  const int64_t n = a.size(-1), batch = n ? a.numel() / (n * n) : 0;
  blas::dim(n, "matrix dimension");
  for (int64_t b = 0; b < batch; ++b) check_symmetric(a, b, "A");
  const double cost = double(n) * n * n;
  const int threads = num_threads();
  run_matrix_tasks(
      threads, batch, [&](int64_t) { return cost; },
      [&](int64_t b, int) {
        SqrtWork<double> w;  // float64 for every input dtype (see newton_schulz.h)
        sqrt_one(a, b, sqrt_out, inv_out, o, w, status[b]);
      },
      o.method == SqrtMethod::Eigh ? lapack_tasks(batch, threads) : TaskPolicy{});
}

namespace {

// Matrix-sign iteration for S X + X S = C: B_0 = S/s, C_0 = C/s (s = ||S||_F), then
// B <- B (3I - B^2)/2, C <- (C (3I - B^2) - B (B C - C B))/2; B -> sign(S) = I, C -> 2X.
// S and C are first scaled by powers of two (exact) to a largest entry near 1, so that s, the
// iteration and the residual neither underflow nor overflow; X = 2^(k - j) X' for S' = 2^k S,
// C' = 2^j C.
template <class T>
void lyapunov_one(const ArrayView& s_in, const ArrayView& c_in, const ArrayView& x_out, int64_t index, int max_iters,
                  SqrtWork<T>& w, SqrtStatus& st) {
  const int n = blas::dim(s_in.size(-1), "matrix dimension");
  const int64_t nn = int64_t(n) * n;
  w.size(n, &w.a, &w.y, &w.z, &w.m, &w.t, &w.u, &w.p, &w.q);
  load_symmetrized(s_in, index, w.a.data());  // S', kept for the residual
  load_matrix(c_in, index, w.q.data());       // C', kept for the residual
  const double s_max = max_abs(w.a.data(), nn), c_max = max_abs(w.q.data(), nn);
  st = SqrtStatus{};
  if (s_max == 0 || c_max == 0) {  // C = 0: X = 0, solved; S = 0 (C != 0): no solution
    std::fill(w.z.begin(), w.z.end(), T(0));
    store_matrix(w.z.data(), x_out, index, 0.0);
    st.converged = c_max == 0;
    st.residual = c_max == 0 ? 0.0 : 1.0;
    return;
  }
  const int k = numerics::even_scale_exponent(s_max), j = numerics::even_scale_exponent(c_max);
  scale_pow2(w.a.data(), nn, k);
  scale_pow2(w.q.data(), nn, j);
  const double scale = frobenius(w.a.data(), nn);
  for (int64_t i = 0; i < nn; ++i) {
    w.y[size_t(i)] = T(double(w.a[size_t(i)]) / scale);
    w.z[size_t(i)] = T(double(w.q[size_t(i)]) / scale);
  }
  ConvergenceWatch watch(unit_roundoff<T>(), n);
  for (st.iterations = 0; st.iterations < max_iters && !interrupted(); ++st.iterations) {
    blas::syrk(false, n, n, T(1), w.y.data(), n, T(0), w.m.data(), n);  // B^2
    blas::mirror_lower(w.m.data(), n);
    if (watch.done(identity_distance(w.m.data(), n))) break;
    for (int64_t i = 0; i < nn; ++i) w.t[size_t(i)] = -w.m[size_t(i)] + T(i % (n + 1) == 0 ? 3 : 0);  // 3I - B^2
    blas::gemm(n, n, n, T(1), w.y.data(), w.z.data(), T(0), w.p.data());                              // B C
    blas::gemm(n, n, n, T(-1), w.z.data(), w.y.data(), T(1), w.p.data());                             // B C - C B
    blas::gemm(n, n, n, T(0.5), w.z.data(), w.t.data(), T(0), w.u.data());  // C (3I - B^2) / 2
    blas::gemm(n, n, n, T(-0.5), w.y.data(), w.p.data(), T(1), w.u.data());
    std::swap(w.z, w.u);
    blas::gemmt(n, T(0.5), w.y.data(), w.t.data(), T(0), w.u.data());
    blas::mirror_lower(w.u.data(), n);
    std::swap(w.y, w.u);
  }
  const bool finite = all_finite(w.z);
  if (!finite) std::fill(w.z.begin(), w.z.end(), T(0));
  for (int64_t i = 0; i < nn; ++i) w.z[size_t(i)] *= T(0.5);  // X'
  // The reported residual is the true ||S'X' + X'S' - C'||_F / ||C'||_F of the X' returned (the
  // sign iteration's own distance says nothing about X: an indefinite S converges too, to
  // sign(S) != I). Converged also needs B = sign(S) at I (S positive definite) and a normwise
  // backward error ||R|| / (2 ||S'|| ||X'|| + ||C'||) below sqrt(u): a solution is at u.
  w.p = w.q;
  blas::gemm(n, n, n, T(1), w.a.data(), w.z.data(), T(-1), w.p.data());  // S'X' - C'
  blas::gemm(n, n, n, T(1), w.z.data(), w.a.data(), T(1), w.p.data());   // + X'S'
  const double r = frobenius(w.p.data(), nn), c_norm = frobenius(w.q.data(), nn);
  const bool positive_definite = numerics::definite_sign(identity_sum_squares(w.y.data(), n));
  const double backward = r / (2 * scale * frobenius(w.z.data(), nn) + c_norm);
  st.residual = finite ? r / c_norm : std::numeric_limits<double>::infinity();
  st.converged = watch.converged && finite && positive_definite && backward <= std::sqrt(unit_roundoff<T>());
  if (!store_matrix(w.z.data(), x_out, index, std::ldexp(1.0, k - j))) {  // X overflowed the output dtype
    st.converged = false;
    st.residual = std::numeric_limits<double>::infinity();
  }
}

}  // namespace

void solve_lyapunov_cpu(const ArrayView& s, const ArrayView& c, const ArrayView& x, int max_iters,
                        std::vector<SqrtStatus>& status) {
  const int64_t n = s.size(-1), batch = n ? s.numel() / (n * n) : 0;
  blas::dim(n, "matrix dimension");
  for (int64_t b = 0; b < batch; ++b) {
    check_symmetric(s, b, "S");
    check_finite_matrix(c, b, "C");
  }
  status.assign(size_t(batch), SqrtStatus{});
  const double cost = double(n) * n * n;
  run_matrix_tasks(
      num_threads(), batch, [&](int64_t) { return cost; },
      [&](int64_t b, int) {
        SqrtWork<double> w;
        lyapunov_one(s, c, x, b, max_iters, w, status[size_t(b)]);
      });
}

}  // namespace curvkit
