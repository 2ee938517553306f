// Hutchinson family: random probe vectors now; trace, diagonal and spectrum estimators over
// a user matvec build on them.
//
// Probes. out is a contiguous (..., n, k) array holding, for every leading index b, k probe
// vectors of length n as columns (a 1-D out of length n is one probe). Column j of batch b is
// probe q = offset + b*k + j, and entry i of probe q is a fixed function of (seed, q, i),
// drawn from Philox4x32-10 with counter (block, q) and key seed:
//   rademacher: block i/128, bit i%128 of the 128 output bits; set bit -> +1, clear -> -1.
//   gaussian:   block i/2 gives two 64-bit uniforms u in (0,1], t in [0,1); Box-Muller
//               sqrt(-2 ln u) * (cos 2 pi t, sin 2 pi t) gives entries 2(i/2) and 2(i/2)+1.
//   sphere:     the gaussian probe divided by its 2-norm, whose squares are summed in the
//               fixed order of probe_math.h (a zero vector, which needs u = 1 exactly in
//               every pair, becomes e_0).
// Values are computed in float64 with portable arithmetic and rounded once to out's dtype,
// so every dtype holds the rounding of the same float64 probe, and CPU and CUDA agree bit
// for bit. Splitting a call by columns or batches with `offset` gives the same probes.
#pragma once
#include <cstdint>

#include "core/array.h"

namespace curvkit {

enum class ProbeKind { Rademacher, Gaussian, Sphere };

struct ProbeLayout {
  int64_t batch = 1, n = 0, k = 1;
};
ProbeLayout probe_layout(const ArrayView& out);

// float64 elements of device workspace the CUDA kernel needs (sphere only; 0 otherwise).
int64_t probes_workspace_size(ProbeKind kind, const ProbeLayout& layout, bool cuda);

// Validates and dispatches on device. workspace: float64, contiguous, on out's device, at
// least probes_workspace_size elements (CUDA sphere only; may be null otherwise).
void probes(const ArrayView& out, ProbeKind kind, uint64_t seed, uint64_t offset, const ArrayView* workspace,
            StreamHandle stream);

// Backends, called by probes() once arguments are checked.
void probes_cpu(const ArrayView& out, ProbeKind kind, uint64_t seed, uint64_t offset);
void probes_cuda(const ArrayView& out, ProbeKind kind, uint64_t seed, uint64_t offset, double* workspace,
                 StreamHandle stream);

}  // namespace curvkit
