// The binding toolkit: what every csrc/<family>/bindings.cpp uses to turn Python arguments
// into the C++ API's and its results back. Bindings convert; they do not validate (the
// family's C++ API does, naming the argument) and they do not compute.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/array.h"
#include "core/check.h"
#include "core/interrupt.h"
#include "python/interop.h"

namespace curvkit::binding {

namespace py = pybind11;

enum class Access { Read, Write };

// The arrays of a Python list (None entries allowed where `optional`), imported for the stream
// the kernels run on and kept alive while the object lives. Destroy it with the GIL held.
class ArrayList {
 public:
  ArrayList(const py::list& items, const char* name, StreamHandle stream, Access access = Access::Read,
            bool optional = false);
  ArrayList(const ArrayList&) = delete;
  ArrayList& operator=(const ArrayList&) = delete;

  // The views; only for a list without None entries.
  const std::vector<ArrayView>& views() const { return views_; }
  // One pointer per entry, null where the entry was None.
  const std::vector<const ArrayView*>& optional_views() const { return pointers_; }
  size_t size() const { return pointers_.size(); }

 private:
  std::vector<std::optional<interop::ImportedArray>> arrays_;
  std::vector<ArrayView> views_;
  std::vector<const ArrayView*> pointers_;
};

// The interrupt hook of a call made on Python's main thread (core/interrupt.h): it takes the
// GIL and runs PyErr_CheckSignals; a signal handler's exception (KeyboardInterrupt for
// Ctrl-C) is kept until restore_interrupt() puts it back. Signals reach only the main thread,
// so calls on other threads install no hook and never take the GIL to poll.
InterruptHook interrupt_hook();
// Sets the Python error to the exception the hook kept (KeyboardInterrupt when none); the GIL
// held. The exception translator calls it for curvkit::Interrupted.
void restore_interrupt();
// Drops a kept exception that no Interrupted carried out (the call finished anyway) by
// re-raising the signal for Python's next check; the GIL held.
void forward_leftover_interrupt();

// One native call: the caller's framework serves CUDA workspaces (`workspace` is the allocator
// curvkit._arrays.workspace_allocator made, or None), the kernels may poll for Ctrl-C, and
// the GIL is released. Construct it with the GIL held, after every argument is imported; on
// destruction the GIL is taken back before the workspace blocks go back to the framework.
class CallScope {
 public:
  explicit CallScope(py::object workspace) : workspace_(std::move(workspace)), interrupt_(interrupt_hook()) {}

 private:
  struct Leftover {  // destroyed with the GIL held, after interrupt_
    ~Leftover() { forward_leftover_interrupt(); }
  };
  interop::FrameworkWorkspace workspace_;
  Leftover leftover_;
  InterruptScope interrupt_;
  py::gil_scoped_release release_;  // last: released after, and retaken before, the workspace
};

// A string argument that names one of an enum's values: {{"auto", Method::Auto}, ...}.
template <class E>
using Choices = std::vector<std::pair<const char*, E>>;

template <class E>
E parse_choice(const Choices<E>& choices, const std::string& value, const char* name) {
  std::string names;
  for (const auto& [text, e] : choices) {
    if (value == text) return e;
    names += cat(names.empty() ? "" : ", ", "'", text, "'");
  }
  throw ValueError(cat("argument '", name, "' must be one of ", names, ", got '", value, "'"));
}

template <class E>
const char* choice_name(const Choices<E>& choices, E e) {
  for (const auto& [text, value] : choices)
    if (value == e) return text;
  return "?";
}

// A named per-matrix field of a status struct: a data member or a function of the struct
// returning bool, an integer, a double or a string.
template <class Get>
struct Field {
  const char* name;
  Get get;
};
template <class Get>
Field<Get> field(const char* name, Get get) {
  return {name, get};
}

// The batch dimensions of a (..., m, n) array: the shape of its per-matrix status arrays.
inline std::vector<py::ssize_t> batch_shape(const ArrayView& a) {
  return {a.shape.begin(), a.shape.end() - std::min(a.ndim(), 2)};
}

namespace detail {

template <class Status, class Get>
py::object field_array(const std::vector<Status>& status, const std::vector<py::ssize_t>& shape, const Get& get) {
  using Value = std::decay_t<std::invoke_result_t<const Get&, const Status&>>;
  if constexpr (std::is_same_v<Value, const char*> || std::is_same_v<Value, std::string>) {
    py::list names;
    for (const Status& s : status) names.append(py::str(std::invoke(get, s)));
    return py::module_::import("numpy").attr("array")(names, py::arg("dtype") = "str").attr("reshape")(shape);
  } else {
    using Stored = std::conditional_t<std::is_same_v<Value, int>, int32_t, Value>;
    py::array_t<Stored> out(shape);
    Stored* data = out.mutable_data();
    for (size_t i = 0; i < status.size(); ++i) data[i] = Stored(std::invoke(get, status[i]));
    return std::move(out);
  }
}

}  // namespace detail

// {name: NumPy array shaped like the batch of `input`} for one input's per-matrix statuses.
template <class Status, class... Gets>
py::dict status_dict(const std::vector<Status>& status, const ArrayView& input, const Field<Gets>&... fields) {
  const std::vector<py::ssize_t> shape = batch_shape(input);
  py::dict d;
  ((d[fields.name] = detail::field_array(status, shape, fields.get)), ...);
  return d;
}

// One status dict per input of a list call.
template <class Status, class... Gets>
py::list status_dicts(const std::vector<std::vector<Status>>& status, const std::vector<ArrayView>& inputs,
                      const Field<Gets>&... fields) {
  py::list result;
  for (size_t i = 0; i < inputs.size(); ++i) result.append(status_dict(status[i], inputs[i], fields...));
  return result;
}

}  // namespace curvkit::binding
