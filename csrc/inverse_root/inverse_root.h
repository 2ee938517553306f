// Inverse roots and eigenbases: the Shampoo / SOAP preconditioner core.
//
// matrix_inverse_root: X = (A + eps I)^{-1/p} for symmetric positive semidefinite A, p >= 1.
//   Eigh:   LAPACK syevd of A; eigenvalues floored at 0 and shifted by eps, w <- max(w, 0) + eps;
//           X = (V diag(w^{-1/(2p)})) (V diag(w^{-1/(2p)}))^T, one syrk (half a plain product).
//           The floor is what optimizers need: a factor accumulated in float32 is PSD only up to
//           its accumulated rounding, which can reach 1e-3 of its largest eigenvalue
//           (Distributed Shampoo shifts its spectrum likewise). status.negative reports the
//           most negative eigenvalue over the largest magnitude; beyond -numerics::kIndefinite
//           (1e-2) the input is indefinite, a failure. Rank-deficient and ill-conditioned inputs
//           are not failures: without eps, eigenvalues below what the compute dtype resolves
//           (n u w_max) are zeros and get the pseudo-inverse; with eps they get
//           (max(w, 0) + eps)^{-1/p}; status.unresolved counts them either way.
//   Newton: the coupled iteration of Scalable Shampoo / Distributed Shampoo:
//           X_0 = z^{1/p} I, M_0 = z (A + eps I), z = (p + 1) / (2 lambda), lambda an upper
//           estimate of the largest eigenvalue (10 power steps, x1.25, capped by
//           min(||A||_F, ||A||_inf)); M' = ((p + 1) I - M) / p, X <- X M', M <- M'^p M
//           (M = X^p (A + eps I) in exact arithmetic), until ||M - I||_max reaches rounding level. Once
//           the error is below 1, a step that grows it by more than 1.2x stops the iteration
//           (the previous iterate is kept). Warm start: X_0 = init, M_0 = init^p (A + eps I);
//           it keeps the part of init's error that does not commute with A. Converged: the
//           true residual ||X^p (A + eps I) - I||_max of the final X is <= tol.
//   Warm start (Eigh): a basis of eigenvectors of a nearby matrix (the previous refresh's) is
//           refined by the Ogita-Aishima iteration (3 matrix products a step, the error
//           squared each step; groups of nearly equal eigenvalues whose vectors mixed are
//           diagonalized exactly), falling back to syevd when it is too far off.
//   Failure policy (per matrix): Newton that misses tol falls back to Eigh in float64 (when
//   fallback is on); if that fails too, init is kept when given, else the (finite) result is
//   returned and reported as not converged. Never NaN or Inf.
// Computes in float64 for float64 input, float32 otherwise.
#pragma once
#include <optional>
#include <vector>

#include "core/array.h"

namespace curvkit {

// Auto: Eigh on the CPU (faster there at every size measured) and wherever a basis is given;
// Newton on CUDA (products are what GPUs do fastest).
enum class RootMethod { Auto, Eigh, Newton };

struct RootOptions {
  int p = 2;
  double eps = 0;
  RootMethod method = RootMethod::Auto;
  int max_iters = 100;
  // Newton: on ||X^p (A + eps I) - I||_max. Unset: the default of the inputs' compute dtypes,
  // 1e-8 for float64 and 1e-3 for float32 (the loosest of those present in the call).
  std::optional<double> tol;
  bool fallback = true;           // Newton failure -> Eigh in float64
  bool compute_residual = false;  // Eigh: also report ||X^p (A + eps I) - I||_max (a few n^3 flops)
};

struct RootStatus {
  bool converged = false;
  int iterations = 0;
  double residual = -1;                  // ||X^p (A + eps I) - I||_max; -1 when not measured
  RootMethod method = RootMethod::Eigh;  // the method that produced the result
  bool fell_back = false;
  bool kept_init = false;
  double products = 0;  // n x n matrix products spent (a symmetric one, syrk / gemmt, counts 0.5)
  double negative = 0;  // Eigh: min(w_min, 0) / w_max, the eigenvalues floored to 0 (0: none)
  int unresolved = 0;   // Eigh: eigenvalues (floored, + eps) at or below n u w_max, below what the
                        // compute dtype resolves: the root is unreliable in those directions
};

// Products of b^p by binary powering: floor(log2 p) squarings, popcount(p) - 1 multiplications.
inline int power_products(int p) {
  int squarings = 0, ones = 0;
  for (int e = p; e > 0; e >>= 1) {
    ones += e & 1;
    squarings += e > 1;
  }
  return squarings + ones - 1;
}

struct EighStatus {
  bool converged = false;
  int iterations = -1;  // refinement steps from the given basis; -1: decomposed from scratch
};

struct BasisStatus {
  bool converged = false;    // the factorization succeeded and the basis kept full column rank
  bool full_rank = true;     // eigenbasis_update: A Q kept its rank in the compute dtype
  double orthogonality = 0;  // orthonormalize_polar: max |Q^T Q - I| of the result (Inf if not finite)
};

// inputs[i] (..., n_i, n_i), all on one device; outputs[i] of the same shape; inits[i] and
// bases[i] (either may be null) too. One status per matrix, input by input. bases[i] (Eigh
// only): eigenvectors of nearby matrices, refined in place (the warm start above) instead of
// decomposing from scratch. outputs must not overlap inputs, inits or bases.
void matrix_inverse_root(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                         const std::vector<const ArrayView*>& inits, const std::vector<const ArrayView*>& bases,
                         const RootOptions& options, std::vector<std::vector<RootStatus>>& status, StreamHandle stream);

// Symmetric eigendecomposition: values[i] (..., n) ascending, vectors[i] (..., n, n) eigenvectors
// as columns; refined from bases[i] (may be null; read only) when given. A failed matrix gets
// zeros and converged = false.
void eigh(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& values,
          const std::vector<ArrayView>& vectors, const std::vector<const ArrayView*>& bases,
          std::vector<std::vector<EighStatus>>& status, StreamHandle stream);

// Orthonormal columns of each q[i] (..., m, k), m >= k, in place, by Householder QR with R's
// diagonal made nonnegative (so the result is the Gram-Schmidt basis of the input, continuous
// in it). converged: LAPACK succeeded and the input had full column rank.
void orthonormalize_qr(const std::vector<ArrayView>& q, std::vector<std::vector<BasisStatus>>& status,
                       StreamHandle stream);

// Orthonormal columns of each q[i] (..., m, k), m >= k, written to out[i] (same shape, any float
// dtype), by `steps` Bjorck passes Q <- 1.5 Q - 0.5 Q Q^T Q (4-bit Shampoo's rectification) on
// Q divided by its RMS singular value ||Q||_F / sqrt(k): the nearest matrix with orthonormal
// columns when the scaled singular values lie in (0, sqrt(3)), at any scale of Q.
// converged: the result is finite and max |Q^T Q - I| <= sqrt(u) of out's dtype (u its unit
// roundoff), so a rank-deficient Q, or one too far from orthogonal for the steps, fails.
void orthonormalize_polar(const std::vector<ArrayView>& q, const std::vector<ArrayView>& out, int steps,
                          std::vector<std::vector<BasisStatus>>& status, StreamHandle stream);

// SOAP's eigenbasis refresh from a previous basis q[i] (..., n, k) of a[i] (..., n, n): the
// eigenvalue estimates d_j = q_j^T A q_j, the columns ordered by d descending (perm: new
// column j is old column perm[j]), then one power step A Q and QR (nonnegative R diagonal).
// A rank-deficient A Q is not a failure: Householder's Q is orthonormal all the same, its last
// columns completing the basis (as SOAP's own QR); status.full_rank says whether the compute
// dtype resolved A Q (SOAP's factors reach condition 1e8, and in float32 the small columns of
// A Q fall below its resolution: pass float64 for those eigenvectors).
// q_out[i] (..., n, k), estimates[i] (..., k) sorted descending, perm[i] (..., k) int64 on the
// host (also for CUDA input).
void eigenbasis_update(const std::vector<ArrayView>& a, const std::vector<ArrayView>& q,
                       const std::vector<ArrayView>& q_out, const std::vector<ArrayView>& estimates,
                       const std::vector<ArrayView>& perm, std::vector<std::vector<BasisStatus>>& status,
                       StreamHandle stream);

// Backends, called by the dispatch in inverse_root.cpp once arguments are checked (and "auto"
// resolved and tol set). The CUDA path writes the roots before a failed matrix's fallback reads
// its input and init again, hence the no-overlap rule above.
void matrix_inverse_root_cpu(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                             const std::vector<const ArrayView*>& inits, const std::vector<const ArrayView*>& bases,
                             const RootOptions& options, std::vector<std::vector<RootStatus>>& status);

// The same on CUDA arrays, on `stream`: matrices grouped by size over the whole list, each
// group iterated in one batch with per-matrix convergence on the device. Bases are refined on
// the device too, except that eigenvalues whose vectors mixed send the matrix to cuSOLVER.
void matrix_inverse_root_cuda(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                              const std::vector<const ArrayView*>& inits, const std::vector<const ArrayView*>& bases,
                              const RootOptions& options, std::vector<std::vector<RootStatus>>& status,
                              StreamHandle stream);

// Per matrix: ok, and `steps` refinement steps (-1: decomposed from scratch by LAPACK).
void eigh_cpu(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& values,
              const std::vector<ArrayView>& vectors, const std::vector<const ArrayView*>& bases,
              std::vector<std::vector<bool>>& ok, std::vector<std::vector<int>>& steps);

// The same on CUDA arrays (cuSOLVER, bases refined on the device), on `stream`.
void eigh_cuda(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& values,
               const std::vector<ArrayView>& vectors, const std::vector<const ArrayView*>& bases,
               std::vector<std::vector<bool>>& ok, std::vector<std::vector<int>>& steps, StreamHandle stream);

void orthonormalize_qr_cpu(const ArrayView& q, std::vector<bool>& ok);
// max |Q^T Q - I| per matrix of q (..., m, k) as stored (Inf where Q is not finite).
void orthogonality_cpu(const ArrayView& q, std::vector<double>& error);
void orthogonality_cuda(const ArrayView& q, std::vector<double>& error, StreamHandle stream);
void orthonormalize_qr_cuda(const ArrayView& q, std::vector<bool>& ok, StreamHandle stream);

// ok: factored, finite, estimates within d's dtype; full_rank: A Q kept its rank in the compute
// dtype (information: a rank-deficient A Q is not a failure).
// ok[i][b] and full_rank[i][b] for matrix b of input i (empty for an input without elements).
void eigenbasis_update_cpu(const std::vector<ArrayView>& a, const std::vector<ArrayView>& q,
                           const std::vector<ArrayView>& q_out, const std::vector<ArrayView>& estimates,
                           const std::vector<ArrayView>& perm, std::vector<std::vector<bool>>& ok,
                           std::vector<std::vector<bool>>& full_rank);
// The same on CUDA arrays (perm on the host: a NumPy array), on `stream`.
void eigenbasis_update_cuda(const std::vector<ArrayView>& a, const std::vector<ArrayView>& q,
                            const std::vector<ArrayView>& q_out, const std::vector<ArrayView>& estimates,
                            const std::vector<ArrayView>& perm, std::vector<std::vector<bool>>& ok,
                            std::vector<std::vector<bool>>& full_rank, StreamHandle stream);

}  // namespace curvkit
