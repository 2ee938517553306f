#include "core/array.h"

namespace curvkit {

std::string DType::name() const {
  const std::string b = std::to_string(bits);
  switch (code) {
    case DTypeCode::Int: return "int" + b;
    case DTypeCode::UInt: return "uint" + b;
    case DTypeCode::Float: return "float" + b;
    case DTypeCode::BFloat: return "bfloat" + b;
    case DTypeCode::Complex: return "complex" + b;
    case DTypeCode::Bool: return "bool";
    default: return "unsupported dtype (" + b + " bits)";
  }
}

std::string Device::name() const {
  switch (kind) {
    case DeviceKind::CPU: return "cpu";
    case DeviceKind::CUDA: return "cuda:" + std::to_string(id);
    default: return "unsupported device";
  }
}

int64_t ArrayView::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

bool ArrayView::is_contiguous() const {
  if (numel() == 0) return true;  // producers give empty arrays arbitrary strides
  int64_t expected = 1;
  for (int d = ndim() - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

}  // namespace curvkit
