// Inverse roots and eigenbases: argument checks, "auto" and default tolerances resolved, and
// the one CPU/CUDA dispatch.
#include "inverse_root/inverse_root.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "core/numerics.h"
#include "newton_schulz/newton_schulz.h"

namespace curvkit {

namespace {

// Newton's default tolerance on ||X^p (A + eps I) - I||_max, by compute dtype.
constexpr double kRootTolFloat64 = 1e-8, kRootTolFloat32 = 1e-3;

// Every array on the first one's device.
void check_one_device(const std::vector<ArrayView>& arrays, const char* name) {
  for (const ArrayView& a : arrays) check_same_device(arrays[0], name, a, name);
}

// An optional per-input array (init, basis): shaped like its input, on its device.
void check_companion(const ArrayView& a, const ArrayView* x, const char* name, bool written) {
  if (!x) return;
  check_square_batch(*x, name);
  check_same_shape(a, "A", *x, name);
  check_same_device(a, "A", *x, name);
  if (written) check_writable(*x, name);
}

// A (..., m, k) stack of columns to orthonormalize, m >= k.
void check_basis(const ArrayView& q, const char* name) {
  check_floating(q, name);
  CK_CHECK_VALUE(q.ndim() >= 2, "argument '", name, "' must have shape (..., m, k), got ", shape_text(q));
  CK_CHECK_VALUE(q.is_contiguous(), "argument '", name, "' must be C-contiguous");
  CK_CHECK_VALUE(q.size(-1) <= q.size(-2), "argument '", name, "' must have at least as many rows as columns, got ",
                 q.size(-2), " x ", q.size(-1));
}

// Statuses of one input, every matrix "converged" until its backend says otherwise (so 0 x 0
// matrices, which no backend visits, are trivially solved).
template <class Status>
std::vector<Status> solved(const ArrayView& a) {
  Status s;
  s.converged = true;
  return std::vector<Status>(size_t(leading_count(a)), s);
}

}  // namespace

void matrix_inverse_root(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                         const std::vector<const ArrayView*>& inits, const std::vector<const ArrayView*>& bases,
                         const RootOptions& options, std::vector<std::vector<RootStatus>>& status,
                         StreamHandle stream) {
  RootOptions o = options;
  CK_CHECK_VALUE(o.p >= 1, "argument 'p' must be a positive integer, got ", o.p);
  CK_CHECK_VALUE(o.eps >= 0 && std::isfinite(o.eps), "argument 'eps' must be finite and >= 0, got ", o.eps);
  CK_CHECK_VALUE(o.max_iters >= 1, "argument 'max_iters' must be >= 1, got ", o.max_iters);
  CK_CHECK_VALUE(!o.tol || *o.tol > 0, "argument 'tol' must be > 0, got ", o.tol.value_or(0));
  check_list_sizes(inputs.size(), "A", outputs.size(), "out");
  check_list_sizes(inputs.size(), "A", inits.size(), "init");
  check_list_sizes(inputs.size(), "A", bases.size(), "basis");
  const bool any_basis = std::any_of(bases.begin(), bases.end(), [](const ArrayView* b) { return b != nullptr; });
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_square_batch(inputs[i], "A");
    check_output_like(inputs[i], "A", outputs[i], "out");
    check_companion(inputs[i], inits[i], "init", false);
    check_companion(inputs[i], bases[i], "basis", true);
  }
  check_no_overlap({{outputs, "out"}, {present(bases), "basis"}}, {{inputs, "A"}, {present(inits), "init"}});
  check_one_device(inputs, "A");
  status.clear();
  if (inputs.empty()) return;
  const bool cuda = inputs[0].device.is_cuda();
  if (o.method == RootMethod::Auto) o.method = cuda && !any_basis ? RootMethod::Newton : RootMethod::Eigh;
  CK_CHECK_VALUE(o.method == RootMethod::Eigh || !any_basis,
                 "argument 'basis' warm-starts method 'eigh'; method 'newton' takes 'init'");
  if (!o.tol) {  // the loosest default among the inputs' compute dtypes
    o.tol = kRootTolFloat64;
    for (const ArrayView& a : inputs)
      if (a.dtype != DType::float64()) o.tol = kRootTolFloat32;
  }
  CK_DEVICE_DISPATCH(inputs[0].device, matrix_inverse_root_cpu(inputs, outputs, inits, bases, o, status),
                     matrix_inverse_root_cuda(inputs, outputs, inits, bases, o, status, stream));
}

void eigh(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& values,
          const std::vector<ArrayView>& vectors, const std::vector<const ArrayView*>& bases,
          std::vector<std::vector<EighStatus>>& status, StreamHandle stream) {
  check_list_sizes(inputs.size(), "A", values.size(), "out");
  check_list_sizes(inputs.size(), "A", vectors.size(), "out");
  check_list_sizes(inputs.size(), "A", bases.size(), "basis");
  for (size_t i = 0; i < inputs.size(); ++i) {
    const ArrayView& a = inputs[i];
    check_square_batch(a, "A");
    check_output_like(a, "A", vectors[i], "out");
    check_floating(values[i], "out");
    check_writable(values[i], "out");
    check_same_device(a, "A", values[i], "out");
    CK_CHECK_VALUE(values[i].is_contiguous() && values[i].ndim() == a.ndim() - 1 &&
                       std::equal(values[i].shape.begin(), values[i].shape.end(), a.shape.begin()),
                   "argument 'out': the eigenvalues must be a C-contiguous array of shape (..., n) for A ",
                   shape_text(a), ", got ", shape_text(values[i]));
    check_companion(a, bases[i], "basis", false);
  }
  check_no_overlap({{values, "out"}, {vectors, "out"}}, {{inputs, "A"}, {present(bases), "basis"}});
  check_one_device(inputs, "A");
  status.clear();
  for (const ArrayView& a : inputs) status.push_back(solved<EighStatus>(a));
  if (inputs.empty()) return;
  std::vector<std::vector<bool>> ok;
  std::vector<std::vector<int>> steps;
  CK_DEVICE_DISPATCH(inputs[0].device, eigh_cpu(inputs, values, vectors, bases, ok, steps),
                     eigh_cuda(inputs, values, vectors, bases, ok, steps, stream));
  for (size_t i = 0; i < inputs.size(); ++i)
    for (size_t b = 0; b < ok[i].size() && b < status[i].size(); ++b) status[i][b] = {ok[i][b], steps[i][b]};
}

void orthonormalize_qr(const std::vector<ArrayView>& q, std::vector<std::vector<BasisStatus>>& status,
                       StreamHandle stream) {
  for (const ArrayView& x : q) {
    check_basis(x, "Q");
    check_writable(x, "Q");
  }
  check_no_overlap({{q, "Q"}}, {});
  if (!q.empty()) check_one_device(q, "Q");
  status.clear();
  for (const ArrayView& x : q) {
    status.push_back(solved<BasisStatus>(x));
    if (x.numel() == 0) continue;
    std::vector<bool> ok;
    CK_DEVICE_DISPATCH(x.device, orthonormalize_qr_cpu(x, ok), orthonormalize_qr_cuda(x, ok, stream));
    for (size_t b = 0; b < ok.size() && b < status.back().size(); ++b) status.back()[b].converged = ok[b];
  }
}

void orthonormalize_polar(const std::vector<ArrayView>& q, const std::vector<ArrayView>& out, int steps,
                          std::vector<std::vector<BasisStatus>>& status, StreamHandle stream) {
  CK_CHECK_VALUE(steps >= 1, "argument 'steps' must be >= 1, got ", steps);
  check_list_sizes(q.size(), "Q", out.size(), "out");
  for (size_t i = 0; i < q.size(); ++i) {
    check_basis(q[i], "Q");
    check_output_like(q[i], "Q", out[i], "out");
  }
  if (!q.empty()) check_one_device(q, "Q");
  PolarOptions o;
  o.steps.assign(size_t(steps), PolarStep{1.5, -0.5, 0.0});
  o.normalize = false;
  o.method = PolarMethod::Standard;
  o.in_name = "Q";
  polar(q, out, o, stream);
  status.clear();
  for (const ArrayView& x : out) {
    status.push_back(solved<BasisStatus>(x));
    if (x.numel() == 0) continue;
    std::vector<double> error;
    CK_DEVICE_DISPATCH(x.device, orthogonality_cpu(x, error), orthogonality_cuda(x, error, stream));
    // Rounding an orthonormal Q to out's dtype moves Q^T Q by at most about 2u (u its unit
    // roundoff): sqrt(u) is clear of that, and far below what a lost direction leaves (1).
    const double tol = std::sqrt(unit_roundoff(x.dtype));
    for (size_t b = 0; b < error.size() && b < status.back().size(); ++b) {
      status.back()[b].converged = error[b] <= tol;
      status.back()[b].orthogonality = error[b];
    }
  }
}

void eigenbasis_update(const std::vector<ArrayView>& a, const std::vector<ArrayView>& q,
                       const std::vector<ArrayView>& q_out, const std::vector<ArrayView>& estimates,
                       const std::vector<ArrayView>& perm, std::vector<std::vector<BasisStatus>>& status,
                       StreamHandle stream) {
  check_list_sizes(a.size(), "A", q.size(), "Q");
  check_list_sizes(a.size(), "A", q_out.size(), "out");
  check_list_sizes(a.size(), "A", estimates.size(), "out");
  check_list_sizes(a.size(), "A", perm.size(), "out");
  for (size_t i = 0; i < a.size(); ++i) {
    check_square_batch(a[i], "A");
    check_basis(q[i], "Q");
    check_same_device(a[i], "A", q[i], "Q");
    CK_CHECK_VALUE(
        q[i].ndim() == a[i].ndim() && std::equal(a[i].shape.begin(), a[i].shape.end() - 1, q[i].shape.begin()),
        "argument 'Q' must have shape (..., n, k) matching A ", shape_text(a[i]), ", got ", shape_text(q[i]));
    check_output_like(q[i], "Q", q_out[i], "out");
    std::vector<int64_t> columns(q[i].shape.begin(), q[i].shape.end() - 2);
    columns.push_back(q[i].size(-1));
    check_floating(estimates[i], "out");
    check_writable(estimates[i], "out");
    check_same_device(a[i], "A", estimates[i], "out");
    CK_CHECK_VALUE(estimates[i].shape == columns && estimates[i].is_contiguous(),
                   "argument 'out': the estimates must be C-contiguous of shape (..., k)");
    CK_CHECK_VALUE(perm[i].dtype == (DType{DTypeCode::Int, 64}) && !perm[i].device.is_cuda() &&
                       perm[i].shape == columns && perm[i].is_contiguous() && perm[i].writable,
                   "argument 'out': the permutation must be a writable C-contiguous int64 host array of shape "
                   "(..., k)");
  }
  check_no_overlap({{q_out, "out"}, {estimates, "out"}, {perm, "out"}}, {{a, "A"}, {q, "Q"}});
  check_one_device(a, "A");
  status.clear();
  for (const ArrayView& x : q) status.push_back(solved<BasisStatus>(x));
  if (a.empty()) return;
  std::vector<std::vector<bool>> ok, full_rank;
  CK_DEVICE_DISPATCH(a[0].device, eigenbasis_update_cpu(a, q, q_out, estimates, perm, ok, full_rank),
                     eigenbasis_update_cuda(a, q, q_out, estimates, perm, ok, full_rank, stream));
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t b = 0; b < ok[i].size() && b < status[i].size(); ++b) {
      status[i][b].converged = ok[i][b];
      status[i][b].full_rank = full_rank[i][b];
    }
}

}  // namespace curvkit
