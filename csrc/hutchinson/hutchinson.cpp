// Hutchinson family: argument checks and the one CPU/CUDA dispatch.
#include "hutchinson/hutchinson.h"

#include "core/check.h"
#include "hutchinson/probe_math.h"

namespace curvkit {

ProbeLayout probe_layout(const ArrayView& out) {
  CK_CHECK_VALUE(out.ndim() >= 1, "argument 'out' must have shape (n,) or (..., n, k), got a 0-d array");
  ProbeLayout L;
  L.n = out.size(out.ndim() == 1 ? -1 : -2);
  L.k = out.ndim() == 1 ? 1 : out.size(-1);
  for (int d = 0; d < out.ndim() - 2; ++d) L.batch *= out.shape[size_t(d)];
  return L;
}

int64_t probes_workspace_size(ProbeKind kind, const ProbeLayout& L, bool cuda) {
  if (!cuda || kind != ProbeKind::Sphere) return 0;
  const int64_t chunks = (L.n + probe_math::kNormChunk - 1) / probe_math::kNormChunk;
  return L.batch * L.k * (chunks + 1);
}

void probes(const ArrayView& out, ProbeKind kind, uint64_t seed, uint64_t offset, const ArrayView* workspace,
            StreamHandle stream) {
  check_floating(out, "out");
  check_writable(out, "out");
  CK_CHECK_VALUE(out.is_contiguous(), "argument 'out' must be C-contiguous");
  const ProbeLayout L = probe_layout(out);
  const uint64_t probes_count = uint64_t(L.batch) * uint64_t(L.k);
  CK_CHECK_VALUE(probes_count == 0 || offset <= UINT64_MAX - (probes_count - 1), "argument 'offset' (", offset,
                 ") plus the number of probes (", probes_count, ") exceeds 2^64");
  const int64_t need = probes_workspace_size(kind, L, out.device.is_cuda());
  double* ws = nullptr;
  if (need > 0) {
    CK_CHECK_VALUE(workspace != nullptr, "argument 'workspace' is required for sphere probes on CUDA (", need,
                   " float64 elements)");
    CK_CHECK_TYPE(workspace->dtype == DType::float64(), "argument 'workspace' must be float64, got ",
                  workspace->dtype.name());
    check_same_device(out, "out", *workspace, "workspace");
    check_writable(*workspace, "workspace");
    CK_CHECK_VALUE(workspace->is_contiguous() && workspace->numel() >= need, "argument 'workspace' must be ",
                   "contiguous with at least ", need, " elements");
    ws = workspace->ptr<double>();
    const std::vector<ArrayView> outs{out}, workspaces{*workspace};
    check_no_overlap({{outs, "out"}, {workspaces, "workspace"}}, {});
  }
  CK_DEVICE_DISPATCH(out.device, probes_cpu(out, kind, seed, offset), probes_cuda(out, kind, seed, offset, ws, stream));
}

}  // namespace curvkit
