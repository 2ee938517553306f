"""The cost of the NaN/Inf check of the fused AdaHessian and Sophia steps over the ResNet-18
parameter list (62 float32 tensors, 11.2M entries): each step with its check (the default)
and without it (check_finite=False, the unchecked kernel alone), interleaved call by call in
rotating order, so that a noisy shared machine loads both sides alike. Prints the medians and
the median of the per-round ratios checked / unchecked.

Run: python bench/check_finite_cost.py [rounds] [threads]
"""
import statistics
import sys
import time

import torch
from baselines.hutchinson import resnet18_cifar_shapes

import curvkit


def main(rounds: int, threads: int) -> None:
    curvkit.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    shapes = resnet18_cifar_shapes()
    make = lambda: [torch.randn(s, generator=gen) for s in shapes]  # noqa: E731
    p, g, h, m, v = make(), make(), make(), make(), [x.abs() for x in make()]
    hess = [x.abs() for x in make()]
    calls = {
        "adahessian checked": lambda: curvkit.adahessian_step_(p, g, h, m, v, step=10, lr=1e-3),
        "adahessian unchecked": lambda: curvkit.adahessian_step_(p, g, h, m, v, step=10, lr=1e-3,
                                                                 check_finite=False),
        "sophia checked": lambda: curvkit.sophia_step_(p, g, m, hess),
        "sophia unchecked": lambda: curvkit.sophia_step_(p, g, m, hess, check_finite=False),
    }
    names = list(calls)
    for fn in calls.values():  # warm up: first-touch page faults, thread pools
        fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    count = sum(x.numel() for x in p)
    print(f"{len(shapes)} tensors, {count} float32 entries, {rounds} rounds, curvkit threads "
          f"{curvkit.get_num_threads()}")
    for name in names:
        print(f"{name:22s} median {1e3 * statistics.median(times[name]):7.2f} ms")
    for step in ("adahessian", "sophia"):
        ratios = [a / b for a, b in zip(times[f"{step} checked"], times[f"{step} unchecked"])]
        print(f"{step}: checked / unchecked, median of per-round ratios {statistics.median(ratios):.3f} "
              f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.3f} to {statistics.quantiles(ratios, n=4)[2]:.3f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 41, int(sys.argv[2]) if len(sys.argv) > 2 else
         curvkit.get_num_threads())
