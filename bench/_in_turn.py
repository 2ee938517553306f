"""Implementations timed in turn within one benchmark: each round calls every one once, each
call timed on its own, so a slow spell of the VM falls on all of them alike (a benchmark per
implementation times one for seconds, then the next). The summary (conftest.py) prints each
one's median and its ratio to curvkit's."""
import statistics
import time


def in_turn(benchmark, calls, rounds):
    """Times `calls` ({impl: callable}) in turn for `rounds` rounds after one warm-up round (one
    round with --benchmark-disable)."""
    times = {impl: [] for impl in calls}

    def turn():
        for impl, call in calls.items():
            start = time.perf_counter()
            call()
            times[impl].append(time.perf_counter() - start)

    benchmark.pedantic(turn, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info.update(impl="in turn", in_turn={impl: statistics.median(t[-rounds:])
                                                         for impl, t in times.items()})


def after(first, call, *args):
    """A call that runs first() (the model's own PyTorch work, say) and then call(*args)."""
    def both():
        first()
        call(*args)
    return both
