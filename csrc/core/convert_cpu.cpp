#include <omp.h>

#include "core/check.h"
#include "core/convert.h"
#include "core/dispatch.h"
#include "core/runtime.h"

namespace curvkit {

StridedPair make_strided_pair(const ArrayView& src, const ArrayView& dst) {
  StridedPair p;
  int64_t size[64], ss[64], ds[64];
  int n = 0;
  for (int d = 0; d < src.ndim(); ++d) {
    p.numel *= src.shape[d];
    if (src.shape[d] == 1) continue;
    if (n > 0 && ss[n - 1] == src.shape[d] * src.strides[d] && ds[n - 1] == src.shape[d] * dst.strides[d]) {
      size[n - 1] *= src.shape[d];  // contiguous with the previous dimension in both
      ss[n - 1] = src.strides[d];
      ds[n - 1] = dst.strides[d];
      continue;
    }
    CK_CHECK_VALUE(n < 64, "arrays with more than 64 dimensions are not supported");
    size[n] = src.shape[d];
    ss[n] = src.strides[d];
    ds[n] = dst.strides[d];
    ++n;
  }
  if (p.numel == 0) n = 0;
  CK_CHECK_VALUE(n <= StridedPair::kMaxDims, "strided copy supports at most ", StridedPair::kMaxDims,
                 " non-mergeable dimensions, got ", n, "; make the array contiguous first");
  p.ndim = n;
  for (int d = 0; d < n; ++d) {
    p.size[d] = size[d];
    p.src_stride[d] = ss[d];
    p.dst_stride[d] = ds[d];
  }
  return p;
}

void convert(const ArrayView& src, const ArrayView& dst, StreamHandle stream, const char* src_name,
             const char* dst_name) {
  check_floating(src, src_name);
  check_floating(dst, dst_name);
  check_writable(dst, dst_name);
  check_same_shape(src, src_name, dst, dst_name);
  check_same_device(src, src_name, dst, dst_name);
  CK_DEVICE_DISPATCH(src.device, convert_cpu(src, dst), convert_cuda(src, dst, stream));
}

namespace {

template <class S, class D>
void convert_rows(const S* src, D* dst, const StridedPair& p) {
  if (p.numel == 0) return;
  if (p.ndim == 0) {  // a single element
    dst[0] = from_double<D>(to_double(src[0]));
    return;
  }
  const int last = p.ndim - 1;
  const int64_t inner = p.size[last], rows = p.numel / inner;
  const int64_t si = p.src_stride[last], di = p.dst_stride[last];
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (p.numel > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    int64_t so = 0, dof = 0, rem = r;
    for (int d = last - 1; d >= 0; --d) {
      const int64_t idx = rem % p.size[d];
      rem /= p.size[d];
      so += idx * p.src_stride[d];
      dof += idx * p.dst_stride[d];
    }
    const S* s = src + so;
    D* o = dst + dof;
    for (int64_t i = 0; i < inner; ++i) o[i * di] = from_double<D>(to_double(s[i * si]));
  }
}

}  // namespace

void convert_cpu(const ArrayView& src, const ArrayView& dst) {
  const StridedPair p = make_strided_pair(src, dst);
  CK_DISPATCH_FLOATING(src.dtype, "src", S, [&] {
    CK_DISPATCH_FLOATING(dst.dtype, "dst", D, [&] { convert_rows(src.ptr<const S>(), dst.ptr<D>(), p); });
  });
}

}  // namespace curvkit
