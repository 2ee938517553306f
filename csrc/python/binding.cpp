#include "python/binding.h"

#include <pythread.h>

namespace curvkit::binding {
namespace {

// The exception a signal handler raised during a call on the main thread, until the
// translator (restore_interrupt) or the call's end (forward_leftover_interrupt) takes it.
struct KeptError {
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
};
KeptError kept;  // only the main thread polls, so only it touches this

unsigned long main_thread_id() {
  static const unsigned long id = [] {
    py::gil_scoped_acquire gil;
    return py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  }();
  return id;
}

bool check_signals() {
  PyGILState_STATE gil = PyGILState_Ensure();
  const bool raised = PyErr_CheckSignals() != 0;
  if (raised) {
    if (kept.type) {  // a second signal while the first is kept: keep the first
      PyErr_Clear();
    } else {
      PyErr_Fetch(&kept.type, &kept.value, &kept.traceback);
    }
  }
  PyGILState_Release(gil);
  return raised;
}

}  // namespace

InterruptHook interrupt_hook() { return PyThread_get_thread_ident() == main_thread_id() ? &check_signals : nullptr; }

void restore_interrupt() {
  if (kept.type) {
    PyErr_Restore(kept.type, kept.value, kept.traceback);
    kept = KeptError{};
  } else {
    PyErr_SetNone(PyExc_KeyboardInterrupt);
  }
}

void forward_leftover_interrupt() {
  if (!kept.type || std::uncaught_exceptions() > 0) return;  // an exception carries it (or another) out
  Py_XDECREF(kept.type);
  Py_XDECREF(kept.value);
  Py_XDECREF(kept.traceback);
  kept = KeptError{};
  PyErr_SetInterrupt();  // Python raises KeyboardInterrupt at its next check
}

ArrayList::ArrayList(const py::list& items, const char* name, StreamHandle stream, Access access, bool optional) {
  arrays_.reserve(items.size());
  for (py::handle item : items) {
    if (optional && item.is_none()) {
      arrays_.emplace_back();
      continue;
    }
    arrays_.emplace_back(access == Access::Write ? interop::import_output(item, name, stream)
                                                 : interop::import_array(item, name, stream));
  }
  for (const auto& a : arrays_) {
    pointers_.push_back(a ? &a->view : nullptr);
    if (a) views_.push_back(a->view);
  }
}

}  // namespace curvkit::binding
