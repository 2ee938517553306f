// CUDA helpers (CUDA builds only): CUDA, cuBLAS and cuSOLVER error checks that throw CudaError
// with file, line and the error string; cuBLAS and cuSOLVER handles per thread and device; DLPack stream
// numbers to cudaStream_t; a device guard; launch sizes (the named limits: core/cuda_limits.h).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstdint>

#include "core/array.h"
#include "core/check.h"
#include "core/cuda_limits.h"

#define CK_CUDA_CHECK(expr)                                                                      \
  do {                                                                                           \
    const cudaError_t _err = (expr);                                                             \
    if (_err != cudaSuccess) {                                                                   \
      cudaGetLastError();                                                                        \
      throw ::curvkit::CudaError(::curvkit::cat("CUDA error at ", __FILE__, ":", __LINE__, ": ", \
                                                cudaGetErrorString(_err), " (", #expr, ")"));    \
    }                                                                                            \
  } while (0)

#define CK_CUBLAS_CHECK(expr)                                                                       \
  do {                                                                                              \
    const cublasStatus_t _status = (expr);                                                          \
    if (_status != CUBLAS_STATUS_SUCCESS) {                                                         \
      throw ::curvkit::CudaError(::curvkit::cat("cuBLAS error at ", __FILE__, ":", __LINE__, ": ",  \
                                                cublasGetStatusString(_status), " (", #expr, ")")); \
    }                                                                                               \
  } while (0)

#define CK_CUSOLVER_CHECK(expr)                                                                                        \
  do {                                                                                                                 \
    const cusolverStatus_t _status = (expr);                                                                           \
    if (_status != CUSOLVER_STATUS_SUCCESS) {                                                                          \
      throw ::curvkit::CudaError(                                                                                      \
          ::curvkit::cat("cuSOLVER error at ", __FILE__, ":", __LINE__, ": status ", int(_status), " (", #expr, ")")); \
    }                                                                                                                  \
  } while (0)

namespace curvkit {

// This host thread's cuSOLVER (dense) handle for the current device, bound to `stream`.
cusolverDnHandle_t cusolver_handle(cudaStream_t stream);

// This host thread's cuBLAS handle for the current device, bound to `stream`. Handles are
// created once per (thread, device) and kept for the life of the process.
cublasHandle_t cublas_handle(cudaStream_t stream);

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
