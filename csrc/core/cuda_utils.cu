#include <unordered_map>

#include "core/cuda_utils.h"

namespace curvkit {

cublasHandle_t cublas_handle(cudaStream_t stream) {
  thread_local std::unordered_map<int, cublasHandle_t> handles;
  int device = 0;
  CK_CUDA_CHECK(cudaGetDevice(&device));
  auto it = handles.find(device);
  if (it == handles.end()) {
    cublasHandle_t handle = nullptr;
    CK_CUBLAS_CHECK(cublasCreate(&handle));
    it = handles.emplace(device, handle).first;
  }
  CK_CUBLAS_CHECK(cublasSetStream(it->second, stream));
  return it->second;
}

}  // namespace curvkit
