// Runtime dtype -> compile-time type, as an immediately invoked lambda:
//   CK_DISPATCH_FLOATING(x.dtype, "x", scalar_t, [&] { kernel<scalar_t>(...); });
#pragma once
#include "core/array.h"
#include "core/check.h"
#include "core/half.h"

#define CK_DISPATCH_CASE(DT, CTYPE, T, ...) \
  if (_dt == (DT)) { using T = CTYPE; return __VA_ARGS__(); }

// float16, bfloat16, float32, float64
#define CK_DISPATCH_FLOATING(DTYPE, NAME, T, ...)                                            \
  [&] {                                                                                      \
    const ::curvkit::DType _dt = (DTYPE);                                                    \
    CK_DISPATCH_CASE(::curvkit::DType::float32(), float, T, __VA_ARGS__)                     \
    CK_DISPATCH_CASE(::curvkit::DType::float64(), double, T, __VA_ARGS__)                    \
    CK_DISPATCH_CASE(::curvkit::DType::float16(), ::curvkit::half_t, T, __VA_ARGS__)         \
    CK_DISPATCH_CASE(::curvkit::DType::bfloat16(), ::curvkit::bfloat16_t, T, __VA_ARGS__)    \
    throw ::curvkit::TypeError(::curvkit::cat("argument '", NAME,                            \
        "' must have dtype float16, bfloat16, float32 or float64, got ", _dt.name()));       \
  }()
