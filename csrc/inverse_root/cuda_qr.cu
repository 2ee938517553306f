// QR-based routines on CUDA: orthonormalize "qr" (orthonormalize_qr_cuda), the orthogonality
// measure of orthonormalize "polar" (orthogonality_cuda) and SOAP's eigenbasis refresh
// (eigenbasis_update_cuda). cuSOLVER's geqrf and orgqr per matrix, R's diagonal made
// nonnegative, with the CPU's full-rank verdict (qr_positive in cpu.cpp).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "inverse_root/cuda_kernels.cuh"

namespace curvkit {
namespace {

// ||A||_F^2 per matrix of `size` elements, a block per matrix (Inf or NaN when A is not finite).
template <class T>
__global__ void frobenius2_kernel(const T* a, double* out, int64_t size, int64_t count) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    double local = 0;
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
      const double x = a[b * size + i];
      local += x * x;
    }
    local = cuda::block_sum(local);
    if (threadIdx.x == 0) out[b] = local;
  }
}

// After geqrf: sign(R_jj) per column, and the CPU's verdict (qr_positive in cpu.cpp) as bits:
// kFactored (LAPACK succeeded, A finite) and kFullRank (every |R_jj| > m u ||A||_F). A block per
// matrix.
constexpr int kFactored = 1, kFullRank = 2;

template <class T>
__global__ void qr_signs_kernel(const T* a, T* sign, const int* info, const double* norm2, int* good, int64_t m,
                                int64_t k, int64_t count, double unit) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    const double floor = numerics::rank_floor(m, unit, sqrt(norm2[b]));
    bool ok = true;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const double r = a[b * m * k + j * m + j];
      sign[b * k + j] = r < 0 ? T(-1) : T(1);
      ok &= fabs(r) > floor;
    }
    ok = __syncthreads_and(ok);
    if (threadIdx.x == 0) good[b] = (info[b] == 0 && norm2[b] <= DBL_MAX ? kFactored : 0) | (ok ? kFullRank : 0);
  }
}

template <class T>
__global__ void apply_signs_kernel(T* a, const T* sign, int64_t m, int64_t k, int64_t count) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y)
    for (int64_t j = blockIdx.x; j < k; j += gridDim.x)
      for (int64_t i = threadIdx.x; i < m; i += blockDim.x) a[b * m * k + j * m + i] *= sign[b * k + j];
}

cusolverStatus_t orgqr_buffer_size(cusolverDnHandle_t h, int m, int k, const float* a, const float* tau, int* lwork) {
  return cusolverDnSorgqr_bufferSize(h, m, k, k, a, m, tau, lwork);
}
cusolverStatus_t orgqr_buffer_size(cusolverDnHandle_t h, int m, int k, const double* a, const double* tau, int* lwork) {
  return cusolverDnDorgqr_bufferSize(h, m, k, k, a, m, tau, lwork);
}
cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int k, float* a, const float* tau, float* work, int lwork,
                       int* info) {
  return cusolverDnSorgqr(h, m, k, k, a, m, tau, work, lwork, info);
}
cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int k, double* a, const double* tau, double* work, int lwork,
                       int* info) {
  return cusolverDnDorgqr(h, m, k, k, a, m, tau, work, lwork, info);
}

// Householder QR of each column-major m x k matrix (m >= k) in place, keeping Q with column j
// multiplied by sign(R_jj): the Gram-Schmidt basis, continuous in the input. Per matrix (on
// the host): whether it succeeded with full column rank (and, when asked, the two apart).
// cuSOLVER has no batched QR for general sizes: one geqrf and one orgqr call per matrix, all
// queued on the stream.
template <class T>
std::vector<bool> qr_positive(cudaStream_t stream, T* a, int64_t m, int64_t k, int64_t count,
                              std::vector<bool>* factored_only = nullptr, std::vector<bool>* full_rank = nullptr) {
  std::vector<bool> ok(static_cast<size_t>(count));
  if (count == 0) return ok;
  CK_CHECK_VALUE(m * k <= INT32_MAX, "argument 'Q': a ", m, " x ", k, " matrix is too large for cuSOLVER's QR");
  const cudaDataType t = cuda::data_type(dtype_of<T>());
  const int64_t mk = m * k;
  DeviceBuffer tau(sizeof(T) * size_t(count * k), stream), sign(sizeof(T) * size_t(count * k), stream),
      info(sizeof(int) * size_t(2 * count), stream), norm2(sizeof(double) * size_t(count), stream),
      good(sizeof(int) * size_t(count), stream), exponent(sizeof(int) * size_t(count), stream);
  // QR's Q does not depend on the scale: a largest entry near 1 keeps ||A||_F finite at 1e300.
  cuda::scale_to_unit(stream, a, mk, count, exponent.as<int>());
  frobenius2_kernel<<<cuda::blocks_per_matrix(count), kThreads, 0, stream>>>(a, norm2.as<double>(), mk, count);
  CK_CUDA_CHECK(cudaGetLastError());
  cusolverDnHandle_t handle = cusolver_handle(stream);
  const SolverParams params;
  size_t device_bytes = 0, host_bytes = 0;
  CK_CUSOLVER_CHECK(
      cusolverDnXgeqrf_bufferSize(handle, params, m, k, t, a, m, t, tau.as<T>(), t, &device_bytes, &host_bytes));
  int lwork = 0;
  CK_CUSOLVER_CHECK(orgqr_buffer_size(handle, int(m), int(k), a, tau.as<T>(), &lwork));
  DeviceBuffer work(std::max(device_bytes, sizeof(T) * size_t(lwork)), stream);
  std::vector<char> host(host_bytes);
  int* infos = info.as<int>();
  for (int64_t b = 0; b < count; ++b)
    CK_CUSOLVER_CHECK(cusolverDnXgeqrf(handle, params, m, k, t, a + b * mk, m, t, tau.as<T>() + b * k, t,
                                       work.as<void>(), device_bytes, host.data(), host_bytes, infos + b));
  qr_signs_kernel<<<cuda::blocks_per_matrix(count), kThreads, 0, stream>>>(
      a, sign.as<T>(), infos, norm2.as<double>(), good.as<int>(), m, k, count, unit_roundoff<T>());
  CK_CUDA_CHECK(cudaGetLastError());
  for (int64_t b = 0; b < count; ++b)
    CK_CUSOLVER_CHECK(
        orgqr(handle, int(m), int(k), a + b * mk, tau.as<T>() + b * k, work.as<T>(), lwork, infos + count + b));
  apply_signs_kernel<<<matrix_grid(k, count, 1024), kThreads, 0, stream>>>(a, sign.as<T>(), m, k, count);
  CK_CUDA_CHECK(cudaGetLastError());
  std::vector<int> flags(static_cast<size_t>(2 * count));
  std::vector<int> verdict(static_cast<size_t>(count));
  CK_CUDA_CHECK(cudaMemcpyAsync(flags.data(), infos, sizeof(int) * flags.size(), cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(
      cudaMemcpyAsync(verdict.data(), good.as<int>(), sizeof(int) * verdict.size(), cudaMemcpyDeviceToHost, stream));
  CK_CUDA_CHECK(cudaStreamSynchronize(stream));  // also keeps the host workspace alive long enough
  for (int64_t b = 0; b < count; ++b) {
    const bool factored = (verdict[size_t(b)] & kFactored) && flags[size_t(count + b)] == 0;
    ok[size_t(b)] = factored && (verdict[size_t(b)] & kFullRank);
    if (full_rank) (*full_rank)[size_t(b)] = verdict[size_t(b)] & kFullRank;
    if (factored_only) (*factored_only)[size_t(b)] = factored;
  }
  return ok;
}

// d_j = 2^-(e + 2f) (2^f q_j) . (2^e A 2^f Q)_j per column (column-major n x k each), a block per
// (column, matrix), with e = a_exponent[b] and f = q_exponent[b].
template <class T>
__global__ void column_dots_kernel(const T* q, const T* aq, const int* a_exponent, const int* q_exponent, double* d,
                                   int64_t n, int64_t k, int64_t count) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y)
    for (int64_t j = blockIdx.x; j < k; j += gridDim.x) {
      double local = 0;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        local += double(q[b * n * k + j * n + i]) * double(aq[b * n * k + j * n + i]);
      local = cuda::block_sum(local);
      if (threadIdx.x == 0) d[b * k + j] = ldexp(local, -a_exponent[b] - 2 * q_exponent[b]);
    }
}

// error[b] = max |G_b - I| over the k x k matrices G_b (Inf if one is not finite), a block per
// matrix.
template <class T>
__global__ void identity_distance_kernel(const T* g, double* error, int64_t k, int64_t count) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    double worst = 0;
    for (int64_t e = threadIdx.x; e < k * k; e += blockDim.x)
      worst = fmax(worst, numerics::identity_gap(double(g[b * k * k + e]), e / k == e % k));
    worst = cuda::block_max(worst);
    if (threadIdx.x == 0) error[b] = worst;
  }
}

// flag = 1 if any of the `total` entries is NaN or Inf.
template <class T>
__global__ void nonfinite_kernel(const T* a, int64_t total, int* flag) {
  bool finite = true;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    finite &= fabs(double(a[i])) <= DBL_MAX;
  if (!__syncthreads_and(finite) && threadIdx.x == 0) atomicOr(flag, 1);
}

// The bases loaded to `a` must be finite: an ArgumentError naming `name` before anything is
// written (one host synchronization).
template <class T>
void check_finite_bases(cudaStream_t stream, const T* a, int64_t total, const char* name) {
  DeviceBuffer flag(sizeof(int), stream);
  CK_CUDA_CHECK(cudaMemsetAsync(flag.as<int>(), 0, sizeof(int), stream));
  nonfinite_kernel<<<unsigned(std::min<int64_t>((total + kThreads - 1) / kThreads, 1024)), kThreads, 0, stream>>>(
      a, total, flag.as<int>());
  CK_CUDA_CHECK(cudaGetLastError());
  CK_CHECK_VALUE(cuda::read_counter(stream, flag.as<int>()) == 0, "argument '", name, "' contains NaN or Inf");
}

// Matrices in a (..., m, k) stack of bases (m >= k, checked), with `ok` sized for them.
int64_t bases_in(const ArrayView& q, std::vector<bool>& ok) {
  const int64_t m = q.size(-2), k = q.size(-1), count = m > 0 && k > 0 ? q.numel() / (m * k) : 0;
  CK_CHECK_VALUE(k <= m, "argument 'Q' must have at least as many rows as columns, got ", m, " x ", k);
  ok.assign(size_t(count), true);
  return count;
}

}  // namespace

void orthonormalize_qr_cuda(const ArrayView& q, std::vector<bool>& ok, StreamHandle stream_handle) {
  const int64_t m = q.size(-2), k = q.size(-1), count = bases_in(q, ok);
  if (count == 0) return;
  CudaDeviceGuard guard(q.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  CK_DISPATCH_COMPUTE(q.dtype, T, [&] {
    DeviceBuffer a(sizeof(T) * size_t(count * m * k), stream);
    load_columns(stream, q, a.as<T>(), m, k, count);
    check_finite_bases(stream, a.as<T>(), count * m * k, "Q");
    ok = qr_positive(stream, a.as<T>(), m, k, count);
    store_columns(stream, a.as<T>(), q, m, k, count);
    CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  });
}

void orthogonality_cuda(const ArrayView& q, std::vector<double>& error, StreamHandle stream_handle) {
  std::vector<bool> unused;
  const int64_t m = q.size(-2), k = q.size(-1), count = bases_in(q, unused);
  error.assign(size_t(count), 0.0);
  if (count == 0) return;
  CudaDeviceGuard guard(q.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  CK_DISPATCH_COMPUTE(q.dtype, T, [&] {
    DeviceBuffer a(sizeof(T) * size_t(count * m * k), stream), g(sizeof(T) * size_t(count * k * k), stream),
        worst(sizeof(double) * size_t(count), stream);
    load_columns(stream, q, a.as<T>(), m, k, count);
    cuda::gemm(stream, dtype_of<T>(), Op::T, Op::N, int(k), int(k), int(m), 1.0, {a.as<T>(), m, m * k},
               {a.as<T>(), m, m * k}, 0.0, {g.as<T>(), k, k * k}, count);  // Q^T Q
    identity_distance_kernel<<<cuda::blocks_per_matrix(count), kThreads, 0, stream>>>(g.as<T>(), worst.as<double>(), k,
                                                                                      count);
    CK_CUDA_CHECK(cudaGetLastError());
    error = cuda::copy_to_host(stream, worst.as<double>(), count);
  });
}

namespace {

void update_bases(const ArrayView& a_in, const ArrayView& q, const ArrayView& q_out, const ArrayView& estimates,
                  const ArrayView& perm, std::vector<bool>& ok, std::vector<bool>& full_rank,
                  StreamHandle stream_handle) {
  const int64_t n = q.size(-2), k = q.size(-1), count = bases_in(q, ok);
  full_rank.assign(size_t(count), true);
  if (count == 0) return;
  CudaDeviceGuard guard(q.device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  CK_DISPATCH_COMPUTE(q.dtype, T, [&] {
    DeviceBuffer a(sizeof(T) * size_t(count * n * n), stream), qc(sizeof(T) * size_t(count * n * k), stream),
        aq(sizeof(T) * size_t(count * n * k), stream), d(sizeof(double) * size_t(count * k), stream),
        order(sizeof(int64_t) * size_t(count * k), stream), stats(sizeof(MatrixStats) * size_t(count), stream),
        exponent(sizeof(int) * size_t(2 * count), stream);
    cuda::load_symmetric(stream, a_in, a.as<T>(), stats.as<MatrixStats>());
    cuda::check_symmetric(stream, a_in, stats.as<MatrixStats>(), "A");
    cuda::scale_to_unit(stream, a.as<T>(), n * n, count, exponent.as<int>());  // A Q of a huge A would overflow
    load_columns(stream, q, qc.as<T>(), n, k, count);
    check_finite_bases(stream, qc.as<T>(), count * n * k, "Q");
    cuda::scale_to_unit(stream, qc.as<T>(), n * k, count, exponent.as<int>() + count);
    cuda::gemm(stream, dtype_of<T>(), Op::N, Op::N, int(n), int(k), int(n), 1.0, {a.as<T>(), n, n * n},
               {qc.as<T>(), n, n * k}, 0.0, {aq.as<T>(), n, n * k}, count);  // A Q
    column_dots_kernel<<<matrix_grid(k, count, 1024), kThreads, 0, stream>>>(
        qc.as<T>(), aq.as<T>(), exponent.as<int>(), exponent.as<int>() + count, d.as<double>(), n, k, count);
    CK_CUDA_CHECK(cudaGetLastError());
    CK_DISPATCH_FLOATING(estimates.dtype, "out", D, [&] {
      sort_kernel<<<cuda::blocks_per_matrix(count), kThreads, 0, stream>>>(d.as<double>(), order.as<int64_t>(),
                                                                           estimates.ptr<D>(), k, count, true);
    });
    permute_columns_kernel<<<matrix_grid(k, count, 1024), kThreads, 0, stream>>>(aq.as<T>(), qc.as<T>(),
                                                                                 order.as<int64_t>(), n, k, count);
    CK_CUDA_CHECK(cudaGetLastError());
    std::vector<bool> factored(static_cast<size_t>(count)), full(static_cast<size_t>(count));
    qr_positive(stream, qc.as<T>(), n, k, count, &factored, &full);
    // A rank-deficient A Q still gives an orthonormal Q (its last columns complete the basis),
    // as SOAP's own QR: not a failure; full_rank says whether the compute dtype resolved it.
    ok = factored;
    full_rank = full;
    // q^T A q of a huge A and Q can overflow d's dtype: a failure, zeros
    const std::vector<char> overflow = cuda::zero_nonfinite(stream, estimates.dtype, estimates.data, k, count);
    for (int64_t b = 0; b < count; ++b) ok[size_t(b)] = ok[size_t(b)] && !overflow[size_t(b)];
    store_columns(stream, qc.as<T>(), q_out, n, k, count);
    CK_CUDA_CHECK(cudaMemcpyAsync(perm.data, order.as<int64_t>(), sizeof(int64_t) * size_t(count * k),
                                  cudaMemcpyDeviceToHost, stream));
    CK_CUDA_CHECK(cudaStreamSynchronize(stream));
  });
}

}  // namespace

void eigenbasis_update_cuda(const std::vector<ArrayView>& a, const std::vector<ArrayView>& q,
                            const std::vector<ArrayView>& q_out, const std::vector<ArrayView>& estimates,
                            const std::vector<ArrayView>& perm, std::vector<std::vector<bool>>& ok,
                            std::vector<std::vector<bool>>& full_rank, StreamHandle stream) {
  ok.assign(a.size(), {});
  full_rank.assign(a.size(), {});
  for (size_t i = 0; i < a.size(); ++i)
    if (q[i].numel() != 0) update_bases(a[i], q[i], q_out[i], estimates[i], perm[i], ok[i], full_rank[i], stream);
}

}  // namespace curvkit
