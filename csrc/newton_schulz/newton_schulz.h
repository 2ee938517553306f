// Newton–Schulz family: the orthogonal polar factor U V^T of G = U S V^T by odd polynomial
// iterations (Muon and its per-step-optimal successors), batched and over lists of shapes.
//
// polar. For each matrix G (m x n), with r = min(m, n) the short side:
//   X_0 = G / ((norm_scale + norm_eps) ||G||_F)     (G = 0 gives 0; any scale of G gives the
//                                                     same X_0 down to the smallest normals)
//   X_{k+1} = P_k X_k,  P_k = a_k I + b_k A_k + c_k A_k^2,  A_k = X_k X_k^T (r x r)
// (tall inputs iterate on G^T without copying). Each step costs 3 r^2 c + r^3 flops using
// symmetric products (syrk for A and A^2, symm for P X) instead of the 4 r^2 c + 2 r^3 of
// plain products. The Gram route iterates on r x r matrices only: A_{k+1} = A_k P_k^2,
// Q_{k+1} = P_k Q_k, X_K = Q_K X_0 (4 r^3 per step plus r^2 c + 2 r^2 c once). Squaring the
// spectrum loses small singular values in low precision, so it restarts (X = Q X_0,
// A = X X^T, Q = I) every restart_after steps.
//
// Output: out = beta * out + alpha * X_K (alpha = 1, beta = 0 for a plain result; an
// optimizer step param <- (1 - lr wd) param - lr s X_K is alpha = -lr s, beta = 1 - lr wd),
// fused into the last product when out has the compute dtype.
#pragma once
#include <vector>

#include "core/array.h"

namespace curvkit {

struct PolarStep {
  double a, b, c;
};

// Auto: Gram on the CPU for matrices at least kGramMinAspect times longer than wide, Standard
// elsewhere (on CUDA the Gram route's small products do not pay).
enum class PolarMethod { Auto, Standard, Gram };

struct PolarOptions {
  std::vector<PolarStep> steps;
  double norm_scale = 1.0;
  double norm_eps = 1e-7;  // relative guard on the normalization (not a ridge)
  // false: X_0 = G / (its RMS singular value ||G||_F / sqrt(min(m, n))), for Bjorck's
  // rectification of a nearly orthogonal G at any scale.
  bool normalize = true;
  PolarMethod method = PolarMethod::Auto;
  // Gram route: restart after every this many steps (0: never); polar() sets it for the route.
  int restart_after = 0;
  double alpha = 1.0, beta = 0.0;
  // Per input, when not empty (one entry each): these factors instead of alpha and beta (Muon's
  // per-parameter learning rates and shape scales in one call).
  std::vector<double> alphas, betas;
  // false: no NaN/Inf check of the inputs, so no host synchronization on CUDA (the call can be
  // captured in a CUDA graph); a matrix holding NaN or Inf then gives NaN.
  bool check_finite = true;
  // The names errors give the inputs and outputs: polar_update_ calls its outputs 'param',
  // orthonormalize its inputs 'Q'.
  const char* in_name = "G";
  const char* out_name = "out";
};

// inputs[i] (..., m_i, n_i) and outputs[i] of the same shape, any float dtypes, C-contiguous,
// all on one device. float64 inputs compute in float64, all others in float32.
void polar(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs, const PolarOptions& options,
           StreamHandle stream);

// Square roots of symmetric positive (semi)definite A (..., n, n). Only (A + A^T)/2 is used;
// A further from symmetric than a dtype-dependent tolerance is an error. With
// c = min(||A||_F, ||A||_inf) (both bound the largest eigenvalue):
//   NewtonSchulz: coupled iteration Y_0 = A/c, Z_0 = I, T = (3I - Z Y)/2, Y <- Y T, Z <- T Z
//                 (6 n^3 flops a step), until ||I - Z Y||_F/sqrt(n) reaches rounding level
//                 and stops falling; S = sqrt(c) Y, S^{-1} = Z / sqrt(c).
//   Pade:         [5/5] Pade approximant of sqrt(1 - z) at M = I - A/c: S = sqrt(c) Q(M)^{-1} P(M)
//                 (Song et al., "Fast Differentiable Matrix Square Root"); fixed cost, accurate
//                 only for well-conditioned A.
//   Eigh:         LAPACK syevd, S = V diag(max(w, 0)^{1/2}) V^T. Negative eigenvalues down to
//                 -numerics::kIndefinite of the largest magnitude are floored at 0 (an accumulated factor
//                 is PSD only up to its rounding, as for the inverse roots); below, A is
//                 indefinite and not converged.
//   Auto:         Eigh on the CPU (faster there at equal accuracy), NewtonSchulz on CUDA (the
//                 only method there).
// On CPU these compute in float64 for every input dtype: float32 arithmetic loses about
// n * eps32 (2e-6 relative at n = 256, cond 1e3, measured, as float32 eigh does).
// Status per matrix: converged <=> ||S^2 - A||_F / ||A||_F <= tol (for Eigh, tol plus what the
// floor removed, ||A - A_+||_F / ||A||_F), the outputs are finite and, when the inverse is asked
// for, A is numerically nonsingular (and NewtonSchulz converged). With fallback, a matrix that
// NewtonSchulz or Pade failed is redone by Eigh on the CPU (fell_back); CUDA leaves it to the
// caller (the Python layer redoes it with cuSOLVER's eigh).
enum class SqrtMethod { Auto, NewtonSchulz, Pade, Eigh };

struct SqrtOptions {
  SqrtMethod method = SqrtMethod::Auto;
  int max_iters = 100;
  double tol = 1e-8;     // on ||S^2 - A||_F / ||A||_F
  bool fallback = true;  // redo a failed NewtonSchulz / Pade matrix by Eigh (CPU)
};

struct SqrtStatus {
  bool converged = false;
  int iterations = 0;
  double residual = 0;                   // ||S^2 - A||_F / ||A||_F
  SqrtMethod method = SqrtMethod::Auto;  // the method that gave the result
  double negative = 0;                   // Eigh: min(lambda_min, 0) / max |lambda|
  bool fell_back = false;                // the requested method failed; Eigh gave the result
};

// For each input A_i (..., n_i, n_i): sqrt_out[i] = A_i^{1/2} and inv_sqrt_out[i] = A_i^{-1/2},
// either list empty when that result is not wanted; status[i] has one entry per matrix of A_i.
void matrix_sqrt(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& sqrt_out,
                 const std::vector<ArrayView>& inv_sqrt_out, const SqrtOptions& options,
                 std::vector<std::vector<SqrtStatus>>& status, StreamHandle stream);

// X with S X + X S = C for symmetric positive definite S (..., n, n) and any C of the same
// shape: the matrix-sign iteration on [[S, C], [0, -S]] (which tends to [[I, 2X], [0, -I]]),
// as the backward of the square root solves it, run until ||I - B||_F/sqrt(n) stops falling.
// Computed in float64. Status per matrix as for square roots (method NewtonSchulz).
struct LyapunovOptions {
  int max_iters = 100;
};

void solve_lyapunov(const std::vector<ArrayView>& s, const std::vector<ArrayView>& c, const std::vector<ArrayView>& x,
                    const LyapunovOptions& options, std::vector<std::vector<SqrtStatus>>& status, StreamHandle stream);

// Backends, called by the dispatch in newton_schulz.cpp once arguments are checked (and
// "auto" resolved): one array (or list, for polar) on one device.
void polar_cpu(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
               const PolarOptions& options);
void polar_cuda(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                const PolarOptions& options, StreamHandle stream);
void matrix_sqrt_cpu(const ArrayView& a, const ArrayView* sqrt_out, const ArrayView* inv_sqrt_out,
                     const SqrtOptions& options, SqrtStatus* status);
void matrix_sqrt_cuda(const ArrayView& a, const ArrayView* sqrt_out, const ArrayView* inv_sqrt_out,
                      const SqrtOptions& options, SqrtStatus* status, StreamHandle stream);
void solve_lyapunov_cpu(const ArrayView& s, const ArrayView& c, const ArrayView& x, int max_iters,
                        std::vector<SqrtStatus>& status);
void solve_lyapunov_cuda(const ArrayView& s, const ArrayView& c, const ArrayView& x, int max_iters,
                         std::vector<SqrtStatus>& status, StreamHandle stream);

}  // namespace curvkit
