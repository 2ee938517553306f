#include "core/convert.h"
#include "core/cuda_utils.h"
#include "core/dispatch.h"

namespace curvkit {
namespace {

template <class S, class D>
__global__ void convert_kernel(const S* __restrict__ src, D* __restrict__ dst, StridedPair p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += stride) {
    int64_t so = 0, dof = 0, rem = i;
    for (int d = p.ndim - 1; d >= 0; --d) {
      const int64_t idx = rem % p.size[d];
      rem /= p.size[d];
      so += idx * p.src_stride[d];
      dof += idx * p.dst_stride[d];
    }
    dst[dof] = from_double<D>(to_double(src[so]));
  }
}

}  // namespace

void convert_cuda(const ArrayView& src, const ArrayView& dst, StreamHandle stream) {
  const StridedPair p = make_strided_pair(src, dst);
  if (p.numel == 0) return;
  CudaDeviceGuard guard(dst.device);
  constexpr int threads = 256;
  CK_DISPATCH_FLOATING(src.dtype, "src", S, [&] {
    CK_DISPATCH_FLOATING(dst.dtype, "dst", D, [&] {
      convert_kernel<S, D>
          <<<grid_for(p.numel, threads), threads, 0, to_cuda_stream(stream)>>>(src.ptr<const S>(), dst.ptr<D>(), p);
    });
  });
  CK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace curvkit
