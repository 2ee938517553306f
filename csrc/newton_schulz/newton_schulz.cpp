// Newton–Schulz family: argument checks, "auto" resolved, and the one CPU/CUDA dispatch.
#include "newton_schulz/newton_schulz.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>
#include <utility>

#include "core/check.h"

namespace curvkit {

namespace {

// Auto picks the Gram route on the CPU when the long side is at least this times the short one.
constexpr int64_t kGramMinAspect = 2;
// The Gram route restarts (X = Q X_0, A = X X^T, Q = I) after every this many steps, which keeps
// float32 within 6e-5 of the float64 iteration.
constexpr int kGramRestart = 2;

PolarMethod polar_route(const ArrayView& g, PolarMethod requested) {
  if (requested != PolarMethod::Auto) return requested;
  const int64_t m = g.size(-2), n = g.size(-1);
  const bool gram_pays = !g.device.is_cuda() && std::max(m, n) >= kGramMinAspect * std::max<int64_t>(std::min(m, n), 1);
  return gram_pays ? PolarMethod::Gram : PolarMethod::Standard;
}

// One status per matrix, 0 x 0 matrices trivially solved.
template <class Status>
std::vector<Status> initial_status(const ArrayView& a, SqrtMethod method) {
  Status st;
  st.converged = a.size(-1) == 0;
  st.method = method;
  return std::vector<Status>(size_t(leading_count(a)), st);
}

}  // namespace

void polar(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs, const PolarOptions& o,
           StreamHandle stream) {
  const char *in_name = o.in_name, *out_name = o.out_name;
  check_list_sizes(inputs.size(), in_name, outputs.size(), out_name);
  for (const PolarStep& s : o.steps)
    CK_CHECK_VALUE(std::isfinite(s.a) && std::isfinite(s.b) && std::isfinite(s.c),
                   "argument 'coefficients' must be finite");
  CK_CHECK_VALUE(std::isfinite(o.alpha) && std::isfinite(o.beta), "the update factors must be finite");
  CK_CHECK_VALUE(o.alphas.size() == o.betas.size() && (o.alphas.empty() || o.alphas.size() == inputs.size()),
                 "the per-input update factors must have one entry per input (", inputs.size(), "), got ",
                 o.alphas.size(), " and ", o.betas.size());
  for (size_t i = 0; i < o.alphas.size(); ++i)
    CK_CHECK_VALUE(std::isfinite(o.alphas[i]) && std::isfinite(o.betas[i]), "the update factors must be finite");
  CK_CHECK_VALUE(o.norm_scale > 0 && o.norm_eps >= 0 && std::isfinite(o.norm_scale + o.norm_eps),
                 "argument 'norm_eps' must be >= 0 and finite");
  for (size_t i = 0; i < inputs.size(); ++i) {
    const ArrayView &g = inputs[i], &out = outputs[i];
    check_floating(g, in_name);
    CK_CHECK_VALUE(g.ndim() >= 2, "argument '", in_name, "' must have shape (..., m, n), got ", shape_text(g));
    CK_CHECK_VALUE(g.is_contiguous(), "argument '", in_name, "' must be C-contiguous");
    check_same_device(inputs[0], in_name, g, in_name);
    check_output_like(g, in_name, out, out_name);
  }
  check_no_overlap({{outputs, out_name}}, {{inputs, in_name}});
  // One backend call per route and pair of update factors: the backends take one method and
  // one (alpha, beta) for all their matrices.
  std::map<std::tuple<PolarMethod, double, double>, std::pair<std::vector<ArrayView>, std::vector<ArrayView>>> calls;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const double alpha = o.alphas.empty() ? o.alpha : o.alphas[i], beta = o.betas.empty() ? o.beta : o.betas[i];
    auto& [in, out] = calls[{polar_route(inputs[i], o.method), alpha, beta}];
    in.push_back(inputs[i]);
    out.push_back(outputs[i]);
  }
  for (const auto& [key, call] : calls) {
    PolarOptions routed = o;
    std::tie(routed.method, routed.alpha, routed.beta) = key;
    routed.alphas.clear();
    routed.betas.clear();
    routed.restart_after = routed.method == PolarMethod::Gram ? kGramRestart : 0;
    const auto& [in, out] = call;
    CK_DEVICE_DISPATCH(in[0].device, polar_cpu(in, out, routed), polar_cuda(in, out, routed, stream));
  }
}

void matrix_sqrt(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& sqrt_out,
                 const std::vector<ArrayView>& inv_out, const SqrtOptions& o,
                 std::vector<std::vector<SqrtStatus>>& status, StreamHandle stream) {
  if (!sqrt_out.empty()) check_list_sizes(inputs.size(), "A", sqrt_out.size(), "out");
  if (!inv_out.empty()) check_list_sizes(inputs.size(), "A", inv_out.size(), "out");
  CK_CHECK_VALUE(!sqrt_out.empty() || !inv_out.empty() || inputs.empty(), "no output asked for");
  CK_CHECK_VALUE(o.max_iters >= 1, "argument 'max_iters' must be >= 1, got ", o.max_iters);
  CK_CHECK_VALUE(o.tol > 0, "argument 'tol' must be > 0, got ", o.tol);
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_square_batch(inputs[i], "A");
    check_same_device(inputs[0], "A", inputs[i], "A");
    if (!sqrt_out.empty()) check_output_like(inputs[i], "A", sqrt_out[i], "out");
    if (!inv_out.empty()) check_output_like(inputs[i], "A", inv_out[i], "out");
  }
  check_no_overlap({{sqrt_out, "out"}, {inv_out, "out"}}, {{inputs, "A"}});
  status.clear();
  for (size_t i = 0; i < inputs.size(); ++i) {
    const ArrayView& a = inputs[i];
    SqrtOptions resolved = o;
    if (o.method == SqrtMethod::Auto)
      resolved.method = a.device.is_cuda() ? SqrtMethod::NewtonSchulz : SqrtMethod::Eigh;
    status.push_back(initial_status<SqrtStatus>(a, resolved.method));
    if (a.numel() == 0) continue;
    const ArrayView* s = sqrt_out.empty() ? nullptr : &sqrt_out[i];
    const ArrayView* r = inv_out.empty() ? nullptr : &inv_out[i];
    SqrtStatus* st = status.back().data();
    CK_DEVICE_DISPATCH(a.device, matrix_sqrt_cpu(a, s, r, resolved, st),
                       matrix_sqrt_cuda(a, s, r, resolved, st, stream));
  }
}

void solve_lyapunov(const std::vector<ArrayView>& s, const std::vector<ArrayView>& c, const std::vector<ArrayView>& x,
                    const LyapunovOptions& o, std::vector<std::vector<SqrtStatus>>& status, StreamHandle stream) {
  check_list_sizes(s.size(), "S", c.size(), "C");
  check_list_sizes(s.size(), "S", x.size(), "out");
  CK_CHECK_VALUE(o.max_iters >= 1, "argument 'max_iters' must be >= 1, got ", o.max_iters);
  for (size_t i = 0; i < s.size(); ++i) {
    check_square_batch(s[i], "S");
    check_same_device(s[0], "S", s[i], "S");
    check_floating(c[i], "C");
    check_same_shape(s[i], "S", c[i], "C");
    check_same_device(s[i], "S", c[i], "C");
    CK_CHECK_VALUE(c[i].is_contiguous(), "argument 'C' must be C-contiguous");
    check_output_like(s[i], "S", x[i], "out");
  }
  check_no_overlap({{x, "out"}}, {{s, "S"}, {c, "C"}});
  status.clear();
  for (size_t i = 0; i < s.size(); ++i) {
    status.push_back(initial_status<SqrtStatus>(s[i], SqrtMethod::NewtonSchulz));
    if (s[i].numel() == 0) continue;
    std::vector<SqrtStatus>& st = status.back();
    CK_DEVICE_DISPATCH(s[i].device, solve_lyapunov_cpu(s[i], c[i], x[i], o.max_iters, st),
                       solve_lyapunov_cuda(s[i], c[i], x[i], o.max_iters, st, stream));
    for (SqrtStatus& y : st) y.method = SqrtMethod::NewtonSchulz;
  }
}

}  // namespace curvkit
