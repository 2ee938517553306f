// M-FAC family: Python arguments to the C++ API (mfac.h) and results back.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>

#include "mfac/mfac.h"
#include "python/binding.h"

namespace curvkit {

namespace py = pybind11;

namespace {

const binding::Choices<FisherNormalize> kNormalize = {{"capacity", FisherNormalize::Capacity},
                                                      {"count", FisherNormalize::Count}};

using State = std::tuple<int64_t, int64_t, int64_t, int64_t>;  // size, oldest, count, since_refactor

FisherWindowState to_state(const State& s) { return {std::get<0>(s), std::get<1>(s), std::get<2>(s), std::get<3>(s)}; }

using Status = std::tuple<int64_t, int64_t, bool>;  // fault, pushes accepted before it, result finite

Status to_tuple(const WindowStatus& s) { return {s.fault, s.accepted, s.result_finite}; }

// The optional status word (None: no view).
interop::ImportedArray import_status(py::handle status, StreamHandle stream) {
  if (status.is_none()) return {};
  return interop::import_output(status, "status", stream);
}

// The window's arrays, imported writable (push writes all of them; the others only read).
struct Window {
  interop::ImportedArray G, gram, factor, status;
  Window(py::handle g, py::handle k, py::handle l, py::handle st, StreamHandle stream)
      : G(interop::import_output(g, "G", stream)),
        gram(interop::import_output(k, "gram", stream)),
        factor(interop::import_output(l, "factor", stream)),
        status(import_status(st, stream)) {}
  FisherWindowArrays arrays() const { return {G.view, gram.view, factor.view, status.view}; }
};

struct SparseWindow {
  interop::ImportedArray indices, values, error, gram, factor, status;
  SparseWindow(py::handle i, py::handle v, py::handle e, py::handle k, py::handle l, py::handle st, StreamHandle stream)
      : indices(interop::import_output(i, "indices", stream)),
        values(interop::import_output(v, "values", stream)),
        error(interop::import_output(e, "error", stream)),
        gram(interop::import_output(k, "gram", stream)),
        factor(interop::import_output(l, "factor", stream)),
        status(import_status(st, stream)) {}
  SparseWindowArrays arrays() const {
    return {indices.view, values.view, error.view, gram.view, factor.view, status.view};
  }
};

FisherWindowOptions options(double damp, const std::string& normalize, int64_t refactor_every) {
  FisherWindowOptions o;
  o.damp = damp;
  o.normalize = binding::parse_choice(kNormalize, normalize, "normalize");
  o.refactor_every = refactor_every;
  return o;
}

}  // namespace

void register_mfac(py::module_& m, py::module_& /*testing*/) {
  m.def(
      "fisher_window_push",
      [](py::handle G, py::handle gram, py::handle factor, const State& state, double damp,
         const std::string& normalize, int64_t refactor_every, py::handle status, py::handle g, StreamHandle stream,
         py::object workspace) {
        const FisherWindowOptions o = options(damp, normalize, refactor_every);
        Window w(G, gram, factor, status, stream);
        interop::ImportedArray gi = interop::import_array(g, "g", stream);
        FisherWindowState next;
        {
          binding::CallScope scope(std::move(workspace));
          next = fisher_window_push(w.arrays(), to_state(state), o, gi.view, stream);
        }
        return State{next.size, next.oldest, next.count, next.since_refactor};
      },
      py::arg("G"), py::arg("gram"), py::arg("factor"), py::arg("state"), py::kw_only(), py::arg("damp"),
      py::arg("normalize"), py::arg("refactor_every"), py::arg("status").none(true), py::arg("g"), py::arg("stream"),
      py::arg("workspace"), "Push g into a FisherWindow's arrays; returns the new state (see curvkit.FisherWindow).");
  m.def(
      "fisher_window_ihvp",
      [](py::handle G, py::handle gram, py::handle factor, const State& state, double damp,
         const std::string& normalize, int64_t refactor_every, py::handle status, py::handle x, py::handle out,
         StreamHandle stream, py::object workspace) {
        const FisherWindowOptions o = options(damp, normalize, refactor_every);
        Window w(G, gram, factor, status, stream);
        interop::ImportedArray xi = interop::import_array(x, "x", stream);
        interop::ImportedArray oi = interop::import_output(out, "out", stream);
        binding::CallScope scope(std::move(workspace));
        return to_tuple(fisher_window_ihvp(w.arrays(), to_state(state), o, xi.view, oi.view, stream));
      },
      py::arg("G"), py::arg("gram"), py::arg("factor"), py::arg("state"), py::kw_only(), py::arg("damp"),
      py::arg("normalize"), py::arg("refactor_every"), py::arg("status").none(true), py::arg("x"), py::arg("out"),
      py::arg("stream"), py::arg("workspace"), "out = F^-1 x for a FisherWindow (see curvkit.FisherWindow.ihvp).");
  m.def(
      "fisher_window_diag",
      [](py::handle G, py::handle gram, py::handle factor, const State& state, double damp,
         const std::string& normalize, int64_t refactor_every, py::handle status, py::handle out, StreamHandle stream,
         py::object workspace) {
        const FisherWindowOptions o = options(damp, normalize, refactor_every);
        Window w(G, gram, factor, status, stream);
        interop::ImportedArray oi = interop::import_output(out, "out", stream);
        binding::CallScope scope(std::move(workspace));
        return to_tuple(fisher_window_diag(w.arrays(), to_state(state), o, oi.view, stream));
      },
      py::arg("G"), py::arg("gram"), py::arg("factor"), py::arg("state"), py::kw_only(), py::arg("damp"),
      py::arg("normalize"), py::arg("refactor_every"), py::arg("status").none(true), py::arg("out"), py::arg("stream"),
      py::arg("workspace"), "out = diag(F^-1) for a FisherWindow (see curvkit.FisherWindow.diag).");
  m.def(
      "fisher_window_refactor",
      [](py::handle G, py::handle gram, py::handle factor, const State& state, double damp,
         const std::string& normalize, int64_t refactor_every, py::handle status, StreamHandle stream,
         py::object workspace) {
        const FisherWindowOptions o = options(damp, normalize, refactor_every);
        Window w(G, gram, factor, status, stream);
        binding::CallScope scope(std::move(workspace));
        fisher_window_refactor(w.arrays(), to_state(state), o, stream);
      },
      py::arg("G"), py::arg("gram"), py::arg("factor"), py::arg("state"), py::kw_only(), py::arg("damp"),
      py::arg("normalize"), py::arg("refactor_every"), py::arg("status").none(true), py::arg("stream"),
      py::arg("workspace"), "Refactor a FisherWindow's capacitance matrix from its Gram matrix.");
  m.def(
      "fisher_sparse_window_push",
      [](py::handle indices, py::handle values, py::handle error, py::handle gram, py::handle factor,
         const State& state, double damp, const std::string& normalize, int64_t refactor_every, py::handle status,
         int64_t block_size, int64_t k, py::handle g, StreamHandle stream, py::object workspace) {
        const FisherWindowOptions o = options(damp, normalize, refactor_every);
        SparseOptions so;
        so.block = block_size;
        so.k_per_block = k;
        SparseWindow w(indices, values, error, gram, factor, status, stream);
        interop::ImportedArray gi = interop::import_array(g, "g", stream);
        FisherWindowState next;
        {
          binding::CallScope scope(std::move(workspace));
          next = sparse_window_push(w.arrays(), to_state(state), o, so, gi.view, stream);
        }
        return State{next.size, next.oldest, next.count, next.since_refactor};
      },
      py::arg("indices"), py::arg("values"), py::arg("error"), py::arg("gram"), py::arg("factor"), py::arg("state"),
      py::kw_only(), py::arg("damp"), py::arg("normalize"), py::arg("refactor_every"), py::arg("status").none(true),
      py::arg("block_size"), py::arg("k"), py::arg("g"), py::arg("stream"), py::arg("workspace"),
      "Push g into a SparseFisherWindow's arrays; returns the new state (see curvkit.SparseFisherWindow).");
  m.def(
      "fisher_sparse_window_ihvp",
      [](py::handle indices, py::handle values, py::handle error, py::handle gram, py::handle factor,
         const State& state, double damp, const std::string& normalize, int64_t refactor_every, py::handle status,
         py::handle x, py::handle out, StreamHandle stream, py::object workspace) {
        const FisherWindowOptions o = options(damp, normalize, refactor_every);
        SparseWindow w(indices, values, error, gram, factor, status, stream);
        interop::ImportedArray xi = interop::import_array(x, "x", stream);
        interop::ImportedArray oi = interop::import_output(out, "out", stream);
        binding::CallScope scope(std::move(workspace));
        return to_tuple(sparse_window_ihvp(w.arrays(), to_state(state), o, xi.view, oi.view, stream));
      },
      py::arg("indices"), py::arg("values"), py::arg("error"), py::arg("gram"), py::arg("factor"), py::arg("state"),
      py::kw_only(), py::arg("damp"), py::arg("normalize"), py::arg("refactor_every"), py::arg("status").none(true),
      py::arg("x"), py::arg("out"), py::arg("stream"), py::arg("workspace"), "out = F^-1 x for a SparseFisherWindow.");
  m.def(
      "fisher_window_status",
      [](py::handle status, StreamHandle stream, py::object workspace) {
        interop::ImportedArray si = interop::import_output(status, "status", stream);
        binding::CallScope scope(std::move(workspace));
        return to_tuple(fisher_window_status(si.view, stream));
      },
      py::arg("status"), py::kw_only(), py::arg("stream"), py::arg("workspace"),
      "Read and clear a window's status word: (fault, pushes accepted before it, True) (see FisherWindow.check).");
  m.def(
      "fisher_ihvp",
      [](py::handle G, py::handle x, py::handle out, double damp, StreamHandle stream, py::object workspace) {
        interop::ImportedArray gi = interop::import_array(G, "G", stream), xi = interop::import_array(x, "x", stream),
                               oi = interop::import_output(out, "out", stream);
        binding::CallScope scope(std::move(workspace));
        fisher_ihvp(gi.view, xi.view, oi.view, damp, stream);
      },
      py::arg("G"), py::arg("x"), py::arg("out"), py::kw_only(), py::arg("damp"), py::arg("stream"),
      py::arg("workspace"), "out = F^-1 x, F = damp I + G^T G / m (see curvkit.fisher_ihvp).");
  m.def(
      "fisher_inverse_diag",
      [](py::handle G, py::handle out, double damp, StreamHandle stream, py::object workspace) {
        interop::ImportedArray gi = interop::import_array(G, "G", stream),
                               oi = interop::import_output(out, "out", stream);
        binding::CallScope scope(std::move(workspace));
        fisher_inverse_diag(gi.view, oi.view, damp, stream);
      },
      py::arg("G"), py::arg("out"), py::kw_only(), py::arg("damp"), py::arg("stream"), py::arg("workspace"),
      "out = diag(F^-1) (see curvkit.fisher_inverse_diag).");
  m.def(
      "fisher_inverse_factor",
      [](py::handle G, py::handle V, double damp, StreamHandle stream, py::object workspace) {
        interop::ImportedArray gi = interop::import_array(G, "G", stream), vi = interop::import_output(V, "V", stream);
        binding::CallScope scope(std::move(workspace));
        fisher_inverse_factor(gi.view, vi.view, damp, stream);
      },
      py::arg("G"), py::arg("V"), py::kw_only(), py::arg("damp"), py::arg("stream"), py::arg("workspace"),
      "V = L^-1 G with F^-1 = (I - V^T V) / damp (see curvkit.fisher_inverse_factor).");
  m.def(
      "fisher_inverse_entries",
      [](py::handle V, py::handle rows, py::handle cols, py::handle out, double damp, StreamHandle stream,
         py::object workspace) {
        interop::ImportedArray vi = interop::import_array(V, "V", stream),
                               ri = interop::import_array(rows, "rows", stream),
                               ci = interop::import_array(cols, "cols", stream),
                               oi = interop::import_output(out, "out", stream);
        binding::CallScope scope(std::move(workspace));
        fisher_inverse_entries(vi.view, ri.view, ci.view, oi.view, damp, stream);
      },
      py::arg("V"), py::arg("rows"), py::arg("cols"), py::arg("out"), py::kw_only(), py::arg("damp"), py::arg("stream"),
      py::arg("workspace"), "Entries of F^-1 from V (see curvkit.fisher_inverse_entries).");
  m.def(
      "fisher_ihvp_blocks",
      [](py::handle G, py::handle x, py::handle out, double damp, int64_t block, StreamHandle stream,
         py::object workspace) {
        interop::ImportedArray gi = interop::import_array(G, "G", stream), xi = interop::import_array(x, "x", stream),
                               oi = interop::import_output(out, "out", stream);
        binding::CallScope scope(std::move(workspace));
        fisher_ihvp_blocks(gi.view, xi.view, oi.view, damp, block, stream);
      },
      py::arg("G"), py::arg("x"), py::arg("out"), py::kw_only(), py::arg("damp"), py::arg("block_size"),
      py::arg("stream"), py::arg("workspace"), "Blockwise F^-1 x (see curvkit.fisher_ihvp).");
  m.def(
      "fisher_inverse_diag_blocks",
      [](py::handle G, py::handle out, double damp, int64_t block, StreamHandle stream, py::object workspace) {
        interop::ImportedArray gi = interop::import_array(G, "G", stream),
                               oi = interop::import_output(out, "out", stream);
        binding::CallScope scope(std::move(workspace));
        fisher_inverse_diag_blocks(gi.view, oi.view, damp, block, stream);
      },
      py::arg("G"), py::arg("out"), py::kw_only(), py::arg("damp"), py::arg("block_size"), py::arg("stream"),
      py::arg("workspace"), "Blockwise diag(F^-1) (see curvkit.fisher_inverse_diag).");
}

}  // namespace curvkit
