// Errors that cross into Python with a precise type: TypeError, ValueError, and CudaError
// (RuntimeError) carrying file, line and the CUDA error string. Registered in
// csrc/python/module.cpp. Every check names the argument and what was expected.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "core/array.h"

namespace curvkit {

struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Messages are built without iostreams: a stream's locale facets come from whichever
// libstdc++ the process loaded first, and on some machines (a toolchain newer than the
// system's) formatting an int through them crashed at import.
template <class T>
void append_text(std::string& s, const T& v) {
  if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    s += std::string_view(v);
  } else if constexpr (std::is_same_v<T, char>) {
    s += v;
  } else if constexpr (std::is_integral_v<T>) {
    s += std::to_string(v);
  } else if constexpr (std::is_enum_v<T>) {
    s += std::to_string(static_cast<std::underlying_type_t<T>>(v));
  } else {
    static_assert(std::is_floating_point_v<T>, "cat: unsupported argument type");
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
    s += buf;
  }
}

template <class... Args>
std::string cat(const Args&... args) {
  std::string s;
  (append_text(s, args), ...);
  return s;
}

// CK_CHECK_TYPE(cond, "x", " must be float32 or float64, got ", dt.name())
#define CK_CHECK_TYPE(cond, ...)                                          \
  do {                                                                    \
    if (!(cond)) throw ::curvkit::TypeError(::curvkit::cat(__VA_ARGS__)); \
  } while (0)
#define CK_CHECK_VALUE(cond, ...)                                          \
  do {                                                                     \
    if (!(cond)) throw ::curvkit::ValueError(::curvkit::cat(__VA_ARGS__)); \
  } while (0)

// The one "built without CUDA" error, raised for a CUDA array in a build without CUDA kernels.
[[noreturn]] inline void throw_not_built_with_cuda() {
  throw ValueError("curvkit was built without CUDA; CUDA arrays are not supported by this build");
}

// The one CPU/CUDA switch of a family's dispatch (csrc/<family>/<family>.cpp):
//   CK_DEVICE_DISPATCH(a.device, polar_cpu(in, out, o), polar_cuda(in, out, o, stream));
// A build without CUDA compiles no CUDA branch, so the family's CUDA functions need no stubs.
#ifdef CURVKIT_WITH_CUDA
#define CK_DEVICE_DISPATCH(DEVICE, CPU_CALL, CUDA_CALL) \
  do {                                                  \
    if ((DEVICE).is_cuda()) {                           \
      CUDA_CALL;                                        \
    } else {                                            \
      CPU_CALL;                                         \
    }                                                   \
  } while (0)
#else
#define CK_DEVICE_DISPATCH(DEVICE, CPU_CALL, CUDA_CALL) \
  do {                                                  \
    if ((DEVICE).is_cuda())                             \
      ::curvkit::throw_not_built_with_cuda();           \
    else { CPU_CALL; }                                  \
  } while (0)
#endif

inline void check_floating(const ArrayView& a, const char* name) {
  CK_CHECK_TYPE(a.dtype.is_floating(), "argument '", name,
                "' must have dtype float16, bfloat16, float32 or float64, got ", a.dtype.name());
}

inline void check_writable(const ArrayView& a, const char* name) {
  CK_CHECK_VALUE(a.writable, "argument '", name, "' is read-only; an output must be writable");
}

inline void check_same_device(const ArrayView& a, const char* a_name, const ArrayView& b, const char* b_name) {
  CK_CHECK_VALUE(a.device == b.device, "arguments '", a_name, "' and '", b_name, "' must be on the same device, got ",
                 a.device.name(), " and ", b.device.name());
}

// "(2, 3)", "(4,)", "()" for messages.
inline std::string shape_text(const ArrayView& x) {
  std::string s = "(";
  for (int d = 0; d < x.ndim(); ++d) s += (d ? ", " : "") + std::to_string(x.shape[size_t(d)]);
  return s + (x.ndim() == 1 ? ",)" : ")");
}

inline void check_same_shape(const ArrayView& a, const char* a_name, const ArrayView& b, const char* b_name) {
  CK_CHECK_VALUE(a.shape == b.shape, "arguments '", a_name, "' and '", b_name, "' must have the same shape, got ",
                 shape_text(a), " and ", shape_text(b));
}

// Lists passed together (inputs and outputs of a list call) must have one entry each.
inline void check_list_sizes(size_t a, const char* a_name, size_t b, const char* b_name) {
  CK_CHECK_VALUE(a == b, "argument '", b_name, "' must have one array per array of '", a_name, "': got ", b, " for ",
                 a);
}

// A C-contiguous float (..., n, n) stack.
inline void check_square_batch(const ArrayView& a, const char* name) {
  check_floating(a, name);
  CK_CHECK_VALUE(a.ndim() >= 2 && a.size(-1) == a.size(-2), "argument '", name, "' must have shape (..., n, n), got ",
                 shape_text(a));
  CK_CHECK_VALUE(a.is_contiguous(), "argument '", name, "' must be C-contiguous");
}

// An output written with the shape of `a`: float, writable, C-contiguous, on a's device.
inline void check_output_like(const ArrayView& a, const char* a_name, const ArrayView& out, const char* name) {
  check_floating(out, name);
  check_writable(out, name);
  check_same_shape(a, a_name, out, name);
  check_same_device(a, a_name, out, name);
  CK_CHECK_VALUE(out.is_contiguous(), "argument '", name, "' must be C-contiguous");
}

// ---- Outputs that share memory with other arguments

// The bytes [first, last) an array can reach through its strides (first == last: empty).
struct MemoryRange {
  uintptr_t first = 0, last = 0;
};

inline MemoryRange memory_range(const ArrayView& a) {
  if (a.numel() == 0 || a.data == nullptr) return {};
  int64_t low = 0, high = 0;  // element offsets reached
  for (int d = 0; d < a.ndim(); ++d) {
    const int64_t reach = (a.shape[size_t(d)] - 1) * a.strides[size_t(d)];
    (reach < 0 ? low : high) += reach;
  }
  const auto base = reinterpret_cast<uintptr_t>(a.data);
  const int64_t item = a.dtype.itemsize();
  return {base + uintptr_t(low * item), base + uintptr_t((high + 1) * item)};
}

// Whether two arrays may touch the same bytes (their address ranges intersect on one device).
inline bool may_overlap(const ArrayView& a, const ArrayView& b) {
  if (a.device != b.device) return false;
  const MemoryRange x = memory_range(a), y = memory_range(b);
  return x.first < x.last && y.first < y.last && x.first < y.last && y.first < x.last;
}

// A list argument of one call (a single array is a list of one) and its name.
struct NamedArrays {
  const std::vector<ArrayView>& arrays;
  const char* name;
};

// The arrays a call writes must share no memory with each other nor with any array it reads:
// the kernels run the matrices of a list in any order (and on several threads), so
// polar([a, b], out=[b, a]) would read what another matrix already wrote. An argument that is
// both read and written (polar_update_'s param, a basis refined in place) is listed once, as
// an output. Raises ValueError naming both arguments (and their list entries). One sort and
// one sweep over the address ranges, so long lists (an optimizer's parameters) stay cheap.
inline void check_no_overlap(std::initializer_list<NamedArrays> outputs, std::initializer_list<NamedArrays> inputs) {
  struct Entry {
    MemoryRange range;
    int device_kind, device_id;
    const NamedArrays* list;
    size_t index;
    bool output;
  };
  std::vector<Entry> entries;
  const auto add = [&](const NamedArrays& l, bool output) {
    for (size_t i = 0; i < l.arrays.size(); ++i) {
      const ArrayView& a = l.arrays[i];
      const MemoryRange r = memory_range(a);
      if (r.first < r.last)
        entries.push_back({r, int(a.device.kind), a.device.is_cuda() ? a.device.id : 0, &l, i, output});
    }
  };
  for (const NamedArrays& l : outputs) add(l, true);
  for (const NamedArrays& l : inputs) add(l, false);
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.device_kind, a.device_id, a.range.first) < std::tie(b.device_kind, b.device_id, b.range.first);
  });
  const auto where = [](const Entry& e) {
    return e.list->arrays.size() > 1 ? cat("argument '", e.list->name, "' (entry ", e.index, ")")
                                     : cat("argument '", e.list->name, "'");
  };
  // Sweeping by start address: an entry overlaps an earlier one iff it starts before the
  // furthest end so far; the furthest-reaching earlier entry (of any kind, or an output) is then
  // one it overlaps.
  const Entry *reach_any = nullptr, *reach_output = nullptr;
  for (size_t k = 0; k < entries.size(); ++k) {
    const Entry& e = entries[k];
    if (k > 0 && (e.device_kind != entries[k - 1].device_kind || e.device_id != entries[k - 1].device_id))
      reach_any = reach_output = nullptr;
    const Entry* other = e.output ? reach_any : reach_output;
    CK_CHECK_VALUE(!other || other->range.last <= e.range.first, where(*other), " shares memory with ", where(e),
                   "; an output must not overlap an input or another output (pass separate arrays)");
    if (!reach_any || e.range.last > reach_any->range.last) reach_any = &e;
    if (e.output && (!reach_output || e.range.last > reach_output->range.last)) reach_output = &e;
  }
}

// The present entries of an optional per-input list (init, basis), for check_no_overlap.
inline std::vector<ArrayView> present(const std::vector<const ArrayView*>& optional) {
  std::vector<ArrayView> arrays;
  for (const ArrayView* a : optional)
    if (a) arrays.push_back(*a);
  return arrays;
}

}  // namespace curvkit
