// CUDA kernels of the fused AdaHessian and Sophia steps: the tensors of a list travel in the
// kernel's arguments, kMaxTensors per launch (blockIdx.y picks the tensor), so a list of a
// network's parameters takes a few launches instead of a dozen per tensor.
#include <algorithm>
#include <vector>

#include "core/cuda_utils.h"
#include "core/dispatch.h"
#include "core/linalg_cuda.h"
#include "hutchinson/hutchinson.h"
#include "hutchinson/step_math.h"

namespace curvkit {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTensors = 24;  // keeps the argument block well under CUDA's 4 KiB

template <class T>
struct TensorList {
  T* p[kMaxTensors];
  const T* g[kMaxTensors];
  const T* h[kMaxTensors];  // hessian samples (AdaHessian) or estimates (Sophia; may be null)
  T* m[kMaxTensors];
  T* v[kMaxTensors];  // exp_avg_sq (AdaHessian) or hessian (Sophia)
  int64_t numel[kMaxTensors];
  int64_t group[kMaxTensors];
};

template <class T>
__global__ void adahessian_kernel(TensorList<T> list, step_math::AdaHessianScalars s) {
  using C = cuda::acc_t<T>;
  const step_math::AdaHessianElement<C> element(s);
  const int t = blockIdx.y;
  const int64_t n = list.numel[t], group = list.group[t], groups = (n + group - 1) / group;
  for (int64_t gi = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; gi < groups;
       gi += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = gi * group, e = b + group < n ? b + group : n;
    C sum = C(0);
    for (int64_t j = b; j < e; ++j) sum += fabs(cuda::load(list.h[t] + j));
    const C d = sum / C(e - b);
    for (int64_t j = b; j < e; ++j) {
      C p = cuda::load(list.p[t] + j), m = cuda::load(list.m[t] + j), v = cuda::load(list.v[t] + j);
      element(p, cuda::load(list.g[t] + j), d, m, v);
      cuda::store(list.p[t] + j, p);
      cuda::store(list.m[t] + j, m);
      cuda::store(list.v[t] + j, v);
    }
  }
}

template <class T>
__global__ void sophia_kernel(TensorList<T> list, step_math::SophiaScalars s, unsigned long long* wins) {
  using C = cuda::acc_t<T>;
  const step_math::SophiaElement<C> element(s);
  const int t = blockIdx.y;
  const int64_t n = list.numel[t];
  unsigned long long count = 0;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    C h = cuda::load(list.v[t] + j);
    if (list.h[t]) {
      element.update_hessian(h, cuda::load(list.h[t] + j));
      cuda::store(list.v[t] + j, h);
    }
    C p = cuda::load(list.p[t] + j), m = cuda::load(list.m[t] + j);
    count += element(p, cuda::load(list.g[t] + j), m, h) ? 1 : 0;
    cuda::store(list.p[t] + j, p);
    cuda::store(list.m[t] + j, m);
  }
  if (wins) {
    for (int off = 16; off > 0; off /= 2) count += __shfl_down_sync(0xffffffffu, count, off);
    if ((threadIdx.x & 31) == 0 && count) atomicAdd(wins, count);
  }
}

// Calls launch(list, tensors, largest) for runs of up to kMaxTensors tensors of one dtype.
template <class Fill, class Launch>
void for_tensor_batches(const std::vector<ArrayView>& params, Fill fill, Launch launch) {
  for (const DType dtype : {DType::float32(), DType::float64(), DType::float16(), DType::bfloat16()}) {
    std::vector<size_t> indices;
    for (size_t i = 0; i < params.size(); ++i)
      if (params[i].dtype == dtype && params[i].numel() > 0) indices.push_back(i);
    for (size_t first = 0; first < indices.size(); first += kMaxTensors) {
      const size_t count = std::min<size_t>(kMaxTensors, indices.size() - first);
      CK_DISPATCH_FLOATING(dtype, "params", T, [&] {
        TensorList<T> list{};
        int64_t largest = 0;
        for (size_t slot = 0; slot < count; ++slot) {
          fill(list, slot, indices[first + slot]);
          largest = std::max(largest, list.numel[slot] / list.group[slot] + 1);
        }
        launch(list, int(count), largest);
      });
    }
  }
}

constexpr int kMaxChecked = 64;  // arrays per check launch

template <class T>
struct CheckedArrays {
  const T* x[kMaxChecked];
  int64_t numel[kMaxChecked];
  int64_t slot[kMaxChecked];  // where its flag goes: tensor * lists + list
};

template <class T>
__device__ __forceinline__ bool nonfinite(T v) {
  return !(fabs(cuda::acc_t<T>(v)) <= cuda::acc_t<T>(3.4028234663852886e38));
}
template <>
__device__ __forceinline__ bool nonfinite(double v) {
  return !(fabs(v) <= 1.7976931348623157e308);
}
template <>
__device__ __forceinline__ bool nonfinite(half_t v) {
  return (v.bits & 0x7C00) == 0x7C00;
}
template <>
__device__ __forceinline__ bool nonfinite(bfloat16_t v) {
  return (v.bits & 0x7F80) == 0x7F80;
}

// flags[slot] = 1 for every array (blockIdx.y) that holds NaN or Inf; read only.
template <class T>
__global__ void nonfinite_kernel(CheckedArrays<T> arrays, int* flags) {
  const int a = blockIdx.y;
  const int64_t n = arrays.numel[a];
  bool bad = false;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x)
    bad |= nonfinite(arrays.x[a][j]);
  if (__syncthreads_or(bad) && threadIdx.x == 0) flags[arrays.slot[a]] = 1;
}

}  // namespace

NonFiniteEntry first_nonfinite_cuda(const std::vector<const std::vector<ArrayView>*>& lists, StreamHandle stream) {
  const std::vector<ArrayView>& first = *lists[0];
  CudaDeviceGuard guard(first[0].device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t count = int64_t(lists.size()), tensors = int64_t(first.size());
  cuda::DeviceBuffer buffer(sizeof(int) * size_t(count * tensors), s);
  int* flags = buffer.as<int>();
  CK_CUDA_CHECK(cudaMemsetAsync(flags, 0, sizeof(int) * size_t(count * tensors), s));
  for (const DType dtype : {DType::float32(), DType::float64(), DType::float16(), DType::bfloat16()}) {
    CK_DISPATCH_FLOATING(dtype, "params", T, [&] {
      CheckedArrays<T> arrays{};
      int filled = 0;
      int64_t largest = 0;
      const auto launch = [&] {
        if (filled == 0) return;
        const dim3 grid(grid_for(largest, kThreads), unsigned(filled));
        nonfinite_kernel<T><<<grid, kThreads, 0, s>>>(arrays, flags);
        CK_CUDA_CHECK(cudaGetLastError());
        filled = 0;
        largest = 0;
      };
      for (int64_t t = 0; t < tensors; ++t) {
        if (first[size_t(t)].dtype != dtype || first[size_t(t)].numel() == 0) continue;
        for (int64_t l = 0; l < count; ++l) {
          const ArrayView& a = (*lists[size_t(l)])[size_t(t)];
          arrays.x[filled] = a.ptr<const T>();
          arrays.numel[filled] = a.numel();
          arrays.slot[filled] = t * count + l;
          largest = std::max(largest, a.numel());
          if (++filled == kMaxChecked) launch();
        }
      }
      launch();
    });
  }
  const std::vector<int> host = cuda::copy_to_host(s, flags, count * tensors);
  for (int64_t t = 0; t < tensors; ++t)
    for (int64_t l = 0; l < count; ++l)
      if (host[size_t(t * count + l)]) return {int(l), t};
  return {};
}

void adahessian_step_cuda(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                          const std::vector<ArrayView>& hessian, const std::vector<ArrayView>& exp_avg,
                          const std::vector<ArrayView>& exp_avg_sq, const AdaHessianOptions& o, StreamHandle stream) {
  CudaDeviceGuard guard(params[0].device);
  const cudaStream_t s = to_cuda_stream(stream);
  const step_math::AdaHessianScalars scalars =
      step_math::adahessian_scalars(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.hessian_power, o.step);
  for_tensor_batches(
      params,
      [&](auto& list, size_t slot, size_t i) {
        using T = std::remove_pointer_t<std::decay_t<decltype(list.p[0])>>;
        list.p[slot] = params[i].ptr<T>();
        list.g[slot] = grads[i].ptr<T>();
        list.h[slot] = hessian[i].ptr<T>();
        list.m[slot] = exp_avg[i].ptr<T>();
        list.v[slot] = exp_avg_sq[i].ptr<T>();
        list.numel[slot] = params[i].numel();
        list.group[slot] = o.group_sizes[i];
      },
      [&](auto& list, int count, int64_t largest) {
        using T = std::remove_pointer_t<std::decay_t<decltype(list.p[0])>>;
        const dim3 grid(grid_for(largest, kThreads), unsigned(count));
        adahessian_kernel<T><<<grid, kThreads, 0, s>>>(list, scalars);
        CK_CUDA_CHECK(cudaGetLastError());
      });
}

int64_t sophia_step_cuda(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                         const std::vector<ArrayView>& exp_avg, const std::vector<ArrayView>& hessian,
                         const std::vector<ArrayView>& estimates, const SophiaOptions& o, StreamHandle stream) {
  CudaDeviceGuard guard(params[0].device);
  const cudaStream_t s = to_cuda_stream(stream);
  const step_math::SophiaScalars scalars{
      o.lr, o.beta1, 1.0 - o.beta1, o.beta2, 1.0 - o.beta2, 1.0 - o.lr * o.weight_decay, o.rho * o.batch_size, o.eps};
  cuda::DeviceBuffer counter(sizeof(unsigned long long), s);
  unsigned long long* wins = o.count_wins ? counter.as<unsigned long long>() : nullptr;
  if (wins) CK_CUDA_CHECK(cudaMemsetAsync(wins, 0, sizeof(unsigned long long), s));
  for_tensor_batches(
      params,
      [&](auto& list, size_t slot, size_t i) {
        using T = std::remove_pointer_t<std::decay_t<decltype(list.p[0])>>;
        list.p[slot] = params[i].ptr<T>();
        list.g[slot] = grads[i].ptr<T>();
        list.h[slot] = estimates.empty() ? nullptr : estimates[i].ptr<T>();
        list.m[slot] = exp_avg[i].ptr<T>();
        list.v[slot] = hessian[i].ptr<T>();
        list.numel[slot] = params[i].numel();
        list.group[slot] = 1;
      },
      [&](auto& list, int count, int64_t largest) {
        using T = std::remove_pointer_t<std::decay_t<decltype(list.p[0])>>;
        const dim3 grid(grid_for(largest, kThreads), unsigned(count));
        sophia_kernel<T><<<grid, kThreads, 0, s>>>(list, scalars, wins);
        CK_CUDA_CHECK(cudaGetLastError());
      });
  if (!wins) return 0;
  unsigned long long host = 0;
  CK_CUDA_CHECK(cudaMemcpyAsync(&host, wins, sizeof host, cudaMemcpyDeviceToHost, s));
  CK_CUDA_CHECK(cudaStreamSynchronize(s));
  return int64_t(host);
}

}  // namespace curvkit
