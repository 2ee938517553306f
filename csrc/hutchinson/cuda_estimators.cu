// CUDA kernels of the estimator cores that the Hutchinson, Hutch++ and Diag++ estimators use:
// the sketch QR (cuBLAS block Gram–Schmidt twice, cuSOLVER Householder QR), the projection
// out of a basis, and the per-column and per-row sums of products. Row-major (n, k) arrays
// are the column-major k x n matrices cuBLAS sees, so no copies are needed for the products.
#include <algorithm>
#include <limits>

#include "core/cuda_utils.h"
#include "core/dispatch.h"
#include "core/linalg_cuda.h"
#include "hutchinson/estimators_cuda.h"

namespace curvkit {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkRows = 4096;  // rows per partial sum of column_dots

template <class T>
__global__ void column_partials_kernel(const T* x, const T* y, int64_t n, int64_t k, int64_t chunks, double* partial) {
  const int64_t j = blockIdx.y, c = blockIdx.x;
  if (c >= chunks) return;
  double s = 0;
  const int64_t end = min(n, (c + 1) * kChunkRows);
  for (int64_t i = c * kChunkRows + threadIdx.x; i < end; i += blockDim.x)
    s += double(x[i * k + j]) * double(y[i * k + j]);
  s = cuda::block_sum(s);
  if (threadIdx.x == 0) partial[j * chunks + c] = s;
}

template <class T>
__global__ void row_dots_kernel(const T* x, const T* y, int64_t n, int64_t k, T* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    double s = 0;
    for (int64_t j = 0; j < k; ++j) s += double(x[i * k + j]) * double(y[i * k + j]);
    out[i] = T(s);
  }
}

template <class T>
__global__ void accumulate_kernel(const T* x, const T* y, int64_t n, int64_t k, int64_t count, T* mean, T* m2) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    double block_mean = 0, block_m2 = 0;
    for (int64_t j = 0; j < k; ++j) block_mean += double(x[i * k + j]) * double(y[i * k + j]);
    block_mean /= double(k);
    for (int64_t j = 0; j < k; ++j) {
      const double d = double(x[i * k + j]) * double(y[i * k + j]) - block_mean;
      block_m2 += d * d;
    }
    if (count == 0) {
      mean[i] = T(block_mean);
      m2[i] = T(block_m2);
    } else {
      const double total = double(count + k), delta = block_mean - double(mean[i]);
      mean[i] = T(double(mean[i]) + delta * double(k) / total);
      m2[i] = T(double(m2[i]) + block_m2 + delta * delta * double(count) * double(k) / total);
    }
  }
}

// r (k x k, row-major): zeros where sketch_qr writes (columns [k0, k), and rows [k0, k) of
// columns [0, k0)); or, with c, r[i][k0 + j] += c[i + j k0] (the Gram–Schmidt coefficients).
template <class T>
__global__ void r_update_kernel(T* r, int64_t k, int64_t k0, const T* c) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < k * k; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t / k, j = t % k;
    if (c) {
      if (i < k0 && j >= k0) r[t] += c[i + (j - k0) * k0];
    } else if (j >= (i < k0 ? k0 : 0)) {
      r[t] = T(0);
    }
  }
}

// Between the row-major columns [k0, k) of q and a column-major n x b panel a (lda n).
template <class T>
__global__ void panel_kernel(T* q, int64_t n, int64_t k, int64_t k0, T* a, bool to_panel) {
  const int64_t b = k - k0;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n * b; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t / b, j = t % b;
    if (to_panel)
      a[i + j * n] = q[i * k + k0 + j];
    else
      q[i * k + k0 + j] = a[i + j * n];
  }
}

// R of the panel (its upper triangle) into r[k0 + i][k0 + j].
template <class T>
__global__ void extract_r_kernel(const T* a, int64_t n, int64_t k, int64_t k0, T* r) {
  const int64_t b = k - k0;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < b * b; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = t / b, j = t % b;
    if (j >= i) r[(k0 + i) * k + k0 + j] = a[i + j * n];
  }
}

cusolverStatus_t geqrf_size(cusolverDnHandle_t h, int m, int n, float* a, int* lwork) {
  return cusolverDnSgeqrf_bufferSize(h, m, n, a, m, lwork);
}
cusolverStatus_t geqrf_size(cusolverDnHandle_t h, int m, int n, double* a, int* lwork) {
  return cusolverDnDgeqrf_bufferSize(h, m, n, a, m, lwork);
}
cusolverStatus_t geqrf(cusolverDnHandle_t h, int m, int n, float* a, float* tau, float* work, int lwork, int* info) {
  return cusolverDnSgeqrf(h, m, n, a, m, tau, work, lwork, info);
}
cusolverStatus_t geqrf(cusolverDnHandle_t h, int m, int n, double* a, double* tau, double* work, int lwork, int* info) {
  return cusolverDnDgeqrf(h, m, n, a, m, tau, work, lwork, info);
}
cusolverStatus_t orgqr_size(cusolverDnHandle_t h, int m, int n, float* a, float* tau, int* lwork) {
  return cusolverDnSorgqr_bufferSize(h, m, n, n, a, m, tau, lwork);
}
cusolverStatus_t orgqr_size(cusolverDnHandle_t h, int m, int n, double* a, double* tau, int* lwork) {
  return cusolverDnDorgqr_bufferSize(h, m, n, n, a, m, tau, lwork);
}
cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int n, float* a, float* tau, float* work, int lwork, int* info) {
  return cusolverDnSorgqr(h, m, n, n, a, m, tau, work, lwork, info);
}
cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int n, double* a, double* tau, double* work, int lwork, int* info) {
  return cusolverDnDorgqr(h, m, n, n, a, m, tau, work, lwork, info);
}

// S = R^{-T} with unit columns (r row-major k x k; s column-major in float64: column i is s_i),
// the diagonal floored as on the CPU (cpu_estimators.cpp unit_inverse_transpose). One block.
template <class T>
__global__ void unit_inverse_transpose_kernel(const T* r, int64_t k, double eps, double* s) {
  __shared__ double floor_value;
  if (threadIdx.x == 0) {
    double largest = 0;
    for (int64_t j = 0; j < k; ++j) largest = fmax(largest, fabs(double(r[j * k + j])));
    floor_value = largest > 0 ? eps * largest : 1.0;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    double* col = s + i * k;
    double norm = 0;
    for (int64_t j = 0; j < k; ++j) {
      if (j < i) {
        col[j] = 0;
        continue;
      }
      double acc = j == i ? 1.0 : 0.0;
      for (int64_t l = i; l < j; ++l) acc -= double(r[l * k + j]) * col[l];
      const double d = double(r[j * k + j]);
      col[j] = acc / (fabs(d) >= floor_value ? d : copysign(floor_value, d));
      norm += col[j] * col[j];
    }
    norm = sqrt(norm);
    for (int64_t j = 0; j < k; ++j) col[j] /= norm;
  }
}

// The XTrace leave-one-out estimate of probe i (hutchinson.h); h, w, t are the column-major
// k x k products Q^T Z, Q^T Omega, Z^T Omega as cuBLAS left them: h[a + c k] = (Q^T Z)[a][c].
template <class T>
__global__ void xtrace_kernel(const T* h, const T* w, const T* t, const double* s, const double* omega_y, int64_t n,
                              int64_t k, bool improved, double* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < k; i += int64_t(gridDim.x) * blockDim.x) {
    const double* si = s + i * k;
    double trace_h = 0, sw = 0, ww = 0;
    for (int64_t a = 0; a < k; ++a) {
      trace_h += double(h[a + a * k]);
      const double wa = double(w[a + i * k]);
      sw += si[a] * wa;
      ww += wa * wa;
    }
    double shs = 0, vhv = 0, tv = 0;
    for (int64_t a = 0; a < k; ++a) {
      const double va = double(w[a + i * k]) - si[a] * sw;
      double hs = 0, hv = 0;
      for (int64_t c = 0; c < k; ++c) {
        const double hac = double(h[a + c * k]), vc = double(w[c + i * k]) - si[c] * sw;
        hs += hac * si[c];
        hv += hac * vc;
      }
      shs += si[a] * hs;
      vhv += va * hv;
      tv += double(t[a + i * k]) * va;
    }
    const double scale = improved ? double(n - k + 1) / (double(n) - ww + sw * sw) : 1.0;
    out[i] = trace_h - shs + scale * (omega_y[i] - 2.0 * tv + vhv);
  }
}

// c_i = s_i^T R e_i and st = S in the compute dtype (column-major, as s).
template <class T>
__global__ void xdiag_prepare_kernel(const double* s, const T* r, int64_t k, double* c, T* st) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < k * k; t += int64_t(gridDim.x) * blockDim.x) {
    st[t] = T(s[t]);
    if (t < k) {
      double acc = 0;
      for (int64_t a = 0; a < k; ++a) acc += s[t * k + a] * double(r[a * k + t]);
      c[t] = acc;
    }
  }
}

// Row i of XDiag: the mean of d_ij = diag(Q Z^T)_i - QS_ij ZS_ij + Omega_ij QS_ij c_j over j,
// and the variance of that mean (hutchinson.h); QS, ZS row-major n x k.
template <class T>
__global__ void xdiag_rows_kernel(const T* omega, const T* q, const T* z, const T* qs, const T* zs, const double* c,
                                  int64_t n, int64_t k, T* mean, T* variance) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    double base = 0;
    for (int64_t j = 0; j < k; ++j) base += double(q[i * k + j]) * double(z[i * k + j]);
    double sum = 0, sum_sq = 0;
    for (int64_t j = 0; j < k; ++j) {
      const double qsv = double(qs[i * k + j]);
      const double d = base - qsv * double(zs[i * k + j]) + double(omega[i * k + j]) * qsv * c[j];
      sum += d;
      sum_sq += d * d;
    }
    const double m = sum / double(k);
    mean[i] = T(m);
    variance[i] = T(k > 1 ? fmax(0.0, sum_sq - double(k) * m * m) / double(k - 1) / double(k) : INFINITY);
  }
}

}  // namespace

void xdiag_estimates_cuda(const ArrayView& omega, const ArrayView& q, const ArrayView& r, const ArrayView& z,
                          const ArrayView& mean, const ArrayView& variance, StreamHandle stream) {
  CudaDeviceGuard guard(q.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t n = q.size(0), k = q.size(1);
  CK_DISPATCH_COMPUTE(q.dtype, T, [&] {
    cuda::DeviceBuffer sinv(sizeof(double) * size_t(k * k + k), s), st(sizeof(T) * size_t(k * k), s),
        prod(sizeof(T) * size_t(2 * n * k), s);
    double* c = sinv.as<double>() + k * k;
    unit_inverse_transpose_kernel<T>
        <<<1, kThreads, 0, s>>>(r.ptr<T>(), k, double(std::numeric_limits<T>::epsilon()), sinv.as<double>());
    CK_CUDA_CHECK(cudaGetLastError());
    xdiag_prepare_kernel<T>
        <<<grid_for(k * k, kThreads), kThreads, 0, s>>>(sinv.as<double>(), r.ptr<T>(), k, c, st.as<T>());
    CK_CUDA_CHECK(cudaGetLastError());
    T* qs = prod.as<T>();
    T* zs = qs + n * k;
    // row-major Q S is the column-major S^T Q^T: S is stored column-major, so op T on it
    cuda::gemm(s, q.dtype, cuda::Op::T, cuda::Op::N, int(k), int(n), int(k), 1.0, {st.as<T>(), k, 0}, {q.data, k, 0},
               0.0, {qs, k, 0}, 1);
    cuda::gemm(s, q.dtype, cuda::Op::T, cuda::Op::N, int(k), int(n), int(k), 1.0, {st.as<T>(), k, 0}, {z.data, k, 0},
               0.0, {zs, k, 0}, 1);
    xdiag_rows_kernel<T><<<grid_for(n, kThreads), kThreads, 0, s>>>(omega.ptr<T>(), q.ptr<T>(), z.ptr<T>(), qs, zs, c,
                                                                    n, k, mean.ptr<T>(), variance.ptr<T>());
    CK_CUDA_CHECK(cudaGetLastError());
  });
}

void xtrace_estimates_cuda(const ArrayView& omega, const ArrayView& y, const ArrayView& q, const ArrayView& r,
                           const ArrayView& z, bool improved, const ArrayView& out, StreamHandle stream) {
  CudaDeviceGuard guard(q.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t n = q.size(0), k = q.size(1);
  const int64_t chunks = std::max<int64_t>(1, (n + kChunkRows - 1) / kChunkRows);
  CK_DISPATCH_COMPUTE(q.dtype, T, [&] {
    cuda::DeviceBuffer products(sizeof(T) * size_t(3 * k * k), s), sinv(sizeof(double) * size_t(k * k), s),
        omega_y(sizeof(double) * size_t(k), s), partial(sizeof(double) * size_t(chunks * k), s);
    T* h = products.as<T>();
    T* w = h + k * k;
    T* t = w + k * k;
    const auto cross = [&](const void* a, const void* b, T* c) {  // column-major (A^T B) of row-major n x k
      cuda::gemm(s, q.dtype, cuda::Op::N, cuda::Op::T, int(k), int(k), int(n), 1.0, {const_cast<void*>(a), k, 0},
                 {const_cast<void*>(b), k, 0}, 0.0, {c, k, 0}, 1);
    };
    cross(q.data, z.data, h);
    cross(q.data, omega.data, w);
    cross(z.data, omega.data, t);
    column_partials_kernel<T><<<dim3(unsigned(chunks), unsigned(k)), kThreads, 0, s>>>(omega.ptr<T>(), y.ptr<T>(), n, k,
                                                                                       chunks, partial.as<double>());
    CK_CUDA_CHECK(cudaGetLastError());
    cuda::sum_slots(s, partial.as<double>(), chunks, k, omega_y.as<double>(), sizeof(double));
    unit_inverse_transpose_kernel<T>
        <<<1, kThreads, 0, s>>>(r.ptr<T>(), k, double(std::numeric_limits<T>::epsilon()), sinv.as<double>());
    CK_CUDA_CHECK(cudaGetLastError());
    xtrace_kernel<T><<<grid_for(k, 64), 64, 0, s>>>(h, w, t, sinv.as<double>(), omega_y.as<double>(), n, k, improved,
                                                    out.ptr<double>());
    CK_CUDA_CHECK(cudaGetLastError());
  });
}

void column_dots_cuda(const ArrayView& x, const ArrayView& y, const ArrayView& out, StreamHandle stream) {
  CudaDeviceGuard guard(x.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t n = x.size(0), k = x.size(1);
  if (k == 0) return;
  const int64_t chunks = std::max<int64_t>(1, (n + kChunkRows - 1) / kChunkRows);
  cuda::DeviceBuffer partial(sizeof(double) * size_t(chunks * k), s);
  CK_DISPATCH_COMPUTE(x.dtype, T, [&] {
    column_partials_kernel<T><<<dim3(unsigned(chunks), unsigned(k)), kThreads, 0, s>>>(x.ptr<T>(), y.ptr<T>(), n, k,
                                                                                       chunks, partial.as<double>());
  });
  CK_CUDA_CHECK(cudaGetLastError());
  cuda::sum_slots(s, partial.as<double>(), chunks, k, out.ptr<double>(), sizeof(double));
}

void row_dots_cuda(const ArrayView& x, const ArrayView& y, const ArrayView& out, StreamHandle stream) {
  CudaDeviceGuard guard(x.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t n = x.size(0), k = x.size(1);
  CK_DISPATCH_COMPUTE(x.dtype, T, [&] {
    row_dots_kernel<T><<<grid_for(n, kThreads), kThreads, 0, s>>>(x.ptr<T>(), y.ptr<T>(), n, k, out.ptr<T>());
  });
  CK_CUDA_CHECK(cudaGetLastError());
}

void accumulate_products_cuda(const ArrayView& x, const ArrayView& y, int64_t count, const ArrayView& mean,
                              const ArrayView& m2, StreamHandle stream) {
  CudaDeviceGuard guard(x.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t n = x.size(0), k = x.size(1);
  CK_DISPATCH_COMPUTE(x.dtype, T, [&] {
    accumulate_kernel<T>
        <<<grid_for(n, kThreads), kThreads, 0, s>>>(x.ptr<T>(), y.ptr<T>(), n, k, count, mean.ptr<T>(), m2.ptr<T>());
  });
  CK_CUDA_CHECK(cudaGetLastError());
}

void project_out_cuda(const ArrayView& q, const ArrayView& x, StreamHandle stream) {
  CudaDeviceGuard guard(q.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t n = q.size(0), k = q.size(1), p = x.size(1);
  if (k == 0 || p == 0 || n == 0) return;
  cuda::DeviceBuffer c(size_t(q.dtype.itemsize()) * size_t(k * p), s);
  for (int pass = 0; pass < 2; ++pass) {
    cuda::gemm(s, q.dtype, cuda::Op::N, cuda::Op::T, int(k), int(p), int(n), 1.0, {q.data, k, 0}, {x.data, p, 0}, 0.0,
               {c.as<void>(), k, 0}, 1);
    cuda::gemm(s, q.dtype, cuda::Op::T, cuda::Op::N, int(p), int(n), int(k), -1.0, {c.as<void>(), k, 0}, {q.data, k, 0},
               1.0, {x.data, p, 0}, 1);
  }
}

void sketch_qr_cuda(const ArrayView& q, const ArrayView& r, int64_t k0, StreamHandle stream) {
  CudaDeviceGuard guard(q.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t n = q.size(0), k = q.size(1), b = k - k0;
  if (b <= 0) return;
  CK_DISPATCH_COMPUTE(q.dtype, T, [&] {
    T* qp = q.ptr<T>();
    T* rp = r.ptr<T>();
    r_update_kernel<T><<<grid_for(k * k, kThreads), kThreads, 0, s>>>(rp, k, k0, nullptr);
    CK_CUDA_CHECK(cudaGetLastError());
    if (k0 > 0) {
      cuda::DeviceBuffer c(sizeof(T) * size_t(k0 * b), s);
      for (int pass = 0; pass < 2; ++pass) {  // block classical Gram–Schmidt, twice
        cuda::gemm(s, q.dtype, cuda::Op::N, cuda::Op::T, int(k0), int(b), int(n), 1.0, {qp, k, 0}, {qp + k0, k, 0}, 0.0,
                   {c.as<T>(), k0, 0}, 1);
        cuda::gemm(s, q.dtype, cuda::Op::T, cuda::Op::N, int(b), int(n), int(k0), -1.0, {c.as<T>(), k0, 0}, {qp, k, 0},
                   1.0, {qp + k0, k, 0}, 1);
        r_update_kernel<T><<<grid_for(k * k, kThreads), kThreads, 0, s>>>(rp, k, k0, c.as<T>());
        CK_CUDA_CHECK(cudaGetLastError());
      }
    }
    cuda::DeviceBuffer panel(sizeof(T) * size_t(n * b), s), tau(sizeof(T) * size_t(b), s), info(sizeof(int), s);
    panel_kernel<T><<<grid_for(n * b, kThreads), kThreads, 0, s>>>(qp, n, k, k0, panel.as<T>(), true);
    CK_CUDA_CHECK(cudaGetLastError());
    cusolverDnHandle_t h = cusolver_handle(s);
    int lwork_qr = 0, lwork_q = 0;
    CK_CUSOLVER_CHECK(geqrf_size(h, int(n), int(b), panel.as<T>(), &lwork_qr));
    CK_CUSOLVER_CHECK(orgqr_size(h, int(n), int(b), panel.as<T>(), tau.as<T>(), &lwork_q));
    cuda::DeviceBuffer work(sizeof(T) * size_t(std::max(1, std::max(lwork_qr, lwork_q))), s);
    CK_CUSOLVER_CHECK(geqrf(h, int(n), int(b), panel.as<T>(), tau.as<T>(), work.as<T>(), lwork_qr, info.as<int>()));
    extract_r_kernel<T><<<grid_for(b * b, kThreads), kThreads, 0, s>>>(panel.as<T>(), n, k, k0, rp);
    CK_CUDA_CHECK(cudaGetLastError());
    CK_CUSOLVER_CHECK(orgqr(h, int(n), int(b), panel.as<T>(), tau.as<T>(), work.as<T>(), lwork_q, info.as<int>()));
    panel_kernel<T><<<grid_for(n * b, kThreads), kThreads, 0, s>>>(qp, n, k, k0, panel.as<T>(), false);
    CK_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace curvkit
