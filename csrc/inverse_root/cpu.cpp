#include <algorithm>
#include <cmath>
#include <vector>

#include "core/blas.h"
#include "core/matrix_utils.h"
#include "inverse_root/inverse_root.h"

namespace curvkit {
namespace {

struct RootTask {
  size_t input;
  int64_t index, n;
};

// Matrices in a (..., n, n) batch, counted from the leading dimensions (so n = 0 counts too).
int64_t leading_count(const ArrayView& a) {
  int64_t count = 1;
  for (int d = 0; d + 2 < a.ndim(); ++d) count *= a.shape[d];
  return count;
}

// One task per matrix of every input (in order), each checked finite and symmetric first.
std::vector<RootTask> symmetric_tasks(const std::vector<ArrayView>& inputs) {
  std::vector<RootTask> tasks;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t n = inputs[i].size(-1), batch = n ? leading_count(inputs[i]) : 0;
    blas::dim(n, "matrix dimension");
    for (int64_t b = 0; b < batch; ++b) {
      check_symmetric(inputs[i], b, "A");
      tasks.push_back({i, b, n});
    }
  }
  return tasks;
}

template <class T>
struct RootWork {
  std::vector<T> a, x, m, mp, q, t, u, v, w;
  void reserve(int64_t n) {
    for (auto* b : {&a, &x, &m, &mp, &q, &t, &u, &v}) b->resize(size_t(n * n));
    w.resize(size_t(n));
  }
};

// out = b^p (plain products: the coupled iteration's invariant needs them, as in the
// Newton–Schulz square root); uses t and u.
template <class T>
void matrix_power(int n, const std::vector<T>& b, int p, std::vector<T>& out, std::vector<T>& t, std::vector<T>& u) {
  t = b;  // b^(2^k)
  bool have = false;
  for (int e = p; e > 0; e >>= 1) {
    if (e & 1) {
      if (have) {
        blas::gemm(n, n, n, T(1), out.data(), t.data(), T(0), u.data());
        std::swap(out, u);
      } else {
        out = t;
        have = true;
      }
    }
    if (e > 1) {
      blas::gemm(n, n, n, T(1), t.data(), t.data(), T(0), u.data());
      std::swap(t, u);
    }
  }
}

// ||M - I||_max, infinite when M holds NaN or Inf (a max reduction alone would drop NaN).
template <class T>
double max_distance_to_identity(const std::vector<T>& m, int64_t n) {
  double r = 0;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double d = std::fabs(double(m[size_t(i * n + j)]) - (i == j ? 1.0 : 0.0));
      finite &= d <= DBL_MAX;
      r = std::max(r, d);
    }
  return finite ? r : std::numeric_limits<double>::infinity();
}

// ||X^p A_r - I||_max for symmetric X (w.a holds A_r); uses m, t, u, v.
template <class T>
double root_residual(int n, int p, RootWork<T>& w) {
  matrix_power(n, w.x, p, w.v, w.t, w.u);
  blas::gemm(n, n, n, T(1), w.v.data(), w.a.data(), T(0), w.m.data());
  return max_distance_to_identity(w.m, n);
}

// X from the eigendecomposition of A (w.a holds A + eps I; the eps is taken back out and
// applied after flooring). Returns false if LAPACK failed or A is singular or indefinite.
template <class T>
bool root_eigh(int n, const RootOptions& o, RootWork<T>& w) {
  w.v = w.a;
  for (int64_t i = 0; i < n; ++i) w.v[size_t(i * n + i)] -= T(o.eps);
  if (blas::syevd(n, w.v.data(), w.w.data()) != 0) return false;
  const double top = std::max(double(w.w[size_t(n - 1)]), 0.0);
  const double zero = double(n) * unit_roundoff<T>() * (top + o.eps);
  bool ok = double(w.w[0]) >= -std::sqrt(unit_roundoff<T>()) * top;  // a real negative eigenvalue: indefinite
  std::vector<double> scale(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    const double lambda = std::max(double(w.w[size_t(j)]), 0.0) + o.eps;
    ok &= lambda > zero;  // numerically singular: the root is unreliable in that direction
    scale[size_t(j)] = lambda > 0 ? std::pow(lambda, -0.5 / o.p) : 0.0;  // pseudo-inverse of exact zeros
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) w.v[size_t(i * n + j)] = T(double(w.v[size_t(i * n + j)]) * scale[size_t(j)]);
  blas::syrk(false, n, n, T(1), w.v.data(), n, T(0), w.x.data(), n);
  blas::mirror_lower(w.x.data(), n);
  return ok && all_finite(w.x);
}

// Largest-eigenvalue upper estimate for the Newton scaling.
template <class T>
double lambda_max_estimate(int n, RootWork<T>& w) {
  const double bound = std::min(frobenius(w.a.data(), int64_t(n) * n), max_row_sum(w.a.data(), n));
  std::vector<double> v(static_cast<size_t>(n), 1.0 / std::sqrt(double(n))), u(static_cast<size_t>(n));
  double rayleigh = 0;
  for (int k = 0; k < 10; ++k) {
    double norm = 0;
    rayleigh = 0;
    for (int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) s += double(w.a[size_t(i * n + j)]) * v[size_t(j)];
      u[size_t(i)] = s;
      rayleigh += s * v[size_t(i)];
      norm += s * s;
    }
    norm = std::sqrt(norm);
    if (norm == 0) break;
    for (int64_t i = 0; i < n; ++i) v[size_t(i)] = u[size_t(i)] / norm;
  }
  return rayleigh > 0 ? std::min(bound, 1.25 * rayleigh) : bound;
}

// Coupled Newton for X = A_r^{-1/p} (w.a holds A_r), M tracked alongside X; a warm start
// begins from X_0 = init, M_0 = init^p A_r. The coupled form does not correct the part of an
// error in X_0 that does not commute with A_r (and the uncoupled form, which would, is
// unstable: it multiplies such errors by up to ~cond(A)), so the verdict is always the
// true residual ||X^p A_r - I||_max of the final X: an inaccurate warm start is caught and
// falls back instead of being passed on.
template <class T>
bool root_newton(int n, const RootOptions& o, const ArrayView* init, int64_t index, RootWork<T>& w, RootStatus& st) {
  const int p = o.p;
  const int64_t nn = int64_t(n) * n;
  if (init) {
    load_symmetrized(*init, index, w.x.data());
    matrix_power(n, w.x, p, w.q, w.t, w.u);
    blas::gemm(n, n, n, T(1), w.q.data(), w.a.data(), T(0), w.m.data());
  } else {
    const double lambda = lambda_max_estimate(n, w);
    const double z = (p + 1) / (2 * lambda);
    for (int64_t i = 0; i < nn; ++i) {
      w.x[size_t(i)] = T(i % (n + 1) == 0 ? std::pow(z, 1.0 / p) : 0.0);
      w.m[size_t(i)] = T(z * double(w.a[size_t(i)]));
    }
  }
  const double eps = unit_roundoff<T>();
  double previous = std::numeric_limits<double>::infinity();
  for (st.iterations = 0;; ++st.iterations) {
    const double r = max_distance_to_identity(w.m, n);
    if (previous < 1 && r > 1.2 * previous) {  // growing in the convergent region: keep the previous iterate
      std::swap(w.x, w.v);
      break;
    }
    if (r <= 10 * n * eps || (previous < std::sqrt(eps) && r >= previous) || st.iterations >= o.max_iters) break;
    previous = r;
    for (int64_t i = 0; i < nn; ++i) w.mp[size_t(i)] = T(((i % (n + 1) == 0 ? p + 1.0 : 0.0) - double(w.m[size_t(i)])) / p);
    w.v = w.x;  // the previous iterate, in case the next step grows the error
    blas::gemm(n, n, n, T(1), w.v.data(), w.mp.data(), T(0), w.x.data());
    matrix_power(n, w.mp, p, w.q, w.t, w.u);  // M <- M'^p M
    blas::gemm(n, n, n, T(1), w.q.data(), w.m.data(), T(0), w.t.data());
    std::swap(w.m, w.t);
  }
  symmetrize(w.x.data(), n);  // X is symmetric in exact arithmetic
  if (!all_finite(w.x)) return false;
  st.residual = root_residual(n, p, w);
  return st.residual <= o.tol;
}

template <class T>
void root_one(const ArrayView& a, const ArrayView& out, const ArrayView* init, int64_t index, const RootOptions& o,
              RootWork<T>& w, RootStatus& st) {
  const int n = blas::dim(a.size(-1), "matrix dimension");
  w.reserve(n);
  load_symmetrized(a, index, w.a.data());
  for (int64_t i = 0; i < n; ++i) w.a[size_t(i * n + i)] += T(o.eps);
  st = RootStatus{};
  st.method = o.method;
  bool ok;
  if (o.method == RootMethod::Newton) {
    ok = root_newton(n, o, init, index, w, st);
  } else {
    ok = root_eigh(n, o, w);
    if (o.compute_residual) st.residual = root_residual(n, o.p, w);  // reported, not a criterion
  }
  st.converged = ok;
  if (!ok && o.method == RootMethod::Newton && o.fallback) {  // eigh, in float64
    RootWork<double> w64;
    RootOptions o64 = o;
    o64.method = RootMethod::Eigh;
    RootStatus fallback;
    root_one<double>(a, out, nullptr, index, o64, w64, fallback);
    fallback.iterations = st.iterations;
    fallback.fell_back = true;
    if (fallback.converged || !init) {
      st = fallback;
      return;  // written by the recursive call
    }
  }
  if (!st.converged && init) {  // keep the previous root
    load_symmetrized(*init, index, w.x.data());
    st.kept_init = true;
  }
  if (!all_finite(w.x)) std::fill(w.x.begin(), w.x.end(), T(0));
  store_matrix(w.x.data(), out, index);
}

}  // namespace

void matrix_inverse_root_cpu(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                             const std::vector<const ArrayView*>& inits, const RootOptions& o,
                             std::vector<std::vector<RootStatus>>& status) {
  const std::vector<RootTask> tasks = symmetric_tasks(inputs);
  status.assign(inputs.size(), {});
  for (size_t i = 0; i < inputs.size(); ++i) {
    RootStatus empty;  // 0 x 0 matrices have their (empty) root
    empty.converged = true;
    status[i].assign(size_t(leading_count(inputs[i])), inputs[i].size(-1) ? RootStatus{} : empty);
  }
  for (const RootTask& t : tasks)
    if (inits[t.input]) check_symmetric(*inits[t.input], t.index, "init");
  run_matrix_tasks(
      int64_t(tasks.size()), [&](int64_t k) { return std::pow(double(tasks[size_t(k)].n), 3); },
      [&](int64_t k, int) {
        const RootTask& t = tasks[size_t(k)];
        RootStatus& st = status[t.input][size_t(t.index)];
        if (inputs[t.input].dtype == DType::float64()) {
          RootWork<double> w;
          root_one(inputs[t.input], outputs[t.input], inits[t.input], t.index, o, w, st);
        } else {
          RootWork<float> w;
          root_one(inputs[t.input], outputs[t.input], inits[t.input], t.index, o, w, st);
        }
      },
      lapack_small_task(int64_t(tasks.size())));
}

namespace {

// In-place QR of row-major a (m x k) keeping Q, with column j multiplied by sign(R_jj).
// False when LAPACK fails or a column was (numerically) dependent on the previous ones.
template <class T>
bool qr_positive(int m, int k, T* a) {
  std::vector<T> tau(static_cast<size_t>(k));
  const double scale = frobenius(a, int64_t(m) * k);
  if (blas::geqrf(m, k, a, tau.data()) != 0) return false;
  std::vector<T> sign(static_cast<size_t>(k));
  bool full_rank = true;
  for (int j = 0; j < k; ++j) {
    const double r = double(a[size_t(j) * k + j]);
    full_rank &= std::fabs(r) > double(m) * unit_roundoff<T>() * scale;
    sign[size_t(j)] = r < 0 ? T(-1) : T(1);
  }
  if (blas::orgqr(m, k, a, tau.data()) != 0) return false;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) a[size_t(i * k + j)] *= sign[size_t(j)];
  return full_rank;
}

// Tasks over the batch of q (..., m, k), calling solve(tag, index) with T the compute type.
template <class Solve>
void for_each_basis(const ArrayView& q, std::vector<bool>& ok, Solve solve) {
  const int64_t m = q.size(-2), k = q.size(-1), batch = m * k ? q.numel() / (m * k) : 0;
  blas::dim(m, "matrix dimension");
  CK_CHECK_VALUE(k <= m, "argument 'Q' must have at least as many rows as columns, got ", m, " x ", k);
  std::vector<char> good(static_cast<size_t>(batch));
  const double cost = double(m) * k * k;
  run_matrix_tasks(batch, [&](int64_t) { return cost; }, [&](int64_t b, int) {
    good[size_t(b)] = q.dtype == DType::float64() ? solve(double(), b) : solve(float(), b);
  }, lapack_small_task(batch));
  ok.assign(good.begin(), good.end());
}

}  // namespace

void orthonormalize_qr_cpu(const ArrayView& q, std::vector<bool>& ok) {
  const int64_t m = q.size(-2), k = q.size(-1);
  for_each_basis(q, ok, [&](auto tag, int64_t b) {
    using T = decltype(tag);
    std::vector<T> a(static_cast<size_t>(m * k));
    load_matrix(q, b, a.data());
    bool good = all_finite(a) && qr_positive(int(m), int(k), a.data());
    store_matrix(a.data(), q, b);
    return good;
  });
}

void eigenbasis_update_cpu(const ArrayView& a_in, const ArrayView& q, const ArrayView& q_out,
                           const ArrayView& estimates, const ArrayView& perm, std::vector<bool>& ok) {
  const int64_t n = q.size(-2), k = q.size(-1);
  const int64_t batch = n * k ? q.numel() / (n * k) : 0;
  for (int64_t b = 0; b < batch; ++b) check_symmetric(a_in, b, "A");
  for_each_basis(q, ok, [&](auto tag, int64_t b) {
    using T = decltype(tag);
    std::vector<T> a(static_cast<size_t>(n * n)), qb(static_cast<size_t>(n * k)), aq(qb.size()), p(qb.size());
    load_symmetrized(a_in, b, a.data());
    load_matrix(q, b, qb.data());
    blas::symm(true, int(n), int(k), T(1), a.data(), int(n), qb.data(), int(k), T(0), aq.data(), int(k));  // A Q
    std::vector<double> d(static_cast<size_t>(k), 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < k; ++j) d[size_t(j)] += double(qb[size_t(i * k + j)]) * double(aq[size_t(i * k + j)]);
    std::vector<int64_t> order(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) order[size_t(j)] = j;
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return d[size_t(x)] > d[size_t(y)]; });
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < k; ++j) p[size_t(i * k + j)] = aq[size_t(i * k + order[size_t(j)])];
    const bool good = all_finite(p) && qr_positive(int(n), int(k), p.data());
    store_matrix(p.data(), q_out, b);
    std::vector<double> sorted(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) sorted[size_t(j)] = d[size_t(order[size_t(j)])];
    store_vector(sorted.data(), k, estimates, b);
    std::copy(order.begin(), order.end(), perm.ptr<int64_t>() + b * k);
    return good;
  });
}

void eigh_cpu(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& values,
              const std::vector<ArrayView>& vectors, std::vector<std::vector<bool>>& ok) {
  const std::vector<RootTask> tasks = symmetric_tasks(inputs);
  ok.assign(inputs.size(), {});
  for (size_t i = 0; i < inputs.size(); ++i) ok[i].assign(size_t(leading_count(inputs[i])), true);
  // vector<bool> packs bits: collect per task, copy after the parallel loop.
  std::vector<char> task_ok(tasks.size());
  auto solve = [&](auto tag, const RootTask& t) {
    using T = decltype(tag);
    const int n = int(t.n);
    std::vector<T> a(size_t(t.n * t.n)), w(size_t(t.n));
    load_symmetrized(inputs[t.input], t.index, a.data());
    const bool good = blas::syevd(n, a.data(), w.data()) == 0 && all_finite(a) && all_finite(w);
    if (!good) {
      std::fill(a.begin(), a.end(), T(0));
      std::fill(w.begin(), w.end(), T(0));
    }
    store_vector(w.data(), t.n, values[t.input], t.index);
    store_matrix(a.data(), vectors[t.input], t.index);
    return good;
  };
  run_matrix_tasks(
      int64_t(tasks.size()), [&](int64_t k) { return std::pow(double(tasks[size_t(k)].n), 3); },
      [&](int64_t k, int) {
        const RootTask& t = tasks[size_t(k)];
        task_ok[size_t(k)] = inputs[t.input].dtype == DType::float64() ? solve(double(), t) : solve(float(), t);
      },
      lapack_small_task(int64_t(tasks.size())));
  for (size_t k = 0; k < tasks.size(); ++k) ok[tasks[k].input][size_t(tasks[k].index)] = task_ok[k];
}

}  // namespace curvkit
