// CUDA kernels of the estimator cores: the sketch QR (cuBLAS block Gram–Schmidt twice,
// cuSOLVER Householder QR), the projection out of a basis, the per-column and per-row sums of
// products, the XTrace, XDiag and XNysTrace leave-one-out estimates, the Lanczos step (cuBLAS
// batched products for the reorthogonalization), Ritz vectors and power steps. Row-major
// (n, k) arrays are the column-major k x n matrices cuBLAS sees, so no copies are needed for
// the products. Only the k x k and tridiagonal eigen-algebra runs on the host.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/cuda_utils.h"
#include "core/dispatch.h"
#include "core/linalg_cuda.h"
#include "hutchinson/estimators_cpu.h"
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

// Per-probe sums of products over n entries, out of fixed-order per-chunk partials:
// partial[b chunks + c] = sum over chunk c of x[b xs + i] y[b ys + i].
template <class T>
__global__ void probe_partials_kernel(const T* x, int64_t xs, const T* y, int64_t ys, int64_t n, int64_t chunks,
                                      double* partial) {
  const int64_t b = blockIdx.y, c = blockIdx.x;
  double s = 0;
  const int64_t end = min(n, (c + 1) * kChunkRows);
  for (int64_t i = c * kChunkRows + threadIdx.x; i < end; i += blockDim.x)
    s += double(x[b * xs + i]) * double(y[b * ys + i]);
  s = cuda::block_sum(s);
  if (threadIdx.x == 0) partial[b * chunks + c] = s;
}

// out[b] = x_b . y_b for p vectors of length n (device float64; no host synchronization).
template <class T>
void probe_dots(cudaStream_t s, const T* x, int64_t xs, const T* y, int64_t ys, int64_t n, int64_t p, double* out) {
  const int64_t chunks = std::max<int64_t>(1, (n + kChunkRows - 1) / kChunkRows);
  cuda::DeviceBuffer partial(sizeof(double) * size_t(chunks * p), s);
  probe_partials_kernel<T>
      <<<dim3(unsigned(chunks), unsigned(p)), kThreads, 0, s>>>(x, xs, y, ys, n, chunks, partial.as<double>());
  CK_CUDA_CHECK(cudaGetLastError());
  cuda::sum_slots(s, partial.as<double>(), chunks, p, out, sizeof(double));
}

// Whether probe b runs step j (hutchinson.h lanczos_step).
__global__ void lanczos_active_kernel(const int64_t* lengths, const double* beta, int64_t m, int64_t j, bool restart,
                                      int64_t p, int* active) {
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < p; b += int64_t(gridDim.x) * blockDim.x)
    active[b] = lengths[b] == j && (j == 0 || beta[b * m + j - 1] > 0.0 || restart);
}

// x (p, n) <- w (n, p) transposed, so each probe's vector is contiguous.
template <class T>
__global__ void gather_probes_kernel(const T* w, int64_t n, int64_t p, T* x) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n * p; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / n, i = t % n;
    x[t] = w[i * p + b];
  }
}

// x_b -= beta_{j-1} v_{j-1} (the previous basis vector), for active probes after a step that
// did not break down.
template <class T>
__global__ void lanczos_previous_kernel(T* x, const T* basis, const double* beta, const int* active, int64_t m,
                                        int64_t n, int64_t p, int64_t j) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n * p; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / n, i = t % n;
    const double previous = beta[b * m + j - 1];
    if (active[b] && previous > 0.0) x[t] -= T(previous) * basis[(b * (m + 1) + j - 1) * n + i];
  }
}

// x_b -= a_b v_j.
template <class T>
__global__ void lanczos_axpy_kernel(T* x, const T* basis, const double* a, int64_t m, int64_t n, int64_t p, int64_t j) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n * p; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / n, i = t % n;
    x[t] -= T(a[b]) * basis[(b * (m + 1) + j) * n + i];
  }
}

// a_b += c_b[j]: the reorthogonalization's correction to alpha_j.
template <class T>
__global__ void lanczos_alpha_kernel(const T* c, int64_t j, int64_t p, double* a) {
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < p; b += int64_t(gridDim.x) * blockDim.x)
    a[b] += double(c[b * (j + 1) + j]);
}

// v_{j+1} = x_b / |x_b| into the basis and w, alpha_j, beta_j and the Krylov dimension; a
// breakdown (|x_b| at rounding level of the input) or an inactive probe leaves zeros.
template <class T>
__global__ void lanczos_finish_kernel(T* basis, T* w, const T* x, double* alpha, double* beta, int64_t* lengths,
                                      const int* active, const double* input_sq, const double* a, const double* norm_sq,
                                      int64_t m, int64_t n, int64_t p, int64_t j, double eps) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n * p; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / n, i = t % n;
    const bool on = active[b] != 0;
    const double norm = sqrt(norm_sq[b]);
    const bool grows = on && norm > 16 * eps * fmax(sqrt(input_sq[b]), fabs(a[b]));
    T v = T(0);
    if (grows) {
      v = T(double(x[t]) / norm);
      basis[(b * (m + 1) + j + 1) * n + i] = v;
    }
    w[i * p + b] = v;
    if (i == 0) {
      alpha[b * m + j] = on ? a[b] : 0.0;
      beta[b * m + j] = grows ? norm : 0.0;
      if (on) lengths[b] = j + 1;
    }
  }
}

// ct (p, steps, r) in the compute dtype from the float64 coefficients (p, rows, r).
template <class T>
__global__ void coefficients_kernel(const double* coefficients, int64_t p, int64_t rows, int64_t steps, int64_t r,
                                    T* ct) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < p * steps * r;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / (steps * r), rest = t % (steps * r);
    ct[t] = T(coefficients[b * rows * r + rest]);
  }
}

// v = w / norm.
template <class T>
__global__ void normalize_kernel(T* v, const T* w, int64_t n, double norm) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    v[i] = T(double(w[i]) / norm);
}

// XNysTrace's shift: nu = relative_shift |Y|_F / sqrt(n) from the column sums of squares, then
// Y <- Y + nu Omega; nu also goes to nu_out.
template <class T>
__global__ void nystrom_shift_kernel(T* y, const T* omega, int64_t n, int64_t k, const double* column_squares,
                                     double relative_shift, double* nu_out) {
  double total = 0;
  for (int64_t j = 0; j < k; ++j) total += column_squares[j];
  const double nu = relative_shift * sqrt(total) / sqrt(double(n));
  if (blockIdx.x == 0 && threadIdx.x == 0) *nu_out = nu;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n * k; t += int64_t(gridDim.x) * blockDim.x)
    y[t] = T(double(y[t]) + nu * double(omega[t]));
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

bool xnystrace_estimates_cuda(const ArrayView& omega, const ArrayView& y, double relative_shift, const ArrayView& out,
                              StreamHandle stream) {
  CudaDeviceGuard guard(y.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t n = y.size(0), k = y.size(1);
  const int64_t chunks = std::max<int64_t>(1, (n + kChunkRows - 1) / kChunkRows);
  std::vector<double> gram(static_cast<size_t>(k * k)), r(static_cast<size_t>(k * k)),
      estimates(static_cast<size_t>(k));
  double nu = 0;
  CK_DISPATCH_COMPUTE(y.dtype, T, [&] {
    cuda::DeviceBuffer partial(sizeof(double) * size_t(chunks * k), s), small(sizeof(double) * size_t(k + 1), s),
        products(sizeof(T) * size_t(2 * k * k), s), panel(sizeof(T) * size_t(n * k), s), tau(sizeof(T) * size_t(k), s),
        info(sizeof(int), s);
    double* column_squares = small.as<double>();
    column_partials_kernel<T><<<dim3(unsigned(chunks), unsigned(k)), kThreads, 0, s>>>(y.ptr<T>(), y.ptr<T>(), n, k,
                                                                                       chunks, partial.as<double>());
    CK_CUDA_CHECK(cudaGetLastError());
    cuda::sum_slots(s, partial.as<double>(), chunks, k, column_squares, sizeof(double));
    nystrom_shift_kernel<T><<<grid_for(n * k, kThreads), kThreads, 0, s>>>(
        y.ptr<T>(), omega.ptr<T>(), n, k, column_squares, relative_shift, column_squares + k);
    CK_CUDA_CHECK(cudaGetLastError());
    T* c = products.as<T>();  // column-major Omega^T (Y + nu Omega)
    T* rp = c + k * k;        // row-major R of Y + nu Omega
    cuda::gemm(s, y.dtype, cuda::Op::N, cuda::Op::T, int(k), int(k), int(n), 1.0, {omega.data, k, 0}, {y.data, k, 0},
               0.0, {c, k, 0}, 1);
    CK_CUDA_CHECK(cudaMemsetAsync(rp, 0, sizeof(T) * size_t(k * k), s));
    panel_kernel<T><<<grid_for(n * k, kThreads), kThreads, 0, s>>>(y.ptr<T>(), n, k, 0, panel.as<T>(), true);
    CK_CUDA_CHECK(cudaGetLastError());
    cusolverDnHandle_t h = cusolver_handle(s);
    int lwork = 0;
    CK_CUSOLVER_CHECK(geqrf_size(h, int(n), int(k), panel.as<T>(), &lwork));
    cuda::DeviceBuffer work(sizeof(T) * size_t(std::max(1, lwork)), s);
    CK_CUSOLVER_CHECK(geqrf(h, int(n), int(k), panel.as<T>(), tau.as<T>(), work.as<T>(), lwork, info.as<int>()));
    extract_r_kernel<T><<<grid_for(k * k, kThreads), kThreads, 0, s>>>(panel.as<T>(), n, k, 0, rp);
    CK_CUDA_CHECK(cudaGetLastError());
    // One synchronization: the k x k factors and nu to the host.
    const std::vector<T> host = cuda::copy_to_host(s, products.as<T>(), 2 * k * k);
    nu = cuda::copy_to_host(s, column_squares + k, 1)[0];
    for (int64_t a = 0; a < k; ++a)
      for (int64_t b = 0; b < k; ++b) {
        gram[size_t(a * k + b)] = double(host[size_t(a + b * k)]);
        r[size_t(a * k + b)] = double(host[size_t(k * k + a * k + b)]);
      }
  });
  if (!xnystrace_leave_one_out(gram, r, n, k, nu, estimates.data())) return false;
  CK_CUDA_CHECK(cudaMemcpyAsync(out.data, estimates.data(), sizeof(double) * size_t(k), cudaMemcpyHostToDevice, s));
  CK_CUDA_CHECK(cudaStreamSynchronize(s));  // the host estimates go out of scope
  return true;
}

void lanczos_step_cuda(const ArrayView& basis, const ArrayView& w, const ArrayView& alpha, const ArrayView& beta,
                       const ArrayView& lengths, int64_t j, bool reorthogonalize, bool restart, StreamHandle stream) {
  CudaDeviceGuard guard(basis.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t p = basis.size(0), m = basis.size(1) - 1, n = basis.size(2);
  if (p == 0 || n == 0) return;
  CK_DISPATCH_COMPUTE(basis.dtype, T, [&] {
    cuda::DeviceBuffer xbuf(sizeof(T) * size_t(p * n), s), state(sizeof(double) * size_t(3 * p), s),
        flags(sizeof(int) * size_t(p), s);
    T* x = xbuf.as<T>();
    T* v = basis.ptr<T>();
    double* input_sq = state.as<double>();
    double* a = input_sq + p;
    double* norm_sq = a + p;
    int* active = flags.as<int>();
    const unsigned grid = grid_for(n * p, kThreads);
    lanczos_active_kernel<<<grid_for(p, kThreads), kThreads, 0, s>>>(lengths.ptr<int64_t>(), beta.ptr<double>(), m, j,
                                                                     restart, p, active);
    CK_CUDA_CHECK(cudaGetLastError());
    gather_probes_kernel<T><<<grid, kThreads, 0, s>>>(w.ptr<T>(), n, p, x);
    CK_CUDA_CHECK(cudaGetLastError());
    probe_dots<T>(s, x, n, x, n, n, p, input_sq);
    if (j > 0) {
      lanczos_previous_kernel<T><<<grid, kThreads, 0, s>>>(x, v, beta.ptr<double>(), active, m, n, p, j);
      CK_CUDA_CHECK(cudaGetLastError());
    }
    probe_dots<T>(s, v + j * n, (m + 1) * n, x, n, n, p, a);
    lanczos_axpy_kernel<T><<<grid, kThreads, 0, s>>>(x, v, a, m, n, p, j);
    CK_CUDA_CHECK(cudaGetLastError());
    if (reorthogonalize) {  // classical Gram–Schmidt twice against v_0 .. v_j, every probe in one batch
      cuda::DeviceBuffer cbuf(sizeof(T) * size_t(p * (j + 1)), s);
      const cuda::Stack vs{basis.data, n, (m + 1) * n}, xs{x, n, n}, cs{cbuf.as<T>(), j + 1, j + 1};
      for (int pass = 0; pass < 2; ++pass) {
        cuda::gemm(s, basis.dtype, cuda::Op::T, cuda::Op::N, int(j + 1), 1, int(n), 1.0, vs, xs, 0.0, cs, p);
        cuda::gemm(s, basis.dtype, cuda::Op::N, cuda::Op::N, int(n), 1, int(j + 1), -1.0, vs, cs, 1.0, xs, p);
        lanczos_alpha_kernel<T><<<grid_for(p, kThreads), kThreads, 0, s>>>(cbuf.as<T>(), j, p, a);
        CK_CUDA_CHECK(cudaGetLastError());
      }
    }
    probe_dots<T>(s, x, n, x, n, n, p, norm_sq);
    lanczos_finish_kernel<T><<<grid, kThreads, 0, s>>>(v, w.ptr<T>(), x, alpha.ptr<double>(), beta.ptr<double>(),
                                                       lengths.ptr<int64_t>(), active, input_sq, a, norm_sq, m, n, p, j,
                                                       double(std::numeric_limits<T>::epsilon()));
    CK_CUDA_CHECK(cudaGetLastError());
  });
}

void tridiagonal_eigh_cuda(const ArrayView& alpha, const ArrayView& beta, const ArrayView& lengths, int64_t steps,
                           const ArrayView& nodes, const ArrayView& vectors, StreamHandle stream) {
  CudaDeviceGuard guard(alpha.device);
  const cudaStream_t s = to_cuda_stream(stream);
  // The p small tridiagonal matrices go to the host once per solve (LAPACK stev there).
  std::vector<double> a(size_t(alpha.numel())), e(size_t(beta.numel()));
  std::vector<int64_t> len(size_t(lengths.numel()));
  CK_CUDA_CHECK(cudaMemcpyAsync(a.data(), alpha.data, sizeof(double) * a.size(), cudaMemcpyDeviceToHost, s));
  CK_CUDA_CHECK(cudaMemcpyAsync(e.data(), beta.data, sizeof(double) * e.size(), cudaMemcpyDeviceToHost, s));
  CK_CUDA_CHECK(cudaMemcpyAsync(len.data(), lengths.data, sizeof(int64_t) * len.size(), cudaMemcpyDeviceToHost, s));
  CK_CUDA_CHECK(cudaStreamSynchronize(s));
  ArrayView ha = alpha, he = beta, hl = lengths;
  ha.data = a.data();
  he.data = e.data();
  hl.data = len.data();
  ha.device = he.device = hl.device = Device{};
  tridiagonal_eigh_cpu(ha, he, hl, steps, nodes, vectors);
}

void basis_combination_cuda(const ArrayView& basis, const ArrayView& coefficients, int64_t steps, const ArrayView& out,
                            StreamHandle stream) {
  CudaDeviceGuard guard(basis.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t p = basis.size(0), m1 = basis.size(1), n = basis.size(2);
  const int64_t rows = coefficients.size(1), r = coefficients.size(2);
  if (p == 0 || n == 0 || r == 0) return;
  if (steps == 0) {
    CK_CUDA_CHECK(cudaMemsetAsync(out.data, 0, size_t(out.numel()) * size_t(out.dtype.itemsize()), s));
    return;
  }
  CK_DISPATCH_COMPUTE(basis.dtype, T, [&] {
    cuda::DeviceBuffer ct(sizeof(T) * size_t(p * steps * r), s);
    coefficients_kernel<T><<<grid_for(p * steps * r, kThreads), kThreads, 0, s>>>(coefficients.ptr<double>(), p, rows,
                                                                                  steps, r, ct.as<T>());
    CK_CUDA_CHECK(cudaGetLastError());
    // row-major out_b (n x r) is the column-major r x n matrix C_b^T V_b (V_b: steps rows of n)
    cuda::gemm(s, basis.dtype, cuda::Op::N, cuda::Op::T, int(r), int(n), int(steps), 1.0, {ct.as<T>(), r, steps * r},
               {basis.data, n, m1 * n}, 0.0, {out.data, r, n * r}, p);
  });
}

double power_step_cuda(const ArrayView& v, const ArrayView& w, const ArrayView* found, double& norm,
                       StreamHandle stream) {
  CudaDeviceGuard guard(v.device);
  const cudaStream_t s = to_cuda_stream(stream);
  const int64_t n = v.numel();
  return CK_DISPATCH_COMPUTE(v.dtype, T, [&] {
    cuda::DeviceBuffer sums(sizeof(double) * 2, s);
    probe_dots<T>(s, v.ptr<T>(), 0, w.ptr<T>(), 0, n, 1, sums.as<double>());
    if (found && found->numel() > 0) project_out_cuda(*found, w, stream);
    probe_dots<T>(s, w.ptr<T>(), 0, w.ptr<T>(), 0, n, 1, sums.as<double>() + 1);
    const std::vector<double> host = cuda::copy_to_host(s, sums.as<double>(), 2);  // the one synchronization
    norm = std::sqrt(host[1]);
    if (norm > 0) {
      normalize_kernel<T><<<grid_for(n, kThreads), kThreads, 0, s>>>(v.ptr<T>(), w.ptr<T>(), n, norm);
      CK_CUDA_CHECK(cudaGetLastError());
    }
    return host[0];
  });
}

}  // namespace curvkit
