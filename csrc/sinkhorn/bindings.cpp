// Sinkhorn family: Python arguments to the C++ API (sinkhorn.h) and results back.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

#include "python/binding.h"
#include "sinkhorn/sinkhorn.h"

namespace curvkit {

namespace py = pybind11;

namespace {

const binding::Choices<SinkhornMethod> kMethods = {
    {"auto", SinkhornMethod::Auto}, {"log", SinkhornMethod::Log}, {"sns", SinkhornMethod::SNS}};
const binding::Choices<GroundCost> kCosts = {{"matrix", GroundCost::Matrix},
                                             {"sqeuclidean", GroundCost::SqEuclidean},
                                             {"euclidean", GroundCost::Euclidean},
                                             {"l1", GroundCost::L1},
                                             {"pnorm", GroundCost::PNorm}};

// One status dict per batch: {field: array of shape (B,)}.
py::dict status_dict(const std::vector<SinkhornStatus>& status) {
  const std::vector<py::ssize_t> shape{py::ssize_t(status.size())};
  auto get = [&](auto field) { return binding::detail::field_array(status, shape, field); };
  py::dict d;
  d["converged"] = get(&SinkhornStatus::converged);
  d["iterations"] = get(&SinkhornStatus::iterations);
  d["newton_steps"] = get(&SinkhornStatus::newton_steps);
  d["marginal_error"] = get(&SinkhornStatus::marginal_error);
  d["cost"] = get(&SinkhornStatus::cost);
  d["objective"] = get(&SinkhornStatus::objective);
  d["method"] = get([](const SinkhornStatus& s) { return binding::choice_name(kMethods, s.method); });
  d["potentials_overflow"] = get(&SinkhornStatus::potentials_overflow);
  return d;
}

}  // namespace

void register_sinkhorn(py::module_& m, py::module_& /*testing*/) {
  m.def(
      "sinkhorn",
      [](const py::list& a, const py::list& b, const py::list& C, const py::list& x, const py::list& y,
         const py::list& f, const py::list& g, const py::list& plan, const std::string& cost, double p, double reg,
         const std::string& method, double tol, int64_t max_iter, int64_t max_newton, double density,
         bool float32_warmup, bool warm_start, StreamHandle stream, py::object workspace) {
        SinkhornOptions o;
        o.reg = reg;
        o.method = binding::parse_choice(kMethods, method, "method");
        o.tol = tol;
        o.max_iters = max_iter;
        o.max_newton = max_newton;
        o.density = density;
        o.float32_warmup = float32_warmup;
        o.warm_start = warm_start;
        const GroundCost kind = binding::parse_choice(kCosts, cost, "cost");
        const bool points = kind != GroundCost::Matrix;
        binding::ArrayList al(a, "a", stream), bl(b, "b", stream), Cl(C, "C", stream, binding::Access::Read, true),
            xl(x, "x", stream, binding::Access::Read, true), yl(y, "y", stream, binding::Access::Read, true),
            fl(f, "f", stream, binding::Access::Write), gl(g, "g", stream, binding::Access::Write),
            pl(plan, "plan", stream, binding::Access::Write, true);
        const size_t count = al.size();
        for (const auto& [list, name] : {std::pair<const binding::ArrayList*, const char*>{&bl, "b"},
                                         {&Cl, "C"},
                                         {&xl, "x"},
                                         {&yl, "y"},
                                         {&fl, "f"},
                                         {&gl, "g"},
                                         {&pl, "plan"}})
          check_list_sizes(count, "a", list->size(), name);
        std::vector<OTProblems> problems(count);
        std::vector<OTOutputs> outputs(count);
        for (size_t k = 0; k < count; ++k) {
          OTProblems& pr = problems[k];
          pr.a = al.views()[k];
          pr.b = bl.views()[k];
          pr.cost = kind;
          pr.p = p;
          const ArrayView *Cv = Cl.optional_views()[k], *xv = xl.optional_views()[k], *yv = yl.optional_views()[k];
          CK_CHECK_VALUE(points ? (xv && yv && !Cv) : (Cv && !xv && !yv),
                         points ? "a point-cloud cost needs 'x' and 'y' and no 'C'" : "cost='matrix' needs 'C'");
          if (points) {
            pr.x = *xv;
            pr.y = *yv;
          } else {
            pr.C = *Cv;
          }
          outputs[k].f = fl.views()[k];
          outputs[k].g = gl.views()[k];
          outputs[k].plan = pl.optional_views()[k];
        }
        std::vector<std::vector<SinkhornStatus>> status;
        {
          binding::CallScope scope(std::move(workspace));
          status = sinkhorn(problems, outputs, o, stream);
        }
        py::list result;
        for (const auto& s : status) result.append(status_dict(s));
        return result;
      },
      py::arg("a"), py::arg("b"), py::arg("C"), py::arg("x"), py::arg("y"), py::arg("f"), py::arg("g"), py::arg("plan"),
      py::kw_only(), py::arg("cost"), py::arg("p"), py::arg("reg"), py::arg("method"), py::arg("tol"),
      py::arg("max_iter"), py::arg("max_newton"), py::arg("density"), py::arg("float32_warmup"), py::arg("warm_start"),
      py::arg("stream"), py::arg("workspace"),
      "Entropic OT over lists of batches (see curvkit.sinkhorn); one status dict per batch.");
  m.def(
      "sinkhorn_sparse_plan",
      [](py::handle a, py::handle b, py::handle C, py::handle x, py::handle y, py::handle f, py::handle g,
         const std::string& cost, double p, double reg, double threshold, int64_t index, StreamHandle stream,
         py::object workspace) {
        const GroundCost kind = binding::parse_choice(kCosts, cost, "cost");
        interop::ImportedArray ai = interop::import_array(a, "a"), bi = interop::import_array(b, "b"),
                               fi = interop::import_output(f, "f"), gi = interop::import_output(g, "g");
        std::optional<interop::ImportedArray> Ci, xi, yi;
        OTProblems pr;
        pr.a = ai.view;
        pr.b = bi.view;
        pr.cost = kind;
        pr.p = p;
        if (kind == GroundCost::Matrix) {
          Ci.emplace(interop::import_array(C, "C"));
          pr.C = Ci->view;
        } else {
          xi.emplace(interop::import_array(x, "x"));
          yi.emplace(interop::import_array(y, "y"));
          pr.x = xi->view;
          pr.y = yi->view;
        }
        CsrPlan plan;
        {
          binding::CallScope scope(std::move(workspace));
          plan = sinkhorn_sparse_plan(pr, fi.view, gi.view, index, reg, threshold, stream);
        }
        return py::make_tuple(py::array_t<int64_t>(py::ssize_t(plan.indptr.size()), plan.indptr.data()),
                              py::array_t<int64_t>(py::ssize_t(plan.indices.size()), plan.indices.data()),
                              py::array_t<double>(py::ssize_t(plan.values.size()), plan.values.data()));
      },
      py::arg("a"), py::arg("b"), py::arg("C"), py::arg("x"), py::arg("y"), py::arg("f"), py::arg("g"), py::kw_only(),
      py::arg("cost"), py::arg("p"), py::arg("reg"), py::arg("threshold"), py::arg("index"), py::arg("stream"),
      py::arg("workspace"),
      "The entries >= threshold of the plan of potentials (f, g) as CSR arrays (indptr, indices, values).");
}

}  // namespace curvkit
