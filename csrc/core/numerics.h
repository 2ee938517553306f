// Numerics shared by the CPU and CUDA kernels, written once as host-device inline functions (as
// hutchinson/probe_math.h does for probes): unit roundoffs, distances of an iterate to the
// identity, the stopping rules of the quadratically convergent iterations, and the rounding-level
// thresholds of the eigen-, refinement and QR verdicts. Each is one expression in one order, so a
// host and a device evaluation round alike (FMA contraction is off on both: -ffp-contract=off,
// nvcc --fmad=false). CK_HD (core/half.h) is __host__ __device__ under nvcc, inline otherwise.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/array.h"
#include "core/half.h"

namespace curvkit {

// Unit roundoff u = epsilon / 2 of a compute type: 2^-53 for double, 2^-24 for float.
template <class T>
CK_HD constexpr double unit_roundoff() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value, "a compute type");
  return std::is_same<T, double>::value ? 0x1p-53 : 0x1p-24;
}

// Unit roundoff of a storage dtype (host): float64, float32, float16, bfloat16.
inline double unit_roundoff(const DType& dt) {
  if (dt == DType::float64()) return unit_roundoff<double>();
  if (dt == DType::float32()) return unit_roundoff<float>();
  return dt == DType::float16() ? 0x1p-11 : 0x1p-8;
}

// How far from symmetric an input may be, relative to its largest entry, by input dtype (host):
// only the symmetric part is used, so this catches a matrix that was never meant symmetric
// (off at O(1)) while passing the rounding of accumulation. A factor accumulated in float32
// (an EMA of addmm_ steps: 1.9e-8 measured) and passed as float64 is the optimizer's case.
inline double symmetry_tolerance(const DType& dt) {
  return dt == DType::float64() || dt == DType::float32() ? 1e-4 : 3e-2;
}

namespace numerics {

// ---- Scaling by powers of two (exact), so that no family depends on the magnitude of its input

// The even k for which 2^k amax lies in [0.5, 2) (amax > 0 and finite): scaling by 2^k keeps
// every product clear of overflow and underflow from the subnormals to DBL_MAX, and being even,
// a square root unscales exactly by 2^(-k/2).
CK_HD int even_scale_exponent(double amax) {
  const int e = -ilogb(amax);
  return e - (e & 1);
}

// ---- Distances of an iterate M to the identity

// Entry (i, j) of M - I.
CK_HD double identity_difference(double m, bool diagonal) { return m - (diagonal ? 1.0 : 0.0); }

// |M - I| at one entry as a max-norm takes it: NaN and Inf count as Inf.
CK_HD double identity_gap(double m, bool diagonal) {
  const double d = fabs(identity_difference(m, diagonal));
  return d <= DBL_MAX ? d : INFINITY;
}

// ||M - I||_F / sqrt(n), from the sum of squares of M - I.
CK_HD double rms_distance(double sum_squares, int64_t n) { return sqrt(sum_squares / double(n)); }

// Whether a converged sign iterate B is sign(S) = I, i.e. S positive definite, from the sum of
// squares of B - I: each eigenvalue of S on the wrong side adds 4 (B - I has an eigenvalue -2
// there), so the test holds for any n, however spread the eigenvector.
CK_HD bool definite_sign(double sum_squares) { return sum_squares <= 1.0; }

// ---- Stopping rules of quadratically convergent iterations on a distance r to I

// Once the distance is small (below sqrt(u)), one that no longer falls is at rounding level.
CK_HD bool stalled(double r, double previous, double unit) { return previous < sqrt(unit) && r >= previous; }

// The most steps a sign iteration (square root, Lyapunov) takes. Its iterate starts with every
// eigenvalue x in (0, 1] and multiplies a small one by about 1.5 a step (x (3 - x^2) / 2 for
// Lyapunov's B; the square root's Z Y grows faster), and an input whose condition number is
// below 1/u starts with x >= u / sqrt(n): every eigenvalue passes 1/2 within
// log(sqrt(n) / u) / log(1.5) steps, and the quadratic phase converges within 10 more. An
// iterate still short of I by then holds an eigenvalue at rounding level of 0 (a singular
// input), which no number of steps moves: it has stalled (93 + 10 steps for n = 4 in float64).
CK_HD int sign_step_limit(int64_t n, double unit) {
  return int(ceil(log(sqrt(double(n > 1 ? n : 1)) / unit) / log(1.5))) + 10;
}

// Sign iterations on the rms distance, after `steps` steps: converged at 100 u or once stalled
// near I; a distance above 2 means divergence (indefinite input); no convergence within
// sign_step_limit steps means a singular input (Stalled: stop, not converged).
enum class SignVerdict { GoOn, Converged, Diverged, Stalled };
CK_HD SignVerdict sign_verdict(double r, double previous, double unit, int steps, int limit) {
  if (!(r <= 2.0)) return SignVerdict::Diverged;
  if (r <= 100 * unit || stalled(r, previous, unit)) return SignVerdict::Converged;
  if (steps >= limit) return SignVerdict::Stalled;
  return SignVerdict::GoOn;
}

// Coupled Newton for inverse roots on max|M - I|: rounding level 10 sqrt(n) u.
CK_HD double newton_root_stop(int64_t n, double unit) { return 10 * sqrt(double(n)) * unit; }

// In the convergent region (below 1), a step that grows the error by more than 1.2x ends the
// iteration, and the previous iterate is kept. Only from M_2 on: a step maps every eigenvalue
// in (0, p + 1) into (0, 1], so from M_1 on M - I is negative semidefinite, its largest entry
// is on the diagonal, and no exact step grows a diagonal entry; M_0's entries say nothing of
// its spectrum (eigenvalues up to (p + 1) / 2.5 with max|M_0 - I| below 1: M_1 grew from 0.48
// in 30% of p = 8, condition 1e2 matrices, which then fell back to eigh).
CK_HD bool error_grew(double r, double previous, int iterations) {
  return iterations >= 2 && previous < 1 && r > 1.2 * previous;
}

// Newton stops at rounding level (`stop`: newton_root_stop), once stalled, or at max_iters.
CK_HD bool newton_root_stops(double r, double previous, double stop, double unit, int iterations, int max_iters) {
  return r <= stop || stalled(r, previous, unit) || iterations >= max_iters;
}

// Newton's start: lambda, an upper estimate of the largest eigenvalue, is 1.25 times the power
// steps' Rayleigh quotient capped by `bound` (the bound alone when the quotient is not
// positive); M_0 = z A with z = (p + 1) / (2 lambda).
CK_HD double newton_lambda(double bound, double rayleigh) {
  if (!(rayleigh > 0)) return bound;
  const double estimate = 1.25 * rayleigh;
  return estimate < bound ? estimate : bound;  // std::min(bound, estimate)
}
CK_HD double newton_scale(int p, double lambda) { return (p + 1) / (2 * lambda); }

// ---- Inverse roots from eigenpairs (w ascending, top = max(w_max, 0))

// Eigenvalues (after the floor and eps) at or below n u (top + eps) are not resolved by the
// compute dtype (unit roundoff u): the root is unreliable in their directions. Without a ridge
// (eps = 0) they are taken as zeros and pseudo-inverted (Distributed Shampoo's pseudo-inverse
// uses the same n u relative threshold).
CK_HD double singular_level(int64_t n, double unit, double top, double eps) { return double(n) * unit * (top + eps); }

// The floor's report: min(w_min, 0) / max(|w_min|, |w_max|), in [-1, 0].
CK_HD double negative_ratio(double w_min, double w_max) {
  const double scale = fmax(fabs(w_min), fabs(w_max));
  return w_min < 0 && scale > 0 ? w_min / scale : 0.0;
}

// Negative eigenvalues down to this fraction of the largest magnitude are accumulated rounding
// (measured: 1e-3 for a float32-accumulated Shampoo factor) and floored; beyond it the input is
// indefinite, a failure (its floored root is still returned).
constexpr double kIndefinite = 1e-2;
CK_HD bool clearly_indefinite(double negative) { return negative < -kIndefinite; }

// The column factor of eigenvalue w: lambda^(-1/(2p)) for lambda = max(w, 0) + eps, 0 for a
// numerical zero of an unridged matrix (the pseudo-inverse).
CK_HD double eigen_factor(double w, double eps, double level, int p) {
  const double lambda = (w > 0 ? w : 0.0) + eps;
  return eps == 0 && lambda <= level ? 0.0 : pow(lambda, -0.5 / p);
}

// lambda = max(w, 0) + eps (finite w).
CK_HD double floored_eigenvalue(double w, double eps) { return (w > 0 ? w : 0.0) + eps; }

// ---- Ogita-Aishima refinement of eigenbases (S = V^T A V, R = I - V^T V, d the eigenvalues)

constexpr int kMaxRefineSteps = 8;
constexpr double kCoupledRatio = 0.1;  // |s_ij| beyond this fraction of the gap: coupled

// Rounding level of R (and of S relative to max |d|): 4 sqrt(n) u.
CK_HD double refine_floor(int64_t n, double unit) { return 4 * sqrt(double(n)) * unit; }

// A pair (i, j) whose |s_ij| exceeds both the rounding level and a tenth of the gap d_j - d_i.
CK_HD bool strongly_coupled(double s_abs, double floor_s, double gap) {
  return s_abs > floor_s && s_abs > kCoupledRatio * fabs(gap);
}

// Off-diagonal (i, j) in the first-order regime: a nonzero gap d_j - d_i that exceeds the
// coupling |s_ij| + max(|d_i|, |d_j|) |r_ij| tenfold; then E_ij = (s_ij + d_j r_ij) / gap.
CK_HD bool first_order(double sij, double rij, double di, double dj, bool diagonal) {
  const double gap = dj - di, ai = fabs(di), aj = fabs(dj);
  const double coupling = fabs(sij) + (ai < aj ? aj : ai) * fabs(rij);  // std::max(ai, aj)
  return !diagonal && gap != 0 && coupling <= kCoupledRatio * fabs(gap);
}

// Converged: max_{i != j} |s_ij| and max |r_ij| at rounding level.
CK_HD bool refine_converged(double off, double off_r, double floor_s, double floor_r) {
  return off <= floor_s && off_r <= floor_r;
}

// Too far off to refine: out of steps, the coupling grew, or the basis lost orthogonality.
CK_HD bool refine_too_far(int step, int max_steps, double off, double previous_off, double off_r) {
  return step == max_steps || off > previous_off || off_r > 0.25;
}

// ---- QR

// Full column rank: every |R_jj| above m u ||A||_F.
CK_HD double rank_floor(int64_t m, double unit, double norm) { return double(m) * unit * norm; }

}  // namespace numerics
}  // namespace curvkit
