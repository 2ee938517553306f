// Process-wide settings and what this build can do: the one thread count that governs
// curvkit's OpenMP loops and OpenBLAS, and the build/device description behind show_config.
#pragma once
#include <map>
#include <string>

namespace curvkit {

// The most threads set_num_threads accepts (each OpenMP thread costs a stack and a per-thread
// workspace; far beyond the cores it only slows calls down). OpenBLAS itself uses at most its
// build's MAX_THREADS (64 for scipy-openblas32; config()["blas_threads"] shows it).
constexpr int kMaxThreads = 1024;

// The thread count; a call reads it once and uses that snapshot throughout, so a concurrent
// set_num_threads affects only later calls.
int num_threads();
// Sets curvkit's OpenMP loops and OpenBLAS's pool to n threads (1 <= n <= kMaxThreads);
// ValueError naming 'n' otherwise. Safe while other threads run curvkit calls.
void set_num_threads(int n);

// OpenBLAS single-threaded while any such scope lives in the process (one matrix per OpenMP
// thread), and back at num_threads() once the last one ends: concurrent scopes do not leave
// the count changed.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
};

bool built_with_cuda();
int cuda_device_count();  // 0 when not built with CUDA or no usable device/driver

// Build and machine description, key -> value (all strings).
std::map<std::string, std::string> build_info();

}  // namespace curvkit
