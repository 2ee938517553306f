// Hutchinson family: argument checks and the one CPU/CUDA dispatch.
#include "hutchinson/hutchinson.h"

#include <cmath>
#include <initializer_list>
#include <utility>

#include "core/blas.h"
#include "core/check.h"
#include "hutchinson/estimators_cpu.h"
#ifdef CURVKIT_WITH_CUDA
#include "hutchinson/estimators_cuda.h"
#endif
#include "hutchinson/probe_math.h"

namespace curvkit {

ProbeLayout probe_layout(const ArrayView& out) {
  CK_CHECK_VALUE(out.ndim() >= 1, "argument 'out' must have shape (n,) or (..., n, k), got a 0-d array");
  ProbeLayout L;
  L.n = out.size(out.ndim() == 1 ? -1 : -2);
  L.k = out.ndim() == 1 ? 1 : out.size(-1);
  for (int d = 0; d < out.ndim() - 2; ++d) L.batch *= out.shape[size_t(d)];
  return L;
}

int64_t probes_workspace_size(ProbeKind kind, const ProbeLayout& L, bool cuda) {
  if (!cuda || kind != ProbeKind::Sphere) return 0;
  const int64_t chunks = (L.n + probe_math::kNormChunk - 1) / probe_math::kNormChunk;
  return L.batch * L.k * (chunks + 1);
}

void probes(const ArrayView& out, ProbeKind kind, uint64_t seed, uint64_t offset, const ArrayView* workspace,
            StreamHandle stream) {
  check_floating(out, "out");
  check_writable(out, "out");
  CK_CHECK_VALUE(out.is_contiguous(), "argument 'out' must be C-contiguous");
  const ProbeLayout L = probe_layout(out);
  const uint64_t probes_count = uint64_t(L.batch) * uint64_t(L.k);
  CK_CHECK_VALUE(probes_count == 0 || offset <= UINT64_MAX - (probes_count - 1), "argument 'offset' (", offset,
                 ") plus the number of probes (", probes_count, ") exceeds 2^64");
  const int64_t need = probes_workspace_size(kind, L, out.device.is_cuda());
  double* ws = nullptr;
  if (need > 0) {
    CK_CHECK_VALUE(workspace != nullptr, "argument 'workspace' is required for sphere probes on CUDA (", need,
                   " float64 elements)");
    CK_CHECK_TYPE(workspace->dtype == DType::float64(), "argument 'workspace' must be float64, got ",
                  workspace->dtype.name());
    check_same_device(out, "out", *workspace, "workspace");
    check_writable(*workspace, "workspace");
    CK_CHECK_VALUE(workspace->is_contiguous() && workspace->numel() >= need, "argument 'workspace' must be ",
                   "contiguous with at least ", need, " elements");
    ws = workspace->ptr<double>();
    const std::vector<ArrayView> outs{out}, workspaces{*workspace};
    check_no_overlap({{outs, "out"}, {workspaces, "workspace"}}, {});
  }
  CK_DEVICE_DISPATCH(out.device, probes_cpu(out, kind, seed, offset), probes_cuda(out, kind, seed, offset, ws, stream));
}

void probes_flat(const std::vector<ArrayView>& outs, ProbeKind kind, uint64_t seed,
                 const std::vector<uint64_t>& offsets, const ArrayView* workspace, StreamHandle stream) {
  CK_CHECK_VALUE(offsets.size() == outs.size(), "argument 'offsets' must have one entry per output (", outs.size(),
                 "), got ", offsets.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    if (i > 0) check_same_device(outs[0], "out", outs[i], "out");
    CK_CHECK_VALUE(outs[i].is_contiguous(), "argument 'out' must hold C-contiguous arrays (entry ", i, " is not)");
    ArrayView flat = outs[i];
    flat.shape = {outs[i].numel()};
    flat.strides = {1};
    probes(flat, kind, seed, offsets[i], workspace, stream);
  }
}

}  // namespace curvkit

// ---- Estimator cores: checks, then the CPU kernels (estimators_cpu.h)

namespace curvkit {
namespace {

// A C-contiguous array of `ndim` dimensions with the given sizes (-1: any), on the CPU, of
// dtype `dtype` (or any float32/float64 when dtype is floating and `compute` is set).
void check_array(const ArrayView& a, const char* name, std::initializer_list<int64_t> shape, DType dtype,
                 bool writable = false, const ArrayView* device_of = nullptr) {
  CK_CHECK_TYPE(a.dtype == dtype, "argument '", name, "' must have dtype ", dtype.name(), ", got ", a.dtype.name());
  CK_CHECK_VALUE(a.ndim() == int(shape.size()), "argument '", name, "' must have ", shape.size(),
                 " dimensions, got shape ", shape_text(a));
  int d = 0;
  for (int64_t s : shape) {
    CK_CHECK_VALUE(s < 0 || a.shape[size_t(d)] == s, "argument '", name, "' has shape ", shape_text(a), ": dimension ",
                   d, " must be ", s);
    ++d;
  }
  CK_CHECK_VALUE(a.is_contiguous(), "argument '", name, "' must be C-contiguous");
  if (writable) check_writable(a, name);
  if (device_of) {  // a kernel with a CUDA backend: one device for all its arrays
    CK_CHECK_VALUE(a.device == device_of->device, "argument '", name, "' must be on the device of the other ",
                   "arrays (", device_of->device.name(), "), got ", a.device.name());
    return;
  }
  if (a.device.is_cuda()) {
#ifdef CURVKIT_WITH_CUDA
    throw ValueError(
        cat("argument '", name, "' is a CUDA array: the estimator kernels run on CPU arrays only in this version"));
#else
    throw_not_built_with_cuda();
#endif
  }
}

void check_compute(const ArrayView& a, const char* name) {
  CK_CHECK_TYPE(a.dtype == DType::float32() || a.dtype == DType::float64(), "argument '", name,
                "' must have dtype float32 or float64, got ", a.dtype.name());
}

constexpr DType kF64 = DType::float64();
constexpr DType kI64{DTypeCode::Int, 64};

}  // namespace

void sketch_qr(const ArrayView& q, const ArrayView& r, int64_t k0, StreamHandle stream) {
  check_compute(q, "q");
  check_array(q, "q", {-1, -1}, q.dtype, true, &q);
  const int64_t n = q.size(0), k = q.size(1);
  check_array(r, "r", {k, k}, q.dtype, true, &q);
  CK_CHECK_VALUE(k <= n, "the sketch has ", k, " columns, more than the dimension n = ", n, " (use at most n probes)");
  CK_CHECK_VALUE(k0 >= 0 && k0 <= k, "argument 'k0' must be in [0, ", k, "], got ", k0);
  blas::dim(n, "the dimension n");
  CK_DEVICE_DISPATCH(q.device, sketch_qr_cpu(q, r, k0), sketch_qr_cuda(q, r, k0, stream));
}

void xtrace_estimates(const ArrayView& omega, const ArrayView& y, const ArrayView& q, const ArrayView& r,
                      const ArrayView& z, bool improved, const ArrayView& out, StreamHandle stream) {
  check_compute(q, "q");
  CK_CHECK_VALUE(q.ndim() == 2, "argument 'q' must have shape (n, k), got ", shape_text(q));
  const int64_t n = q.size(0), k = q.size(1);
  for (const auto& [a, name] : {std::pair{&omega, "omega"}, {&y, "y"}, {&q, "q"}, {&z, "z"}})
    check_array(*a, name, {n, k}, q.dtype, false, &q);
  check_array(r, "r", {k, k}, q.dtype, false, &q);
  check_array(out, "out", {k}, kF64, true, &q);
  CK_CHECK_VALUE(k >= 1 && k <= n, "XTrace needs between 1 and n probes, got ", k);
  blas::dim(n, "the dimension n");
  CK_DEVICE_DISPATCH(q.device, xtrace_estimates_cpu(omega, y, q, r, z, improved, out),
                     xtrace_estimates_cuda(omega, y, q, r, z, improved, out, stream));
}

void xdiag_estimates(const ArrayView& omega, const ArrayView& q, const ArrayView& r, const ArrayView& z,
                     const ArrayView& mean, const ArrayView& variance, StreamHandle stream) {
  check_compute(q, "q");
  CK_CHECK_VALUE(q.ndim() == 2, "argument 'q' must have shape (n, k), got ", shape_text(q));
  const int64_t n = q.size(0), k = q.size(1);
  for (const auto& [a, name] : {std::pair{&omega, "omega"}, {&q, "q"}, {&z, "z"}})
    check_array(*a, name, {n, k}, q.dtype, false, &q);
  check_array(r, "r", {k, k}, q.dtype, false, &q);
  check_array(mean, "mean", {n}, q.dtype, true, &q);
  check_array(variance, "variance", {n}, q.dtype, true, &q);
  CK_CHECK_VALUE(k >= 1 && k <= n, "XDiag needs between 1 and n probes, got ", k);
  blas::dim(n, "the dimension n");
  CK_DEVICE_DISPATCH(q.device, xdiag_estimates_cpu(omega, q, r, z, mean, variance),
                     xdiag_estimates_cuda(omega, q, r, z, mean, variance, stream));
}

bool xnystrace_estimates(const ArrayView& omega, const ArrayView& y, double relative_shift, const ArrayView& out,
                         StreamHandle stream) {
  check_compute(y, "y");
  CK_CHECK_VALUE(y.ndim() == 2, "argument 'y' must have shape (n, k), got ", shape_text(y));
  const int64_t n = y.size(0), k = y.size(1);
  check_array(omega, "omega", {n, k}, y.dtype, false, &y);
  check_array(y, "y", {n, k}, y.dtype, true, &y);
  check_array(out, "out", {k}, kF64, true, &y);
  CK_CHECK_VALUE(k >= 1 && k <= n, "XNysTrace needs between 1 and n probes, got ", k);
  CK_CHECK_VALUE(relative_shift >= 0 && std::isfinite(relative_shift), "argument 'relative_shift' must be >= 0");
  blas::dim(n, "the dimension n");
  bool ok = false;
  CK_DEVICE_DISPATCH(y.device, ok = xnystrace_estimates_cpu(omega, y, relative_shift, out),
                     ok = xnystrace_estimates_cuda(omega, y, relative_shift, out, stream));
  return ok;
}

void column_dots(const ArrayView& x, const ArrayView& y, const ArrayView& out, StreamHandle stream) {
  check_compute(x, "x");
  check_array(x, "x", {-1, -1}, x.dtype, false, &x);
  check_array(y, "y", {x.size(0), x.size(1)}, x.dtype, false, &x);
  check_array(out, "out", {x.size(1)}, kF64, true, &x);
  CK_DEVICE_DISPATCH(x.device, column_dots_cpu(x, y, out), column_dots_cuda(x, y, out, stream));
}

void row_dots(const ArrayView& x, const ArrayView& y, const ArrayView& out, StreamHandle stream) {
  check_compute(x, "x");
  check_array(x, "x", {-1, -1}, x.dtype, false, &x);
  check_array(y, "y", {x.size(0), x.size(1)}, x.dtype, false, &x);
  check_array(out, "out", {x.size(0)}, x.dtype, true, &x);
  CK_DEVICE_DISPATCH(x.device, row_dots_cpu(x, y, out), row_dots_cuda(x, y, out, stream));
}

void project_out(const ArrayView& q, const ArrayView& x, StreamHandle stream) {
  check_compute(q, "q");
  check_array(q, "q", {-1, -1}, q.dtype, false, &q);
  check_array(x, "x", {q.size(0), -1}, q.dtype, true, &q);
  blas::dim(q.size(0), "the dimension n");
  CK_DEVICE_DISPATCH(q.device, project_out_cpu(q, x), project_out_cuda(q, x, stream));
}

void accumulate_products(const ArrayView& x, const ArrayView& y, int64_t count, const ArrayView& mean,
                         const ArrayView& m2, StreamHandle stream) {
  check_compute(x, "x");
  check_array(x, "x", {-1, -1}, x.dtype, false, &x);
  check_array(y, "y", {x.size(0), x.size(1)}, x.dtype, false, &x);
  check_array(mean, "mean", {x.size(0)}, x.dtype, true, &x);
  check_array(m2, "m2", {x.size(0)}, x.dtype, true, &x);
  CK_CHECK_VALUE(count >= 0, "argument 'count' must be >= 0");
  if (x.size(1) == 0) return;
  CK_DEVICE_DISPATCH(x.device, accumulate_products_cpu(x, y, count, mean, m2),
                     accumulate_products_cuda(x, y, count, mean, m2, stream));
}

void lanczos_step(const ArrayView& basis, const ArrayView& w, const ArrayView& alpha, const ArrayView& beta,
                  const ArrayView& lengths, int64_t j, bool reorthogonalize, bool restart, StreamHandle stream) {
  check_compute(basis, "basis");
  check_array(basis, "basis", {-1, -1, -1}, basis.dtype, true, &basis);
  const int64_t p = basis.size(0), m = basis.size(1) - 1, n = basis.size(2);
  CK_CHECK_VALUE(m >= 1, "argument 'basis' must hold at least two vectors per probe");
  check_array(w, "w", {n, p}, basis.dtype, true, &basis);
  check_array(alpha, "alpha", {p, m}, kF64, true, &basis);
  check_array(beta, "beta", {p, m}, kF64, true, &basis);
  check_array(lengths, "lengths", {p}, kI64, true, &basis);
  CK_CHECK_VALUE(j >= 0 && j < m, "argument 'j' must be in [0, ", m - 1, "], got ", j);
  CK_CHECK_VALUE(!basis.device.is_cuda() || p <= 65535, "at most 65535 probes run Lanczos together on CUDA, got ", p);
  blas::dim(n, "the dimension n");
  CK_DEVICE_DISPATCH(basis.device, lanczos_step_cpu(basis, w, alpha, beta, lengths, j, reorthogonalize, restart),
                     lanczos_step_cuda(basis, w, alpha, beta, lengths, j, reorthogonalize, restart, stream));
}

void tridiagonal_eigh(const ArrayView& alpha, const ArrayView& beta, const ArrayView& lengths, int64_t steps,
                      const ArrayView& nodes, const ArrayView& vectors, StreamHandle stream) {
  check_array(alpha, "alpha", {-1, -1}, kF64, false, &alpha);
  const int64_t p = alpha.size(0), m = alpha.size(1);
  check_array(beta, "beta", {p, m}, kF64, false, &alpha);
  check_array(lengths, "lengths", {p}, kI64, false, &alpha);
  CK_CHECK_VALUE(steps >= 1 && steps <= m, "argument 'steps' must be in [1, ", m, "], got ", steps);
  check_array(nodes, "nodes", {p, steps}, kF64, true);
  check_array(vectors, "vectors", {p, steps, steps}, kF64, true);
  CK_DEVICE_DISPATCH(alpha.device, tridiagonal_eigh_cpu(alpha, beta, lengths, steps, nodes, vectors),
                     tridiagonal_eigh_cuda(alpha, beta, lengths, steps, nodes, vectors, stream));
}

void basis_combination(const ArrayView& basis, const ArrayView& coefficients, int64_t steps, const ArrayView& out,
                       StreamHandle stream) {
  check_compute(basis, "basis");
  check_array(basis, "basis", {-1, -1, -1}, basis.dtype, false, &basis);
  const int64_t p = basis.size(0), n = basis.size(2);
  check_array(coefficients, "coefficients", {p, -1, -1}, kF64, false, &basis);
  CK_CHECK_VALUE(steps >= 0 && steps <= coefficients.size(1) && steps <= basis.size(1), "argument 'steps' (", steps,
                 ") exceeds the basis");
  check_array(out, "out", {p, n, coefficients.size(2)}, basis.dtype, true, &basis);
  blas::dim(n, "the dimension n");
  CK_DEVICE_DISPATCH(basis.device, basis_combination_cpu(basis, coefficients, steps, out),
                     basis_combination_cuda(basis, coefficients, steps, out, stream));
}

double power_step(const ArrayView& v, const ArrayView& w, const ArrayView* found, double& norm, StreamHandle stream) {
  check_compute(v, "v");
  check_array(v, "v", {-1, 1}, v.dtype, true, &v);
  check_array(w, "w", {v.size(0), 1}, v.dtype, true, &v);
  if (found) check_array(*found, "found", {v.size(0), -1}, v.dtype, false, &v);
  blas::dim(v.size(0), "the dimension n");
  double rayleigh = 0;
  CK_DEVICE_DISPATCH(v.device, rayleigh = power_step_cpu(v, w, found, norm),
                     rayleigh = power_step_cuda(v, w, found, norm, stream));
  return rayleigh;
}

// ---- Fused optimizer steps

namespace {

void check_step_lists(const std::vector<std::pair<const std::vector<ArrayView>*, const char*>>& lists, size_t outputs) {
  const std::vector<ArrayView>& params = *lists[0].first;
  for (const auto& [list, name] : lists) check_list_sizes(params.size(), "params", list->size(), name);
  for (size_t i = 0; i < params.size(); ++i) {
    for (size_t l = 0; l < lists.size(); ++l) {
      const ArrayView& a = (*lists[l].first)[i];
      const char* name = lists[l].second;
      check_floating(a, name);
      CK_CHECK_TYPE(a.dtype == params[i].dtype, "argument '", name, "' (entry ", i, ") must have the dtype of ",
                    "'params' (", params[i].dtype.name(), "), got ", a.dtype.name());
      check_same_shape(params[i], "params", a, name);
      check_same_device(params[0], "params", a, name);
      CK_CHECK_VALUE(a.is_contiguous(), "argument '", name, "' (entry ", i, ") must be C-contiguous");
      if (l < outputs) check_writable(a, name);
    }
  }
}

// ValueError naming the first argument and tensor that holds NaN or Inf; nothing is written yet.
void check_finite_lists(const std::vector<std::pair<const std::vector<ArrayView>*, const char*>>& lists,
                        StreamHandle stream) {
  std::vector<const std::vector<ArrayView>*> views;
  for (const auto& entry : lists) views.push_back(entry.first);
  NonFiniteEntry bad;
  const Device& device = (*views[0])[0].device;
  CK_DEVICE_DISPATCH(device, bad = first_nonfinite_cpu(views), bad = first_nonfinite_cuda(views, stream));
  (void)stream;
  CK_CHECK_VALUE(bad.list < 0, "argument '", lists[size_t(bad.list < 0 ? 0 : bad.list)].second,
                 "' contains NaN or Inf (tensor ", bad.tensor, " of the list); nothing was updated");
}

}  // namespace

void adahessian_step(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                     const std::vector<ArrayView>& hessian, const std::vector<ArrayView>& exp_avg,
                     const std::vector<ArrayView>& exp_avg_sq, const AdaHessianOptions& o, StreamHandle stream) {
  check_step_lists({{&params, "params"},
                    {&exp_avg, "exp_avg"},
                    {&exp_avg_sq, "exp_avg_sq"},
                    {&grads, "grads"},
                    {&hessian, "hessian_diag_samples"}},
                   3);
  CK_CHECK_VALUE(o.group_sizes.size() == params.size(), "one group size per tensor is needed, got ",
                 o.group_sizes.size(), " for ", params.size());
  for (int64_t g : o.group_sizes) CK_CHECK_VALUE(g >= 1, "argument 'block_size' must be >= 1, got ", g);
  CK_CHECK_VALUE(o.step >= 1, "argument 'step' must be >= 1, got ", o.step);
  CK_CHECK_VALUE(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, "argument 'betas' must lie in [0, 1)");
  CK_CHECK_VALUE(
      std::isfinite(o.lr) && std::isfinite(o.eps) && std::isfinite(o.weight_decay) && std::isfinite(o.hessian_power),
      "arguments 'lr', 'eps', 'weight_decay' and 'hessian_power' must be finite");
  check_no_overlap({{params, "params"}, {exp_avg, "exp_avg"}, {exp_avg_sq, "exp_avg_sq"}},
                   {{grads, "grads"}, {hessian, "hessian_diag_samples"}});
  if (params.empty()) return;
  if (o.check_finite)
    check_finite_lists({{&params, "params"}, {&grads, "grads"}, {&hessian, "hessian_diag_samples"}}, stream);
  CK_DEVICE_DISPATCH(params[0].device, adahessian_step_cpu(params, grads, hessian, exp_avg, exp_avg_sq, o),
                     adahessian_step_cuda(params, grads, hessian, exp_avg, exp_avg_sq, o, stream));
}

int64_t sophia_step(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                    const std::vector<ArrayView>& exp_avg, const std::vector<ArrayView>& hessian,
                    const std::vector<ArrayView>& estimates, const SophiaOptions& o, StreamHandle stream) {
  if (estimates.empty())
    check_step_lists({{&params, "params"}, {&exp_avg, "exp_avg"}, {&hessian, "hessian"}, {&grads, "grads"}}, 3);
  else
    check_step_lists({{&params, "params"},
                      {&exp_avg, "exp_avg"},
                      {&hessian, "hessian"},
                      {&grads, "grads"},
                      {&estimates, "hessian_estimate"}},
                     3);
  CK_CHECK_VALUE(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, "argument 'betas' must lie in [0, 1)");
  CK_CHECK_VALUE(std::isfinite(o.lr) && std::isfinite(o.rho) && std::isfinite(o.weight_decay) &&
                     std::isfinite(o.batch_size) && std::isfinite(o.eps),
                 "arguments 'lr', 'rho', 'weight_decay', 'batch_size' and 'eps' must be finite");
  check_no_overlap({{params, "params"}, {exp_avg, "exp_avg"}, {hessian, "hessian"}},
                   {{grads, "grads"}, {estimates, "hessian_estimate"}});
  if (params.empty()) return 0;
  if (o.check_finite) {
    if (estimates.empty())
      check_finite_lists({{&params, "params"}, {&grads, "grads"}}, stream);
    else
      check_finite_lists({{&params, "params"}, {&grads, "grads"}, {&estimates, "hessian_estimate"}}, stream);
  }
  int64_t wins = 0;
  CK_DEVICE_DISPATCH(params[0].device, wins = sophia_step_cpu(params, grads, exp_avg, hessian, estimates, o),
                     wins = sophia_step_cuda(params, grads, exp_avg, hessian, estimates, o, stream));
  return wins;
}

}  // namespace curvkit
