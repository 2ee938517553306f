// Sinkhorn family: the schedule of Sinkhorn-Newton-Sparse, written once for the CPU and CUDA
// solvers: when the Sinkhorn phase hands over to Newton, the log-P histogram that picks the
// sparse Hessian's threshold, and the constants of the Newton phase's line search and density.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/half.h"

namespace curvkit::sns_schedule {

// How the Sinkhorn phase ends when it does not converge.
enum class Handoff { Never, AfterWarmup, WhenSlow };
constexpr int64_t kWarmup = 20;      // SNS's N1 for the random-assignment case
constexpr int64_t kRateWindow = 10;  // iterations over which the linear rate is measured
// Predicted iterations to tolerance that count as slow: a Newton step costs 2-4 Sinkhorn
// iterations (a pass for the plan's sums and histogram, one for the sparse plan, one per
// line-search trial; the CG on ~10 entries a row is cheap beside them) and a handful of steps
// finish from where the rate is first measured. bench/results/sinkhorn_cpu.md: at 30, RegOT's
// Synthetic I n = 1000 stayed with Sinkhorn for 82 iterations, 5.9x the time of handing over.
constexpr double kSlowIterations = 20;

// Whether the Sinkhorn phase hands over to Newton after an iteration of error `error`:
// `iterations` Sinkhorn iterations done before it (all phases), `window_error` the error
// kRateWindow iterations before (0 while the phase has fewer).
CK_HD bool hand_over(Handoff handoff, double error, double window_error, int64_t iterations, double tol) {
  if (handoff == Handoff::AfterWarmup) return iterations >= kWarmup;
  if (handoff != Handoff::WhenSlow || !(window_error > 0)) return false;
  const double rate = pow(error / window_error, 1.0 / double(kRateWindow));
  return rate >= 1 || log(tol / error) / log(rate) > kSlowIterations;
}

// The histogram of log P over [kLogLow, kLogHigh) in bins of 1 / kBinsPerUnit: the Hessian's
// threshold is the lower edge of the bin where the count from the top reaches the entries kept.
constexpr double kLogLow = -80, kLogHigh = 20;
constexpr int kBinsPerUnit = 16;
constexpr int kBins = int(kLogHigh - kLogLow) * kBinsPerUnit;

// The bin of log P = z, or -1 below the histogram (entries below e^kLogLow of a plan of mass ~1
// never matter beside the Hessian's diagonal).
CK_HD int log_bin(double z) {
  if (!(z >= kLogLow)) return -1;
  const double k = (z - kLogLow) * kBinsPerUnit;
  return k >= double(kBins - 1) ? kBins - 1 : int(k);
}

// The log-P threshold that keeps at least `keep` entries.
template <class Count>
CK_HD double threshold_for(const Count* histogram, int64_t keep) {
  int64_t count = 0;
  for (int k = kBins - 1; k >= 0; --k) {
    count += int64_t(histogram[k]);
    if (count >= keep) return kLogLow + double(k) / kBinsPerUnit;
  }
  return kLogLow;
}

// ---- The Newton phase
constexpr int kMaxHalvings = 30;             // line-search halvings before a step counts as failed
constexpr double kArmijo = 1e-4;             // sufficient ascent of the dual, relative to the slope
constexpr int64_t kFallbackIterations = 20;  // Sinkhorn iterations after a failed Newton step
constexpr double kLocalError = 1e-2;         // marginal error (of the mass) where Newton is local
constexpr int64_t kStallSteps = 10;          // accepted steps over which the error must halve

// The ridge that removes the null direction (1, -1), fading as the error does (relative to the mass).
inline double newton_shift(double error, double mass) { return std::fmin(1e-3, error / mass); }

// CG's relative tolerance and step cap for a Newton direction.
inline double cg_tolerance(double error, double mass) { return std::fmax(1e-12, std::fmin(0.1, error / mass)); }
inline int64_t cg_max_steps(int64_t m) { return m > 100 ? m : 100; }

// Whether a line-search trial is accepted: Armijo ascent, or (at rounding level of the dual)
// no loss and a smaller error.
inline bool accept_step(double F_trial, double F, double alpha, double slope, double noise, double err_trial,
                        double err) {
  return F_trial >= F + kArmijo * alpha * slope || (F_trial >= F - noise && err_trial < 0.9 * err);
}

// The density after an accepted step (step count `steps`, after counting it): a poor step near
// the solution is the sparse Hessian's fault: keep more of it; far from the solution damped
// steps are Newton's own. Anywhere, steps that keep the error from halving over kStallSteps mean
// the sparse model misses what matters. `window_error` is updated every kStallSteps steps.
inline double density_after_step(double density, int64_t steps, double alpha, double err_trial, double err, double mass,
                                 double& window_error) {
  if ((alpha < 1 || err_trial > 0.5 * err) && err < kLocalError * mass) density = std::fmin(1.0, 2 * density);
  if (steps % kStallSteps == 0) {
    if (err_trial > 0.5 * window_error) density = std::fmin(1.0, 2 * density);
    window_error = err_trial;
  }
  return density;
}

}  // namespace curvkit::sns_schedule
