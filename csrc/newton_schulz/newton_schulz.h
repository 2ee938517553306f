// Newton–Schulz family: the orthogonal polar factor U V^T of G = U S V^T by odd polynomial
// iterations (Muon and its per-step-optimal successors), batched and over lists of shapes.
//
// polar. For each matrix G (m x n), with r = min(m, n) the short side:
//   X_0 = G / ((norm_scale + eps) ||G||_F)          (G = 0 gives 0; any scale of G gives the
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

enum class PolarMethod { Standard, Gram };

struct PolarOptions {
  std::vector<PolarStep> steps;
  double norm_scale = 1.0;
  double eps = 1e-7;
  PolarMethod method = PolarMethod::Standard;
  int restart_after = 0;  // Gram route: restart after every this many steps (0: never)
  double alpha = 1.0, beta = 0.0;
};

// inputs[i] (..., m_i, n_i) and outputs[i] of the same shape, any float dtypes, C-contiguous,
// all on one device. float64 inputs compute in float64, all others in float32.
void polar(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
           const PolarOptions& options, StreamHandle stream);

void polar_cpu(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
               const PolarOptions& options);
void polar_cuda(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& outputs,
                const PolarOptions& options, StreamHandle stream);

}  // namespace curvkit
