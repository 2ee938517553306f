// Symmetric eigendecompositions on CUDA (eigh_cuda), and the eigenpairs the Eigh roots use
// (cuda_roots.cu): cuSOLVER's batched syev, or a warm-start basis refined on the device by the
// Ogita-Aishima iteration (refine_eigenbasis in cpu.cpp, with its rules from core/numerics.h).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "inverse_root/cuda_kernels.cuh"

namespace curvkit {
namespace {

// Eigenvalues, n per matrix; zeros for a matrix whose info is nonzero.
template <class T, class D>
__global__ void store_values_kernel(const T* src, D* dst, const int* info, int64_t n, int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_double<D>(info[i / n] != 0 ? 0.0 : double(src[i]));
}

// ---- Warm-started eigenbases: the Ogita-Aishima refinement of refine_eigenbasis (cpu.cpp)
// on the device, S = V^T A V, R = I - V^T V, d_i = s_ii / (1 - r_ii), V <- V (I + E).

// One matrix's refinement. off, off_r and scale are maxima (atomicMax on the bits of
// nonnegative doubles), the flags ORs, all reset by the watch each step; ||E||_F^2 is summed
// by the watch from the blocks' slots.
struct RefineState {
  double previous_off;
  double off, off_r, scale;
  int steps, evaluations;
  int active;        // needs another evaluation
  int apply;         // this step's correction is applied
  int fell_back;     // too far off: decomposed by cuSOLVER instead
  int coupled;       // eigenvalues that mixed (the CPU separates them in place; here: cuSOLVER)
  int higher_order;  // a pair outside the first-order regime got E_ij = r_ij / 2
  int nonfinite;
};

__global__ void refine_reset_kernel(RefineState* rs, const int* warm, int64_t count) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < count) rs[b] = RefineState{INFINITY, 0, 0, 0, 0, 0, warm[b], 0, !warm[b], 0, 0, 0};
}

// d_i = s_ii / (1 - r_ii) and max |d|, a block per matrix.
template <class T>
__global__ void refine_eigenvalues_kernel(const T* s, const T* r, T* d, RefineState* rs, int64_t n, int64_t count) {
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    double local = 0;
    bool finite = true;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const T di = T(double(s[b * n * n + i * n + i]) / (1 - double(r[b * n * n + i * n + i])));
      d[b * n + i] = di;
      finite &= fabs(double(di)) <= DBL_MAX;
      local = fmax(local, fabs(double(di)));
    }
    if (!finite) rs[b].nonfinite = 1;
    block_max_into(finite ? local : 0.0, &rs[b].scale);
  }
}

// E (column-major, E(i, j) at j n + i) and the step's reductions, as in refine_eigenbasis;
// this block's share of ||E||_F^2 goes to its slot, correction2[b * gridDim.x + blockIdx.x].
template <class T>
__global__ void refine_correction_kernel(const T* s, const T* r, const T* d, T* e, RefineState* rs, double* correction2,
                                         int64_t n, int64_t count, double floor_r) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    const double floor_s = floor_r * rs[b].scale;
    double off = 0, off_r = 0, e2 = 0;
    bool coupled = false, higher = false, finite = true;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
      const double dj = d[b * n + j];
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const int64_t at = b * n * n + j * n + i;
        const double sij = s[at], rij = r[at], di = d[b * n + i], gap = dj - di;
        finite &= fabs(sij) <= DBL_MAX && fabs(rij) <= DBL_MAX;
        const bool first_order = numerics::first_order(sij, rij, di, dj, i == j);
        const T eij = T(first_order ? (sij + dj * rij) / gap : rij / 2);
        e[at] = eij;
        e2 += double(eij) * double(eij);
        if (i != j) {
          off = fmax(off, fabs(sij));
          coupled |= numerics::strongly_coupled(fabs(sij), floor_s, gap);
          higher |= !first_order;
        }
        off_r = fmax(off_r, fabs(rij));
      }
    }
    if (!finite) rs[b].nonfinite = 1;
    if (coupled) rs[b].coupled = 1;
    if (higher) rs[b].higher_order = 1;
    block_max_into(finite ? off : 0.0, &rs[b].off);
    block_max_into(finite ? off_r : 0.0, &rs[b].off_r);
    const double total = cuda::block_sum(e2);
    if (threadIdx.x == 0) correction2[b * gridDim.x + blockIdx.x] = total;
  }
}

// The decisions of refine_eigenbasis per matrix; counts the matrices that need another
// evaluation. A correction with ||E||_F^2 <= u in the first-order regime is applied and ends
// the refinement (its S and R are at rounding level unseen).
__global__ void refine_watch_kernel(RefineState* rs, const double* correction2, int slots, int64_t count,
                                    double floor_r, double unit, int max_steps, int* active) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= count) return;
  RefineState& s = rs[b];
  s.apply = 0;
  if (s.active) {
    ++s.evaluations;
    const double floor_s = floor_r * s.scale;
    if (s.nonfinite || !(s.scale <= DBL_MAX)) {
      s.active = 0;
      s.fell_back = 1;
    } else if (numerics::refine_converged(s.off, s.off_r, floor_s, floor_r)) {
      s.active = 0;
    } else if (numerics::refine_too_far(s.steps, max_steps, s.off, s.previous_off, s.off_r) || s.coupled) {
      s.active = 0;
      s.fell_back = 1;
    } else {
      s.previous_off = s.off;
      ++s.steps;
      s.apply = 1;
      double e2 = 0;  // in slot order
      for (int k = 0; k < slots; ++k) e2 += correction2[b * slots + k];
      if (!s.higher_order && e2 <= unit)
        s.active = 0;
      else
        atomicAdd(active, 1);
    }
  }
  s.off = s.off_r = s.scale = 0;
  s.coupled = s.higher_order = s.nonfinite = 0;
}

// E <- 0 for the matrices whose correction is not applied (their V stays bit-identical).
template <class T>
__global__ void refine_mask_kernel(T* e, const RefineState* rs, int64_t n, int64_t count) {
  for (int64_t b = blockIdx.y; b < count; b += gridDim.y) {
    if (rs[b].apply) continue;
    for (int64_t j = blockIdx.x; j < n; j += gridDim.x)
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) e[b * n * n + j * n + i] = T(0);
  }
}

// cuSOLVER's batched syev on a contiguous stack (column-major, eigenvectors overwrite a,
// eigenvalues ascending in w, info per matrix), in chunks within its 32-bit size limit.
template <class T>
void syev_batched(cudaStream_t stream, T* a, T* w, int* info, int64_t n, int64_t count) {
  CK_CHECK_VALUE(n * n <= INT32_MAX, "argument 'A': matrix dimension ", n, " is too large for cuSOLVER's eigh");
  const int64_t chunk = std::max<int64_t>(1, INT32_MAX / (n * n));
  const cudaDataType t = cuda::data_type(dtype_of<T>());
  cusolverDnHandle_t handle = cusolver_handle(stream);
  const SolverParams params;
  for (int64_t start = 0; start < count; start += chunk) {
    const int64_t batch = std::min(chunk, count - start);
    T* ab = a + start * n * n;
    T* wb = w + start * n;
    size_t device_bytes = 0, host_bytes = 0;
    CK_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(handle, params, CUSOLVER_EIG_MODE_VECTOR,
                                                        CUBLAS_FILL_MODE_LOWER, n, t, ab, n, t, wb, t, &device_bytes,
                                                        &host_bytes, batch));
    DeviceBuffer work(device_bytes, stream);
    std::vector<char> host(host_bytes);
    CK_CUSOLVER_CHECK(cusolverDnXsyevBatched(handle, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, t, ab,
                                             n, t, wb, t, work.as<void>(), device_bytes, host.data(), host_bytes,
                                             info + start, batch));
    if (host_bytes) CK_CUDA_CHECK(cudaStreamSynchronize(stream));  // the host workspace must outlive the call
  }
}

}  // namespace

namespace inverse_root_cuda {

template <class T>
EigenpairsInfo eigenpairs(cudaStream_t stream, const T* a, T* v, T* w, int* info, const std::vector<char>& warm,
                          int64_t n, int64_t count) {
  const int64_t nn = n * n;
  const int ni = int(n);
  const size_t bytes = size_t(count * nn) * sizeof(T);
  EigenpairsInfo out{std::vector<int>(size_t(count), -1), std::vector<char>(size_t(count), 0),
                     std::vector<double>(size_t(count), 0.0)};
  CK_CUDA_CHECK(cudaMemsetAsync(info, 0, sizeof(int) * size_t(count), stream));
  const bool any_warm = std::any_of(warm.begin(), warm.end(), [](char c) { return c != 0; });
  std::vector<int64_t> decompose;  // matrices for cuSOLVER
  if (any_warm) {
    const double f = cuda::symmetric_product_fraction(ni);
    const double floor_r = numerics::refine_floor(n, unit_roundoff<T>());
    DeviceBuffer av(bytes, stream), sm(bytes, stream), rm(bytes, stream), em(bytes, stream), v0(bytes, stream),
        flags(sizeof(int) * size_t(count), stream), states(sizeof(RefineState) * size_t(count) + sizeof(int), stream);
    RefineState* rs = states.as<RefineState>();
    int* active = reinterpret_cast<int*>(rs + count);
    std::vector<int> warm_int(warm.begin(), warm.end());
    cuda::copy_to_device(stream, flags.as<void>(), warm_int.data(), sizeof(int) * warm_int.size());
    const unsigned per_state = unsigned((count + 127) / 128);
    refine_reset_kernel<<<per_state, 128, 0, stream>>>(rs, flags.as<int>(), count);
    CK_CUDA_CHECK(cudaGetLastError());
    const DType dt = dtype_of<T>();
    const Stack sa{const_cast<T*>(a), n, nn}, sv{v, n, nn}, sav{av.as<T>(), n, nn}, ss{sm.as<T>(), n, nn},
        sr{rm.as<T>(), n, nn}, se{em.as<T>(), n, nn}, sv0{v0.as<T>(), n, nn};
    const dim3 elements = matrix_grid(n, count, 1024), reduce = matrix_grid(n, count, 32);
    DeviceBuffer correction2(sizeof(double) * reduce.x * size_t(count), stream);  // slots of ||E||_F^2
    for (int it = 0;; ++it) {
      cuda::gemm(stream, dt, Op::N, Op::N, ni, ni, ni, 1.0, sa, sv, 0.0, sav, count);  // A V
      // S = V^T A V and -V^T V, then mirrored even where symmetric_product runs one plain product:
      // E_ij + E_ji = r_ij needs s_ij = s_ji to the last bit (refine_eigenbasis in cpu.cpp)
      cuda::symmetric_product(stream, dt, Op::T, Op::N, ni, ni, 1.0, sv, sav, 0.0, ss, count, false);
      cuda::symmetric_product(stream, dt, Op::T, Op::N, ni, ni, -1.0, sv, sv, 0.0, sr, count, false);
      cuda::mirror_lower(stream, dt, ss, ni, count);
      cuda::mirror_lower(stream, dt, sr, ni, count);
      cuda::scale_add_identity(stream, dt, sr, sr, ni, count, 1.0, 1.0);  // I - V^T V
      refine_eigenvalues_kernel<<<cuda::blocks_per_matrix(count), kThreads, 0, stream>>>(sm.as<T>(), rm.as<T>(), w, rs,
                                                                                         n, count);
      refine_correction_kernel<<<reduce, kThreads, 0, stream>>>(sm.as<T>(), rm.as<T>(), w, em.as<T>(), rs,
                                                                correction2.as<double>(), n, count, floor_r);
      CK_CUDA_CHECK(cudaMemsetAsync(active, 0, sizeof(int), stream));
      refine_watch_kernel<<<per_state, 128, 0, stream>>>(rs, correction2.as<double>(), int(reduce.x), count, floor_r,
                                                         unit_roundoff<T>(), numerics::kMaxRefineSteps, active);
      refine_mask_kernel<<<elements, kThreads, 0, stream>>>(em.as<T>(), rs, n, count);
      CK_CUDA_CHECK(cudaGetLastError());
      CK_CUDA_CHECK(cudaMemcpyAsync(v0.as<void>(), v, bytes, cudaMemcpyDeviceToDevice, stream));
      cuda::gemm(stream, dt, Op::N, Op::N, ni, ni, ni, 1.0, sv0, se, 1.0, sv, count);  // V <- V + V E
      // the host looks every 4 steps
      if ((it % 4 == 3 || it >= numerics::kMaxRefineSteps) && cuda::read_counter(stream, active) == 0) break;
    }
    const std::vector<RefineState> host = cuda::copy_to_host(stream, rs, count);
    for (int64_t b = 0; b < count; ++b) {
      const RefineState& h = host[size_t(b)];
      if (!warm[size_t(b)]) continue;
      out.products[size_t(b)] = h.evaluations * (1 + 2 * f) + h.steps;
      out.fell_back[size_t(b)] = char(h.fell_back);
      if (!h.fell_back) out.steps[size_t(b)] = h.steps;
    }
  }
  for (int64_t b = 0; b < count; ++b)
    if (out.steps[size_t(b)] < 0) decompose.push_back(b);
  if (int64_t(decompose.size()) == count) {  // all of them: cuSOLVER in place
    CK_CUDA_CHECK(cudaMemcpyAsync(v, a, bytes, cudaMemcpyDeviceToDevice, stream));
    syev_batched(stream, v, w, info, n, count);
  } else if (!decompose.empty()) {  // cuSOLVER for the rest, gathered into one batch
    const int64_t k = int64_t(decompose.size());
    DeviceBuffer g(sizeof(T) * size_t(k * nn), stream), gw(sizeof(T) * size_t(k * n), stream),
        gi(sizeof(int) * size_t(k), stream);
    for (int64_t q = 0; q < k; ++q)
      CK_CUDA_CHECK(cudaMemcpyAsync(g.as<T>() + q * nn, a + decompose[size_t(q)] * nn, sizeof(T) * size_t(nn),
                                    cudaMemcpyDeviceToDevice, stream));
    syev_batched(stream, g.as<T>(), gw.as<T>(), gi.as<int>(), n, k);
    for (int64_t q = 0; q < k; ++q) {
      const int64_t b = decompose[size_t(q)];
      CK_CUDA_CHECK(
          cudaMemcpyAsync(v + b * nn, g.as<T>() + q * nn, sizeof(T) * size_t(nn), cudaMemcpyDeviceToDevice, stream));
      CK_CUDA_CHECK(
          cudaMemcpyAsync(w + b * n, gw.as<T>() + q * n, sizeof(T) * size_t(n), cudaMemcpyDeviceToDevice, stream));
      CK_CUDA_CHECK(cudaMemcpyAsync(info + b, gi.as<int>() + q, sizeof(int), cudaMemcpyDeviceToDevice, stream));
    }
  }
  if (any_warm) {  // refined eigenpairs come unsorted: ascending, eigenvectors alike
    DeviceBuffer order(sizeof(int64_t) * size_t(count * n), stream), sorted(sizeof(T) * size_t(count * n), stream),
        vs(bytes, stream);
    sort_kernel<<<cuda::blocks_per_matrix(count), kThreads, 0, stream>>>(w, order.as<int64_t>(), sorted.as<T>(), n,
                                                                         count, false);
    permute_columns_kernel<<<matrix_grid(n, count, 1024), kThreads, 0, stream>>>(v, vs.as<T>(), order.as<int64_t>(), n,
                                                                                 n, count);
    CK_CUDA_CHECK(cudaGetLastError());
    CK_CUDA_CHECK(cudaMemcpyAsync(v, vs.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream));
    CK_CUDA_CHECK(
        cudaMemcpyAsync(w, sorted.as<void>(), sizeof(T) * size_t(count * n), cudaMemcpyDeviceToDevice, stream));
  }
  return out;
}

template EigenpairsInfo eigenpairs<float>(cudaStream_t, const float*, float*, float*, int*, const std::vector<char>&,
                                          int64_t, int64_t);
template EigenpairsInfo eigenpairs<double>(cudaStream_t, const double*, double*, double*, int*,
                                           const std::vector<char>&, int64_t, int64_t);

}  // namespace inverse_root_cuda

void eigh_cuda(const std::vector<ArrayView>& inputs, const std::vector<ArrayView>& values,
               const std::vector<ArrayView>& vectors, const std::vector<const ArrayView*>& bases,
               std::vector<std::vector<bool>>& ok, std::vector<std::vector<int>>& steps, StreamHandle stream_handle) {
  ok.assign(inputs.size(), {});
  steps.assign(inputs.size(), {});
  if (inputs.empty()) return;
  CudaDeviceGuard guard(inputs[0].device);
  const cudaStream_t stream = to_cuda_stream(stream_handle);
  for (size_t i = 0; i < inputs.size(); ++i) {
    ok[i].assign(size_t(leading_count(inputs[i])), true);
    steps[i].assign(ok[i].size(), -1);
    const int64_t count = matrices_in(inputs[i]);
    if (count == 0) continue;
    DeviceBuffer stats(sizeof(MatrixStats) * size_t(count), stream);
    cuda::load_symmetric<double>(stream, inputs[i], nullptr, stats.as<MatrixStats>());
    cuda::check_symmetric(stream, inputs[i], stats.as<MatrixStats>(), "A");
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t n = inputs[i].size(-1), count = matrices_in(inputs[i]);
    if (count == 0) continue;
    CK_DISPATCH_COMPUTE(inputs[i].dtype, T, [&] {
      DeviceBuffer a(sizeof(T) * size_t(count * n * n), stream), v(sizeof(T) * size_t(count * n * n), stream),
          w(sizeof(T) * size_t(count * n), stream), info(sizeof(int) * size_t(count), stream),
          stats(sizeof(MatrixStats) * size_t(count), stream);
      cuda::load_symmetric(stream, inputs[i], a.as<T>(), stats.as<MatrixStats>());
      if (bases[i]) load_columns(stream, *bases[i], v.as<T>(), n, n, count);
      const EigenpairsInfo refined = eigenpairs(stream, a.as<T>(), v.as<T>(), w.as<T>(), info.as<int>(),
                                                std::vector<char>(size_t(count), bases[i] ? 1 : 0), n, count);
      finite_verdict_kernel<<<cuda::blocks_per_matrix(count), kThreads, 0, stream>>>(v.as<T>(), w.as<T>(),
                                                                                     info.as<int>(), n, count);
      store_columns(stream, v.as<T>(), vectors[i], n, n, count, info.as<int>(), OnFailure::Zero);
      CK_DISPATCH_FLOATING(values[i].dtype, "out", D, [&] {
        store_values_kernel<<<grid_for(count * n, kThreads), kThreads, 0, stream>>>(w.as<T>(), values[i].ptr<D>(),
                                                                                    info.as<int>(), n, count * n);
      });
      CK_CUDA_CHECK(cudaGetLastError());
      // n max|A| can overflow a float16 output: a failure, zeros
      const std::vector<char> overflow = cuda::zero_nonfinite(stream, values[i].dtype, values[i].data, n, count);
      const std::vector<int> host = cuda::copy_to_host(stream, info.as<int>(), count);
      for (int64_t b = 0; b < count; ++b) {
        ok[i][size_t(b)] = host[size_t(b)] == 0 && !overflow[size_t(b)];
        steps[i][size_t(b)] = refined.steps[size_t(b)];
      }
    });
  }
}

}  // namespace curvkit
