// Hutchinson family: random probe vectors; the linear algebra of the trace, diagonal and
// spectrum estimators over a user matvec; the fused AdaHessian and Sophia steps.
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
#include <vector>

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

// One probe per output (probes_like's list in one call): outs[i], C-contiguous of any shape, gets
// probe number offsets[i] of length numel in C order, as a 1-D probes() would give it. Outputs on
// one device; the workspace is probes()'s, sized for the largest (one stream, reused in turn).
void probes_flat(const std::vector<ArrayView>& outs, ProbeKind kind, uint64_t seed,
                 const std::vector<uint64_t>& offsets, const ArrayView* workspace, StreamHandle stream);

// Backends, called by probes() once arguments are checked.
void probes_cpu(const ArrayView& out, ProbeKind kind, uint64_t seed, uint64_t offset);
void probes_cuda(const ArrayView& out, ProbeKind kind, uint64_t seed, uint64_t offset, double* workspace,
                 StreamHandle stream);

// ---- Estimator cores (trace_estimate, diag_estimate, top_eigenvalues, spectral_density)
//
// The estimators' outer loop calls the user's matvec and lives in Python; the linear algebra
// between matvecs is here. Arrays are C-contiguous and row-major, float32 or float64, one
// dtype per call (bookkeeping arrays named below are float64 or int64), all on one device.
// Notation: n the operator's dimension, k the columns of a probe block, Omega the probes,
// Y = A Omega, Q R = Y the sketch's QR, Z = A Q. Every core also runs on CUDA arrays, on
// `stream` (the float64 and int64 bookkeeping arrays then live on the device too, except the
// outputs of tridiagonal_eigh, which stay on the host). Host synchronizations on CUDA:
// xnystrace_estimates and power_step one each (their results are read on the host),
// tridiagonal_eigh one (the tridiagonal matrices go to the host for LAPACK stev); none in
// lanczos_step and the others.

// q (n, k): columns [0, k0) hold an orthonormal basis; columns [k0, k) hold new sketch
// columns on entry and, on exit, their orthonormal completion (block Gram–Schmidt twice
// against the old basis, then Householder QR). r (k, k) receives the new columns of R
// (columns [k0, k)) and zeros below the old block (rows [k0, k) of columns [0, k0)); its
// block [0, k0) x [0, k0) is left alone, so Y[:, :k] = Q R over calls.
void sketch_qr(const ArrayView& q, const ArrayView& r, int64_t k0, StreamHandle stream = 0);

// XTrace (Epperly, Tropp & Webber 2024): out (k,) float64, the leave-one-out estimates
//   t_i = tr(H) - s_i^T H s_i + scale_i (omega_i^T y_i - 2 (Z^T omega_i)^T v_i + v_i^T H v_i),
// H = Q^T Z, s_i the normalized column i of R^{-T}, v_i = w_i - s_i (s_i^T w_i), w = Q^T Omega.
// Their mean is the XTrace estimate and their spread its standard error. `improved` (probes
// uniform on the sphere of radius sqrt(n)) rescales the residual term by
// scale_i = (n - k + 1) / (n - |w_i|^2 + (s_i^T w_i)^2); otherwise scale_i = 1.
void xtrace_estimates(const ArrayView& omega, const ArrayView& y, const ArrayView& q, const ArrayView& r,
                      const ArrayView& z, bool improved, const ArrayView& out, StreamHandle stream = 0);

// XDiag: mean (n,) and the per-entry variance of the mean (n,) of the k leave-one-out
// diagonal estimates d_i = diag(Q Z^T) - (Q s_i) . (Z s_i) + omega_i . (Q s_i) (s_i^T R e_i),
// both in the dtype of q.
void xdiag_estimates(const ArrayView& omega, const ArrayView& q, const ArrayView& r, const ArrayView& z,
                     const ArrayView& mean, const ArrayView& variance, StreamHandle stream = 0);

// XNysTrace (PSD operators): out (k,) float64 leave-one-out estimates from the Nystrom
// approximation of A + nu I built from Omega and Y = A Omega (y is overwritten),
//   t_i = |B|_F^2 - |B x_i|^2 / |x_i|^2 + 1 / |x_i|^2 - n nu,   B = (Y + nu Omega) C^{-1},
// C the Cholesky factor of Omega^T (Y + nu Omega), x_i column i of C^{-T}, and the stabilizing
// shift nu = relative_shift |Y|_F / sqrt(n). Each t_i is unbiased for tr(A + nu I) - n nu.
// Returns false when Omega^T (Y + nu Omega) is not positive definite (A not PSD).
// On CUDA the n x k work (the shift, Omega^T Y, the QR of Y) runs on the device and the k x k
// leave-one-out algebra on the host.
bool xnystrace_estimates(const ArrayView& omega, const ArrayView& y, double relative_shift, const ArrayView& out,
                         StreamHandle stream = 0);

// out (k,) float64: out[j] = sum_i x_ij y_ij (Hutchinson's quadratic forms).
void column_dots(const ArrayView& x, const ArrayView& y, const ArrayView& out, StreamHandle stream = 0);
// out (n,) in the dtype of x: out[i] = sum_j x_ij y_ij (the diagonal of X Y^T).
void row_dots(const ArrayView& x, const ArrayView& y, const ArrayView& out, StreamHandle stream = 0);
// x (n, p) <- x - Q (Q^T x), twice (q (n, k) orthonormal columns).
void project_out(const ArrayView& q, const ArrayView& x, StreamHandle stream = 0);
// Running per-entry mean and sum of squared deviations (Chan et al.'s update) of the k
// samples x_ij y_ij of each row i, merged into mean (n,) and m2 (n,) which already hold
// `count` samples.
void accumulate_products(const ArrayView& x, const ArrayView& y, int64_t count, const ArrayView& mean,
                         const ArrayView& m2, StreamHandle stream = 0);

// One Lanczos step on p independent starting vectors. basis (p, m + 1, n) holds v_0 .. v_j
// of each probe; w (n, p) holds A v_j on entry and v_{j+1} on exit (the next matvec's input,
// zero after a breakdown); alpha, beta (p, m) float64 receive alpha_j and beta_j; lengths (p,)
// int64 holds each probe's Krylov dimension (j + 1 while it runs; it stops growing at an
// invariant subspace). `reorthogonalize`: full reorthogonalization against the whole basis
// (classical Gram–Schmidt twice); otherwise the three-term recurrence only. A probe whose step
// j - 1 broke down stays stopped, unless `restart`: then the caller has put a new unit vector,
// orthogonal to v_0 .. v_{j-1}, in basis[b, j] and its product in w, and the recurrence goes on
// from there with beta_{j-1} = 0 (the tridiagonal matrix splits into blocks). Norms are
// computed with scaling, so subnormal and huge (1e300) vectors keep their precision.
void lanczos_step(const ArrayView& basis, const ArrayView& w, const ArrayView& alpha, const ArrayView& beta,
                  const ArrayView& lengths, int64_t j, bool reorthogonalize, bool restart = false,
                  StreamHandle stream = 0);

// Eigenpairs of the symmetric tridiagonal matrices with diagonals alpha[b, :len] and
// off-diagonals beta[b, :len-1], len = min(lengths[b], steps) (LAPACK stev): nodes (p, steps)
// ascending, vectors (p, steps, steps) as columns; entries past len are zero. float64. alpha,
// beta and lengths may live on a CUDA device (copied to the host once); nodes and vectors are
// host arrays.
void tridiagonal_eigh(const ArrayView& alpha, const ArrayView& beta, const ArrayView& lengths, int64_t steps,
                      const ArrayView& nodes, const ArrayView& vectors, StreamHandle stream = 0);

// out (p, n, r) = sum_i basis[b, i, :] coefficients[b, i, :] over i < steps: Ritz vectors.
void basis_combination(const ArrayView& basis, const ArrayView& coefficients, int64_t steps, const ArrayView& out,
                       StreamHandle stream = 0);

// One power-iteration step: returns v^T w (the Rayleigh quotient), then w <- w - F (F^T w)
// (F (n, r) the eigenvectors found so far, may be null) and v <- w / |w|. Returns the norm of
// the deflated w in `norm` (0 leaves v unchanged).
double power_step(const ArrayView& v, const ArrayView& w, const ArrayView* found, double& norm,
                  StreamHandle stream = 0);

// ---- Fused optimizer steps over lists of tensors (one call, every tensor)

struct AdaHessianOptions {
  double lr = 0.15, beta1 = 0.9, beta2 = 0.999, eps = 1e-4, weight_decay = 0.0, hessian_power = 1.0;
  int64_t step = 1;
  // NaN or Inf in params, grads or hessian samples raises ValueError naming the argument and the
  // tensor, before anything is written (one read-only pass; on CUDA one host synchronization).
  bool check_finite = true;
  // One per tensor: the contiguous run of elements whose |z . Hz| are averaged (1: none).
  std::vector<int64_t> group_sizes;
};

// For each tensor (all C-contiguous, one shape per index across the lists, one device):
//   D = mean of |h| over each group,  m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) D D,
//   denom = sqrt(v)^k / sqrt(1 - b2^t)^k + eps,  p <- p - lr (m / (1 - b1^t) / denom + wd p),
// h the Hessian-diagonal samples (z . Hz, or Hz for Rademacher z: only |h| is read).
// float64 tensors compute in float64 in exactly this order; other dtypes in float32.
void adahessian_step(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                     const std::vector<ArrayView>& hessian, const std::vector<ArrayView>& exp_avg,
                     const std::vector<ArrayView>& exp_avg_sq, const AdaHessianOptions& options, StreamHandle stream);

struct SophiaOptions {
  double lr = 1e-4, beta1 = 0.965, beta2 = 0.99, rho = 0.04, weight_decay = 0.1, batch_size = 5120, eps = 1e-15;
  bool count_wins = false;  // CUDA: the count needs a host synchronization
  // As AdaHessianOptions::check_finite, over params, grads and the estimates.
  bool check_finite = true;
};

// For each tensor: if estimates are given, h <- b2 h + (1 - b2) e; then
//   p <- p (1 - lr wd),  m <- b1 m + (1 - b1) g,  r = |m| / (rho bs h + eps),
//   p <- p - lr (sign(m) min(r, 1)).
// Returns the number of entries with r < 1 (unclipped) when options.count_wins, else 0.
int64_t sophia_step(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                    const std::vector<ArrayView>& exp_avg, const std::vector<ArrayView>& hessian,
                    const std::vector<ArrayView>& estimates, const SophiaOptions& options, StreamHandle stream);

// The first tensor (lowest index, then the first list of `lists`) holding NaN or Inf, found in
// one read-only pass over the lists (same-shaped C-contiguous tensors, one device); list -1 when
// every entry is finite. CUDA: one host synchronization reads the per-tensor flags back.
struct NonFiniteEntry {
  int list = -1;
  int64_t tensor = -1;
};
NonFiniteEntry first_nonfinite_cpu(const std::vector<const std::vector<ArrayView>*>& lists);
NonFiniteEntry first_nonfinite_cuda(const std::vector<const std::vector<ArrayView>*>& lists, StreamHandle stream);

// Backends of the fused steps.
void adahessian_step_cpu(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                         const std::vector<ArrayView>& hessian, const std::vector<ArrayView>& exp_avg,
                         const std::vector<ArrayView>& exp_avg_sq, const AdaHessianOptions& options);
void adahessian_step_cuda(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                          const std::vector<ArrayView>& hessian, const std::vector<ArrayView>& exp_avg,
                          const std::vector<ArrayView>& exp_avg_sq, const AdaHessianOptions& options,
                          StreamHandle stream);
int64_t sophia_step_cpu(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                        const std::vector<ArrayView>& exp_avg, const std::vector<ArrayView>& hessian,
                        const std::vector<ArrayView>& estimates, const SophiaOptions& options);
int64_t sophia_step_cuda(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                         const std::vector<ArrayView>& exp_avg, const std::vector<ArrayView>& hessian,
                         const std::vector<ArrayView>& estimates, const SophiaOptions& options, StreamHandle stream);

}  // namespace curvkit
