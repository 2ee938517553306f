"""Threads and signals: calls from many Python threads at once, thread-count changes during
calls, the bounds of set_num_threads, iteration that cannot progress, and Ctrl-C during a
long call (issue 14)."""
import signal
import threading
import time
import warnings

import numpy as np
import pytest
from conftest import TOL, torch

import curvkit
from curvkit import _core
from curvkit import testing as reference
from curvkit.newton_schulz import schedule


@pytest.fixture
def restore_threads():
    before = curvkit.get_num_threads()
    yield before
    _core.set_num_threads(before)


def _run_threads(workers, toggle=False, seconds=None):
    """Runs each worker in its own thread (and, with toggle, one more that flips the thread
    count between 1 and 2 until they finish); re-raises the first worker error."""
    errors = []
    done = threading.Event()

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                errors.append(e)
        return run

    def toggler():
        n = 0
        while not done.is_set():
            _core.set_num_threads(1 + n % 2)  # _core: no warning on a 1-core machine
            n += 1
            time.sleep(0.0005)

    threads = [threading.Thread(target=guard(w)) for w in workers]
    flipper = threading.Thread(target=toggler) if toggle else None
    if flipper:
        flipper.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds)
    done.set()
    if flipper:
        flipper.join()
    assert not any(t.is_alive() for t in threads), "a worker did not finish"
    if errors:
        raise errors[0]


# ---- thread count: bounds, warning, one snapshot per call


@pytest.mark.parametrize("n", [0, -1, _core.MAX_THREADS + 1, 100000, 2**40, 2**70])
def test_set_num_threads_out_of_range(n):
    with pytest.raises(curvkit.ArgumentError, match="'n'"):
        curvkit.set_num_threads(n)


@pytest.mark.parametrize("n", [1.5, "2", None, True])
def test_set_num_threads_wrong_type(n):
    with pytest.raises(curvkit.ArgumentTypeError, match="'n'"):
        curvkit.set_num_threads(n)


def test_max_threads_is_1024():
    assert _core.MAX_THREADS == 1024
    with pytest.raises(ValueError, match="'n'"):
        _core.set_num_threads(1025)  # the C++ check too, without the Python wrapper


def test_set_num_threads_warns_above_the_cores(restore_threads):
    cores = len(__import__("os").sched_getaffinity(0))
    with pytest.warns(RuntimeWarning, match="more threads than"):
        curvkit.set_num_threads(cores + 1)
    assert curvkit.get_num_threads() == cores + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curvkit.set_num_threads(cores)  # no warning at the core count


def test_many_threads_run(restore_threads):
    # far more threads than cores: slower, but correct (was a segfault at 100000, now refused)
    G = [np.random.default_rng(i).standard_normal((6, 6)) for i in range(8)]
    expected = curvkit.polar(G)
    _core.set_num_threads(256)
    got = curvkit.polar(G)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("shape", [(300, 517), (517, 300), (257, 257)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_polar_products_split_over_a_team(restore_threads, threads, method, shape, dtype):
    # One matrix: its products are cut into bands of rows or columns, one per thread
    # (team_blas); uneven bands, and more threads than cores, give the reference iteration.
    G = np.random.default_rng(threads).standard_normal(shape).astype(dtype)
    _core.set_num_threads(threads)
    X = curvkit.polar(G, 5, "you", method=method)
    expected = reference.newton_schulz(G.astype(np.float64), *schedule("you", 5))
    np.testing.assert_allclose(X, expected, atol=TOL[(np.dtype(dtype).name, "polar")])


def test_set_num_threads_during_polar(restore_threads):
    # was a segfault: workspaces sized from one read of the thread count, the loop from another
    rng = np.random.default_rng(0)
    G = [rng.standard_normal((16, 24)) for _ in range(16)]
    _core.set_num_threads(1)
    expected = curvkit.polar(G)

    def worker():
        for _ in range(15):
            got = curvkit.polar(G)
            assert all(np.array_equal(a, b) for a, b in zip(got, expected))

    _run_threads([worker] * 4, toggle=True, seconds=60)


def test_blas_threads_restored_after_concurrent_calls(restore_threads):
    # was left at 1: each call saved and restored OpenBLAS's count, and overlapping calls
    # restored each other's 1
    _core.set_num_threads(2)
    before = curvkit.config()["blas_threads"]
    rng = np.random.default_rng(1)
    G = [rng.standard_normal((12, 12)) for _ in range(8)]
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        for _ in range(20):
            curvkit.polar(G)

    _run_threads([worker] * 8, seconds=60)
    assert curvkit.get_num_threads() == 2
    assert curvkit.config()["blas_threads"] == before


def test_set_num_threads_while_blas_is_single_threaded(restore_threads):
    # a setting made while another call holds OpenBLAS at 1 takes effect when that call ends
    rng = np.random.default_rng(2)
    G = [rng.standard_normal((32, 32)) for _ in range(64)]
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            curvkit.polar(G, steps=20)

    t = threading.Thread(target=worker)
    t.start()
    try:
        for n in (1, 2, 1, 2):
            _core.set_num_threads(n)
            time.sleep(0.01)
    finally:
        stop.set()
        t.join()
    assert curvkit.config()["blas_threads"] == "2"


# ---- every family at once, bit-identical to single-threaded calls


def _family_calls():
    rng = np.random.default_rng(3)
    n = 6

    def spd(k):
        B = rng.standard_normal((k, n, n))
        return B @ B.transpose(0, 2, 1) + n * np.eye(n)

    G = rng.standard_normal((5, n, n + 3))
    W = rng.standard_normal((5, n, n + 3))
    A = spd(5)
    S = spd(4)
    C = rng.standard_normal((4, n, n))
    C = C + C.transpose(0, 2, 1)
    Q = rng.standard_normal((5, n + 4, n))
    Qo = np.linalg.qr(Q)[0]

    def update():
        param = W.copy()
        curvkit.polar_update_(param, G, lr=0.1)
        return param

    return {
        "probes": lambda: curvkit.probes((3, 40, 4), kind="gaussian", seed=7),
        "polar": lambda: curvkit.polar(G),
        "polar_list": lambda: curvkit.polar(list(G)),
        "polar_update_": update,
        "matrix_sqrt": lambda: curvkit.matrix_sqrt(A),
        "matrix_sqrt_eigh": lambda: curvkit.matrix_sqrt(A, method="eigh"),
        "solve_lyapunov": lambda: curvkit.solve_lyapunov(S, C),
        "matrix_inverse_root": lambda: curvkit.matrix_inverse_root(A, p=4),
        "matrix_inverse_root_newton": lambda: curvkit.matrix_inverse_root(A, p=2, method="newton"),
        "eigh": lambda: curvkit.eigh(A),
        "orthonormalize": lambda: curvkit.orthonormalize(Q),
        "orthonormalize_polar": lambda: curvkit.orthonormalize(Qo * 1.01, "polar"),
        "eigenbasis_update": lambda: curvkit.eigenbasis_update(A, Qo[:, :n, :]),
    }


def _flatten(result):
    if isinstance(result, (tuple, list)):
        return [x for r in result for x in _flatten(r)]
    return [np.asarray(result)]


def test_every_family_concurrently_bit_identical(restore_threads):
    calls = _family_calls()
    _core.set_num_threads(1)
    expected = {name: _flatten(fn()) for name, fn in calls.items()}
    names = list(calls)

    def worker(offset):
        def run():
            for k in range(40 * len(names)):
                name = names[(k + offset) % len(names)]
                got = _flatten(calls[name]())
                assert len(got) == len(expected[name])
                for a, b in zip(got, expected[name]):
                    assert np.array_equal(a, b), f"{name} differs from its single-threaded result"
        return run

    start = time.monotonic()
    _run_threads([worker(i) for i in range(4)], toggle=True, seconds=60)
    assert time.monotonic() - start < 10


# ---- iterations that cannot progress stop


def test_lyapunov_singular_s_stalls():
    # was a hang with max_iters=2**31-1: the zero eigenvalue of B never moves
    start = time.monotonic()
    X, info = curvkit.solve_lyapunov(np.diag([0.0, 1, 2, 3]), np.eye(4), max_iters=2**31 - 1, return_info=True)
    assert time.monotonic() - start < 1
    assert not info["converged"]
    assert info["iterations"] <= 200


def test_lyapunov_nonsingular_unchanged_by_the_step_limit():
    S = np.diag([1e-12, 1.0, 2.0, 3.0])  # condition 3e12: takes many steps, converges
    X, info = curvkit.solve_lyapunov(S, np.eye(4), max_iters=2**31 - 1, return_info=True)
    assert info["converged"]
    np.testing.assert_allclose(S @ X + X @ S, np.eye(4), atol=1e-8)


# ---- Ctrl-C during a long call


def _interrupt_after(delay):
    """Sends SIGINT to the main thread after `delay` s; returns a list that gets the send time."""
    sent = []
    main = threading.main_thread().ident

    def fire():
        time.sleep(delay)
        sent.append(time.monotonic())
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=fire, daemon=True).start()
    return sent


needs_main_thread = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                       reason="signals reach only the main thread")


@needs_main_thread
@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="SIGINT is not Python's default handler here")
@pytest.mark.parametrize("case", ["one_matrix", "matrix_list", "newton_root",
                                  pytest.param("newton_root_cuda", marks=pytest.mark.skipif(
                                      not (curvkit.has_cuda() and torch is not None and torch.cuda.is_available()),
                                      reason="needs PyTorch with CUDA and a CUDA build of curvkit"))])
def test_keyboard_interrupt_is_prompt(case, restore_threads):
    rng = np.random.default_rng(4)
    if case == "one_matrix":  # the iterate loop of one large task (about 30 s uninterrupted)
        G = rng.standard_normal((256, 256))

        def call():
            return curvkit.polar(G, steps=10_000)
    elif case == "matrix_list":  # one matrix per OpenMP thread: the flag crosses the region
        G = [rng.standard_normal((64, 64)) for _ in range(8)]

        def call():
            return curvkit.polar(G, steps=10_000)
    else:  # Newton's loop; a huge p makes each step long, checked between its products
        B = rng.standard_normal((96, 96))
        A = B @ B.T / 96 + np.eye(96)
        if case == "newton_root_cuda":  # the host loop, between steps
            A = torch.from_numpy(A).cuda()

        def call():
            return curvkit.matrix_inverse_root([A] * 4, p=2**30, method="newton", max_iters=2**31 - 1,
                                               return_info=True)
    small = rng.standard_normal((5, 7))
    reference = curvkit.polar(small)
    sent = _interrupt_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        call()
        time.sleep(5)  # not interrupted in the call: wait for the signal here, then fail below
    assert sent and time.monotonic() - sent[0] < 1.0
    # the library is usable afterwards, with OpenBLAS's count back
    assert np.array_equal(curvkit.polar(small), reference)
    assert curvkit.config()["blas_threads"] == str(min(curvkit.get_num_threads(), 64))


def test_calls_in_other_threads_are_not_interrupted():
    # signals go to the main thread; a worker thread's call neither sees nor consumes them
    result = []

    def worker():
        result.append(curvkit.polar(np.eye(4), steps=50, coefficients=[(1.5, -0.5, 0.0)]))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert np.allclose(result[0], np.eye(4))
