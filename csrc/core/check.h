// Errors that cross into Python with a precise type: TypeError, ValueError, and CudaError
// (RuntimeError) carrying file, line and the CUDA error string. Registered in
// csrc/python/module.cpp. Every check names the argument and what was expected.
#pragma once
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

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

}  // namespace curvkit
