// Runtime dtype -> compile-time type, as an immediately invoked lambda:
//   CK_DISPATCH_FLOATING(x.dtype, "x", scalar_t, [&] { kernel<scalar_t>(...); });
//   CK_DISPATCH_COMPUTE(x.dtype, T, [&] { solve<T>(...); });  // the compute type
#pragma once
#include <type_traits>

#include "core/array.h"
#include "core/check.h"
#include "core/half.h"

#define CK_DISPATCH_CASE(DT, CTYPE, T, ...) \
  if (_dt == (DT)) {                        \
    using T = CTYPE;                        \
    return __VA_ARGS__();                   \
  }

// float16, bfloat16, float32, float64
#define CK_DISPATCH_FLOATING(DTYPE, NAME, T, ...)                                                          \
  [&] {                                                                                                    \
    const ::curvkit::DType _dt = (DTYPE);                                                                  \
    CK_DISPATCH_CASE(::curvkit::DType::float32(), float, T, __VA_ARGS__)                                   \
    CK_DISPATCH_CASE(::curvkit::DType::float64(), double, T, __VA_ARGS__)                                  \
    CK_DISPATCH_CASE(::curvkit::DType::float16(), ::curvkit::half_t, T, __VA_ARGS__)                       \
    CK_DISPATCH_CASE(::curvkit::DType::bfloat16(), ::curvkit::bfloat16_t, T, __VA_ARGS__)                  \
    throw ::curvkit::TypeError(::curvkit::cat(                                                             \
        "argument '", NAME, "' must have dtype float16, bfloat16, float32 or float64, got ", _dt.name())); \
  }()

// The compute type: T = double for float64 data, float for every other dtype (float16 and
// bfloat16 accumulate in float32). Returns what the body returns.
#define CK_DISPATCH_COMPUTE(DTYPE, T, ...)        \
  [&] {                                           \
    if ((DTYPE) == ::curvkit::DType::float64()) { \
      using T = double;                           \
      return __VA_ARGS__();                       \
    }                                             \
    using T = float;                              \
    return __VA_ARGS__();                         \
  }()

namespace curvkit {

// The dtype of a compute type (float64 for double, float32 for float).
template <class T>
constexpr DType dtype_of() {
  return std::is_same<T, double>::value ? DType::float64() : DType::float32();
}

}  // namespace curvkit
