// Inverse roots and eigenbases: Python arguments to the C++ API (inverse_root.h) and results back.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <vector>

#include "inverse_root/inverse_root.h"
#include "python/binding.h"

namespace curvkit {

namespace py = pybind11;

namespace {

const binding::Choices<RootMethod> kRootMethods = {
    {"auto", RootMethod::Auto}, {"eigh", RootMethod::Eigh}, {"newton", RootMethod::Newton}};

py::list basis_infos(const std::vector<std::vector<BasisStatus>>& status, const std::vector<ArrayView>& inputs) {
  return binding::status_dicts(status, inputs, binding::field("converged", &BasisStatus::converged));
}

}  // namespace

void register_inverse_root(py::module_& m, py::module_& /*testing*/) {
  m.def(
      "matrix_inverse_root",
      [](const py::list& inputs, const py::list& outputs, const py::list& inits, const py::list& bases, int p,
         double eps, const std::string& method, int max_iters, std::optional<double> tol, bool fallback,
         bool compute_residual, StreamHandle stream, py::object workspace) {
        RootOptions o;
        o.p = p;
        o.eps = eps;
        o.method = binding::parse_choice(kRootMethods, method, "method");
        o.max_iters = max_iters;
        o.tol = tol;
        o.fallback = fallback;
        o.compute_residual = compute_residual;
        binding::ArrayList in(inputs, "A", stream), out(outputs, "out", stream, binding::Access::Write),
            init(inits, "init", stream, binding::Access::Read, true),
            basis(bases, "basis", stream, binding::Access::Write, true);
        std::vector<std::vector<RootStatus>> status;
        {
          binding::CallScope scope(std::move(workspace));
          matrix_inverse_root(in.views(), out.views(), init.optional_views(), basis.optional_views(), o, status,
                              stream);
        }
        return binding::status_dicts(
            status, in.views(), binding::field("converged", &RootStatus::converged),
            binding::field("iterations", &RootStatus::iterations), binding::field("residual", &RootStatus::residual),
            binding::field("method", [](const RootStatus& s) { return binding::choice_name(kRootMethods, s.method); }),
            binding::field("fell_back", &RootStatus::fell_back), binding::field("kept_init", &RootStatus::kept_init),
            binding::field("products", &RootStatus::products), binding::field("negative", &RootStatus::negative),
            binding::field("unresolved", &RootStatus::unresolved));
      },
      py::arg("inputs"), py::arg("outputs"), py::arg("inits"), py::arg("bases"), py::kw_only(), py::arg("p"),
      py::arg("eps"), py::arg("method"), py::arg("max_iters"), py::arg("tol"), py::arg("fallback"),
      py::arg("compute_residual"), py::arg("stream"), py::arg("workspace"),
      "outputs[i] = (inputs[i] + eps I)^(-1/p); an info dict per input (see curvkit.matrix_inverse_root).");
  m.def(
      "eigh",
      [](const py::list& inputs, const py::list& values, const py::list& vectors, const py::list& bases,
         StreamHandle stream, py::object workspace) {
        binding::ArrayList in(inputs, "A", stream), w(values, "out", stream, binding::Access::Write),
            v(vectors, "out", stream, binding::Access::Write),
            basis(bases, "basis", stream, binding::Access::Read, true);
        std::vector<std::vector<EighStatus>> status;
        {
          binding::CallScope scope(std::move(workspace));
          eigh(in.views(), w.views(), v.views(), basis.optional_views(), status, stream);
        }
        return binding::status_dicts(status, in.views(), binding::field("converged", &EighStatus::converged),
                                     binding::field("iterations", &EighStatus::iterations));
      },
      py::arg("inputs"), py::arg("values"), py::arg("vectors"), py::arg("bases"), py::kw_only(), py::arg("stream"),
      py::arg("workspace"),
      "Symmetric eigendecomposition of each input, refined from bases[i] where given; an info dict per input.");
  m.def(
      "orthonormalize_qr",
      [](const py::list& q, StreamHandle stream, py::object workspace) {
        binding::ArrayList qv(q, "Q", stream, binding::Access::Write);
        std::vector<std::vector<BasisStatus>> status;
        {
          binding::CallScope scope(std::move(workspace));
          orthonormalize_qr(qv.views(), status, stream);
        }
        return basis_infos(status, qv.views());
      },
      py::arg("Q"), py::kw_only(), py::arg("stream"), py::arg("workspace"),
      "Orthonormalize the columns of each Q in place by QR (nonnegative R diagonal); an info dict per input.");
  m.def(
      "orthonormalize_polar",
      [](const py::list& q, const py::list& out, int steps, StreamHandle stream, py::object workspace) {
        binding::ArrayList qv(q, "Q", stream), ov(out, "out", stream, binding::Access::Write);
        std::vector<std::vector<BasisStatus>> status;
        {
          binding::CallScope scope(std::move(workspace));
          orthonormalize_polar(qv.views(), ov.views(), steps, status, stream);
        }
        return binding::status_dicts(status, qv.views(), binding::field("converged", &BasisStatus::converged),
                                     binding::field("orthogonality", &BasisStatus::orthogonality));
      },
      py::arg("Q"), py::arg("out"), py::kw_only(), py::arg("steps"), py::arg("stream"), py::arg("workspace"),
      "out[i] = Q[i] orthonormalized by Bjorck passes (see curvkit.orthonormalize); an info dict per input.");
  m.def(
      "eigenbasis_update",
      [](const py::list& a, const py::list& q, const py::list& q_out, const py::list& estimates, const py::list& perm,
         StreamHandle stream, py::object workspace) {
        binding::ArrayList av(a, "A", stream), qv(q, "Q", stream), ov(q_out, "out", stream, binding::Access::Write),
            ev(estimates, "out", stream, binding::Access::Write), pv(perm, "out", stream, binding::Access::Write);
        std::vector<std::vector<BasisStatus>> status;
        {
          binding::CallScope scope(std::move(workspace));
          eigenbasis_update(av.views(), qv.views(), ov.views(), ev.views(), pv.views(), status, stream);
        }
        return binding::status_dicts(status, qv.views(), binding::field("converged", &BasisStatus::converged),
                                     binding::field("fell_back", &BasisStatus::fell_back));
      },
      py::arg("A"), py::arg("Q"), py::arg("Q_out"), py::arg("estimates"), py::arg("perm"), py::kw_only(),
      py::arg("stream"), py::arg("workspace"), "SOAP's eigenbasis refresh (see curvkit.eigenbasis_update).");
}

}  // namespace curvkit
