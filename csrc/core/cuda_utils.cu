#include <unordered_map>

#include "core/cuda_utils.h"

namespace curvkit {

namespace {

// Relaxed stream-capture mode for this thread while alive: creating a handle allocates device
// memory, which a capture in global mode (PyTorch's default) would otherwise refuse when the
// first call of a thread is made inside a CUDA graph capture.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  ~RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// The handle of this host thread for the current device (created on first use, kept for the
// life of the process), bound to `stream`.
template <class Handle, class Create, class Bind>
Handle handle_for_stream(std::unordered_map<int, Handle>& handles, cudaStream_t stream, Create create, Bind bind) {
  int device = 0;
  CK_CUDA_CHECK(cudaGetDevice(&device));
  auto it = handles.find(device);
  if (it == handles.end()) {
    RelaxedCaptureMode relaxed;
    it = handles.emplace(device, create()).first;
  }
  bind(it->second, stream);
  return it->second;
}

}  // namespace

cublasHandle_t cublas_handle(cudaStream_t stream) {
  thread_local std::unordered_map<int, cublasHandle_t> handles;
  return handle_for_stream(
      handles, stream,
      [] {
        cublasHandle_t h = nullptr;
        CK_CUBLAS_CHECK(cublasCreate(&h));
        return h;
      },
      [](cublasHandle_t h, cudaStream_t s) { CK_CUBLAS_CHECK(cublasSetStream(h, s)); });
}

cusolverDnHandle_t cusolver_handle(cudaStream_t stream) {
  thread_local std::unordered_map<int, cusolverDnHandle_t> handles;
  return handle_for_stream(
      handles, stream,
      [] {
        cusolverDnHandle_t h = nullptr;
        CK_CUSOLVER_CHECK(cusolverDnCreate(&h));
        return h;
      },
      [](cusolverDnHandle_t h, cudaStream_t s) { CK_CUSOLVER_CHECK(cusolverDnSetStream(h, s)); });
}

}  // namespace curvkit
