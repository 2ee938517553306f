// Sinkhorn family: entropic optimal transport,
//
//   min_P <C, P> + reg * sum_ij P_ij (log P_ij - 1)   subject to   P 1 = a,  P^T 1 = b,
//
// solved on its dual over the potentials (f, g), with P_ij = exp((f_i + g_j - C_ij) / reg):
//
//   max_{f,g} <a, f> + <b, g> - reg * sum_ij exp((f_i + g_j - C_ij) / reg).
//
// Log-domain Sinkhorn is exact alternating maximization of the dual, one fused log-sum-exp
// pass per half-step (no exp of a positive number, so no overflow at any reg):
//   f_i = reg log a_i - reg LSE_j((g_j - C_ij) / reg),   g_j likewise over the columns.
// The f half-step also yields the row sums of the plan before it, so the L1 marginal error
// ||P 1 - a||_1 + ||P^T 1 - b||_1 (the columns being exact after a g half-step) costs nothing.
//
// Sinkhorn-Newton-Sparse (Tang et al., ICML 2024; docs/sinkhorn.md): Sinkhorn warm-up until
// its linear rate is measured to be slow (or the error is small), then Newton steps on the
// dual with the Hessian -(1/reg) [[diag(P 1), P], [P^T, diag(P^T 1)]], P sparsified by one
// global threshold (the k largest entries kept, the diagonals exact), shifted by a small ridge
// that removes the null direction (1, -1), and solved by Jacobi-preconditioned CG on the
// Schur complement; a backtracking line search on the dual keeps every step an ascent.
//
// Costs come as a matrix (B, n, m) or are computed on the fly from point clouds x (B, n, d)
// and y (B, m, d), never materialized: "sqeuclidean" ||x - y||^2, "euclidean" ||x - y||,
// "l1" ||x - y||_1, "pnorm" ||x - y||_p^p.
#pragma once
#include <cstdint>
#include <vector>

#include "core/array.h"

namespace curvkit {

enum class SinkhornMethod { Auto, Log, SNS };
enum class GroundCost { Matrix, SqEuclidean, Euclidean, L1, PNorm };

// One batch of B problems of one size n x m: a (B, n), b (B, m) and either C (B, n, m) or
// x (B, n, d) and y (B, m, d); every array of one float dtype, C-contiguous, on one device.
struct OTProblems {
  ArrayView a, b, C, x, y;
  GroundCost cost = GroundCost::Matrix;
  double p = 2;  // the exponent of "pnorm"
};

// Outputs of one batch: f (B, n) and g (B, m) the potentials, plan (B, n, m) when wanted; the
// problems' dtype and device.
struct OTOutputs {
  ArrayView f, g;
  const ArrayView* plan = nullptr;
};

struct SinkhornOptions {
  double reg = 0;  // epsilon > 0 (the SNS paper's eta is 1 / reg)
  SinkhornMethod method = SinkhornMethod::Auto;
  double tol = 1e-9;            // on the L1 marginal error
  int64_t max_iters = 10000;    // Sinkhorn iterations (each an f and a g half-step)
  int64_t max_newton = 200;     // Newton steps (SNS)
  double density = 0;           // fraction of the plan kept in the sparse Hessian; 0: automatic
  bool float32_warmup = false;  // Sinkhorn warm-up in float32 arithmetic, Newton in float64
  bool warm_start = false;      // start from the f and g given in the outputs, not from zero
};

struct SinkhornStatus {
  bool converged = false;
  int64_t iterations = 0;    // Sinkhorn iterations
  int64_t newton_steps = 0;  // accepted Newton steps
  double marginal_error = 0, cost = 0, objective = 0;
  SinkhornMethod method = SinkhornMethod::Log;  // the method that ran (Auto resolved)
  bool potentials_overflow = false;             // a finite potential beyond the dtype's range (then not converged)
};

// Solves every problem of every batch (a list of batches of different sizes, solved in one
// parallel schedule); one status per problem, per batch. Problems that do not converge are
// reported (converged false, their marginal error), their outputs those of the last iterate.
std::vector<std::vector<SinkhornStatus>> sinkhorn(const std::vector<OTProblems>& problems,
                                                  const std::vector<OTOutputs>& outputs, const SinkhornOptions& o,
                                                  StreamHandle stream);

// How far the masses of a and b may differ, relative: rounding each entry to the dtype moves
// a mass by at most u relative, and normalizing in float32 by a float32 sum by a few u more.
inline double mass_tolerance(const DType& dt) {
  if (dt == DType::float64()) return 1e-8;
  if (dt == DType::float32()) return 1e-5;
  return dt == DType::float16() ? 4 * 0x1p-11 : 4 * 0x1p-8;
}

// The entries P_ij >= threshold of the plan of potentials (f, g) (shapes (B, n), (B, m), the
// problems' dtype) of problem `index`, in CSR form (rows in order, columns ascending), without
// forming the dense plan; on CUDA built on the device (on `stream`) and copied to the host.
struct CsrPlan {
  std::vector<int64_t> indptr, indices;
  std::vector<double> values;
};
CsrPlan sinkhorn_sparse_plan(const OTProblems& problems, const ArrayView& f, const ArrayView& g, int64_t index,
                             double reg, double threshold, StreamHandle stream = 0);

// The automatic density of the sparse Hessian for an n x m problem.
double sns_default_density(int64_t n, int64_t m);

// ---- Backends, called once arguments are checked.
namespace sinkhorn_impl {

void solve_cpu(const std::vector<OTProblems>& problems, const std::vector<OTOutputs>& outputs, const SinkhornOptions& o,
               std::vector<std::vector<SinkhornStatus>>& status);
CsrPlan sparse_plan_cpu(const OTProblems& problems, const ArrayView& f, const ArrayView& g, int64_t index, double reg,
                        double threshold);
#ifdef CURVKIT_WITH_CUDA
// Log-domain Sinkhorn and SNS on the device, on the CPU's schedule (sinkhorn/schedule.h).
void solve_cuda(const std::vector<OTProblems>& problems, const std::vector<OTOutputs>& outputs,
                const SinkhornOptions& o, std::vector<std::vector<SinkhornStatus>>& status, StreamHandle stream);
CsrPlan sparse_plan_cuda(const OTProblems& problems, const ArrayView& f, const ArrayView& g, int64_t index, double reg,
                         double threshold, StreamHandle stream);
#endif

}  // namespace sinkhorn_impl
}  // namespace curvkit
