// Hutchinson family: Python arguments to the C++ API (hutchinson.h) and results back.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>

#include "hutchinson/hutchinson.h"
#include "hutchinson/probe_math.h"
#include "python/binding.h"

namespace curvkit {

namespace py = pybind11;

namespace {

const binding::Choices<ProbeKind> kProbeKinds = {
    {"rademacher", ProbeKind::Rademacher}, {"gaussian", ProbeKind::Gaussian}, {"sphere", ProbeKind::Sphere}};

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
}

}  // namespace curvkit
