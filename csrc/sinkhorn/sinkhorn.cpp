// Sinkhorn family: argument checks and the one CPU/CUDA dispatch.
#include "sinkhorn/sinkhorn.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "core/check.h"

namespace curvkit {

namespace {

void check_array(const ArrayView& v, const char* name, int ndim, const char* shape, const ArrayView& like) {
  CK_CHECK_TYPE(v.dtype == like.dtype, "argument '", name, "' must have the dtype of 'a' (", like.dtype.name(),
                "), got ", v.dtype.name());
  CK_CHECK_VALUE(v.ndim() == ndim, "argument '", name, "' must have shape ", shape, ", got ", shape_text(v));
  CK_CHECK_VALUE(v.is_contiguous(), "argument '", name, "' must be C-contiguous");
  check_same_device(like, "a", v, name);
}

void check_batch(const OTProblems& p, const OTOutputs& o) {
  check_floating(p.a, "a");
  CK_CHECK_VALUE(p.a.ndim() == 2, "argument 'a' must have shape (B, n), got ", shape_text(p.a));
  CK_CHECK_VALUE(p.a.is_contiguous(), "argument 'a' must be C-contiguous");
  check_array(p.b, "b", 2, "(B, m)", p.a);
  const int64_t B = p.a.size(0), n = p.a.size(1), m = p.b.size(1);
  CK_CHECK_VALUE(p.b.size(0) == B, "arguments 'a' and 'b' must hold the same number of problems, got ", B, " and ",
                 p.b.size(0));
  CK_CHECK_VALUE(n >= 1, "argument 'a' must have n >= 1 entries per problem, got shape ", shape_text(p.a));
  CK_CHECK_VALUE(m >= 1, "argument 'b' must have m >= 1 entries per problem, got shape ", shape_text(p.b));
  CK_CHECK_VALUE(n <= INT32_MAX && m <= INT32_MAX, "n (", n, ") and m (", m, ") must be below 2^31");
  if (p.cost == GroundCost::Matrix) {
    check_array(p.C, "C", 3, "(B, n, m)", p.a);
    CK_CHECK_VALUE(p.C.size(0) == B && p.C.size(1) == n && p.C.size(2) == m, "argument 'C' must have shape (", B, ", ",
                   n, ", ", m, ") for 'a' ", shape_text(p.a), " and 'b' ", shape_text(p.b), ", got ", shape_text(p.C));
  } else {
    check_array(p.x, "x", 3, "(B, n, d)", p.a);
    check_array(p.y, "y", 3, "(B, m, d)", p.a);
    CK_CHECK_VALUE(p.x.size(0) == B && p.x.size(1) == n, "argument 'x' must have shape (", B, ", ", n, ", d) for 'a' ",
                   shape_text(p.a), ", got ", shape_text(p.x));
    CK_CHECK_VALUE(p.y.size(0) == B && p.y.size(1) == m && p.y.size(2) == p.x.size(2), "argument 'y' must have shape (",
                   B, ", ", m, ", ", p.x.size(2), ") for 'b' ", shape_text(p.b), " and 'x' ", shape_text(p.x), ", got ",
                   shape_text(p.y));
    CK_CHECK_VALUE(p.x.size(2) >= 1, "the points need d >= 1 coordinates, got ", shape_text(p.x));
    CK_CHECK_VALUE(p.cost != GroundCost::PNorm || (std::isfinite(p.p) && p.p > 0),
                   "argument 'p' must be a finite number > 0, got ", p.p);
  }
  for (const auto& [v, name, shape] :
       {std::tuple<const ArrayView*, const char*, const char*>{&o.f, "f", "(B, n)"}, {&o.g, "g", "(B, m)"}}) {
    check_array(*v, name, 2, shape, p.a);
    check_writable(*v, name);
  }
  check_same_shape(p.a, "a", o.f, "f");
  check_same_shape(p.b, "b", o.g, "g");
  std::vector<ArrayView> outs{o.f, o.g}, ins{p.a, p.b};
  if (o.plan) {
    check_array(*o.plan, "plan", 3, "(B, n, m)", p.a);
    check_writable(*o.plan, "plan");
    CK_CHECK_VALUE(o.plan->size(0) == B && o.plan->size(1) == n && o.plan->size(2) == m,
                   "argument 'plan' must have shape (", B, ", ", n, ", ", m, "), got ", shape_text(*o.plan));
    outs.push_back(*o.plan);
  }
  for (const ArrayView* v : {&p.C, &p.x, &p.y})
    if (v->data) ins.push_back(*v);
  check_no_overlap({{outs, "the outputs"}}, {{ins, "the problem's arrays"}});
}

// A normal float64 reg keeps the solver's power-of-two rescaling (to eps in [1, 2)) finite.
void check_reg(double reg) {
  CK_CHECK_VALUE(std::isfinite(reg) && reg >= DBL_MIN,
                 "argument 'reg' must be a finite number >= 2.2e-308 (a normal float64), got ", reg);
}

void check_options(const SinkhornOptions& o) {
  check_reg(o.reg);
  CK_CHECK_VALUE(std::isfinite(o.tol) && o.tol > 0, "argument 'tol' must be a finite number > 0, got ", o.tol);
  CK_CHECK_VALUE(o.max_iters >= 0, "argument 'max_iter' must be >= 0, got ", o.max_iters);
  CK_CHECK_VALUE(o.max_newton >= 0, "argument 'max_newton' must be >= 0, got ", o.max_newton);
  CK_CHECK_VALUE(o.density >= 0 && o.density <= 1, "argument 'density' must be in [0, 1] (0: automatic), got ",
                 o.density);
}

}  // namespace

double sns_default_density(int64_t n, int64_t m) {
  // About ten entries a row: RegOT's GPU default, min(10 / min(n, m), 1).
  return std::min(1.0, 10.0 / double(std::max<int64_t>(1, std::min(n, m))));
}

std::vector<std::vector<SinkhornStatus>> sinkhorn(const std::vector<OTProblems>& problems,
                                                  const std::vector<OTOutputs>& outputs, const SinkhornOptions& o,
                                                  StreamHandle stream) {
  check_options(o);
  check_list_sizes(problems.size(), "problems", outputs.size(), "outputs");
  for (size_t k = 0; k < problems.size(); ++k) {
    check_batch(problems[k], outputs[k]);
    check_same_device(problems[0].a, "a", problems[k].a, "a");
  }
  std::vector<std::vector<SinkhornStatus>> status(problems.size());
  if (problems.empty()) return status;
  (void)stream;
  CK_DEVICE_DISPATCH(problems[0].a.device, sinkhorn_impl::solve_cpu(problems, outputs, o, status),
                     sinkhorn_impl::solve_cuda(problems, outputs, o, status, stream));
  return status;
}

CsrPlan sinkhorn_sparse_plan(const OTProblems& problems, const ArrayView& f, const ArrayView& g, int64_t index,
                             double reg, double threshold, StreamHandle stream) {
  check_reg(reg);
  CK_CHECK_VALUE(threshold > 0, "argument 'sparse_tol' must be > 0, got ", threshold);
  const OTOutputs outputs{f, g, nullptr};
  check_batch(problems, outputs);
  CK_CHECK_VALUE(index >= 0 && index < problems.a.size(0), "problem index ", index, " out of range");
  (void)stream;
  CsrPlan plan;
  CK_DEVICE_DISPATCH(problems.a.device, plan = sinkhorn_impl::sparse_plan_cpu(problems, f, g, index, reg, threshold),
                     plan = sinkhorn_impl::sparse_plan_cuda(problems, f, g, index, reg, threshold, stream));
  return plan;
}

}  // namespace curvkit
