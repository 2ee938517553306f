// Hutchinson family: Python arguments to the C++ API (hutchinson.h) and results back.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "hutchinson/hutchinson.h"
#include "hutchinson/probe_math.h"
#include "python/binding.h"

namespace curvkit {

namespace py = pybind11;

namespace {

const binding::Choices<ProbeKind> kProbeKinds = {
    {"rademacher", ProbeKind::Rademacher}, {"gaussian", ProbeKind::Gaussian}, {"sphere", ProbeKind::Sphere}};

interop::ImportedArray in(py::handle a, const char* name, StreamHandle stream = 0) {
  return interop::import_array(a, name, stream);
}
interop::ImportedArray out(py::handle a, const char* name, StreamHandle stream = 0) {
  return interop::import_output(a, name, stream);
}

// The estimator cores: CPU arrays, and for the kernels with a CUDA backend CUDA arrays on `stream`.
void register_estimators(py::module_& m) {
  m.def(
      "sketch_qr",
      [](py::handle q, py::handle r, int64_t k0, StreamHandle stream, py::object workspace) {
        auto qa = out(q, "q", stream), ra = out(r, "r", stream);
        binding::CallScope scope(std::move(workspace));
        sketch_qr(qa.view, ra.view, k0, stream);
      },
      py::arg("q"), py::arg("r"), py::arg("k0"), py::arg("stream") = 0, py::arg("workspace") = py::none(),
      "Orthonormalize the new sketch columns q[:, k0:] (see hutchinson.h).");
  m.def(
      "xtrace_estimates",
      [](py::handle omega, py::handle y, py::handle q, py::handle r, py::handle z, bool improved, py::handle o,
         StreamHandle stream, py::object workspace) {
        auto a = in(omega, "omega", stream), b = in(y, "y", stream), c = in(q, "q", stream), d = in(r, "r", stream),
             e = in(z, "z", stream), f = out(o, "out", stream);
        binding::CallScope scope(std::move(workspace));
        xtrace_estimates(a.view, b.view, c.view, d.view, e.view, improved, f.view, stream);
      },
      py::arg("omega"), py::arg("y"), py::arg("q"), py::arg("r"), py::arg("z"), py::arg("improved"), py::arg("out"),
      py::arg("stream") = 0, py::arg("workspace") = py::none(), "Leave-one-out XTrace estimates, one per probe.");
  m.def(
      "xdiag_estimates",
      [](py::handle omega, py::handle q, py::handle r, py::handle z, py::handle mean, py::handle variance,
         StreamHandle stream, py::object workspace) {
        auto a = in(omega, "omega", stream), c = in(q, "q", stream), d = in(r, "r", stream), e = in(z, "z", stream),
             f = out(mean, "mean", stream), g = out(variance, "variance", stream);
        binding::CallScope scope(std::move(workspace));
        xdiag_estimates(a.view, c.view, d.view, e.view, f.view, g.view, stream);
      },
      py::arg("omega"), py::arg("q"), py::arg("r"), py::arg("z"), py::arg("mean"), py::arg("variance"),
      py::arg("stream") = 0, py::arg("workspace") = py::none(),
      "XDiag: the mean of the leave-one-out diagonal estimates and its variance.");
  m.def(
      "xnystrace_estimates",
      [](py::handle omega, py::handle y, double relative_shift, py::handle o, StreamHandle stream,
         py::object workspace) {
        auto a = in(omega, "omega", stream), b = out(y, "y", stream), f = out(o, "out", stream);
        binding::CallScope scope(std::move(workspace));
        return xnystrace_estimates(a.view, b.view, relative_shift, f.view, stream);
      },
      py::arg("omega"), py::arg("y"), py::arg("relative_shift"), py::arg("out"), py::arg("stream") = 0,
      py::arg("workspace") = py::none(), "Leave-one-out XNysTrace estimates; False when the operator is not PSD.");
  m.def(
      "column_dots",
      [](py::handle x, py::handle y, py::handle o, StreamHandle stream, py::object workspace) {
        auto a = in(x, "x", stream), b = in(y, "y", stream), f = out(o, "out", stream);
        binding::CallScope scope(std::move(workspace));
        column_dots(a.view, b.view, f.view, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("out"), py::arg("stream") = 0, py::arg("workspace") = py::none(),
      "out[j] = sum_i x[i, j] y[i, j] (float64).");
  m.def(
      "row_dots",
      [](py::handle x, py::handle y, py::handle o, StreamHandle stream) {
        auto a = in(x, "x", stream), b = in(y, "y", stream), f = out(o, "out", stream);
        binding::CallScope scope{py::none()};
        row_dots(a.view, b.view, f.view, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("out"), py::arg("stream") = 0, "out[i] = sum_j x[i, j] y[i, j].");
  m.def(
      "project_out",
      [](py::handle q, py::handle x, StreamHandle stream, py::object workspace) {
        auto a = in(q, "q", stream), b = out(x, "x", stream);
        binding::CallScope scope(std::move(workspace));
        project_out(a.view, b.view, stream);
      },
      py::arg("q"), py::arg("x"), py::arg("stream") = 0, py::arg("workspace") = py::none(),
      "x <- x - Q (Q^T x), twice.");
  m.def(
      "accumulate_products",
      [](py::handle x, py::handle y, int64_t count, py::handle mean, py::handle m2, StreamHandle stream) {
        auto a = in(x, "x", stream), b = in(y, "y", stream), c = out(mean, "mean", stream), d = out(m2, "m2", stream);
        binding::CallScope scope{py::none()};
        accumulate_products(a.view, b.view, count, c.view, d.view, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("count"), py::arg("mean"), py::arg("m2"), py::arg("stream") = 0,
      "Merge the row samples x * y into a running mean and sum of squared deviations.");
  m.def(
      "lanczos_step",
      [](py::handle basis, py::handle w, py::handle alpha, py::handle beta, py::handle lengths, int64_t j,
         bool reorthogonalize, bool restart, StreamHandle stream, py::object workspace) {
        auto a = out(basis, "basis", stream), b = out(w, "w", stream), c = out(alpha, "alpha", stream),
             d = out(beta, "beta", stream), e = out(lengths, "lengths", stream);
        binding::CallScope scope(std::move(workspace));
        lanczos_step(a.view, b.view, c.view, d.view, e.view, j, reorthogonalize, restart, stream);
      },
      py::arg("basis"), py::arg("w"), py::arg("alpha"), py::arg("beta"), py::arg("lengths"), py::arg("j"),
      py::arg("reorthogonalize"), py::arg("restart") = false, py::arg("stream") = 0, py::arg("workspace") = py::none(),
      "One Lanczos step on p independent probes.");
  m.def(
      "tridiagonal_eigh",
      [](py::handle alpha, py::handle beta, py::handle lengths, int64_t steps, py::handle nodes, py::handle vectors,
         StreamHandle stream) {
        auto a = in(alpha, "alpha", stream), b = in(beta, "beta", stream), c = in(lengths, "lengths", stream),
             d = out(nodes, "nodes"), e = out(vectors, "vectors");
        binding::CallScope scope{py::none()};
        tridiagonal_eigh(a.view, b.view, c.view, steps, d.view, e.view, stream);
      },
      py::arg("alpha"), py::arg("beta"), py::arg("lengths"), py::arg("steps"), py::arg("nodes"), py::arg("vectors"),
      py::arg("stream") = 0, "Eigenpairs of the Lanczos tridiagonal matrices.");
  m.def(
      "basis_combination",
      [](py::handle basis, py::handle coefficients, int64_t steps, py::handle o, StreamHandle stream,
         py::object workspace) {
        auto a = in(basis, "basis", stream), b = in(coefficients, "coefficients", stream), c = out(o, "out", stream);
        binding::CallScope scope(std::move(workspace));
        basis_combination(a.view, b.view, steps, c.view, stream);
      },
      py::arg("basis"), py::arg("coefficients"), py::arg("steps"), py::arg("out"), py::arg("stream") = 0,
      py::arg("workspace") = py::none(), "Ritz vectors from a Lanczos basis.");
  m.def(
      "power_step",
      [](py::handle v, py::handle w, py::handle found, StreamHandle stream, py::object workspace) {
        auto a = out(v, "v", stream), b = out(w, "w", stream);
        std::optional<interop::ImportedArray> f;
        if (!found.is_none()) f.emplace(in(found, "found", stream));
        double norm = 0, rayleigh = 0;
        {
          binding::CallScope scope(std::move(workspace));
          rayleigh = power_step(a.view, b.view, f ? &f->view : nullptr, norm, stream);
        }
        return std::make_pair(rayleigh, norm);
      },
      py::arg("v"), py::arg("w"), py::arg("found"), py::arg("stream") = 0, py::arg("workspace") = py::none(),
      "One deflated power-iteration step: (v^T w, |w|).");
}

void register_steps(py::module_& m) {
  m.def(
      "adahessian_step",
      [](const py::list& params, const py::list& grads, const py::list& hessian, const py::list& exp_avg,
         const py::list& exp_avg_sq, double lr, double beta1, double beta2, double eps, double weight_decay,
         double hessian_power, int64_t step, std::vector<int64_t> group_sizes, bool check_finite, StreamHandle stream,
         py::object workspace) {
        AdaHessianOptions o;
        o.lr = lr;
        o.beta1 = beta1;
        o.beta2 = beta2;
        o.eps = eps;
        o.weight_decay = weight_decay;
        o.hessian_power = hessian_power;
        o.step = step;
        o.group_sizes = std::move(group_sizes);
        o.check_finite = check_finite;
        binding::ArrayList p(params, "params", stream, binding::Access::Write), g(grads, "grads", stream),
            h(hessian, "hessian_diag_samples", stream), m1(exp_avg, "exp_avg", stream, binding::Access::Write),
            m2(exp_avg_sq, "exp_avg_sq", stream, binding::Access::Write);
        binding::CallScope scope(std::move(workspace));
        adahessian_step(p.views(), g.views(), h.views(), m1.views(), m2.views(), o, stream);
      },
      py::arg("params"), py::arg("grads"), py::arg("hessian_diag_samples"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
      py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("hessian_power"), py::arg("step"), py::arg("group_sizes"), py::arg("check_finite"), py::arg("stream"),
      py::arg("workspace"), "The fused AdaHessian step over lists of tensors (see curvkit.adahessian_step_).");
  m.def(
      "sophia_step",
      [](const py::list& params, const py::list& grads, const py::list& exp_avg, const py::list& hessian,
         const py::list& estimates, double lr, double beta1, double beta2, double rho, double weight_decay,
         double batch_size, double eps, bool count_wins, bool check_finite, StreamHandle stream, py::object workspace) {
        SophiaOptions o;
        o.lr = lr;
        o.beta1 = beta1;
        o.beta2 = beta2;
        o.rho = rho;
        o.weight_decay = weight_decay;
        o.batch_size = batch_size;
        o.eps = eps;
        o.count_wins = count_wins;
        o.check_finite = check_finite;
        binding::ArrayList p(params, "params", stream, binding::Access::Write), g(grads, "grads", stream),
            m1(exp_avg, "exp_avg", stream, binding::Access::Write),
            h(hessian, "hessian", stream, binding::Access::Write), e(estimates, "hessian_estimate", stream);
        binding::CallScope scope(std::move(workspace));
        return sophia_step(p.views(), g.views(), m1.views(), h.views(), e.views(), o, stream);
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("hessian"), py::arg("hessian_estimate"),
      py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("rho"), py::arg("weight_decay"),
      py::arg("batch_size"), py::arg("eps"), py::arg("count_wins"), py::arg("check_finite"), py::arg("stream"),
      py::arg("workspace"),
      "The fused Sophia step over lists of tensors; the unclipped count (see curvkit.sophia_step_).");
}

}  // namespace

void register_hutchinson(py::module_& m, py::module_& testing) {
  m.def(
      "probes",
      [](py::handle out, const std::string& kind, uint64_t seed, uint64_t offset, py::handle workspace,
         StreamHandle stream) {
        const ProbeKind k = binding::parse_choice(kProbeKinds, kind, "kind");
        interop::ImportedArray o = interop::import_output(out, "out", stream);
        std::optional<interop::ImportedArray> ws;
        if (!workspace.is_none()) ws.emplace(interop::import_output(workspace, "workspace", stream));
        binding::CallScope scope{py::none()};
        probes(o.view, k, seed, offset, ws ? &ws->view : nullptr, stream);
      },
      py::arg("out"), py::kw_only(), py::arg("kind"), py::arg("seed"), py::arg("offset"), py::arg("workspace"),
      py::arg("stream"), "Fill `out` with probe vectors (see curvkit.probes).");
  m.def(
      "probes_flat",
      [](const py::list& outs, const std::string& kind, uint64_t seed, const std::vector<uint64_t>& offsets,
         py::handle workspace, StreamHandle stream) {
        const ProbeKind k = binding::parse_choice(kProbeKinds, kind, "kind");
        binding::ArrayList o(outs, "out", stream, binding::Access::Write);
        std::optional<interop::ImportedArray> ws;
        if (!workspace.is_none()) ws.emplace(interop::import_output(workspace, "workspace", stream));
        binding::CallScope scope{py::none()};
        probes_flat(o.views(), k, seed, offsets, ws ? &ws->view : nullptr, stream);
      },
      py::arg("outs"), py::kw_only(), py::arg("kind"), py::arg("seed"), py::arg("offsets"), py::arg("workspace"),
      py::arg("stream"), "Fill each array of `outs` with one flat probe (see curvkit.probes_like).");
  m.def(
      "probes_workspace_size",
      [](const std::vector<int64_t>& shape, const std::string& kind, bool cuda) {
        ArrayView v;
        v.shape = shape;
        return probes_workspace_size(binding::parse_choice(kProbeKinds, kind, "kind"), probe_layout(v), cuda);
      },
      py::arg("shape"), py::arg("kind"), py::arg("cuda"),
      "float64 elements of workspace curvkit.probes needs on the given device.");
  testing.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
        const Philox4x32 r = philox4x32_10(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1]);
        return std::array<uint32_t, 4>{r.v[0], r.v[1], r.v[2], r.v[3]};
      },
      py::arg("counter"), py::arg("key"), "One Philox4x32-10 block (for known-answer tests).");
  testing.def(
      "gaussian_entry",
      [](uint64_t seed, uint64_t probe, uint64_t i) { return probe_math::gaussian_entry(seed, probe, i); },
      py::arg("seed"), py::arg("probe"), py::arg("i"),
      "Entry i of gaussian probe `probe`, from the scalar definition (tests compare the "
      "vectorized kernels against it bit for bit).");
  register_estimators(m);
  register_steps(m);
}

}  // namespace curvkit
