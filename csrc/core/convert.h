// convert: dst[...] = src[...] for any strides (negative and zero included) and any pair of
// float16/bfloat16/float32/float64 dtypes, rounding once (to nearest, ties to even). The
// explicit copy that kernels needing contiguous or wider input use, and the upcast of
// half-precision input on CPU.
#pragma once
#include <cstdint>

#include "core/array.h"

namespace curvkit {

// src and dst flattened to at most kMaxDims dimensions after dropping size-1 dimensions and
// merging dimensions that are contiguous in both.
struct StridedPair {
  static constexpr int kMaxDims = 8;
  int ndim = 0;
  int64_t size[kMaxDims];
  int64_t src_stride[kMaxDims];
  int64_t dst_stride[kMaxDims];
  int64_t numel = 1;
};
StridedPair make_strided_pair(const ArrayView& src, const ArrayView& dst);

// Checks shapes, dtypes and devices, then copies on the arrays' device (CUDA: on `stream`).
// Checks the arrays, naming them src_name and dst_name in errors, and dispatches on device.
void convert(const ArrayView& src, const ArrayView& dst, StreamHandle stream, const char* src_name = "src",
             const char* dst_name = "dst");

void convert_cpu(const ArrayView& src, const ArrayView& dst);
void convert_cuda(const ArrayView& src, const ArrayView& dst, StreamHandle stream);

}  // namespace curvkit
