// Process-wide settings and what this build can do: the one thread count that governs
// curvkit's OpenMP loops and OpenBLAS, and the build/device description behind show_config.
#pragma once
#include <map>
#include <string>

namespace curvkit {

int num_threads();
// Sets curvkit's OpenMP loops and OpenBLAS's pool to n threads (n >= 1).
void set_num_threads(int n);

bool built_with_cuda();
int cuda_device_count();  // 0 when not built with CUDA or no usable device/driver

// Build and machine description, key -> value (all strings).
std::map<std::string, std::string> build_info();

}  // namespace curvkit
