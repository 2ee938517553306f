// ArrayView: a framework-free description of an array (pointer, dtype, device, shape,
// strides in elements). Kernels see only this; the Python intake fills it (csrc/python).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace curvkit {

enum class DTypeCode : uint8_t { Int, UInt, Float, BFloat, Complex, Bool, Other };

struct DType {
  DTypeCode code = DTypeCode::Other;
  uint8_t bits = 0;

  static constexpr DType float16() { return {DTypeCode::Float, 16}; }
  static constexpr DType bfloat16() { return {DTypeCode::BFloat, 16}; }
  static constexpr DType float32() { return {DTypeCode::Float, 32}; }
  static constexpr DType float64() { return {DTypeCode::Float, 64}; }

  bool operator==(const DType& o) const { return code == o.code && bits == o.bits; }
  bool operator!=(const DType& o) const { return !(*this == o); }
  bool is_floating() const {
    return *this == float16() || *this == bfloat16() || *this == float32() || *this == float64();
  }
  int itemsize() const { return (bits + 7) / 8; }
  std::string name() const;  // "float32", "int64", "complex64", ...
};

enum class DeviceKind : uint8_t { CPU, CUDA, Other };

struct Device {
  DeviceKind kind = DeviceKind::CPU;
  int id = 0;
  bool operator==(const Device& o) const { return kind == o.kind && (kind == DeviceKind::CPU || id == o.id); }
  bool operator!=(const Device& o) const { return !(*this == o); }
  bool is_cuda() const { return kind == DeviceKind::CUDA; }
  std::string name() const;  // "cpu", "cuda:0"
};

// A CUDA stream as DLPack passes it: 0 or 1 the legacy default stream, 2 the per-thread
// default stream, anything else a cudaStream_t.
using StreamHandle = int64_t;

struct ArrayView {
  void* data = nullptr;
  DType dtype;
  Device device;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements; may be negative or zero
  bool writable = true;

  int ndim() const { return static_cast<int>(shape.size()); }
  int64_t numel() const;
  // Size of dimension d, negative d counting from the end (-1 is the last).
  int64_t size(int d) const { return shape[d < 0 ? d + ndim() : d]; }
  bool is_contiguous() const;  // C order, dimensions of size 1 ignored
  template <class T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// Matrices in a (..., m, n) stack, counted from the leading dimensions (so m n = 0 counts too).
inline int64_t leading_count(const ArrayView& a) {
  int64_t count = 1;
  for (int d = 0; d + 2 < a.ndim(); ++d) count *= a.shape[size_t(d)];
  return count;
}

}  // namespace curvkit
