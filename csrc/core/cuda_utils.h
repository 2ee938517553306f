// CUDA helpers (CUDA builds only): error checks that throw CudaError with file, line and
// the error string; DLPack stream numbers to cudaStream_t; a device guard; launch sizes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "core/array.h"
#include "core/check.h"

#define CK_CUDA_CHECK(expr)                                                              \
  do {                                                                                   \
    const cudaError_t _err = (expr);                                                     \
    if (_err != cudaSuccess) {                                                           \
      cudaGetLastError();                                                                \
      throw ::curvkit::CudaError(::curvkit::cat("CUDA error at ", __FILE__, ":", __LINE__, \
                                                ": ", cudaGetErrorString(_err), " (", #expr, ")")); \
    }                                                                                    \
  } while (0)

namespace curvkit {

inline cudaStream_t to_cuda_stream(StreamHandle s) {
  if (s == 0 || s == 1) return cudaStreamLegacy;
  if (s == 2) return cudaStreamPerThread;
  return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(s));
}

// Makes `device` current for the scope, restoring the previous device after.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(const Device& device) {
    CK_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device.id != previous_) CK_CUDA_CHECK(cudaSetDevice(device.id));
  }
  ~CudaDeviceGuard() { cudaSetDevice(previous_); }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Blocks for a grid-stride loop over n items: enough to fill the device, never above the
// 2^31-1 grid limit (the kernels index with 64 bits).
inline unsigned grid_for(int64_t n, int threads_per_block) {
  const int64_t blocks = (n + threads_per_block - 1) / threads_per_block;
  constexpr int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace curvkit
