// CPU kernels of the fused AdaHessian and Sophia steps: every tensor of the list in one
// OpenMP loop over fixed chunks (whole averaging groups), one pass over memory.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "core/dispatch.h"
#include "core/runtime.h"
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

}  // namespace

void adahessian_step_cpu(const std::vector<ArrayView>& params, const std::vector<ArrayView>& grads,
                         const std::vector<ArrayView>& hessian, const std::vector<ArrayView>& exp_avg,
                         const std::vector<ArrayView>& exp_avg_sq, const AdaHessianOptions& o) {
  const std::vector<Task> tasks = chunk_tasks(params, o.group_sizes);
  const step_math::AdaHessianScalars s =
      step_math::adahessian_scalars(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.hessian_power, o.step);
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads()) if (tasks.size() > 1)
  for (size_t i = 0; i < tasks.size(); ++i) {
    const Task& task = tasks[i];
    const size_t t = task.tensor;
    CK_DISPATCH_FLOATING(params[t].dtype, "params", T, [&] {
      using C = Compute<T>;
      const step_math::AdaHessianElement<C> element(s);
      T *p = params[t].ptr<T>(), *m = exp_avg[t].ptr<T>(), *v = exp_avg_sq[t].ptr<T>();
      const T *g = grads[t].ptr<T>(), *h = hessian[t].ptr<T>();
      const int64_t group = o.group_sizes[t];
      for (int64_t b = task.begin; b < task.end; b += group) {
        const int64_t e = std::min(task.end, b + group);
        C sum = C(0);
        for (int64_t j = b; j < e; ++j) sum += std::abs(load(h + j));
        const C d = sum / C(e - b);
        for (int64_t j = b; j < e; ++j) {
          C pj = load(p + j), mj = load(m + j), vj = load(v + j);
          element(pj, load(g + j), d, mj, vj);
          store(p + j, pj);
          store(m + j, mj);
          store(v + j, vj);
        }
      }
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
