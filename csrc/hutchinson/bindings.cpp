// Hutchinson family: validation, device dispatch and the Python bindings.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>

#include "core/check.h"
#include "hutchinson/hutchinson.h"
#include "hutchinson/probe_math.h"
#include "python/interop.h"

namespace curvkit {

namespace py = pybind11;

ProbeKind parse_probe_kind(const std::string& kind) {
  if (kind == "rademacher") return ProbeKind::Rademacher;
  if (kind == "gaussian") return ProbeKind::Gaussian;
  if (kind == "sphere") return ProbeKind::Sphere;
  throw ValueError(cat("argument 'kind' must be 'rademacher', 'gaussian' or 'sphere', got '", kind, "'"));
}

ProbeLayout probe_layout(const ArrayView& out) {
  CK_CHECK_VALUE(out.ndim() >= 1, "argument 'out' must have shape (n,) or (..., n, k), got a 0-d array");
  ProbeLayout L;
  L.n = out.size(out.ndim() == 1 ? -1 : -2);
  L.k = out.ndim() == 1 ? 1 : out.size(-1);
  for (int d = 0; d < out.ndim() - 2; ++d) L.batch *= out.shape[d];
  return L;
}

int64_t probes_workspace_size(ProbeKind kind, const ProbeLayout& L, bool cuda) {
  if (!cuda || kind != ProbeKind::Sphere) return 0;
  const int64_t chunks = (L.n + probe_math::kNormChunk - 1) / probe_math::kNormChunk;
  return L.batch * L.k * (chunks + 1);
}

void probes(const ArrayView& out, ProbeKind kind, uint64_t seed, uint64_t offset,
            const ArrayView* workspace, StreamHandle stream) {
  check_floating(out, "out");
  check_writable(out, "out");
  CK_CHECK_VALUE(out.is_contiguous(), "argument 'out' must be C-contiguous");
  const ProbeLayout L = probe_layout(out);
  const uint64_t probes_count = uint64_t(L.batch) * uint64_t(L.k);
  CK_CHECK_VALUE(probes_count == 0 || offset <= UINT64_MAX - (probes_count - 1), "argument 'offset' (", offset,
                 ") plus the number of probes (", probes_count, ") exceeds 2^64");
  if (!out.device.is_cuda()) {
    probes_cpu(out, kind, seed, offset);
    return;
  }
  const int64_t need = probes_workspace_size(kind, L, true);
  double* ws = nullptr;
  if (need > 0) {
    CK_CHECK_VALUE(workspace != nullptr, "argument 'workspace' is required for sphere probes on CUDA (",
                   need, " float64 elements)");
    CK_CHECK_TYPE(workspace->dtype == DType::float64(), "argument 'workspace' must be float64, got ",
                  workspace->dtype.name());
    check_same_device(out, "out", *workspace, "workspace");
    check_writable(*workspace, "workspace");
    CK_CHECK_VALUE(workspace->is_contiguous() && workspace->numel() >= need, "argument 'workspace' must be ",
                   "contiguous with at least ", need, " elements");
    ws = workspace->ptr<double>();
  }
  probes_cuda(out, kind, seed, offset, ws, stream);
}

void register_hutchinson(py::module_& m) {
  m.def(
      "probes",
      [](py::handle out, const std::string& kind, uint64_t seed, uint64_t offset, py::handle workspace,
         StreamHandle stream) {
        const ProbeKind k = parse_probe_kind(kind);
        interop::ImportedArray o = interop::import_output(out, "out", stream);
        std::optional<interop::ImportedArray> ws;
        if (!workspace.is_none()) ws.emplace(interop::import_output(workspace, "workspace", stream));
        py::gil_scoped_release release;
        probes(o.view, k, seed, offset, ws ? &ws->view : nullptr, stream);
      },
      py::arg("out"), py::arg("kind"), py::arg("seed"), py::arg("offset"), py::arg("workspace") = py::none(),
      py::arg("stream") = 0, "Fill `out` with probe vectors (see curvkit.probes).");
  m.def(
      "probes_workspace_size",
      [](const std::vector<int64_t>& shape, const std::string& kind, bool cuda) {
        ArrayView v;
        v.shape = shape;
        return probes_workspace_size(parse_probe_kind(kind), probe_layout(v), cuda);
      },
      py::arg("shape"), py::arg("kind"), py::arg("cuda"),
      "float64 elements of workspace curvkit.probes needs on the given device.");
  m.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
        const Philox4x32 r = philox4x32_10(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1]);
        return std::array<uint32_t, 4>{r.v[0], r.v[1], r.v[2], r.v[3]};
      },
      py::arg("counter"), py::arg("key"), "One Philox4x32-10 block (for known-answer tests).");
  m.def(
      "gaussian_entry",
      [](uint64_t seed, uint64_t probe, uint64_t i) { return probe_math::gaussian_entry(seed, probe, i); },
      py::arg("seed"), py::arg("probe"), py::arg("i"),
      "Entry i of gaussian probe `probe`, from the scalar definition (tests compare the "
      "vectorized kernels against it bit for bit).");
}

}  // namespace curvkit
