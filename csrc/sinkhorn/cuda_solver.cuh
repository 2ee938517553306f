// Sinkhorn family, CUDA: what the batch solver (cuda.cu: checks, Sinkhorn phases, final pass)
// and the Newton phase (cuda_newton.cu) share: the costs, the per-problem state and its phase
// codes, and the two entry points each gives the other.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "core/half.h"
#include "sinkhorn/ot_math.h"
#include "sinkhorn/schedule.h"
#include "sinkhorn/sinkhorn.h"

namespace curvkit::sinkhorn_impl::on_device {

using sns_schedule::Handoff;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kCheckEvery = 16;  // iterations (Sinkhorn or CG) between host checks
constexpr unsigned kFullMask = 0xffffffffu;

// Column kernels run 32 columns a block with their rows split over kRowGroups thread rows (the
// partial results merged in a fixed order): a thread per column alone leaves most of the device
// idle when B m is a few thousand, and each warp still reads 32 consecutive costs of one row.
constexpr int kRowGroups = 16;
inline dim3 column_block() { return dim3(32, kRowGroups); }
inline unsigned column_grid(int64_t columns) { return unsigned((columns + 31) / 32); }

#ifdef __CUDACC__
// The sum of v over the block's thread rows, for column threadIdx.x: valid in thread row 0
// (every thread calls it).
__device__ inline double column_sum(double v) {
  __shared__ double part[kRowGroups][32];
  part[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  double s = 0;
  if (threadIdx.y == 0)
    for (int k = 0; k < kRowGroups; ++k) s += part[k][threadIdx.x];
  return s;
}
#endif

// The costs of one batch: C (B, n, m) or points x (B, n, d), y (B, m, d), in the storage type.
template <class S>
struct Costs {
  const S* C;
  const S* x;
  const S* y;
  int64_t n, m, d;
  GroundCost kind;
  double p;
  double scale;  // a power of two: costs, potentials and eps are solved multiplied by it

  __device__ double operator()(int64_t b, int64_t i, int64_t j) const {
    if (C) return to_double(C[(b * n + i) * m + j]) * scale;
    const S* xi = x + (b * n + i) * d;
    const S* yj = y + (b * m + j) * d;
    double s = 0;
    for (int64_t k = 0; k < d; ++k) s += ot_math::cost_term(kind, to_double(xi[k]) - to_double(yj[k]), p);
    return ot_math::cost_finish(kind, s) * scale;
  }

  static Costs of(const OTProblems& ps, double scale) {
    const bool matrix = ps.cost == GroundCost::Matrix;
    return {matrix ? ps.C.ptr<S>() : nullptr,
            matrix ? nullptr : ps.x.ptr<S>(),
            matrix ? nullptr : ps.y.ptr<S>(),
            ps.a.size(1),
            ps.b.size(1),
            matrix ? 1 : ps.x.size(2),
            ps.cost,
            ps.p,
            scale};
  }

  // The costs of problem b alone, as a batch of one.
  Costs one(int64_t b) const {
    Costs c = *this;
    if (C) c.C = C + b * n * m;
    if (x) c.x = x + b * n * d;
    if (y) c.y = y + b * m * d;
    return c;
  }
};

// What a problem's Sinkhorn phase is doing.
enum PhaseCode : int { kRunning = 0, kMetTol = 1, kFloor = 2, kHanded = 3, kOutOfBudget = 4 };

constexpr int64_t kHistory = sns_schedule::kRateWindow + 1;

struct State {
  double *f, *f_new, *g, *loga, *logb, *a, *b, *row_err;
  int* code;             // per problem, a PhaseCode
  int64_t* iterations;   // per problem: Sinkhorn iterations, every phase
  int64_t* phase_steps;  // per problem: errors measured in this phase
  double* history;       // per problem: the last kHistory errors of this phase, a ring
  const double* stats;   // per problem: mass of a, mass of b, a invalid, b invalid

  // Problem p alone (n rows, m columns), as a batch of one.
  State at(int64_t p, int64_t n, int64_t m) const {
    return {f + p * n,    f_new + p * n,   g + p * m, loga + p * n,   logb + p * m,    a + p * n,
            b + p * m,    row_err + p * n, code + p,  iterations + p, phase_steps + p, history + p * kHistory,
            stats + p * 4};
  }
};

// How the decision kernel ends a problem's phase.
struct Decision {
  Handoff handoff;
  double tol;
  double floor;       // relative to the mass: stop at this error (the float32 warm-up's end); 0: none
  int64_t max_iters;  // Sinkhorn iterations, every phase
};

// Sinkhorn iterations of every running problem of `st` (B problems) in compute type T until none
// runs, each stopping by `rule`; `error` per problem, `running_count` one int of scratch. cuda.cu.
template <class S, class T>
void sinkhorn_phase(const Costs<S>& costs, const State& st, int64_t B, double eps, const Decision& rule, double* error,
                    int* running_count, cudaStream_t stream);

// Marks the one problem of `one` running with a fresh rate window. cuda.cu.
void restart_problem(const State& one, cudaStream_t stream);

// The Newton phase of every problem of the batch whose code (host copy) is kHanded, one after
// another; returns the Newton steps per problem, -1 where none ran. masses: a's per problem.
// cuda_newton.cu.
template <class S>
std::vector<int64_t> newton_phase(const Costs<S>& costs, const State& st, double eps, const SinkhornOptions& o,
                                  const std::vector<int>& codes, const std::vector<double>& masses, int* running_count,
                                  double* error, cudaStream_t stream);

}  // namespace curvkit::sinkhorn_impl::on_device
