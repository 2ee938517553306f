// M-FAC family: argument checks and the one CPU/CUDA dispatch.
#include "mfac/mfac.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "core/check.h"

namespace curvkit {

namespace {

void check_damp(double damp) {
  CK_CHECK_VALUE(std::isfinite(damp) && damp > 0, "argument 'damp' must be a finite number > 0, got ", damp);
}

void check_contiguous(const ArrayView& a, const char* name) {
  CK_CHECK_VALUE(a.is_contiguous(), "argument '", name, "' must be C-contiguous");
}

// G: a (m, d) float stack.
void check_gradients(const ArrayView& G, const char* name) {
  check_floating(G, name);
  CK_CHECK_VALUE(G.ndim() == 2, "argument '", name, "' must have shape (m, d), got ", shape_text(G));
  check_contiguous(G, name);
}

void check_float64_square(const ArrayView& a, const char* name, int64_t m, const ArrayView& G) {
  CK_CHECK_TYPE(a.dtype == DType::float64(), "argument '", name, "' must be float64, got ", a.dtype.name());
  CK_CHECK_VALUE(a.ndim() == 2 && a.size(0) == m && a.size(1) == m, "argument '", name, "' must have shape (", m, ", ",
                 m, "), got ", shape_text(a));
  check_contiguous(a, name);
  check_same_device(G, "G", a, name);
}

// x: (d,) or (d, k) in G's dtype, on G's device; out likewise (when given).
void check_vectors(const ArrayView& G, const ArrayView& x, const char* x_name, const ArrayView* out) {
  const int64_t d = G.size(1);
  CK_CHECK_TYPE(x.dtype == G.dtype, "argument '", x_name, "' must have the gradients' dtype ", G.dtype.name(), ", got ",
                x.dtype.name());
  CK_CHECK_VALUE((x.ndim() == 1 || x.ndim() == 2) && x.size(0) == d, "argument '", x_name, "' must have shape (", d,
                 ",) or (", d, ", k), got ", shape_text(x));
  check_same_device(G, "G", x, x_name);
  check_contiguous(x, x_name);
  if (out) {
    check_output_like(x, x_name, *out, "out");
    CK_CHECK_TYPE(out->dtype == x.dtype, "argument 'out' must have dtype ", x.dtype.name(), ", got ",
                  out->dtype.name());
  }
}

void check_diag_out(const ArrayView& G, const ArrayView& out) {
  check_writable(out, "out");
  CK_CHECK_TYPE(out.dtype == G.dtype, "argument 'out' must have dtype ", G.dtype.name(), ", got ", out.dtype.name());
  CK_CHECK_VALUE(out.ndim() == 1 && out.size(0) == G.size(1), "argument 'out' must have shape (", G.size(1), ",), got ",
                 shape_text(out));
  check_same_device(G, "G", out, "out");
  check_contiguous(out, "out");
}

// The optional status word: int64 (2,) on the window's device; required on CUDA.
void check_status(const ArrayView& status, const ArrayView& like, const char* like_name) {
  if (status.data == nullptr) {
    CK_CHECK_VALUE(!like.device.is_cuda(), "argument 'status' (an int64 array of shape (2,)) is required for a ",
                   "window on CUDA");
    return;
  }
  CK_CHECK_TYPE(status.dtype == (DType{DTypeCode::Int, 64}), "argument 'status' must be int64, got ",
                status.dtype.name());
  CK_CHECK_VALUE(status.ndim() == 1 && status.size(0) == 2, "argument 'status' must have shape (2,), got ",
                 shape_text(status));
  check_contiguous(status, "status");
  check_writable(status, "status");
  check_same_device(like, like_name, status, "status");
}

void check_window(const FisherWindowArrays& w, const FisherWindowState& s, const FisherWindowOptions& o) {
  check_gradients(w.G, "G");
  check_writable(w.G, "G");
  const int64_t m = w.G.size(0);
  CK_CHECK_VALUE(m >= 1 && w.G.size(1) >= 1, "argument 'G' must have m >= 1 rows and d >= 1 columns, got ",
                 shape_text(w.G));
  check_float64_square(w.gram, "gram", m, w.G);
  check_float64_square(w.factor, "factor", m, w.G);
  check_writable(w.gram, "gram");
  check_writable(w.factor, "factor");
  check_damp(o.damp);
  CK_CHECK_VALUE(o.refactor_every >= 0, "argument 'refactor_every' must be >= 0, got ", o.refactor_every);
  CK_CHECK_VALUE(
      s.size >= 0 && s.size <= m && s.oldest >= 0 && s.oldest < m && s.count >= s.size && s.since_refactor >= 0,
      "the window state (size ", s.size, ", oldest ", s.oldest, ", count ", s.count, ") does not fit its capacity ", m);
  check_status(w.status, w.G, "G");
  const std::vector<ArrayView> state{w.G, w.gram, w.factor};
  check_no_overlap({{state, "window arrays"}}, {});
}

}  // namespace

WindowStatus fisher_window_status(const ArrayView& status, StreamHandle stream) {
  if (status.data == nullptr) return {};
  check_status(status, status, "status");
  (void)stream;
  WindowStatus result;
  CK_DEVICE_DISPATCH(status.device, (void)0, result = mfac::status_cuda(status, stream));
  return result;
}

double fisher_window_scale(int64_t capacity, int64_t size, FisherNormalize normalize) {
  if (normalize == FisherNormalize::Count) return double(size > 0 ? size : 1);
  return double(capacity);
}

namespace mfac {

Capacitance window_capacitance(const FisherWindowState& s, int64_t capacity, const FisherWindowOptions& o) {
  Capacitance c;
  c.n = s.size;
  c.damp = o.damp;
  c.scale = fisher_window_scale(capacity, s.size, o.normalize);
  c.slots.resize(size_t(s.size));
  for (int64_t p = 0; p < s.size; ++p) c.slots[size_t(p)] = (s.oldest + p) % capacity;
  return c;
}

}  // namespace mfac

FisherWindowState fisher_window_push(const FisherWindowArrays& w, const FisherWindowState& state,
                                     const FisherWindowOptions& o, const ArrayView& g, StreamHandle stream) {
  check_window(w, state, o);
  CK_CHECK_TYPE(g.dtype == w.G.dtype, "argument 'g' must have the window's dtype ", w.G.dtype.name(), ", got ",
                g.dtype.name());
  CK_CHECK_VALUE(g.ndim() == 1 && g.size(0) == w.G.size(1), "argument 'g' must have shape (", w.G.size(1), ",), got ",
                 shape_text(g));
  check_same_device(w.G, "G", g, "g");
  check_contiguous(g, "g");
  const std::vector<ArrayView> state_arrays{w.G, w.gram, w.factor}, inputs{g};
  check_no_overlap({{state_arrays, "window arrays"}}, {{inputs, "g"}});
  (void)stream;
  FisherWindowState next;
  CK_DEVICE_DISPATCH(w.G.device, next = mfac::push_cpu(w, state, o, g), next = mfac::push_cuda(w, state, o, g, stream));
  return next;
}

WindowStatus fisher_window_ihvp(const FisherWindowArrays& w, const FisherWindowState& state,
                                const FisherWindowOptions& o, const ArrayView& x, const ArrayView& out,
                                StreamHandle stream) {
  check_window(w, state, o);
  check_vectors(w.G, x, "x", &out);
  const std::vector<ArrayView> state_arrays{w.G, w.gram, w.factor}, outs{out}, ins{x};
  check_no_overlap({{outs, "out"}}, {{state_arrays, "window arrays"}, {ins, "x"}});
  const mfac::Capacitance cap = mfac::window_capacitance(state, w.G.size(0), o);
  (void)stream;
  WindowStatus status;
  CK_DEVICE_DISPATCH(w.G.device, mfac::ihvp_cpu(w, cap, x, out), status = mfac::ihvp_cuda(w, cap, x, out, stream));
  return status;
}

WindowStatus fisher_window_diag(const FisherWindowArrays& w, const FisherWindowState& state,
                                const FisherWindowOptions& o, const ArrayView& out, StreamHandle stream) {
  check_window(w, state, o);
  check_diag_out(w.G, out);
  const std::vector<ArrayView> state_arrays{w.G, w.gram, w.factor}, outs{out};
  check_no_overlap({{outs, "out"}}, {{state_arrays, "window arrays"}});
  const mfac::Capacitance cap = mfac::window_capacitance(state, w.G.size(0), o);
  (void)stream;
  WindowStatus status;
  CK_DEVICE_DISPATCH(w.G.device, mfac::diag_cpu(w, cap, out), status = mfac::diag_cuda(w, cap, out, stream));
  return status;
}

void fisher_window_refactor(const FisherWindowArrays& w, const FisherWindowState& state, const FisherWindowOptions& o,
                            StreamHandle stream) {
  check_window(w, state, o);
  const mfac::Capacitance cap = mfac::window_capacitance(state, w.G.size(0), o);
  (void)stream;
  CK_DEVICE_DISPATCH(w.G.device, mfac::refactor_cpu(w, cap), mfac::refactor_cuda(w, cap, stream));
}

void fisher_ihvp(const ArrayView& G, const ArrayView& x, const ArrayView& out, double damp, StreamHandle stream) {
  check_gradients(G, "G");
  check_damp(damp);
  check_vectors(G, x, "x", &out);
  const std::vector<ArrayView> outs{out}, ins{G, x};
  check_no_overlap({{outs, "out"}}, {{ins, "G and x"}});
  (void)stream;
  CK_DEVICE_DISPATCH(G.device, mfac::static_cpu(G, &x, &out, nullptr, nullptr, damp),
                     mfac::static_cuda(G, &x, &out, nullptr, nullptr, damp, stream));
}

void fisher_inverse_diag(const ArrayView& G, const ArrayView& out, double damp, StreamHandle stream) {
  check_gradients(G, "G");
  check_damp(damp);
  check_diag_out(G, out);
  const std::vector<ArrayView> outs{out}, ins{G};
  check_no_overlap({{outs, "out"}}, {{ins, "G"}});
  (void)stream;
  CK_DEVICE_DISPATCH(G.device, mfac::static_cpu(G, nullptr, nullptr, &out, nullptr, damp),
                     mfac::static_cuda(G, nullptr, nullptr, &out, nullptr, damp, stream));
}

void fisher_inverse_factor(const ArrayView& G, const ArrayView& V, double damp, StreamHandle stream) {
  check_gradients(G, "G");
  check_damp(damp);
  check_writable(V, "V");
  CK_CHECK_TYPE(V.dtype == DType::float64(), "argument 'V' must be float64, got ", V.dtype.name());
  check_same_shape(G, "G", V, "V");
  check_same_device(G, "G", V, "V");
  check_contiguous(V, "V");
  const std::vector<ArrayView> outs{V}, ins{G};
  check_no_overlap({{outs, "V"}}, {{ins, "G"}});
  (void)stream;
  CK_DEVICE_DISPATCH(G.device, mfac::static_cpu(G, nullptr, nullptr, nullptr, &V, damp),
                     mfac::static_cuda(G, nullptr, nullptr, nullptr, &V, damp, stream));
}

void fisher_inverse_entries(const ArrayView& V, const ArrayView& rows, const ArrayView& cols, const ArrayView& out,
                            double damp, StreamHandle stream) {
  CK_CHECK_TYPE(V.dtype == DType::float64(), "argument 'V' must be float64 (from fisher_inverse_factor), got ",
                V.dtype.name());
  CK_CHECK_VALUE(V.ndim() == 2, "argument 'V' must have shape (m, d), got ", shape_text(V));
  check_contiguous(V, "V");
  check_damp(damp);
  for (const auto& [a, name] : {std::pair<const ArrayView*, const char*>{&rows, "rows"}, {&cols, "cols"}}) {
    CK_CHECK_TYPE(a->dtype == (DType{DTypeCode::Int, 64}), "argument '", name, "' must be int64, got ",
                  a->dtype.name());
    CK_CHECK_VALUE(a->ndim() == 1, "argument '", name, "' must be 1-D, got shape ", shape_text(*a));
    check_contiguous(*a, name);
    check_same_device(V, "V", *a, name);
  }
  check_same_shape(rows, "rows", cols, "cols");
  CK_CHECK_TYPE(out.dtype == DType::float64(), "argument 'out' must be float64, got ", out.dtype.name());
  check_writable(out, "out");
  check_same_shape(rows, "rows", out, "out");
  check_same_device(V, "V", out, "out");
  check_contiguous(out, "out");
  const std::vector<ArrayView> outs{out}, ins{V, rows, cols};
  check_no_overlap({{outs, "out"}}, {{ins, "V, rows and cols"}});
  (void)stream;
  CK_DEVICE_DISPATCH(V.device, mfac::entries_cpu(V, rows, cols, out, damp),
                     mfac::entries_cuda(V, rows, cols, out, damp, stream));
}

int64_t sparse_row_nnz(int64_t d, int64_t block, int64_t k_per_block) {
  const int64_t b = block > 0 ? block : d;
  if (d <= 0 || b <= 0) return 0;
  const int64_t full_blocks = d / b, rest = d % b;
  return full_blocks * std::min(k_per_block, b) + std::min(k_per_block, rest);
}

namespace {

void check_sparse_window(const SparseWindowArrays& w, const FisherWindowState& s, const FisherWindowOptions& o,
                         const SparseOptions* so) {
  CK_CHECK_TYPE(w.indices.dtype == (DType{DTypeCode::Int, 32}), "argument 'indices' must be int32, got ",
                w.indices.dtype.name());
  CK_CHECK_VALUE(w.indices.ndim() == 2 && w.indices.size(0) >= 1, "argument 'indices' must have shape (m, nnz), got ",
                 shape_text(w.indices));
  check_floating(w.values, "values");
  check_same_shape(w.indices, "indices", w.values, "values");
  const int64_t m = w.indices.size(0);
  const DType err = w.values.dtype == DType::float64() ? DType::float64() : DType::float32();
  CK_CHECK_TYPE(w.error.dtype == err, "argument 'error' must be ", err.name(), ", got ", w.error.dtype.name());
  CK_CHECK_VALUE(w.error.ndim() == 1 && w.error.size(0) >= 1, "argument 'error' must have shape (d,), got ",
                 shape_text(w.error));
  const int64_t d = w.error.size(0);
  CK_CHECK_VALUE(d <= INT32_MAX, "the dimension d (", d, ") exceeds the int32 column indices (2^31-1)");
  if (so) {
    CK_CHECK_VALUE(so->block >= 0 && so->k_per_block >= 1, "arguments 'block_size' (", so->block, ") and 'k' (",
                   so->k_per_block, ") must be >= 0 and >= 1");
    const int64_t nnz = sparse_row_nnz(d, so->block, so->k_per_block);
    CK_CHECK_VALUE(w.indices.size(1) == nnz, "argument 'indices' must have ", nnz, " columns for d = ", d, ", got ",
                   w.indices.size(1));
  }
  for (const auto& [a, name] : {std::pair<const ArrayView*, const char*>{&w.indices, "indices"},
                                {&w.values, "values"},
                                {&w.error, "error"},
                                {&w.gram, "gram"},
                                {&w.factor, "factor"}}) {
    check_contiguous(*a, name);
    check_writable(*a, name);
    check_same_device(w.values, "values", *a, name);
  }
  check_float64_square(w.gram, "gram", m, w.values);
  check_float64_square(w.factor, "factor", m, w.values);
  check_damp(o.damp);
  CK_CHECK_VALUE(o.refactor_every >= 0, "argument 'refactor_every' must be >= 0, got ", o.refactor_every);
  CK_CHECK_VALUE(
      s.size >= 0 && s.size <= m && s.oldest >= 0 && s.oldest < m && s.count >= s.size && s.since_refactor >= 0,
      "the window state (size ", s.size, ", oldest ", s.oldest, ", count ", s.count, ") does not fit its capacity ", m);
  check_status(w.status, w.values, "values");
  const std::vector<ArrayView> state{w.indices, w.values, w.error, w.gram, w.factor};
  check_no_overlap({{state, "window arrays"}}, {});
}

}  // namespace

FisherWindowState sparse_window_push(const SparseWindowArrays& w, const FisherWindowState& state,
                                     const FisherWindowOptions& o, const SparseOptions& so, const ArrayView& g,
                                     StreamHandle stream) {
  check_sparse_window(w, state, o, &so);
  CK_CHECK_TYPE(g.dtype == w.values.dtype, "argument 'g' must have the window's dtype ", w.values.dtype.name(),
                ", got ", g.dtype.name());
  CK_CHECK_VALUE(g.ndim() == 1 && g.size(0) == w.error.size(0), "argument 'g' must have shape (", w.error.size(0),
                 ",), got ", shape_text(g));
  check_same_device(w.values, "values", g, "g");
  check_contiguous(g, "g");
  const std::vector<ArrayView> state_arrays{w.indices, w.values, w.error, w.gram, w.factor}, inputs{g};
  check_no_overlap({{state_arrays, "window arrays"}}, {{inputs, "g"}});
  (void)stream;
  FisherWindowState next;
  CK_DEVICE_DISPATCH(w.values.device, next = mfac::sparse_push_cpu(w, state, o, so, g),
                     next = mfac::sparse_push_cuda(w, state, o, so, g, stream));
  return next;
}

WindowStatus sparse_window_ihvp(const SparseWindowArrays& w, const FisherWindowState& state,
                                const FisherWindowOptions& o, const ArrayView& x, const ArrayView& out,
                                StreamHandle stream) {
  check_sparse_window(w, state, o, nullptr);
  const int64_t d = w.error.size(0);
  CK_CHECK_TYPE(x.dtype == w.values.dtype, "argument 'x' must have the window's dtype ", w.values.dtype.name(),
                ", got ", x.dtype.name());
  CK_CHECK_VALUE((x.ndim() == 1 || x.ndim() == 2) && x.size(0) == d, "argument 'x' must have shape (", d, ",) or (", d,
                 ", k), got ", shape_text(x));
  check_same_device(w.values, "values", x, "x");
  check_contiguous(x, "x");
  check_output_like(x, "x", out, "out");
  CK_CHECK_TYPE(out.dtype == x.dtype, "argument 'out' must have dtype ", x.dtype.name(), ", got ", out.dtype.name());
  const std::vector<ArrayView> state_arrays{w.indices, w.values, w.error, w.gram, w.factor}, outs{out}, ins{x};
  check_no_overlap({{outs, "out"}}, {{state_arrays, "window arrays"}, {ins, "x"}});
  (void)stream;
  const mfac::Capacitance cap = mfac::window_capacitance(state, w.indices.size(0), o);
  WindowStatus status;
  CK_DEVICE_DISPATCH(w.values.device, mfac::sparse_ihvp_cpu(w, cap, x, out),
                     status = mfac::sparse_ihvp_cuda(w, cap, x, out, stream));
  return status;
}

namespace {
void check_block(int64_t block) { CK_CHECK_VALUE(block >= 1, "argument 'block_size' must be >= 1, got ", block); }
}  // namespace

void fisher_ihvp_blocks(const ArrayView& G, const ArrayView& x, const ArrayView& out, double damp, int64_t block,
                        StreamHandle stream) {
  check_gradients(G, "G");
  check_damp(damp);
  check_block(block);
  check_vectors(G, x, "x", &out);
  const std::vector<ArrayView> outs{out}, ins{G, x};
  check_no_overlap({{outs, "out"}}, {{ins, "G and x"}});
  (void)stream;
  CK_DEVICE_DISPATCH(G.device, mfac::blocks_cpu(G, &x, &out, nullptr, damp, block),
                     mfac::blocks_cuda(G, &x, &out, nullptr, damp, block, stream));
}

void fisher_inverse_diag_blocks(const ArrayView& G, const ArrayView& out, double damp, int64_t block,
                                StreamHandle stream) {
  check_gradients(G, "G");
  check_damp(damp);
  check_block(block);
  check_diag_out(G, out);
  const std::vector<ArrayView> outs{out}, ins{G};
  check_no_overlap({{outs, "out"}}, {{ins, "G"}});
  (void)stream;
  CK_DEVICE_DISPATCH(G.device, mfac::blocks_cpu(G, nullptr, nullptr, &out, damp, block),
                     mfac::blocks_cuda(G, nullptr, nullptr, &out, damp, block, stream));
}

}  // namespace curvkit
