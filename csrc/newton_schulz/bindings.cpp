// Newton–Schulz family: validation, device dispatch and the Python bindings.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <optional>

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

void matrix_sqrt(const ArrayView& a, const ArrayView* sqrt_out, const ArrayView* inv_out, const SqrtOptions& o,
                 SqrtStatus* status, StreamHandle stream) {
  check_floating(a, "A");
  CK_CHECK_VALUE(a.ndim() >= 2 && a.size(-1) == a.size(-2), "argument 'A' must have shape (..., n, n), got ",
                 a.ndim() >= 2 ? "a non-square shape" : "fewer than 2 dimensions");
  CK_CHECK_VALUE(a.is_contiguous(), "argument 'A' must be C-contiguous");
  CK_CHECK_VALUE(o.max_iters >= 1, "argument 'max_iters' must be >= 1");
  CK_CHECK_VALUE(o.tol > 0, "argument 'tol' must be > 0");
  for (const ArrayView* out : {sqrt_out, inv_out}) {
    if (!out) continue;
    check_floating(*out, "out");
    check_writable(*out, "out");
    check_same_shape(a, "A", *out, "out");
    check_same_device(a, "A", *out, "out");
    CK_CHECK_VALUE(out->is_contiguous(), "argument 'out' must be C-contiguous");
  }
  if (a.device.is_cuda()) {
    matrix_sqrt_cuda(a, sqrt_out, inv_out, o, status, stream);
  } else {
    matrix_sqrt_cpu(a, sqrt_out, inv_out, o, status);
  }
}

namespace {

// (converged, iterations, residual) as NumPy arrays shaped like the batch dimensions.
py::tuple status_arrays(const std::vector<SqrtStatus>& status, const ArrayView& a) {
  std::vector<py::ssize_t> batch(a.shape.begin(), a.shape.end() - 2);
  py::array_t<bool> converged(batch);
  py::array_t<int32_t> iterations(batch);
  py::array_t<double> residual(batch);
  for (py::ssize_t i = 0; i < converged.size(); ++i) {  // 0 x 0 matrices have no task: trivially converged
    const SqrtStatus st = size_t(i) < status.size() ? status[size_t(i)] : SqrtStatus{true, 0, 0.0};
    converged.mutable_data()[i] = st.converged;
    iterations.mutable_data()[i] = st.iterations;
    residual.mutable_data()[i] = st.residual;
  }
  return py::make_tuple(converged, iterations, residual);
}

}  // namespace

void register_newton_schulz(py::module_& m) {
  m.def(
      "matrix_sqrt",
      [](py::handle a, py::handle sqrt_out, py::handle inv_out, const std::string& method, int max_iters, double tol,
         StreamHandle stream, py::object workspace) {
        SqrtOptions o;
        if (method == "newton_schulz") o.method = SqrtMethod::NewtonSchulz;
        else if (method == "pade") o.method = SqrtMethod::Pade;
        else if (method == "eigh") o.method = SqrtMethod::Eigh;
        else throw ValueError(cat("argument 'method' must be 'newton_schulz', 'pade' or 'eigh', got '", method, "'"));
        o.max_iters = max_iters;
        o.tol = tol;
        interop::ImportedArray in = interop::import_array(a, "A", stream);
        std::optional<interop::ImportedArray> s, r;
        if (!sqrt_out.is_none()) s.emplace(interop::import_output(sqrt_out, "out", stream));
        if (!inv_out.is_none()) r.emplace(interop::import_output(inv_out, "out", stream));
        const int64_t n = in.view.ndim() >= 2 ? in.view.size(-1) : 0;
        std::vector<SqrtStatus> status(size_t(n ? in.view.numel() / (n * n) : 0));
        {
          interop::FrameworkWorkspace allocator(std::move(workspace));
          py::gil_scoped_release release;
          matrix_sqrt(in.view, s ? &s->view : nullptr, r ? &r->view : nullptr, o, status.data(), stream);
        }
        return status_arrays(status, in.view);
      },
      py::arg("A"), py::arg("sqrt_out"), py::arg("inv_sqrt_out"), py::arg("method"), py::arg("max_iters"),
      py::arg("tol"), py::arg("stream") = 0, py::kw_only(), py::arg("workspace") = py::none(),
      "Square root and/or inverse square root of symmetric PSD matrices; returns (converged, iterations, "
      "residual) per matrix (see curvkit.matrix_sqrt).");
  m.def(
      "solve_lyapunov",
      [](py::handle s, py::handle c, py::handle x, int max_iters, StreamHandle stream, py::object workspace) {
        interop::ImportedArray sv = interop::import_array(s, "S", stream), cv = interop::import_array(c, "C", stream);
        interop::ImportedArray xv = interop::import_output(x, "out", stream);
        check_floating(sv.view, "S");
        check_floating(cv.view, "C");
        check_floating(xv.view, "out");
        CK_CHECK_VALUE(sv.view.ndim() >= 2 && sv.view.size(-1) == sv.view.size(-2),
                       "argument 'S' must have shape (..., n, n)");
        check_same_shape(sv.view, "S", cv.view, "C");
        check_same_shape(sv.view, "S", xv.view, "out");
        for (auto* v : {&sv.view, &cv.view, &xv.view})
          CK_CHECK_VALUE(v->is_contiguous(), "arguments of solve_lyapunov must be C-contiguous");
        check_same_device(sv.view, "S", cv.view, "C");
        check_same_device(sv.view, "S", xv.view, "out");
        CK_CHECK_VALUE(max_iters >= 1, "argument 'max_iters' must be >= 1");
        std::vector<SqrtStatus> status;
        {
          interop::FrameworkWorkspace allocator(std::move(workspace));
          py::gil_scoped_release release;
          if (sv.view.device.is_cuda()) solve_lyapunov_cuda(sv.view, cv.view, xv.view, max_iters, status, stream);
          else solve_lyapunov_cpu(sv.view, cv.view, xv.view, max_iters, status);
        }
        return status_arrays(status, sv.view);
      },
      py::arg("S"), py::arg("C"), py::arg("out"), py::arg("max_iters"), py::arg("stream"),
      py::kw_only(), py::arg("workspace") = py::none(),
      "X with S X + X S = C for symmetric positive definite S (see curvkit.solve_lyapunov).");
  m.def(
      "polar",
      [](const py::list& inputs, const py::list& outputs, const std::vector<std::tuple<double, double, double>>& steps,
         double norm_scale, double eps, const std::string& method, int restart_after, double alpha, double beta,
         StreamHandle stream, bool normalize, bool check_finite, py::object workspace) {
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
        o.normalize = normalize;
        o.check_finite = check_finite;
        std::vector<interop::ImportedArray> in, out;
        std::vector<ArrayView> in_views, out_views;
        for (py::handle x : inputs) in.push_back(interop::import_array(x, "G", stream));
        for (py::handle x : outputs) out.push_back(interop::import_output(x, "out", stream));
        for (auto& a : in) in_views.push_back(a.view);
        for (auto& a : out) out_views.push_back(a.view);
        interop::FrameworkWorkspace allocator(std::move(workspace));
        py::gil_scoped_release release;
        polar(in_views, out_views, o, stream);
      },
      py::arg("inputs"), py::arg("outputs"), py::arg("steps"), py::arg("norm_scale"), py::arg("eps"),
      py::arg("method"), py::arg("restart_after"), py::arg("alpha"), py::arg("beta"), py::arg("stream") = 0,
      py::kw_only(), py::arg("normalize") = true, py::arg("check_finite") = true,
      py::arg("workspace") = py::none(),
      "outputs[i] = beta * outputs[i] + alpha * polar(inputs[i]) (see curvkit.polar).");
}

}  // namespace curvkit
