#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "core/blas.h"
#include "core/dispatch.h"
#include "core/runtime.h"
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
  double inv_scale = 0.0;  // 1 / ((norm_scale + eps) ||G||_F); 0 for G = 0
  bool finite = true;
  int64_t r() const { return std::min(m, n); }
  int64_t c() const { return std::max(m, n); }
  bool tall() const { return m > n; }
  double cost() const { return double(r()) * double(r()) * double(c()); }
};

// Matrices at most this cheap (r^2 c) run one per thread with single-threaded BLAS.
constexpr double kSmallTask = 512.0 * 512.0 * 512.0;

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
  double sum = 0.0;  // scaled by the largest entry so that neither tiny nor huge G under/overflows
  for (int64_t i = 0; i < size; ++i) {
    const double v = to_double(g[i]) / amax;
    sum += v * v;
  }
  t.inv_scale = 1.0 / ((o.norm_scale + o.eps) * amax * std::sqrt(sum));
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
template <class T>
struct Shape {
  int r, c;
  bool tall;
  void gram(const T* x, T* a) const {
    blas::syrk(tall, r, c, T(1), x, tall ? r : c, T(0), a, r);
    blas::mirror_lower(a, r);
  }
  void apply(const T* p, const T* x, T* dst, T alpha, T beta) const {
    if (tall) blas::symm(false, c, r, alpha, p, r, x, r, beta, dst, r);
    else blas::symm(true, r, c, alpha, p, r, x, c, beta, dst, c);
  }
};

// P = a I + b A + c A^2 (full), A full; uses t for A^2.
template <class T>
void step_polynomial(const PolarStep& s, const T* a, T* p, T* t, int r) {
  blas::syrk(false, r, r, T(1), a, r, T(0), t, r);  // A A^T = A^2, lower
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j <= i; ++j) p[i * r + j] = T(s.c) * t[i * r + j] + T(s.b) * a[i * r + j] + (i == j ? T(s.a) : T(0));
  blas::mirror_lower(p, r);
}

// Runs the iteration on ws.x (X_0, normalized) and leaves the final symmetric factor F in
// ws.p and the matrix it multiplies in ws.x: the result is F * ws.x (apply()).
template <class T>
void iterate(const Shape<T>& sh, const PolarOptions& o, Workspace<T>& ws) {
  const int r = sh.r;
  const size_t steps = o.steps.size();
  if (o.method == PolarMethod::Standard) {
    for (size_t k = 0; k < steps; ++k) {
      sh.gram(ws.x.data(), ws.a.data());
      step_polynomial(o.steps[k], ws.a.data(), ws.p.data(), ws.t.data(), r);
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
    step_polynomial(o.steps[k], ws.a.data(), ws.p.data(), ws.t.data(), r);
    if (k + 1 == steps) break;
    if (have_q) {
      blas::gemmt(r, T(1), ws.p.data(), ws.q.data(), T(0), ws.t.data());  // P Q, symmetric
      blas::mirror_lower(ws.t.data(), r);
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
    blas::syrk(false, r, r, T(1), ws.p.data(), r, T(0), ws.t.data(), r);  // P^2
    blas::mirror_lower(ws.t.data(), r);
    blas::gemmt(r, T(1), ws.a.data(), ws.t.data(), T(0), ws.x2.data());  // A P^2, symmetric
    std::copy_n(ws.x2.data(), size_t(r) * r, ws.a.data());
    blas::mirror_lower(ws.a.data(), r);
  }
  if (have_q) {  // F = P Q (only its lower triangle is read by symm)
    blas::gemmt(r, T(1), ws.p.data(), ws.q.data(), T(0), ws.t.data());
    std::swap(ws.p, ws.t);
  }
}

template <class T, class S, class D>
void polar_one(const PolarTask& t, const PolarOptions& o, Workspace<T>& ws) {
  const int64_t size = t.m * t.n;
  const S* g = t.in->ptr<const S>() + t.index * size;
  D* out = t.out->ptr<D>() + t.index * size;
  const Shape<T> sh{blas::dim(t.r(), "matrix dimension"), blas::dim(t.c(), "matrix dimension"), t.tall()};
  if (t.inv_scale == 0.0 || o.steps.empty()) {  // G = 0 gives 0 (no steps: X_0)
    for (int64_t i = 0; i < size; ++i) {
      const double x0 = o.steps.empty() ? to_double(g[i]) * t.inv_scale : 0.0;
      out[i] = from_double<D>(o.beta == 0.0 ? o.alpha * x0 : o.beta * to_double(out[i]) + o.alpha * x0);
    }
    return;
  }
  ws.reserve(size, t.r());
  for (int64_t i = 0; i < size; ++i) ws.x[size_t(i)] = T(to_double(g[i]) * t.inv_scale);
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
void run(const PolarTask& t, const PolarOptions& o, Workspace<T>& ws) {
  CK_DISPATCH_FLOATING(t.in->dtype, "G", S, [&] {
    CK_DISPATCH_FLOATING(t.out->dtype, "out", D, [&] { polar_one<T, S, D>(t, o, ws); });
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
  for (int64_t i = 0; i < count; ++i) {
    CK_CHECK_VALUE(tasks[i].finite, "argument 'G' contains NaN or Inf (matrix ", tasks[i].index, " of input ",
                   tasks[i].input, ")");
  }

  // Small matrices: one per thread, single-threaded BLAS, largest first. Large ones: one at a
  // time with all threads inside BLAS.
  std::vector<const PolarTask*> small, large;
  for (const PolarTask& t : tasks) (t.cost() <= kSmallTask && count > 1 ? small : large).push_back(&t);
  std::sort(small.begin(), small.end(), [](auto* a, auto* b) { return a->cost() > b->cost(); });
  auto dispatch = [&](const PolarTask& t, auto& ws32, auto& ws64) {
    if (t.in->dtype == DType::float64()) run<double>(t, options, ws64);
    else run<float>(t, options, ws32);
  };
  if (small.size() > 1) {
    blas::ScopedBlasThreads single(1);
#pragma omp parallel num_threads(threads)
    {
      Workspace<float> ws32;
      Workspace<double> ws64;
#pragma omp for schedule(dynamic)
      for (int64_t i = 0; i < int64_t(small.size()); ++i) dispatch(*small[size_t(i)], ws32, ws64);
    }
  } else {
    large.insert(large.begin(), small.begin(), small.end());
  }
  Workspace<float> ws32;
  Workspace<double> ws64;
  for (const PolarTask* t : large) dispatch(*t, ws32, ws64);
}

#ifndef CURVKIT_WITH_CUDA
void polar_cuda(const std::vector<ArrayView>&, const std::vector<ArrayView>&, const PolarOptions&, StreamHandle) {
  throw ValueError("curvkit was built without CUDA; CUDA arrays are not supported by this build");
}
#endif

}  // namespace curvkit
