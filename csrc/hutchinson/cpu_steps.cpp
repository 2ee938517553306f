// CPU kernels of the fused AdaHessian and Sophia steps: every tensor of the list in one
// OpenMP loop over fixed chunks (whole averaging groups), one pass over memory.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/dispatch.h"
#include "core/runtime.h"
#include "core/simd.h"
#include "hutchinson/hutchinson.h"
#include "hutchinson/step_math.h"

namespace curvkit {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per task

struct Task {
  size_t tensor;
  int64_t begin, end;
};

std::vector<Task> chunk_tasks(const std::vector<ArrayView>& tensors, const std::vector<int64_t>& groups) {
  std::vector<Task> tasks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel(), g = groups.empty() ? 1 : groups[t];
    const int64_t per = std::max<int64_t>(g, kChunk / g * g);
    for (int64_t b = 0; b < n; b += per) tasks.push_back({t, b, std::min(n, b + per)});
  }
  return tasks;
}

template <class T>
using Compute = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
Compute<T> load(const T* p) {
  return Compute<T>(to_double(*p));
}
template <class T>
void store(T* p, Compute<T> v) {
  *p = from_double<T>(double(v));
}
template <>
float load(const float* p) {
  return *p;
}
template <>
void store(float* p, float v) {
  *p = v;
}

// Whether x[begin, end) (at most one task, so the count fits 32 bits) holds NaN or Inf: all
// exponent bits set, counted branch-free in 32-bit lanes so that the loop vectorizes and keeps
// up with memory.
template <class T>
bool any_nonfinite(const T* x, int64_t begin, int64_t end) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  constexpr Bits exponent = sizeof(T) == 8              ? Bits(0x7FF0000000000000ull)
                            : sizeof(T) == 4            ? Bits(0x7F800000u)
                            : std::is_same_v<T, half_t> ? Bits(0x7C00)
                                                        : Bits(0x7F80);
  uint32_t bad = 0;
  for (int64_t j = begin; j < end; ++j) {
    Bits bits;
    std::memcpy(&bits, x + j, sizeof bits);
    bad += uint32_t((bits & exponent) == exponent);
  }
  return bad != 0;
}

// One task of the AdaHessian step: elements [begin, end) of one tensor, whole groups of `group`
// (the tensor's last one may be shorter). Each group's mean |h| is its sequential sum (the
// reference's order), eight groups at a time: eight independent chains of adds instead of one
// whose latency bound the step (~4 cycles an element). The update then runs group by group
// (element by element for groups of one: 1-D tensors), vectorized.
template <class T>
CK_INLINE void adahessian_task_impl(const step_math::AdaHessianElement<Compute<T>>& scalars, T* p, const T* g,
                                    const T* h, T* m, T* v, int64_t begin, int64_t end, int64_t group) {
  using C = Compute<T>;
  const step_math::AdaHessianElement<C> element = scalars;  // a local copy: no store can alias it
  auto update = [&](int64_t j, C d) {
    C pj = load(p + j), mj = load(m + j), vj = load(v + j);
    element(pj, load(g + j), d, mj, vj);
    store(p + j, pj);
    store(m + j, mj);
    store(v + j, vj);
  };
  if (group == 1) {  // the mean of one |h| is |h| (0 + |h|, divided by 1)
    for (int64_t j = begin; j < end; ++j) update(j, std::abs(load(h + j)));
    return;
  }
  constexpr int kChains = 8;
  for (int64_t b = begin; b < end;) {
    if (end - b >= kChains * group) {  // eight whole groups: eight chains
      C sums[kChains] = {};
      for (int64_t j = 0; j < group; ++j)
        for (int q = 0; q < kChains; ++q) sums[q] += std::abs(load(h + b + q * group + j));
      for (int q = 0; q < kChains; ++q) {
        const C d = sums[q] / C(group);
        for (int64_t j = b + q * group; j < b + (q + 1) * group; ++j) update(j, d);
      }
      b += kChains * group;
    } else {  // the rest one group at a time (the tensor's last may be shorter)
      const int64_t e = std::min(end, b + group);
      C sum = C(0);
      for (int64_t j = b; j < e; ++j) sum += std::abs(load(h + j));
      const C d = sum / C(e - b);
      for (int64_t j = b; j < e; ++j) update(j, d);
      b = e;
    }
  }
}

// float and double in AVX-512 / AVX2 clones (the same bits: no FMA contraction, IEEE sqrt and
// division in every lane); the half types widen element by element.
template <class T>
void adahessian_task(const step_math::AdaHessianElement<Compute<T>>& element, T* p, const T* g, const T* h, T* m, T* v,
                     int64_t begin, int64_t end, int64_t group) {
  adahessian_task_impl(element, p, g, h, m, v, begin, end, group);
}
CK_SIMD_CLONES void adahessian_task(const step_math::AdaHessianElement<float>& element, float* p, const float* g,
                                    const float* h, float* m, float* v, int64_t begin, int64_t end, int64_t group) {
  adahessian_task_impl(element, p, g, h, m, v, begin, end, group);
}
CK_SIMD_CLONES void adahessian_task(const step_math::AdaHessianElement<double>& element, double* p, const double* g,
                                    const double* h, double* m, double* v, int64_t begin, int64_t end, int64_t group) {
  adahessian_task_impl(element, p, g, h, m, v, begin, end, group);
}

}  // namespace

NonFiniteEntry first_nonfinite_cpu(const std::vector<const std::vector<ArrayView>*>& lists) {
  const std::vector<ArrayView>& first = *lists[0];
  const std::vector<Task> tasks = chunk_tasks(first, {});
  const size_t count = lists.size();
  std::vector<unsigned char> flags(tasks.size() * count, 0);
  // Backwards, so that the chunks the step then starts with were read last and may still be
  // in the last-level cache.
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads()) if (tasks.size() > 1)
  for (size_t r = 0; r < tasks.size(); ++r) {
    const size_t i = tasks.size() - 1 - r;
    const Task& task = tasks[i];
    for (size_t l = 0; l < count; ++l) {
      const ArrayView& a = (*lists[l])[task.tensor];
      flags[i * count + l] = CK_DISPATCH_FLOATING(
          a.dtype, "params", T, [&] { return any_nonfinite(a.ptr<const T>(), task.begin, task.end); });
    }
  }
  NonFiniteEntry found;
  for (size_t i = 0; i < tasks.size(); ++i) {
    if (found.list >= 0 && tasks[i].tensor != size_t(found.tensor)) break;
    for (size_t l = 0; l < count; ++l) {
      if (!flags[i * count + l] || (found.list >= 0 && int(l) >= found.list)) continue;
      found.list = int(l);
      found.tensor = int64_t(tasks[i].tensor);
    }
  }
  return found;
}

void adahessian_step_cpu(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                         const std::vector<ArrayView>& hessian, const std::vector<ArrayView>& exp_avg,
                         const std::vector<ArrayView>& exp_avg_sq, const AdaHessianOptions& o) {
  const std::vector<Task> tasks = chunk_tasks(params, o.group_sizes);
  const step_math::AdaHessianScalars s =
      step_math::adahessian_scalars(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.hessian_power, o.step);
  const bool vectorizable = step_math::power_is_exact_shortcut(o.hessian_power);
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads()) if (tasks.size() > 1)
  for (size_t i = 0; i < tasks.size(); ++i) {
    const Task& task = tasks[i];
    const size_t t = task.tensor;
    CK_DISPATCH_FLOATING(params[t].dtype, "params", T, [&] {
      const step_math::AdaHessianElement<Compute<T>> element(s);
      T *p = params[t].ptr<T>(), *m = exp_avg[t].ptr<T>(), *v = exp_avg_sq[t].ptr<T>();
      const T *g = grads[t].ptr<T>(), *h = hessian[t].ptr<T>();
      if (vectorizable)
        adahessian_task(element, p, g, h, m, v, task.begin, task.end, o.group_sizes[t]);
      else  // pow element by element: the wider clones only add transitions to it (measured 17%)
        adahessian_task<T>(element, p, g, h, m, v, task.begin, task.end, o.group_sizes[t]);
    });
  }
}

int64_t sophia_step_cpu(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                        const std::vector<ArrayView>& exp_avg, const std::vector<ArrayView>& hessian,
                        const std::vector<ArrayView>& estimates, const SophiaOptions& o) {
  const std::vector<Task> tasks = chunk_tasks(params, {});
  const step_math::SophiaScalars s{
      o.lr, o.beta1, 1.0 - o.beta1, o.beta2, 1.0 - o.beta2, 1.0 - o.lr * o.weight_decay, o.rho * o.batch_size, o.eps};
  int64_t wins = 0;
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads()) if (tasks.size() > 1) reduction(+ : wins)
  for (size_t i = 0; i < tasks.size(); ++i) {
    const Task& task = tasks[i];
    const size_t t = task.tensor;
    wins += CK_DISPATCH_FLOATING(params[t].dtype, "params", T, [&] {
      using C = Compute<T>;
      const step_math::SophiaElement<C> element(s);
      T *p = params[t].ptr<T>(), *m = exp_avg[t].ptr<T>(), *h = hessian[t].ptr<T>();
      const T* g = grads[t].ptr<T>();
      const T* e = estimates.empty() ? nullptr : estimates[t].ptr<T>();
      int64_t count = 0;
      for (int64_t j = task.begin; j < task.end; ++j) {
        C hj = load(h + j);
        if (e) {
          element.update_hessian(hj, load(e + j));
          store(h + j, hj);
        }
        C pj = load(p + j), mj = load(m + j);
        count += element(pj, load(g + j), mj, hj);
        store(p + j, pj);
        store(m + j, mj);
      }
      return count;
    });
  }
  return o.count_wins ? wins : 0;
}

}  // namespace curvkit
