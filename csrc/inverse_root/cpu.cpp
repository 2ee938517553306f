#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/blas.h"
#include "core/matrix_utils.h"
#include "core/team_blas.h"
#include "core/team_qr.h"
#include "inverse_root/inverse_root.h"

namespace curvkit {
namespace {

struct RootTask {
  size_t input;
  int64_t index, n;
};

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
  std::vector<T> a, x, m, mp, q, t, u, v, w, scratch;
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

// ||X^p A_r - I||_max for symmetric X (w.a holds A_r); uses m, t, u, v.
template <class T>
double root_residual(int n, int p, RootWork<T>& w) {
  matrix_power(n, w.x, p, w.v, w.t, w.u);
  blas::gemm(n, n, n, T(1), w.v.data(), w.a.data(), T(0), w.m.data());
  return max_distance_to_identity(w.m.data(), n);
}

// Union-find over eigenpair indices: groups of pairs too strongly coupled for a first-order
// correction.
class Groups {
 public:
  explicit Groups(int n) : parent_(static_cast<size_t>(n)) {
    for (int i = 0; i < n; ++i) parent_[size_t(i)] = i;
  }
  int find(int i) {
    while (parent_[size_t(i)] != i) i = parent_[size_t(i)] = parent_[size_t(parent_[size_t(i)])];
    return i;
  }
  void join(int i, int j) { parent_[size_t(find(i))] = find(j); }

 private:
  std::vector<int> parent_;
};

// Rotates the lines `cols` of a row-major n x n matrix by the orthogonal b x b matrix q
// (rows of q index the old lines): columns, m[:, cols] <- m[:, cols] q, with (stride, step)
// = (n, 1); rows, m[cols, :] <- q^T m[cols, :], with (1, n). Entry k of line l is at
// l * stride + cols[k] * step.
template <class T>
void rotate_lines(int n, T* m, const std::vector<int>& cols, const std::vector<T>& q, int64_t stride, int64_t step) {
  const size_t b = cols.size();
  std::vector<double> line(b);
  for (int64_t l = 0; l < n; ++l) {
    T* ml = m + l * stride;
    for (size_t c = 0; c < b; ++c) {
      double x = 0;
      for (size_t k = 0; k < b; ++k) x += double(ml[cols[k] * step]) * double(q[k * b + c]);
      line[c] = x;
    }
    for (size_t c = 0; c < b; ++c) ml[cols[c] * step] = T(line[c]);
  }
}

// Refines approximate eigenvectors v (n x n, columns) of symmetric a into eigenvectors of
// working accuracy, with the iteration of Ogita & Aishima ("Iterative refinement for
// symmetric eigenvalue decomposition", Japan J. Indust. Appl. Math. 35, 2018): with
// S = V^T A V and R = I - V^T V, eigenvalues d_i = s_ii / (1 - r_ii) and V <- V (I + E),
// E_ij = (s_ij + d_j r_ij) / (d_j - d_i), E_ii = r_ii / 2: each step squares the error, all in
// matrix products (3 n x n products a step). Pairs whose coupling |s_ij| exceeds a tenth of
// their gap (eigenvalues that crossed or nearly meet) are outside the first-order regime:
// they are grouped, and each group is diagonalized exactly (a small LAPACK eigh and a rotation
// of its columns) before the step. Pairs whose |s_ij| + |d| |r_ij| still exceeds a tenth of
// the gap get E_ij = r_ij / 2 (orthogonalization only), as for clusters in the paper.
// Converged: max_{i != j} |s_ij| and max |r_ij| at rounding level (4 sqrt(n) u, relative to
// max |d| for S), the accuracy LAPACK's own eigenvectors have, or a first-order correction
// with ||E||_F^2 <= u (its S and R are then at rounding level unseen). Returns the number of
// steps taken (eigenvalues in d, unsorted; products counts the matrix products), or -1 when
// the basis is too far from A's eigenvectors (a coupled group larger than n/4, a step that
// increased the coupling, no convergence within max_steps, or non-finite values): decompose
// from scratch then. Eigenvectors of
// eigenvalues closer than the drift couples them (dense spectra, n >= 1024 after an EMA
// step, measured) rotate too far for refinement. scratch holds 5 n^2 values.
template <class T>
int refine_eigenbasis(int n, const T* a, T* v, T* d, int max_steps, std::vector<T>& scratch, double* products) {
  const int64_t nn = int64_t(n) * n;
  scratch.resize(size_t(5 * nn));
  T *av = scratch.data(), *s = av + nn, *r = s + nn, *e = r + nn, *v0 = e + nn;
  const double u = unit_roundoff<T>(), floor_r = numerics::refine_floor(n, u);
  const int max_group = std::max(2, n / 4);
  double previous_off = std::numeric_limits<double>::infinity();
  auto rayleigh = [&](int64_t i) { return T(double(s[i * n + i]) / (1 - double(r[i * n + i]))); };
  for (int step = 0;; ++step) {
    blas::symm(true, n, n, T(1), a, n, v, n, T(0), av, n);  // A V
    blas::gemmt_tn(n, T(1), v, av, T(0), s);                // S = V^T A V, lower
    blas::syrk(true, n, n, T(-1), v, n, T(0), r, n);        // R = I - V^T V, lower
    for (int64_t i = 0; i < n; ++i) r[i * n + i] += T(1);
    blas::mirror_lower(s, n);
    blas::mirror_lower(r, n);
    *products += 2;
    double scale = 0, off = 0, off_r = 0;
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) {
      d[i] = rayleigh(i);
      scale = std::max(scale, std::fabs(double(d[i])));
      for (int64_t j = 0; j < n; ++j) {
        const double sij = std::fabs(double(s[i * n + j])), rij = std::fabs(double(r[i * n + j]));
        finite &= sij <= DBL_MAX && rij <= DBL_MAX;
        if (i != j) off = std::max(off, sij);
        off_r = std::max(off_r, rij);
      }
    }
    if (!finite || !(scale <= DBL_MAX)) return -1;
    const double floor_s = floor_r * scale;
    if (numerics::refine_converged(off, off_r, floor_s, floor_r)) return step;
    // Outside the quadratic regime (the coupling grew, or the basis lost orthogonality): the
    // drift was too large for this basis; stop early rather than iterate to max_steps.
    if (numerics::refine_too_far(step, max_steps, off, previous_off, off_r)) return -1;
    previous_off = off;
    // Strongly coupled pairs, grouped and diagonalized exactly.
    Groups groups(n);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < i; ++j) {
        const double sij = std::fabs(double(s[int64_t(i) * n + j]));
        if (numerics::strongly_coupled(sij, floor_s, double(d[i]) - double(d[j]))) groups.join(i, j);
      }
    std::vector<std::vector<int>> members(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) members[size_t(groups.find(i))].push_back(i);
    bool rotated = false;
    for (const std::vector<int>& cols : members) {
      const size_t b = cols.size();
      if (b < 2) continue;
      if (int(b) > max_group) return -1;
      std::vector<T> q(b * b), mu(b);
      for (size_t x = 0; x < b; ++x)
        for (size_t y = 0; y < b; ++y) q[x * b + y] = s[int64_t(cols[x]) * n + cols[y]];
      if (blas::syevd(int(b), q.data(), mu.data()) != 0) return -1;
      for (T* m : {v, s, r}) rotate_lines(n, m, cols, q, n, 1);  // V Q, and S Q, R Q
      for (T* m : {s, r}) rotate_lines(n, m, cols, q, 1, n);     // then Q^T S Q, Q^T R Q
      for (int i : cols) d[i] = rayleigh(i);
      rotated = true;
    }
    if (rotated) {  // exactly symmetric again: E_ij + E_ji = r_ij needs s_ij = s_ji to the last bit
      blas::mirror_lower(s, n);
      blas::mirror_lower(r, n);
    }
    double correction2 = 0;  // ||E||_F^2
    bool all_first_order = !rotated;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const double sij = double(s[i * n + j]), rij = double(r[i * n + j]), gap = double(d[j]) - double(d[i]);
        const bool first_order = numerics::first_order(sij, rij, double(d[i]), double(d[j]), i == j);
        all_first_order &= i == j || first_order;
        e[i * n + j] = T(first_order ? (sij + double(d[j]) * rij) / gap : rij / 2);
        correction2 += double(e[i * n + j]) * double(e[i * n + j]);
      }
    std::copy(v, v + nn, v0);
    blas::gemm(n, n, n, T(1), v0, e, T(1), v);  // V <- V + V E
    *products += 1;
    // In the first-order regime the next S and R are off by O(||E||^2) (and d by as much,
    // relative): a correction with ||E||_F^2 <= u leaves them at rounding level, so the
    // evaluation that would confirm it is skipped.
    if (all_first_order && correction2 <= u) return step + 1;
  }
}

// A sort key that puts NaN last in ascending or descending order, so that comparisons stay a
// strict weak order (the result is a permutation; the verdict on NaN is made elsewhere).
inline double nan_last(double v, bool descending) {
  return v == v ? v : (descending ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity());
}

// Eigenpairs sorted by ascending eigenvalue (w, v's columns permuted alike).
template <class T>
void sort_eigenpairs(int n, std::vector<T>& w, std::vector<T>& v, std::vector<T>& scratch) {
  std::vector<int> order(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[size_t(i)] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int x, int y) { return nan_last(w[size_t(x)], false) < nan_last(w[size_t(y)], false); });
  scratch.assign(v.begin(), v.end());
  const std::vector<T> values = w;
  for (int64_t j = 0; j < n; ++j) {
    w[size_t(j)] = values[size_t(order[size_t(j)])];
    for (int64_t i = 0; i < n; ++i) v[size_t(i * n + j)] = scratch[size_t(i * n + order[size_t(j)])];
  }
}

// A refined basis gets numerics::kMaxRefineSteps steps (each squares the error) before LAPACK
// takes over.
using numerics::kMaxRefineSteps;

// Eigenvalues (w.w, ascending) and eigenvectors (w.v) of symmetric a: refined from the basis
// already in w.v when `warm` (st.iterations steps), else, or when that fails (st.fell_back),
// from LAPACK syevd. False if LAPACK fails.
template <class T>
bool decompose(int n, const T* a, bool warm, RootWork<T>& w, RootStatus& st) {
  if (warm) {
    const int steps = refine_eigenbasis(n, a, w.v.data(), w.w.data(), kMaxRefineSteps, w.scratch, &st.products);
    if (steps >= 0) {
      st.iterations = steps;
      sort_eigenpairs(n, w.w, w.v, w.scratch);
      return true;
    }
    st.fell_back = true;
  }
  std::copy(a, a + int64_t(n) * n, w.v.begin());
  return blas::syevd(n, w.v.data(), w.w.data()) == 0;
}

// X from the eigendecomposition of A (w.v, w.w; w.v is overwritten), with the floor's report.
// Returns false if A is clearly indefinite or X is not finite.
template <class T>
bool root_from_eigenpairs(int n, const RootOptions& o, RootWork<T>& w, RootStatus& st) {
  const double w_min = double(w.w[0]), w_max = double(w.w[size_t(n - 1)]);
  const double level = numerics::singular_level(n, unit_roundoff<T>(), std::max(w_max, 0.0), o.eps);
  st.negative = numerics::negative_ratio(w_min, w_max);
  std::vector<double> scale(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {  // the floor of inverse_root.h
    st.unresolved += numerics::floored_eigenvalue(double(w.w[size_t(j)]), o.eps) <= level;
    scale[size_t(j)] = numerics::eigen_factor(double(w.w[size_t(j)]), o.eps, level, o.p);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) w.v[size_t(i * n + j)] = T(double(w.v[size_t(i * n + j)]) * scale[size_t(j)]);
  blas::syrk(false, n, n, T(1), w.v.data(), n, T(0), w.x.data(), n);
  blas::mirror_lower(w.x.data(), n);
  return !numerics::clearly_indefinite(st.negative) && all_finite(w.x);
}

// X from the eigendecomposition of A (matrix `index` of `a`; eps is applied after flooring),
// refined from `basis` (matrix `index`) when given and written back to it. Returns false if
// LAPACK failed or A is singular or indefinite.
template <class T>
bool root_eigh(int n, const RootOptions& o, const ArrayView& a, const ArrayView* basis, int64_t index, RootWork<T>& w,
               RootStatus& st) {
  // A itself, not (A + eps I) - eps I: with eps far above ||A|| (1e100) that subtraction
  // cancels A's diagonal and made a correct root read as indefinite.
  load_symmetrized(a, index, w.t.data());
  if (basis) load_matrix(*basis, index, w.v.data());
  if (!decompose(n, w.t.data(), basis != nullptr, w, st) || !all_finite(w.v) || !all_finite(w.w)) return false;
  if (basis) store_matrix(w.v.data(), *basis, index);
  st.products += 0.5;  // the syrk that rebuilds the root
  return root_from_eigenpairs(n, o, w, st);
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
  return numerics::newton_lambda(bound, rayleigh);
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
    st.products += power_products(p) + 1;
  } else {
    const double lambda = lambda_max_estimate(n, w);
    const double z = numerics::newton_scale(p, lambda);
    for (int64_t i = 0; i < nn; ++i) {
      w.x[size_t(i)] = T(i % (n + 1) == 0 ? std::pow(z, 1.0 / p) : 0.0);
      w.m[size_t(i)] = T(z * double(w.a[size_t(i)]));
    }
  }
  const double eps = unit_roundoff<T>(), stop = numerics::newton_root_stop(n, eps);
  double previous = std::numeric_limits<double>::infinity();
  for (st.iterations = 0;; ++st.iterations) {
    const double r = max_distance_to_identity(w.m.data(), n);
    // growing in the convergent region: keep the previous iterate
    if (numerics::error_grew(r, previous, st.iterations)) {
      std::swap(w.x, w.v);
      break;
    }
    if (numerics::newton_root_stops(r, previous, stop, eps, st.iterations, o.max_iters) || interrupted()) break;
    previous = r;
    for (int64_t i = 0; i < nn; ++i)
      w.mp[size_t(i)] = T(((i % (n + 1) == 0 ? p + 1.0 : 0.0) - double(w.m[size_t(i)])) / p);
    w.v = w.x;  // the previous iterate, in case the next step grows the error
    blas::gemm(n, n, n, T(1), w.v.data(), w.mp.data(), T(0), w.x.data());
    if (interrupted()) break;  // also between the products of a step: one step of a large matrix takes seconds
    matrix_power(n, w.mp, p, w.q, w.t, w.u);  // M <- M'^p M
    st.products += power_products(p) + 2;
    blas::gemm(n, n, n, T(1), w.q.data(), w.m.data(), T(0), w.t.data());
    std::swap(w.m, w.t);
  }
  if (interrupted()) return false;  // the caller throws; skip the residual's products
  symmetrize(w.x.data(), n);        // X is symmetric in exact arithmetic
  if (!all_finite(w.x)) return false;
  st.residual = root_residual(n, p, w);
  st.products += power_products(p) + 1;
  return st.residual <= *o.tol;
}

template <class T>
void root_one(const ArrayView& a, const ArrayView& out, const ArrayView* init, const ArrayView* basis, int64_t index,
              const RootOptions& o, RootWork<T>& w, RootStatus& st) {
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
    ok = root_eigh(n, o, a, basis, index, w, st);
    if (o.compute_residual) st.residual = root_residual(n, o.p, w);  // reported, not a criterion (nor counted)
  }
  st.converged = ok;
  if (!ok && o.method == RootMethod::Newton && o.fallback && !interrupted()) {  // eigh, in float64
    RootWork<double> w64;
    RootOptions o64 = o;
    o64.method = RootMethod::Eigh;
    RootStatus fallback;
    root_one<double>(a, out, nullptr, nullptr, index, o64, w64, fallback);
    fallback.iterations = st.iterations;
    fallback.products += st.products;
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
  if (!store_matrix(w.x.data(), out, index)) {  // overflowed the output dtype
    st.converged = false;
    st.residual = std::numeric_limits<double>::infinity();
  }
}

}  // namespace

void matrix_inverse_root_cpu(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                             const std::vector<const ArrayView*>& inits, const std::vector<const ArrayView*>& bases,
                             const RootOptions& o, std::vector<std::vector<RootStatus>>& status) {
  const std::vector<RootTask> tasks = symmetric_tasks(inputs);
  status.assign(inputs.size(), {});
  for (size_t i = 0; i < inputs.size(); ++i) {
    RootStatus empty;  // 0 x 0 matrices have their (empty) root
    empty.converged = true;
    status[i].assign(size_t(leading_count(inputs[i])), inputs[i].size(-1) ? RootStatus{} : empty);
  }
  for (const RootTask& t : tasks)
    if (inits[t.input]) check_symmetric(*inits[t.input], t.index, "init");
  const int threads = num_threads();
  run_matrix_tasks(
      threads, int64_t(tasks.size()), [&](int64_t k) { return std::pow(double(tasks[size_t(k)].n), 3); },
      [&](int64_t k, int) {
        const RootTask& t = tasks[size_t(k)];
        RootStatus& st = status[t.input][size_t(t.index)];
        CK_DISPATCH_COMPUTE(inputs[t.input].dtype, T, [&] {
          RootWork<T> w;
          root_one(inputs[t.input], outputs[t.input], inits[t.input], bases[t.input], t.index, o, w, st);
        });
      },
      lapack_tasks(int64_t(tasks.size()), threads));
}

namespace {

// Q of column-major a (m x k, destroyed) into column-major q, with column j multiplied by
// sign(R_jj), on `threads` threads (team_qr). False when a column was (numerically) dependent
// on the previous ones, unless full_rank_out is given (the rank verdict goes there).
template <class T>
bool qr_positive(int threads, int m, int k, T* a, T* q, bool* full_rank_out = nullptr) {
  const int64_t size = int64_t(m) * k;
  // Q is the same for any positive multiple of a: scaling by a power of two (exact) to a largest
  // entry near 1 keeps ||a||_F and the rank floor finite (1e300 inputs read as "lost rank").
  const double amax = max_abs(a, size);
  if (amax > 0 && amax <= DBL_MAX) scale_pow2(a, size, numerics::even_scale_exponent(amax));
  const double scale = frobenius(a, size);
  {
    SingleThreadedBlas single;
    team_qr::qr(threads, m, k, a, q);
  }
  bool full_rank = true;
  for (int64_t j = 0; j < k; ++j) {
    const double r = double(a[j * m + j]);
    full_rank &= std::fabs(r) > numerics::rank_floor(m, unit_roundoff<T>(), scale);
    if (r < 0)
      for (int64_t i = 0; i < m; ++i) q[j * m + i] = -q[j * m + i];
  }
  if (full_rank_out) {
    *full_rank_out = full_rank;
    return true;
  }
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
  const int threads = num_threads();
  run_matrix_tasks(
      threads, batch, [&](int64_t) { return cost; },
      [&](int64_t b, int) { good[size_t(b)] = CK_DISPATCH_COMPUTE(q.dtype, T, [&] { return solve(T(), b); }); },
      qr_tasks(batch, threads));
  ok.assign(good.begin(), good.end());
}

}  // namespace

void orthonormalize_qr_cpu(const ArrayView& q, std::vector<bool>& ok) {
  const int64_t m = q.size(-2), k = q.size(-1);
  for (int64_t b = 0; b < leading_count(q); ++b) check_finite_matrix(q, b, "Q");
  for_each_basis(q, ok, [&](auto tag, int64_t b) {
    using T = decltype(tag);
    std::vector<T> a(static_cast<size_t>(m * k)), result(a.size());
    load_matrix_transposed(q, b, a.data());
    const bool finite = all_finite(a);
    const bool good = finite && qr_positive(num_threads(), int(m), int(k), a.data(), result.data());
    store_matrix_transposed(finite ? result.data() : a.data(), q, b);
    return good;
  });
}

void orthogonality_cpu(const ArrayView& q, std::vector<double>& error) {
  const int64_t m = q.size(-2), k = q.size(-1);
  std::vector<bool> unused;
  error.assign(size_t(m * k ? q.numel() / (m * k) : 0), 0.0);
  for_each_basis(q, unused, [&](auto, int64_t b) {
    std::vector<double> a(static_cast<size_t>(m * k)), g(static_cast<size_t>(k * k));
    load_matrix(q, b, a.data());
    blas::syrk(true, int(k), int(m), 1.0, a.data(), int(k), 0.0, g.data(), int(k));  // Q^T Q, lower
    double worst = 0;
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j <= i; ++j) worst = std::max(worst, numerics::identity_gap(g[size_t(i * k + j)], i == j));
    error[size_t(b)] = worst;
    return true;
  });
}

void eigenbasis_update_cpu(const std::vector<ArrayView>& a_in, const std::vector<ArrayView>& q,
                           const std::vector<ArrayView>& q_out, const std::vector<ArrayView>& estimates,
                           const std::vector<ArrayView>& perm, std::vector<std::vector<bool>>& ok,
                           std::vector<std::vector<bool>>& full_rank) {
  // Every matrix of every input is one task, so that a model's factors of many sizes share the
  // threads (a list used to run one input after another).
  struct Task {
    size_t input;
    int64_t index, n, k;
    double cost() const { return double(n) * double(k) * double(k); }
  };
  std::vector<Task> tasks;
  for (size_t i = 0; i < q.size(); ++i) {
    if (q[i].numel() == 0) continue;  // solved as it is
    const int64_t n = q[i].size(-2), k = q[i].size(-1), batch = leading_count(q[i]);
    blas::dim(n, "matrix dimension");
    for (int64_t b = 0; b < batch; ++b) {
      check_symmetric(a_in[i], b, "A");
      check_finite_matrix(q[i], b, "Q");
      tasks.push_back({i, b, n, k});
    }
  }
  std::vector<char> good(tasks.size()), full(tasks.size(), 1);
  const int threads = num_threads();
  auto update = [&](auto tag, size_t id) {
    using T = decltype(tag);
    const Task& t = tasks[id];
    const int64_t n = t.n, k = t.k, b = t.index;
    // Column-major throughout (LAPACK's QR takes it): qt = Q^T row-major, and Q^T A = (A Q)^T.
    std::vector<T> a(static_cast<size_t>(n * n)), qt(static_cast<size_t>(n * k)), aqt(qt.size());
    load_symmetrized(a_in[t.input], b, a.data());
    load_matrix_transposed(q[t.input], b, qt.data());
    // A Q and the estimates from 2^e A and 2^f Q (exact; A Q and q^T A q of huge or tiny
    // inputs would overflow or underflow), d unscaled below.
    const double amax = max_abs(a.data(), n * n), qmax = max_abs(qt.data(), n * k);
    const int e = amax > 0 ? numerics::even_scale_exponent(amax) : 0;
    const int f = qmax > 0 ? numerics::even_scale_exponent(qmax) : 0;
    scale_pow2(a.data(), n * n, e);
    scale_pow2(qt.data(), n * k, f);
    team_blas::symm(threads, false, int(k), int(n), T(1), a.data(), int(n), qt.data(), int(n), T(0), aqt.data(),
                    int(n));  // Q^T A
    std::vector<double> d(static_cast<size_t>(k), 0.0);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < n; ++i) d[size_t(j)] += double(qt[size_t(j * n + i)]) * double(aqt[size_t(j * n + i)]);
    std::vector<int64_t> order(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) order[size_t(j)] = j;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t x, int64_t y) { return nan_last(d[size_t(x)], true) > nan_last(d[size_t(y)], true); });
    std::vector<T>& p = qt;  // A Q with its columns in that order, column-major
    for (int64_t j = 0; j < k; ++j) std::copy_n(aqt.begin() + order[size_t(j)] * n, n, p.begin() + j * n);
    // A rank-deficient A Q still gives an orthonormal Q (its last columns complete the
    // basis), as SOAP's own QR: not a failure; full says whether this dtype resolved it.
    bool full_column_rank = true;
    bool done = all_finite(p) && qr_positive(threads, int(n), int(k), p.data(), aqt.data(), &full_column_rank);
    full[id] = full_column_rank;
    store_matrix_transposed(done ? aqt.data() : p.data(), q_out[t.input], b);  // Q, or the non-finite A Q
    std::vector<double> sorted(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) sorted[size_t(j)] = std::ldexp(d[size_t(order[size_t(j)])], -e - 2 * f);
    done &= store_vector(sorted.data(), k, estimates[t.input], b);  // q^T A q of a huge A and Q can overflow
    std::copy(order.begin(), order.end(), perm[t.input].ptr<int64_t>() + b * k);
    return done;
  };
  SingleThreadedBlas single;  // a large matrix's products and QR run on curvkit's OpenMP team
  run_matrix_tasks(
      threads, int64_t(tasks.size()), [&](int64_t t) { return tasks[size_t(t)].cost(); },
      [&](int64_t t, int) {
        good[size_t(t)] =
            CK_DISPATCH_COMPUTE(q[tasks[size_t(t)].input].dtype, T, [&] { return update(T(), size_t(t)); });
      },
      qr_tasks(int64_t(tasks.size()), threads));
  ok.assign(q.size(), {});
  full_rank.assign(q.size(), {});
  for (size_t t = 0; t < tasks.size(); ++t) {
    ok[tasks[t].input].push_back(good[t]);
    full_rank[tasks[t].input].push_back(full[t]);
  }
}

void eigh_cpu(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& values,
              const std::vector<ArrayView>& vectors, const std::vector<const ArrayView*>& bases,
              std::vector<std::vector<bool>>& ok, std::vector<std::vector<int>>& steps) {
  const std::vector<RootTask> tasks = symmetric_tasks(inputs);
  ok.assign(inputs.size(), {});
  steps.assign(inputs.size(), {});
  for (size_t i = 0; i < inputs.size(); ++i) {
    ok[i].assign(size_t(leading_count(inputs[i])), true);
    steps[i].assign(ok[i].size(), -1);
  }
  // vector<bool> packs bits: collect per task, copy after the parallel loop.
  std::vector<char> task_ok(tasks.size());
  auto solve = [&](auto tag, const RootTask& t) {
    using T = decltype(tag);
    const int n = int(t.n);
    const ArrayView* basis = bases[t.input];
    std::vector<T> a(size_t(t.n * t.n));
    RootWork<T> w;
    w.v.resize(a.size());
    w.w.resize(size_t(n));
    load_symmetrized(inputs[t.input], t.index, a.data());
    if (basis) load_matrix(*basis, t.index, w.v.data());
    RootStatus st;
    bool good = decompose(n, a.data(), basis != nullptr, w, st) && all_finite(w.v) && all_finite(w.w);
    if (!good) {
      std::fill(w.v.begin(), w.v.end(), T(0));
      std::fill(w.w.begin(), w.w.end(), T(0));
    }
    good &= store_vector(w.w.data(), t.n, values[t.input], t.index);  // n max|A| may overflow a float16 output
    store_matrix(w.v.data(), vectors[t.input], t.index);
    steps[t.input][size_t(t.index)] = basis && !st.fell_back ? st.iterations : -1;
    return good;
  };
  const int threads = num_threads();
  run_matrix_tasks(
      threads, int64_t(tasks.size()), [&](int64_t k) { return std::pow(double(tasks[size_t(k)].n), 3); },
      [&](int64_t k, int) {
        const RootTask& t = tasks[size_t(k)];
        task_ok[size_t(k)] = CK_DISPATCH_COMPUTE(inputs[t.input].dtype, T, [&] { return solve(T(), t); });
      },
      lapack_tasks(int64_t(tasks.size()), threads));
  for (size_t k = 0; k < tasks.size(); ++k) ok[tasks[k].input][size_t(tasks[k].index)] = task_ok[k];
}

}  // namespace curvkit
