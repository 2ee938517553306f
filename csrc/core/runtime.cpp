#include "core/runtime.h"

#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <thread>

#include <cblas.h>

#include "core/check.h"

#ifdef CURVKIT_WITH_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#endif

namespace curvkit {
namespace {

int default_num_threads() {
  if (const char* env = std::getenv("CURVKIT_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return std::min(n, kMaxThreads);
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::min(CPU_COUNT(&set), kMaxThreads);
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? std::min(int(hw), kMaxThreads) : 1;
}

// OpenBLAS has one process-wide thread count. Calls that run one matrix per OpenMP thread
// need it at 1 while they run, and concurrent calls may overlap: the count of such calls
// decides it (1 while any runs, curvkit's setting otherwise), so it is never left changed.
struct BlasThreads {
  std::mutex mutex;
  int single_scopes = 0;
};

BlasThreads& blas_threads() {
  static BlasThreads b;
  return b;
}

std::atomic<int>& thread_setting() {
  static std::atomic<int> n = [] {
    const int d = default_num_threads();
    scipy_openblas_set_num_threads(d);
    return d;
  }();
  return n;
}

}  // namespace

int num_threads() { return thread_setting().load(std::memory_order_relaxed); }

void set_num_threads(int n) {
  CK_CHECK_VALUE(n >= 1 && n <= kMaxThreads, "argument 'n' must be a number of threads in [1, ", kMaxThreads, "], got ",
                 n);
  thread_setting();  // initialized before the lock (its initializer sets OpenBLAS too)
  BlasThreads& b = blas_threads();
  std::lock_guard<std::mutex> lock(b.mutex);
  thread_setting().store(n);
  if (b.single_scopes == 0) scipy_openblas_set_num_threads(n);  // else the last scope to end sets it
}

SingleThreadedBlas::SingleThreadedBlas() {
  thread_setting();
  BlasThreads& b = blas_threads();
  std::lock_guard<std::mutex> lock(b.mutex);
  if (b.single_scopes++ == 0) scipy_openblas_set_num_threads(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  BlasThreads& b = blas_threads();
  std::lock_guard<std::mutex> lock(b.mutex);
  if (--b.single_scopes == 0) scipy_openblas_set_num_threads(num_threads());
}

bool built_with_cuda() {
#ifdef CURVKIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef CURVKIT_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for the caller
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

std::map<std::string, std::string> build_info() {
  std::map<std::string, std::string> info;
  info["version"] = CURVKIT_VERSION;
  info["compiler"] = CURVKIT_COMPILER;
  info["openmp"] = std::to_string(_OPENMP);
  info["blas"] = std::string("OpenBLAS (scipy-openblas32) ") + scipy_openblas_get_config();
  info["blas_cores"] = std::to_string(scipy_openblas_get_num_procs());
  info["threads"] = std::to_string(num_threads());
  info["blas_threads"] = std::to_string(scipy_openblas_get_num_threads());
  info["cuda"] = built_with_cuda() ? "yes" : "no";
#ifdef CURVKIT_WITH_CUDA
  info["cuda_build_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_architectures"] = CURVKIT_CUDA_ARCHS;
  int cublas_major = 0, cublas_minor = 0, cublas_patch = 0;
  cublasGetProperty(MAJOR_VERSION, &cublas_major);
  cublasGetProperty(MINOR_VERSION, &cublas_minor);
  cublasGetProperty(PATCH_LEVEL, &cublas_patch);
  info["cublas"] = cat(cublas_major, ".", cublas_minor, ".", cublas_patch);
  int driver = 0;
  if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0)
    info["cuda_driver"] = std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10);
  else
    cudaGetLastError();
  const int count = cuda_device_count();
  std::string devices;
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
    devices += cat(d ? "; " : "", "cuda:", d, " ", prop.name, " (sm_", prop.major, prop.minor, ", ",
                   prop.totalGlobalMem >> 20, " MiB)");
  }
  info["cuda_devices"] = count ? devices : "none";
#endif
  return info;
}

}  // namespace curvkit
