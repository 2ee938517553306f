// Inverse roots and eigenbases: validation, device dispatch and the Python bindings.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "core/check.h"
#include "inverse_root/inverse_root.h"
#include "python/interop.h"

namespace curvkit {

namespace py = pybind11;

namespace {

void check_square_batch(const ArrayView& a, const char* name) {
  check_floating(a, name);
  CK_CHECK_VALUE(a.ndim() >= 2 && a.size(-1) == a.size(-2), "argument '", name, "' must have shape (..., n, n)");
  CK_CHECK_VALUE(a.is_contiguous(), "argument '", name, "' must be C-contiguous");
}

// Every input on the first one's device; true if that is a CUDA device.
bool on_cuda(const std::vector<interop::ImportedArray>& inputs) {
  for (const auto& a : inputs) check_same_device(inputs[0].view, "A", a.view, "A");
  return !inputs.empty() && inputs[0].view.device.is_cuda();
}

void check_output(const ArrayView& a, const ArrayView& out, const char* name) {
  check_floating(out, name);
  check_writable(out, name);
  check_same_device(a, "A", out, name);
  CK_CHECK_VALUE(out.is_contiguous(), "argument '", name, "' must be C-contiguous");
}

std::vector<py::ssize_t> batch_shape(const ArrayView& a) { return {a.shape.begin(), a.shape.end() - 2}; }

// Arrays are exported for the stream the kernels run on (DLPack orders the producer's work).
std::vector<interop::ImportedArray> import_list(const py::list& xs, const char* name, bool output,
                                                StreamHandle stream) {
  std::vector<interop::ImportedArray> out;
  for (py::handle x : xs)
    out.push_back(output ? interop::import_output(x, name, stream) : interop::import_array(x, name, stream));
  return out;
}

std::vector<ArrayView> views(const std::vector<interop::ImportedArray>& xs) {
  std::vector<ArrayView> v;
  for (const auto& x : xs) v.push_back(x.view);
  return v;
}

// Optional per-input arrays (None or an array shaped like the input), e.g. warm starts.
struct OptionalArrays {
  std::vector<std::optional<interop::ImportedArray>> arrays;
  std::vector<const ArrayView*> views;
  OptionalArrays(const py::list& xs, const std::vector<interop::ImportedArray>& inputs, const char* name, bool written,
                 StreamHandle stream)
      : arrays(inputs.size()), views(inputs.size(), nullptr) {
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (xs[i].is_none()) continue;
      arrays[i].emplace(written ? interop::import_output(xs[i], name, stream) : interop::import_array(xs[i], name, stream));
      check_square_batch(arrays[i]->view, name);
      check_same_shape(inputs[i].view, "A", arrays[i]->view, name);
      if (written) check_writable(arrays[i]->view, name);
      views[i] = &arrays[i]->view;
    }
  }
};

}  // namespace

void register_inverse_root(py::module_& m) {
  m.def(
      "matrix_inverse_root",
      [](const py::list& inputs, const py::list& outputs, const py::list& inits, const py::list& bases, int p,
         double eps, const std::string& method, int max_iters, double tol, bool fallback, bool compute_residual,
         StreamHandle stream, py::object workspace) {
        CK_CHECK_VALUE(p >= 1, "argument 'p' must be a positive integer, got ", p);
        CK_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "argument 'eps' must be finite and >= 0");
        CK_CHECK_VALUE(max_iters >= 1, "argument 'max_iters' must be >= 1");
        CK_CHECK_VALUE(tol > 0, "argument 'tol' must be > 0");
        CK_CHECK_VALUE(method == "eigh" || method == "newton", "argument 'method' must be 'auto', 'eigh' or 'newton'");
        RootOptions o{p, eps, method == "newton" ? RootMethod::Newton : RootMethod::Eigh, max_iters, tol, fallback,
                      compute_residual};
        auto in = import_list(inputs, "A", false, stream), out = import_list(outputs, "out", true, stream);
        CK_CHECK_VALUE(in.size() == out.size() && in.size() == size_t(py::len(inits)) &&
                           in.size() == size_t(py::len(bases)),
                       "mismatched list lengths");
        CK_CHECK_VALUE(o.method == RootMethod::Eigh || std::all_of(bases.begin(), bases.end(), [](py::handle b) {
                         return b.is_none();
                       }), "argument 'basis' warm-starts method 'eigh'; method 'newton' takes 'init'");
        OptionalArrays init(inits, in, "init", false, stream), basis(bases, in, "basis", true, stream);
        for (size_t i = 0; i < in.size(); ++i) {
          check_square_batch(in[i].view, "A");
          check_output(in[i].view, out[i].view, "out");
          check_same_shape(in[i].view, "A", out[i].view, "out");
          if (init.views[i]) check_same_device(in[i].view, "A", *init.views[i], "init");
          if (basis.views[i]) check_same_device(in[i].view, "A", *basis.views[i], "basis");
        }
        const bool cuda = on_cuda(in);
        std::vector<std::vector<RootStatus>> status;
        {
          interop::FrameworkWorkspace allocator(std::move(workspace));
          py::gil_scoped_release release;
          if (cuda) matrix_inverse_root_cuda(views(in), views(out), init.views, basis.views, o, status, stream);
          else matrix_inverse_root_cpu(views(in), views(out), init.views, basis.views, o, status);
        }
        py::list result;
        for (size_t i = 0; i < in.size(); ++i) {
          const auto shape = batch_shape(in[i].view);
          py::array_t<bool> converged(shape), fell_back(shape), kept_init(shape);
          py::array_t<int32_t> iterations(shape);
          py::array_t<double> residual(shape);
          py::array_t<bool> newton(shape);
          py::array_t<double> products(shape);
          for (size_t b = 0; b < status[i].size(); ++b) {
            const RootStatus& s = status[i][b];
            converged.mutable_data()[b] = s.converged;
            iterations.mutable_data()[b] = s.iterations;
            residual.mutable_data()[b] = s.residual;
            newton.mutable_data()[b] = s.method == RootMethod::Newton;
            fell_back.mutable_data()[b] = s.fell_back;
            kept_init.mutable_data()[b] = s.kept_init;
            products.mutable_data()[b] = s.products;
          }
          result.append(py::make_tuple(converged, iterations, residual, newton, fell_back, kept_init, products));
        }
        return result;
      },
      py::arg("inputs"), py::arg("outputs"), py::arg("inits"), py::arg("bases"), py::arg("p"), py::arg("eps"),
      py::arg("method"),
      py::arg("max_iters"), py::arg("tol"), py::arg("fallback"), py::arg("compute_residual"), py::arg("stream"),
      py::kw_only(), py::arg("workspace") = py::none(),
      "outputs[i] = (inputs[i] + eps I)^(-1/p); per input (converged, iterations, residual, newton, fell_back, "
      "kept_init, products) (see curvkit.matrix_inverse_root).");
  m.def(
      "eigh",
      [](const py::list& inputs, const py::list& values, const py::list& vectors, const py::list& bases,
         StreamHandle stream, py::object workspace) {
        auto in = import_list(inputs, "A", false, stream), w = import_list(values, "out", true, stream),
             v = import_list(vectors, "out", true, stream);
        CK_CHECK_VALUE(in.size() == w.size() && in.size() == v.size() && in.size() == size_t(py::len(bases)),
                       "mismatched list lengths");
        OptionalArrays basis(bases, in, "basis", false, stream);
        for (size_t i = 0; i < in.size(); ++i) {
          check_square_batch(in[i].view, "A");
          check_output(in[i].view, w[i].view, "out");
          check_output(in[i].view, v[i].view, "out");
          check_same_shape(in[i].view, "A", v[i].view, "out");
          CK_CHECK_VALUE(w[i].view.numel() * in[i].view.size(-1) == in[i].view.numel(), "eigenvalue output size");
          if (basis.views[i]) check_same_device(in[i].view, "A", *basis.views[i], "basis");
        }
        const bool cuda = on_cuda(in);
        std::vector<std::vector<bool>> ok;
        std::vector<std::vector<int>> steps;
        {
          interop::FrameworkWorkspace allocator(std::move(workspace));
          py::gil_scoped_release release;
          if (cuda) eigh_cuda(views(in), views(w), views(v), basis.views, ok, steps, stream);
          else eigh_cpu(views(in), views(w), views(v), basis.views, ok, steps);
        }
        py::list result;
        for (size_t i = 0; i < in.size(); ++i) {
          py::array_t<bool> good(batch_shape(in[i].view));
          py::array_t<int32_t> refined(batch_shape(in[i].view));
          for (size_t b = 0; b < ok[i].size(); ++b) {
            good.mutable_data()[b] = ok[i][b];
            refined.mutable_data()[b] = steps[i][b];
          }
          result.append(py::make_tuple(good, refined));
        }
        return result;
      },
      py::arg("inputs"), py::arg("values"), py::arg("vectors"), py::arg("bases"), py::arg("stream"),
      py::kw_only(), py::arg("workspace") = py::none(),
      "Symmetric eigendecomposition of each input, refined from bases[i] where given; per input (whether it "
      "succeeded, refinement steps or -1 where decomposed from scratch).");
  m.def(
      "orthonormalize_qr",
      [](py::handle q, StreamHandle stream, py::object workspace) {
        interop::ImportedArray qv = interop::import_output(q, "Q", stream);
        check_floating(qv.view, "Q");
        CK_CHECK_VALUE(qv.view.ndim() >= 2, "argument 'Q' must have shape (..., m, k)");
        CK_CHECK_VALUE(qv.view.is_contiguous(), "argument 'Q' must be C-contiguous");
        std::vector<bool> ok;
        {
          interop::FrameworkWorkspace allocator(std::move(workspace));
          py::gil_scoped_release release;
          if (qv.view.device.is_cuda()) orthonormalize_qr_cuda(qv.view, ok, stream);
          else orthonormalize_qr_cpu(qv.view, ok);
        }
        py::array_t<bool> good(batch_shape(qv.view));
        for (size_t b = 0; b < ok.size(); ++b) good.mutable_data()[b] = ok[b];
        return good;
      },
      py::arg("Q"), py::arg("stream"), py::kw_only(), py::arg("workspace") = py::none(),
      "Orthonormalize the columns of Q in place by QR (nonnegative R diagonal).");
  m.def(
      "eigenbasis_update",
      [](py::handle a, py::handle q, py::handle q_out, py::handle estimates, py::handle perm, StreamHandle stream,
         py::object workspace) {
        interop::ImportedArray av = interop::import_array(a, "A", stream), qv = interop::import_array(q, "Q", stream);
        interop::ImportedArray ov = interop::import_output(q_out, "out", stream),
                               ev = interop::import_output(estimates, "out", stream),
                               pv = interop::import_output(perm, "out", stream);
        check_square_batch(av.view, "A");
        for (auto [x, name] : {std::pair{&qv, "Q"}, std::pair{&ov, "out"}, std::pair{&ev, "out"}})
          check_same_device(av.view, "A", x->view, name);
        CK_CHECK_VALUE(!pv.view.device.is_cuda() && pv.view.is_contiguous() && pv.view.numel() == ev.view.numel(),
                       "perm output must be a contiguous host array with one entry per column");
        check_floating(qv.view, "Q");
        CK_CHECK_VALUE(qv.view.is_contiguous() && qv.view.ndim() == av.view.ndim() &&
                           qv.view.size(-2) == av.view.size(-1) &&
                           std::equal(av.view.shape.begin(), av.view.shape.end() - 2, qv.view.shape.begin()),
                       "argument 'Q' must be C-contiguous with shape (..., n, k) matching A (..., n, n)");
        check_same_shape(qv.view, "Q", ov.view, "out");
        CK_CHECK_VALUE(pv.view.dtype == (DType{DTypeCode::Int, 64}), "perm output must be int64");
        std::vector<bool> ok;
        {
          interop::FrameworkWorkspace allocator(std::move(workspace));
          py::gil_scoped_release release;
          if (av.view.device.is_cuda()) eigenbasis_update_cuda(av.view, qv.view, ov.view, ev.view, pv.view, ok, stream);
          else eigenbasis_update_cpu(av.view, qv.view, ov.view, ev.view, pv.view, ok);
        }
        py::array_t<bool> good(batch_shape(av.view));
        for (size_t b = 0; b < ok.size(); ++b) good.mutable_data()[b] = ok[b];
        return good;
      },
      py::arg("A"), py::arg("Q"), py::arg("Q_out"), py::arg("estimates"), py::arg("perm"), py::arg("stream"),
      py::kw_only(), py::arg("workspace") = py::none(),
      "SOAP's eigenbasis refresh (see curvkit.eigenbasis_update).");
}

}  // namespace curvkit
