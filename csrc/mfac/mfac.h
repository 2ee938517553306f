// M-FAC family: inverse-(damped empirical Fisher)-vector products from m gradients g_i of
// dimension d,
//
//   F = damp * I + (1/c) sum_i g_i g_i^T = damp * I + G^T G / c,   G the (m, d) stack of rows g_i,
//
// through the Woodbury identity with the m x m capacitance matrix C = c * damp * I + G G^T:
//
//   F^-1 x = (x - G^T C^-1 G x) / damp.
//
// G is stored in float32, bfloat16, float16 or float64; every product with G accumulates in
// float64 and C is held in float64 (its Cholesky factor L, C = L L^T), so the cancellation in
// x - G^T w stays at float64 rounding: against the float64 result on the stored G and x, the
// relative error stays below 1e-14 * kappa (kappa = max ||g||^2 / (c * damp); docs/mfac.md) plus
// the one rounding of the result to its dtype.
//
// Static (pruning; M-FAC's "static" algorithm, oBERT): G given at once, c = m.
// Sliding window (optimization; M-FAC's "dynamic" algorithm): a ring of m rows in caller memory
// with the Gram matrix K = G G^T (float64, by slot) and L (float64, in age order: row 0 the
// oldest gradient). A push writes the new row and its Gram row in one pass over G, removes the
// oldest gradient from L by a rank-one update of the trailing factor (O(m^2)), and appends the
// new one by one triangular solve (O(m^2)); L is refactored from K (O(m^3), no pass over G)
// every `refactor_every` pushes, which bounds drift, and whenever c changes ("count"
// normalization during warm-up).
#pragma once
#include <cstdint>
#include <vector>

#include "core/array.h"

namespace curvkit {

enum class FisherNormalize { Capacity, Count };

// The window's host-side scalars; the Python object keeps them between calls.
struct FisherWindowState {
  int64_t size = 0;            // gradients held, <= capacity
  int64_t oldest = 0;          // slot of the oldest gradient
  int64_t count = 0;           // gradients pushed since the last reset
  int64_t since_refactor = 0;  // pushes since L was last refactored from K
};

struct FisherWindowOptions {
  double damp = 1e-5;
  FisherNormalize normalize = FisherNormalize::Capacity;
  int64_t refactor_every = 0;  // 0: the capacity
};

// Caller-owned arrays of a window of capacity m over dimension d: G (m, d) in the storage dtype,
// gram (m, m) float64, factor (m, m) float64; all C-contiguous, on one device. status: int64
// (2,) on that device, required on CUDA (optional on the CPU, where it stays zero): a push that
// the device refuses (see WindowFault) is a no-op there and is recorded in it, so that no push
// waits for the host.
struct FisherWindowArrays {
  ArrayView G, gram, factor, status;
};

// Why the device refused a push. status[0]: the first refusal since status was last read (and
// every later push is a no-op too, until it is read); status[1]: the pushes accepted since then,
// before that refusal.
enum WindowFault : int64_t {
  kFaultNone = 0,
  kFaultNonFinite = 1,  // g held NaN or Inf: window unchanged
  kFaultKappa = 2,      // ||g||^2 / (c damp) > kMaxKappa: window unchanged
  kFaultBreakdown = 3,  // the refactored capacitance matrix was not positive definite in float64:
                        // G and the Gram matrix hold the gradient, the factor is stale
};
struct WindowStatus {
  int64_t fault = kFaultNone;
  int64_t accepted = 0;
  // CUDA ihvp / diag: whether the result is finite, read in the same copy. Reported rather than
  // thrown, so that the caller always learns the status it has consumed (the CPU throws).
  bool result_finite = true;
};
// Reads and clears a window's status (on CUDA: one synchronization). Without a status array,
// or on the CPU, nothing was recorded: {0, 0}.
WindowStatus fisher_window_status(const ArrayView& status, StreamHandle stream);

// The normalization c for a window holding `size` gradients.
double fisher_window_scale(int64_t capacity, int64_t size, FisherNormalize normalize);

// Ratio ||g||^2 / (c * damp) above which a gradient is refused: beyond it float64 no longer
// holds the capacitance matrix positive definite.
constexpr double kMaxKappa = 1e12;

// Adds g (shape (d,), the storage dtype, finite) to the window, replacing the oldest when full;
// returns the new state. g is checked before anything is written: on the CPU a refused g throws
// and leaves the window as it was; on CUDA the check runs on the device (no synchronization), a
// refused g leaves the window as it was and is recorded in w.status, reported by the next
// ihvp, diag or fisher_window_status.
FisherWindowState fisher_window_push(const FisherWindowArrays& w, const FisherWindowState& state,
                                     const FisherWindowOptions& o, const ArrayView& g, StreamHandle stream);
// out = F^-1 x for x of shape (d,) or (d, k), in the storage dtype; out like x. Returns the
// window's status, read (and cleared) with the result's finiteness check (CUDA: one
// synchronization): when its fault is set, `state` did not describe the window and out is
// meaningless; the caller rolls its state back to the accepted pushes.
WindowStatus fisher_window_ihvp(const FisherWindowArrays& w, const FisherWindowState& state,
                                const FisherWindowOptions& o, const ArrayView& x, const ArrayView& out,
                                StreamHandle stream);
// out (d,) = diag(F^-1); status as fisher_window_ihvp.
WindowStatus fisher_window_diag(const FisherWindowArrays& w, const FisherWindowState& state,
                                const FisherWindowOptions& o, const ArrayView& out, StreamHandle stream);
// Refactors L from K now (after the caller changed damp, or to check drift).
void fisher_window_refactor(const FisherWindowArrays& w, const FisherWindowState& state, const FisherWindowOptions& o,
                            StreamHandle stream);

// Static, c = m (the rows of G). G (m, d); x and out (d,) or (d, k), G's dtype.
void fisher_ihvp(const ArrayView& G, const ArrayView& x, const ArrayView& out, double damp, StreamHandle stream);
// out (d,) = diag(F^-1).
void fisher_inverse_diag(const ArrayView& G, const ArrayView& out, double damp, StreamHandle stream);
// V (m, d) float64 = L^-1 G, so that F^-1 = (I - V^T V) / damp: entries then cost O(m).
void fisher_inverse_factor(const ArrayView& G, const ArrayView& V, double damp, StreamHandle stream);
// out[e] = F^-1[rows[e], cols[e]] = (delta - V[:, r] . V[:, c]) / damp from V of
// fisher_inverse_factor; rows and cols int64 arrays of one length on V's device, out float64.
void fisher_inverse_entries(const ArrayView& V, const ArrayView& rows, const ArrayView& cols, const ArrayView& out,
                            double damp, StreamHandle stream);

// Blockwise: F restricted to the contiguous coordinate blocks [b*B, min((b+1)*B, d)) (the last
// one partial), each block F_b = damp I + G_b^T G_b / m with G_b = G[:, block]; blocks solved
// independently in float64, dense B x B Cholesky when B <= m and Woodbury otherwise (CPU: in
// parallel; CUDA: all blocks of a group in strided-batched cuBLAS products and batched
// cuSOLVER / cuBLAS factorizations and solves).
void fisher_ihvp_blocks(const ArrayView& G, const ArrayView& x, const ArrayView& out, double damp, int64_t block,
                        StreamHandle stream);
void fisher_inverse_diag_blocks(const ArrayView& G, const ArrayView& out, double damp, int64_t block,
                                StreamHandle stream);

// Compressed window (EFCP, Modoranu et al. 2023): each gradient is added to an error-feedback
// buffer e, the buffer's `k_per_block` largest magnitudes in every block of `block` coordinates
// (the last block partial; block = d: one block) are stored as (int32 column, value) pairs, and
// e keeps the rest (and the rounding of the kept values). Columns are absolute int32 indices, so
// no block size overflows them (d < 2^31). F is the Fisher of the densified rows: products equal
// the dense window's on the same rows. Arrays: indices (m, nnz) int32, values (m, nnz) in the
// storage dtype, error (d,) float64 for float64 storage, float32 otherwise, gram and factor
// (m, m) float64, status as FisherWindowArrays'. On CUDA the selection is a radix select per
// block of coordinates (one thread block each) and refused pushes are recorded in status.
struct SparseWindowArrays {
  ArrayView indices, values, error, gram, factor, status;
};
struct SparseOptions {
  int64_t block = 0;        // coordinates per selection block (0: d)
  int64_t k_per_block = 0;  // values kept per block
};
// Values stored per gradient: sum over blocks of min(k_per_block, block length).
int64_t sparse_row_nnz(int64_t d, int64_t block, int64_t k_per_block);
FisherWindowState sparse_window_push(const SparseWindowArrays& w, const FisherWindowState& state,
                                     const FisherWindowOptions& o, const SparseOptions& so, const ArrayView& g,
                                     StreamHandle stream);
WindowStatus sparse_window_ihvp(const SparseWindowArrays& w, const FisherWindowState& state,
                                const FisherWindowOptions& o, const ArrayView& x, const ArrayView& out,
                                StreamHandle stream);

// ---- Backends, called once arguments are checked.
namespace mfac {

// The capacitance system of rows slots[0..n) of G in age order: C = scale * damp * I + K.
struct Capacitance {
  int64_t n = 0;               // rows in use
  std::vector<int64_t> slots;  // age position -> row of G
  double damp = 0, scale = 1;
};

FisherWindowState push_cpu(const FisherWindowArrays& w, const FisherWindowState& state, const FisherWindowOptions& o,
                           const ArrayView& g);
void ihvp_cpu(const FisherWindowArrays& w, const Capacitance& cap, const ArrayView& x, const ArrayView& out);
void diag_cpu(const FisherWindowArrays& w, const Capacitance& cap, const ArrayView& out);
void refactor_cpu(const FisherWindowArrays& w, const Capacitance& cap);
void static_cpu(const ArrayView& G, const ArrayView* x, const ArrayView* out, const ArrayView* diag, const ArrayView* V,
                double damp);
void entries_cpu(const ArrayView& V, const ArrayView& rows, const ArrayView& cols, const ArrayView& out, double damp);
void blocks_cpu(const ArrayView& G, const ArrayView* x, const ArrayView* out, const ArrayView* diag, double damp,
                int64_t block);

FisherWindowState sparse_push_cpu(const SparseWindowArrays& w, const FisherWindowState& state,
                                  const FisherWindowOptions& o, const SparseOptions& so, const ArrayView& g);
void sparse_ihvp_cpu(const SparseWindowArrays& w, const Capacitance& cap, const ArrayView& x, const ArrayView& out);

#ifdef CURVKIT_WITH_CUDA
FisherWindowState push_cuda(const FisherWindowArrays& w, const FisherWindowState& state, const FisherWindowOptions& o,
                            const ArrayView& g, StreamHandle stream);
WindowStatus ihvp_cuda(const FisherWindowArrays& w, const Capacitance& cap, const ArrayView& x, const ArrayView& out,
                       StreamHandle stream);
WindowStatus diag_cuda(const FisherWindowArrays& w, const Capacitance& cap, const ArrayView& out, StreamHandle stream);
WindowStatus status_cuda(const ArrayView& status, StreamHandle stream);
FisherWindowState sparse_push_cuda(const SparseWindowArrays& w, const FisherWindowState& state,
                                   const FisherWindowOptions& o, const SparseOptions& so, const ArrayView& g,
                                   StreamHandle stream);
WindowStatus sparse_ihvp_cuda(const SparseWindowArrays& w, const Capacitance& cap, const ArrayView& x,
                              const ArrayView& out, StreamHandle stream);
void refactor_cuda(const FisherWindowArrays& w, const Capacitance& cap, StreamHandle stream);
void static_cuda(const ArrayView& G, const ArrayView* x, const ArrayView* out, const ArrayView* diag,
                 const ArrayView* V, double damp, StreamHandle stream);
void entries_cuda(const ArrayView& V, const ArrayView& rows, const ArrayView& cols, const ArrayView& out, double damp,
                  StreamHandle stream);
void blocks_cuda(const ArrayView& G, const ArrayView* x, const ArrayView* out, const ArrayView* diag, double damp,
                 int64_t block, StreamHandle stream);
#endif

// The capacitance description of a window's state.
Capacitance window_capacitance(const FisherWindowState& state, int64_t capacity, const FisherWindowOptions& o);

}  // namespace mfac
}  // namespace curvkit
