// The C++ API without Python: the families called on plain std::vector memory, each checked
// against a property its result must have, and the errors it must raise on bad arguments.
// Built with -DCURVKIT_CPP_TESTS=ON and run by ctest (see CONTRIBUTING.md).
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/interrupt.h"
#include "core/matrix_utils.h"
#include "hutchinson/hutchinson.h"
#include "inverse_root/inverse_root.h"
#include "mfac/mfac.h"
#include "newton_schulz/newton_schulz.h"
#include "sinkhorn/sinkhorn.h"

namespace ck = curvkit;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  failures += !ok;
}

template <class Error>
void expect_error(const std::function<void()>& call, const std::string& needle, const std::string& what) {
  try {
    call();
  } catch (const Error& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos, what + ": " + e.what());
    return;
  } catch (const std::exception& e) {
    expect(false, what + ": wrong exception type: " + e.what());
    return;
  }
  expect(false, what + ": no exception");
}

// A C-contiguous CPU float64 view of `data` with `shape`.
ck::ArrayView view(std::vector<double>& data, std::vector<int64_t> shape) {
  ck::ArrayView v;
  v.data = data.data();
  v.dtype = ck::DType::float64();
  v.shape = shape;
  v.strides.assign(shape.size(), 1);
  for (int d = int(shape.size()) - 2; d >= 0; --d)
    v.strides[size_t(d)] = v.strides[size_t(d) + 1] * shape[size_t(d) + 1];
  return v;
}

// max |A B^T - I| for row-major m x n A and B (m <= n).
double orthogonality_error(const std::vector<double>& a, int64_t m, int64_t n) {
  double worst = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      double dot = 0;
      for (int64_t k = 0; k < n; ++k) dot += a[size_t(i * n + k)] * a[size_t(j * n + k)];
      worst = std::fmax(worst, std::fabs(dot - (i == j ? 1.0 : 0.0)));
    }
  return worst;
}

void test_probes() {
  const int64_t n = 1000, k = 4;
  std::vector<double> z(size_t(n * k)), z2(z.size());
  ck::probes(view(z, {n, k}), ck::ProbeKind::Rademacher, 7, 0, nullptr, 0);
  bool signs = true;
  for (double x : z) signs &= x == 1.0 || x == -1.0;
  expect(signs, "probes: rademacher entries are +-1");
  // Column j of a call at offset 1 is column j + 1 of a call at offset 0.
  ck::probes(view(z2, {n, k}), ck::ProbeKind::Rademacher, 7, 1, nullptr, 0);
  bool shifted = true;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j + 1 < k; ++j) shifted &= z2[size_t(i * k + j)] == z[size_t(i * k + j + 1)];
  expect(shifted, "probes: offset counts probes");
  std::vector<double> s(static_cast<size_t>(n));
  ck::probes(view(s, {n}), ck::ProbeKind::Sphere, 3, 0, nullptr, 0);
  double norm2 = 0;
  for (double x : s) norm2 += x * x;
  expect(std::fabs(norm2 - 1) < 1e-12, "probes: a sphere probe has unit norm");
  std::vector<double> scalar(1);
  expect_error<ck::ValueError>([&] { ck::probes(view(scalar, {}), ck::ProbeKind::Gaussian, 0, 0, nullptr, 0); },
                               "argument 'out'", "probes: a 0-d output is refused");
}

void test_polar() {
  const int64_t m = 24, n = 40;
  std::vector<double> g(size_t(m * n)), x(g.size());
  ck::probes(view(g, {m, n}), ck::ProbeKind::Gaussian, 11, 0, nullptr, 0);
  ck::PolarOptions o;
  const ck::PolarStep cubic{1.5, -0.5, 0.0};  // Newton–Schulz, converges for singular values in (0, sqrt 3)
  o.steps.assign(60, cubic);
  ck::polar({view(g, {m, n})}, {view(x, {m, n})}, o, 0);
  expect(orthogonality_error(x, m, n) < 1e-10, "polar: 60 cubic steps give orthonormal rows");
  std::vector<double> wrong(size_t(m * m));
  expect_error<ck::ValueError>([&] { ck::polar({view(g, {m, n})}, {view(wrong, {m, m})}, o, 0); },
                               "must have the same shape", "polar: an output of another shape is refused");
  expect_error<ck::ValueError>([&] { ck::polar({view(g, {m, n})}, {}, o, 0); }, "argument 'out'",
                               "polar: one output per input");
}

void test_inverse_root() {
  const int64_t n = 3;
  std::vector<double> a = {16, 0, 0, 0, 81, 0, 0, 0, 1}, x(9);
  ck::RootOptions o;
  o.p = 4;
  std::vector<std::vector<ck::RootStatus>> status;
  for (ck::RootMethod method : {ck::RootMethod::Eigh, ck::RootMethod::Newton}) {
    o.method = method;
    ck::matrix_inverse_root({view(a, {n, n})}, {view(x, {n, n})}, {nullptr}, {nullptr}, o, status, 0);
    const double expected[3] = {0.5, 1.0 / 3.0, 1.0};
    double err = 0;
    for (int i = 0; i < 3; ++i) err = std::fmax(err, std::fabs(x[size_t(i * 4)] - expected[i]));
    const char* name = method == ck::RootMethod::Eigh ? "eigh" : "newton";
    expect(status.size() == 1 && status[0].size() == 1 && status[0][0].converged && err < 1e-12,
           std::string("matrix_inverse_root: diag(16, 81, 1)^(-1/4), ") + name);
  }
  o.p = 0;
  expect_error<ck::ValueError>(
      [&] { ck::matrix_inverse_root({view(a, {n, n})}, {view(x, {n, n})}, {nullptr}, {nullptr}, o, status, 0); },
      "argument 'p'", "matrix_inverse_root: p = 0 is refused");
}

// Without a hook nothing is interrupted; with one that asks to stop, a long call throws
// Interrupted (after its first poll interval) and the next call without it runs normally.
void test_interrupt() {
  const int64_t m = 24, n = 40;
  std::vector<double> g(size_t(m * n)), x(g.size()), x2(g.size());
  ck::probes(view(g, {m, n}), ck::ProbeKind::Gaussian, 11, 0, nullptr, 0);
  ck::PolarOptions o;
  o.steps.assign(10000, ck::PolarStep{1.5, -0.5, 0.0});
  expect(!ck::interrupted(), "interrupt: no hook, not interrupted");
  bool thrown = false;
  {
    const ck::InterruptScope scope([] { return true; });
    try {
      ck::polar({view(g, {m, n}), view(g, {m, n})}, {view(x, {m, n}), view(x2, {m, n})}, o, 0);
    } catch (const ck::Interrupted&) { thrown = true; }
  }
  expect(thrown, "interrupt: a hook that asks to stop ends polar with Interrupted");
  o.steps.assign(60, ck::PolarStep{1.5, -0.5, 0.0});
  ck::polar({view(g, {m, n})}, {view(x, {m, n})}, o, 0);
  expect(orthogonality_error(x, m, n) < 1e-10, "interrupt: the next call without a hook computes normally");
}

// A singular S stalls the sign iteration: it stops, not converged, within the step limit.
void test_lyapunov_stall() {
  std::vector<double> s = {0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3}, c(16), x(16);
  for (int i = 0; i < 4; ++i) c[size_t(i * 5)] = 1;
  std::vector<std::vector<ck::SqrtStatus>> status;
  ck::solve_lyapunov({view(s, {4, 4})}, {view(c, {4, 4})}, {view(x, {4, 4})}, ck::LyapunovOptions{2147483647}, status,
                     0);
  expect(status.size() == 1 && !status[0][0].converged && status[0][0].iterations <= 200,
         "solve_lyapunov: a singular S stops (stalled), not converged");
}

// XTrace of a rank-3 operator from 4 probes is exact: every leave-one-out basis holds its range.
void test_xtrace() {
  const int64_t n = 50, k = 4, rank = 3;
  std::vector<double> b(size_t(n * rank)), a(size_t(n * n), 0.0), omega(size_t(n * k)), y(omega.size()),
      q(omega.size()), z(omega.size()), r(size_t(k * k)), est(static_cast<size_t>(k));
  ck::probes(view(b, {n, rank}), ck::ProbeKind::Gaussian, 5, 0, nullptr, 0);
  double trace = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < rank; ++c) a[size_t(i * n + j)] += b[size_t(i * rank + c)] * b[size_t(j * rank + c)];
  for (int64_t i = 0; i < n; ++i) trace += a[size_t(i * n + i)];
  const auto apply = [&](const std::vector<double>& x, std::vector<double>& out) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < k; ++c) {
        double s = 0;
        for (int64_t j = 0; j < n; ++j) s += a[size_t(i * n + j)] * x[size_t(j * k + c)];
        out[size_t(i * k + c)] = s;
      }
  };
  ck::probes(view(omega, {n, k}), ck::ProbeKind::Rademacher, 9, 0, nullptr, 0);
  apply(omega, y);
  q = y;
  ck::sketch_qr(view(q, {n, k}), view(r, {k, k}), 0);
  apply(q, z);
  ck::xtrace_estimates(view(omega, {n, k}), view(y, {n, k}), view(q, {n, k}), view(r, {k, k}), view(z, {n, k}), false,
                       view(est, {k}));
  bool exact = true;
  for (double e : est) exact &= std::fabs(e - trace) < 1e-9 * trace;
  expect(exact, "xtrace: exact below the sketch rank");
  std::vector<double> small(size_t(k * k));
  expect_error<ck::ValueError>([&] { ck::sketch_qr(view(q, {n, k}), view(small, {k, k - 1}), 0); }, "argument 'r'",
                               "sketch_qr: a wrong-shaped R is refused");
}

void test_mfac() {
  const int64_t d = 20, m = 3;
  const double damp = 0.1;
  std::vector<double> G(size_t(m * d)), K(size_t(m * m)), L(size_t(m * m)), grads(size_t(5 * d));
  for (size_t i = 0; i < grads.size(); ++i) grads[i] = std::sin(0.7 * double(i) + 0.3 * double(i % 7));
  const ck::FisherWindowArrays w{view(G, {m, d}), view(K, {m, m}), view(L, {m, m})};
  ck::FisherWindowOptions o;
  o.damp = damp;
  ck::FisherWindowState state;
  for (int64_t t = 0; t < 5; ++t) {
    std::vector<double> g(grads.begin() + t * d, grads.begin() + (t + 1) * d);
    state = ck::fisher_window_push(w, state, o, view(g, {d}), 0);
  }
  expect(state.size == 3 && state.count == 5, "fisher_window_push: the window holds the last m gradients");
  std::vector<double> x(static_cast<size_t>(d)), y(static_cast<size_t>(d));
  for (int64_t j = 0; j < d; ++j) x[size_t(j)] = std::cos(double(j));
  const ck::WindowStatus status = ck::fisher_window_ihvp(w, state, o, view(x, {d}), view(y, {d}), 0);
  expect(status.fault == ck::kFaultNone, "fisher_window_ihvp: a CPU window reports no refused push");
  // F y = damp y + sum over the last m gradients g (g.y) / m must give x back.
  double worst = 0;
  for (int64_t j = 0; j < d; ++j) {
    double fy = damp * y[size_t(j)];
    for (int64_t t = 2; t < 5; ++t) {
      double dot = 0;
      for (int64_t i = 0; i < d; ++i) dot += grads[size_t(t * d + i)] * y[size_t(i)];
      fy += grads[size_t(t * d + j)] * dot / double(m);
    }
    worst = std::fmax(worst, std::fabs(fy - x[size_t(j)]));
  }
  expect(worst < 1e-10, "fisher_window_ihvp: F (F^-1 x) = x");
  std::vector<double> bad(static_cast<size_t>(d), 1.0);
  bad[3] = NAN;
  const std::vector<double> before = G;
  expect_error<ck::ValueError>([&] { ck::fisher_window_push(w, state, o, view(bad, {d}), 0); }, "argument 'g'",
                               "fisher_window_push: NaN refused");
  expect(G == before, "fisher_window_push: a refused gradient leaves G unchanged");
  std::vector<int64_t> word{0, 0};
  const ck::FisherWindowArrays with_status{view(G, {m, d}), view(K, {m, m}), view(L, {m, m}),
                                           ck::ArrayView{word.data(), ck::DType{ck::DTypeCode::Int, 64}, {}, {2}, {1}}};
  expect_error<ck::ValueError>([&] { ck::fisher_window_push(with_status, state, o, view(bad, {d}), 0); },
                               "argument 'g'", "fisher_window_push: a CPU window raises at once, status or not");
  const ck::WindowStatus read = ck::fisher_window_status(with_status.status, 0);
  expect(read.fault == ck::kFaultNone && read.accepted == 0 && word[0] == 0,
         "fisher_window_status: nothing recorded on the CPU");
}

void test_sinkhorn() {
  // A 2 x 2 problem with a closed form: C = [[0, 1], [1, 0]], uniform marginals; the plan is
  // [[p, q], [q, p]] / 2 with p / q = e^(1 / reg), p + q = 1.
  const double reg = 0.5;
  std::vector<double> a{0.5, 0.5}, b{0.5, 0.5}, C{0, 1, 1, 0}, f(2), g(2), P(4);
  ck::OTProblems problem;
  problem.a = view(a, {1, 2});
  problem.b = view(b, {1, 2});
  problem.C = view(C, {1, 2, 2});
  const ck::ArrayView plan = view(P, {1, 2, 2});
  ck::OTOutputs out{view(f, {1, 2}), view(g, {1, 2}), &plan};
  ck::SinkhornOptions o;
  o.reg = reg;
  o.tol = 1e-12;
  for (ck::SinkhornMethod method : {ck::SinkhornMethod::Log, ck::SinkhornMethod::SNS}) {
    o.method = method;
    const auto status = ck::sinkhorn({problem}, {out}, o, 0);
    const double p = 0.5 / (1 + std::exp(-1 / reg));
    expect(status[0][0].converged && std::fabs(P[0] - p) < 1e-12 && std::fabs(P[1] - (0.5 - p)) < 1e-12,
           "sinkhorn: the 2 x 2 closed form");
  }
  o.reg = -1;
  expect_error<ck::ValueError>([&] { ck::sinkhorn({problem}, {out}, o, 0); }, "argument 'reg'",
                               "sinkhorn: reg <= 0 refused");
}

// The fused steps refuse NaN or Inf by argument and tensor before writing anything.
void test_fused_step_check() {
  const int64_t small = 5, large = 40000;  // the large tensor spans several CPU tasks
  std::vector<double> p0(small, 1.0), p1(large, 1.0), g0(small, 0.5), g1(large, 0.5), h0(small, 2.0), h1(large, 2.0),
      m0(small, 0.0), m1(large, 0.0), v0(small, 0.0), v1(large, 0.0);
  g1.back() = NAN;
  ck::AdaHessianOptions o;
  o.group_sizes = {1, 1};
  const std::vector<ck::ArrayView> params{view(p0, {small}), view(p1, {large})},
      grads{view(g0, {small}), view(g1, {large})}, hess{view(h0, {small}), view(h1, {large})},
      m{view(m0, {small}), view(m1, {large})}, v{view(v0, {small}), view(v1, {large})};
  expect_error<ck::ValueError>([&] { ck::adahessian_step(params, grads, hess, m, v, o, 0); },
                               "argument 'grads' contains NaN or Inf (tensor 1 of the list)",
                               "adahessian_step: NaN in grads refused");
  expect(p0[0] == 1.0 && p1[0] == 1.0 && m0[0] == 0.0 && v1[0] == 0.0, "adahessian_step: nothing written");
  o.check_finite = false;
  ck::adahessian_step(params, grads, hess, m, v, o, 0);
  expect(p0[0] != 1.0 && std::isnan(p1.back()), "adahessian_step: check_finite = false steps on");
}

}  // namespace

// Which matrices of a batch run one per thread and which with all threads (run_matrix_tasks).
void test_task_balance() {
  auto threaded = [](std::vector<double> costs, double efficiency) {
    std::vector<int64_t> small, large;
    for (size_t i = 0; i < costs.size(); ++i) small.push_back(int64_t(i));  // sorted, largest first
    ck::balance_matrix_tasks(2, efficiency, [&](int64_t i) { return costs[size_t(i)]; }, small, large);
    return large;
  };
  // Muon's MLP: 256 x 784 (r^2 c = 51M) beside 256 x 256 and 10 x 256: all threaded
  const std::vector<int64_t> muon = threaded({51.4e6, 16.8e6, 2.6e4}, 0.85);
  expect(muon.size() >= 2 && muon[0] == 0 && muon[1] == 1, "balance: a dominant matrix and the next run threaded");
  expect(threaded({1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0}, 0.85).empty(), "balance: equal matrices one per thread");
  expect(threaded({1.0, 1.0, 1.0}, 0.5).empty(), "balance: three equal LAPACK tasks one per thread");
  // SOAP's 784^2 factor beside four 256^2: LAPACK at 50% keeps it on one thread
  expect(threaded({482e6, 16.8e6, 16.8e6, 16.8e6, 16.8e6}, 0.5).empty(),
         "balance: LAPACK efficiency keeps one per thread");
  expect(threaded({482e6, 16.8e6, 16.8e6, 16.8e6, 16.8e6}, ck::qr_tasks(5, 2).threaded_efficiency).size() == 1,
         "balance: the dominant QR threaded");
  expect(threaded({}, 0.85).empty(), "balance: no tasks");
  // A lone LAPACK task up to 384^2 runs in single-threaded BLAS, a larger one on all threads.
  const int previous = ck::num_threads();
  ck::set_num_threads(2);
  auto blas_threads_inside = [](double cost) {
    int seen = 0;
    ck::run_matrix_tasks(
        2, 1, [&](int64_t) { return cost; }, [&](int64_t, int) { seen = scipy_openblas_get_num_threads(); },
        ck::lapack_tasks(1, 2));
    return seen;
  };
  expect(blas_threads_inside(256.0 * 256 * 256) == 1 && blas_threads_inside(1024.0 * 1024 * 1024) == 2,
         "balance: a lone small LAPACK task on one thread");
  ck::set_num_threads(previous);
}

int main() {
  test_probes();
  test_polar();
  test_inverse_root();
  test_interrupt();
  test_lyapunov_stall();
  test_xtrace();
  test_mfac();
  test_sinkhorn();
  test_fused_step_check();
  test_task_balance();
  std::printf("%d failed\n", failures);
  return failures ? 1 : 0;
}
