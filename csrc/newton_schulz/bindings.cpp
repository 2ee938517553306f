// Newton–Schulz family: Python arguments to the C++ API (newton_schulz.h) and results back.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include "newton_schulz/newton_schulz.h"
#include "python/binding.h"

namespace curvkit {

namespace py = pybind11;

namespace {

const binding::Choices<PolarMethod> kPolarMethods = {
    {"auto", PolarMethod::Auto}, {"standard", PolarMethod::Standard}, {"gram", PolarMethod::Gram}};
const binding::Choices<SqrtMethod> kSqrtMethods = {{"auto", SqrtMethod::Auto},
                                                   {"newton_schulz", SqrtMethod::NewtonSchulz},
                                                   {"pade", SqrtMethod::Pade},
                                                   {"eigh", SqrtMethod::Eigh}};

py::list sqrt_infos(const std::vector<std::vector<SqrtStatus>>& status, const std::vector<ArrayView>& inputs) {
  return binding::status_dicts(
      status, inputs, binding::field("converged", &SqrtStatus::converged),
      binding::field("iterations", &SqrtStatus::iterations), binding::field("residual", &SqrtStatus::residual),
      binding::field("method", [](const SqrtStatus& s) { return binding::choice_name(kSqrtMethods, s.method); }),
      binding::field("negative", &SqrtStatus::negative), binding::field("fell_back", &SqrtStatus::fell_back));
}

}  // namespace

void register_newton_schulz(py::module_& m, py::module_& /*testing*/) {
  m.def(
      "polar",
      [](const py::list& inputs, const py::list& outputs, const std::vector<std::tuple<double, double, double>>& steps,
         double norm_scale, double norm_eps, const std::string& method, const std::vector<double>& alpha,
         const std::vector<double>& beta, bool normalize, bool check_finite, StreamHandle stream, py::object workspace,
         const std::string& out_name) {
        PolarOptions o;
        for (const auto& [a, b, c] : steps) o.steps.push_back({a, b, c});
        o.norm_scale = norm_scale;
        o.norm_eps = norm_eps;
        o.method = binding::parse_choice(kPolarMethods, method, "method");
        o.alphas = alpha;  // one per input
        o.betas = beta;
        o.normalize = normalize;
        o.check_finite = check_finite;
        o.out_name = out_name.c_str();
        binding::ArrayList in(inputs, "G", stream), out(outputs, o.out_name, stream, binding::Access::Write);
        binding::CallScope scope(std::move(workspace));
        polar(in.views(), out.views(), o, stream);
      },
      py::arg("inputs"), py::arg("outputs"), py::kw_only(), py::arg("steps"), py::arg("norm_scale"),
      py::arg("norm_eps"), py::arg("method"), py::arg("alpha"), py::arg("beta"), py::arg("normalize"),
      py::arg("check_finite"), py::arg("stream"), py::arg("workspace"), py::arg("out_name") = "out",
      "outputs[i] = beta * outputs[i] + alpha * polar(inputs[i]) (see curvkit.polar).");
  m.def(
      "matrix_sqrt",
      [](const py::list& inputs, const py::list& sqrt_out, const py::list& inv_out, const std::string& method,
         int max_iters, double tol, bool fallback, StreamHandle stream, py::object workspace) {
        SqrtOptions o;
        o.method = binding::parse_choice(kSqrtMethods, method, "method");
        o.max_iters = max_iters;
        o.tol = tol;
        o.fallback = fallback;
        binding::ArrayList in(inputs, "A", stream), s(sqrt_out, "out", stream, binding::Access::Write),
            r(inv_out, "out", stream, binding::Access::Write);
        std::vector<std::vector<SqrtStatus>> status;
        {
          binding::CallScope scope(std::move(workspace));
          matrix_sqrt(in.views(), s.views(), r.views(), o, status, stream);
        }
        return sqrt_infos(status, in.views());
      },
      py::arg("inputs"), py::arg("sqrt_out"), py::arg("inv_sqrt_out"), py::kw_only(), py::arg("method"),
      py::arg("max_iters"), py::arg("tol"), py::arg("fallback"), py::arg("stream"), py::arg("workspace"),
      "Square roots and/or inverse square roots of symmetric PSD matrices; an info dict per input "
      "(see curvkit.matrix_sqrt).");
  m.def(
      "solve_lyapunov",
      [](const py::list& s, const py::list& c, const py::list& x, int max_iters, StreamHandle stream,
         py::object workspace) {
        binding::ArrayList sv(s, "S", stream), cv(c, "C", stream), xv(x, "out", stream, binding::Access::Write);
        std::vector<std::vector<SqrtStatus>> status;
        {
          binding::CallScope scope(std::move(workspace));
          solve_lyapunov(sv.views(), cv.views(), xv.views(), LyapunovOptions{max_iters}, status, stream);
        }
        return sqrt_infos(status, sv.views());
      },
      py::arg("S"), py::arg("C"), py::arg("out"), py::kw_only(), py::arg("max_iters"), py::arg("stream"),
      py::arg("workspace"), "X with S X + X S = C for symmetric positive definite S (see curvkit.solve_lyapunov).");
}

}  // namespace curvkit
