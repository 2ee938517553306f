// Newton–Schulz family: validation, device dispatch and the Python bindings.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "core/check.h"
#include "newton_schulz/newton_schulz.h"
#include "python/interop.h"

namespace curvkit {

namespace py = pybind11;

void polar(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs, const PolarOptions& o,
           StreamHandle stream) {
  CK_CHECK_VALUE(inputs.size() == outputs.size(), "got ", inputs.size(), " inputs and ", outputs.size(), " outputs");
  for (const PolarStep& s : o.steps)
    CK_CHECK_VALUE(std::isfinite(s.a) && std::isfinite(s.b) && std::isfinite(s.c),
                   "argument 'coefficients' must be finite");
  CK_CHECK_VALUE(std::isfinite(o.alpha) && std::isfinite(o.beta), "the update factors must be finite");
  CK_CHECK_VALUE(o.norm_scale > 0 && o.eps >= 0 && std::isfinite(o.norm_scale + o.eps),
                 "argument 'eps' must be >= 0 and finite");
  for (size_t i = 0; i < inputs.size(); ++i) {
    const ArrayView &g = inputs[i], &out = outputs[i];
    check_floating(g, "G");
    check_floating(out, "out");
    check_writable(out, "out");
    CK_CHECK_VALUE(g.ndim() >= 2, "argument 'G' must have shape (..., m, n), got ", g.ndim(), " dimension(s)");
    check_same_shape(g, "G", out, "out");
    check_same_device(g, "G", out, "out");
    check_same_device(g, "G", inputs[0], "G");
    CK_CHECK_VALUE(g.is_contiguous(), "argument 'G' must be C-contiguous");
    CK_CHECK_VALUE(out.is_contiguous(), "argument 'out' must be C-contiguous");
  }
  if (inputs.empty()) return;
  if (inputs[0].device.is_cuda()) {
    polar_cuda(inputs, outputs, o, stream);
  } else {
    polar_cpu(inputs, outputs, o);
  }
}

void register_newton_schulz(py::module_& m) {
  m.def(
      "polar",
      [](const py::list& inputs, const py::list& outputs, const std::vector<std::tuple<double, double, double>>& steps,
         double norm_scale, double eps, const std::string& method, int restart_after, double alpha, double beta,
         StreamHandle stream) {
        CK_CHECK_VALUE(method == "standard" || method == "gram",
                       "argument 'method' must be 'standard', 'gram' or 'auto', got '", method, "'");
        PolarOptions o;
        for (const auto& [a, b, c] : steps) o.steps.push_back({a, b, c});
        o.norm_scale = norm_scale;
        o.eps = eps;
        o.method = method == "gram" ? PolarMethod::Gram : PolarMethod::Standard;
        o.restart_after = restart_after;
        o.alpha = alpha;
        o.beta = beta;
        std::vector<interop::ImportedArray> in, out;
        std::vector<ArrayView> in_views, out_views;
        for (py::handle x : inputs) in.push_back(interop::import_array(x, "G", stream));
        for (py::handle x : outputs) out.push_back(interop::import_output(x, "out", stream));
        for (auto& a : in) in_views.push_back(a.view);
        for (auto& a : out) out_views.push_back(a.view);
        py::gil_scoped_release release;
        polar(in_views, out_views, o, stream);
      },
      py::arg("inputs"), py::arg("outputs"), py::arg("steps"), py::arg("norm_scale"), py::arg("eps"),
      py::arg("method"), py::arg("restart_after"), py::arg("alpha"), py::arg("beta"), py::arg("stream") = 0,
      "outputs[i] = beta * outputs[i] + alpha * polar(inputs[i]) (see curvkit.polar).");
}

}  // namespace curvkit
