"""The intake path: every framework, device, dtype, layout and size goes in and comes back
unchanged (through curvkit's strided copy), and the three import paths all work."""
import array
import gc
import sys
import threading
import weakref

import numpy as np
import pytest
from conftest import DTYPES, backend_dtypes, backends, make, needs_torch, raw_bits, to_numpy

import curvkit
from curvkit import _arrays, _core
from curvkit import testing as reference


def _values(rng, shape):
    return rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, size=shape)


def _data_ptr(x):
    fw = type(x).__module__.split(".")[0]
    if fw == "torch":
        return x.data_ptr()
    if fw == "cupy":
        return x.data.ptr
    return x.__array_interface__["data"][0]


def _device_str(x):
    return str(getattr(x, "device", "cpu"))


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_round_trip_preserves_framework_device_dtype_shape_values(backend, dtype, rng):
    x = make(_values(rng, (3, 5, 4)), backend, dtype)
    y = _arrays.convert(x)
    assert type(y) is type(x) and y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape)
    assert _device_str(y) == _device_str(x)
    np.testing.assert_array_equal(raw_bits(y), raw_bits(x))


def test_strided_inputs_are_read_in_place(backend, rng):
    base = make(_values(rng, (6, 8, 10)), backend, "float64")
    views = [base[::2], base[:, 1::3], base[..., ::4], base.transpose(2, 0, 1) if backend[0] != "torch"
             else base.permute(2, 0, 1), base[1, :, 3], base[2:4, 5:6, 1:9:3]]
    if backend[0] != "torch":  # torch has no negative strides
        views.append(base[::-1, :, ::-2])
    for v in views:
        assert _core._testing.array_info(v)["data"] == _data_ptr(v)  # read in place, not copied
        out = _arrays.convert(v, "float64")
        np.testing.assert_array_equal(to_numpy(out), to_numpy(v))
        assert _core._testing.array_info(out)["contiguous"]


def test_strides_are_reported_in_elements_including_negative_and_zero():
    x = np.arange(24.0).reshape(4, 6)
    assert _core._testing.array_info(x[::-1, ::2])["strides"] == (-6, 2)
    b = np.broadcast_to(np.arange(3.0), (4, 3))
    info = _core._testing.array_info(b)
    assert info["strides"] == (0, 1) and info["writable"] is False
    np.testing.assert_array_equal(_arrays.convert(b), b)


def test_strided_output_is_written_in_place(backend, rng):
    src = make(_values(rng, (4, 3)), backend, "float32")
    dst = make(np.zeros((4, 6)), backend, "float64")
    _core.convert(src, dst[:, ::2], _arrays.stream_of(dst))
    got = to_numpy(dst)
    np.testing.assert_array_equal(got[:, ::2], to_numpy(src))
    assert not got[:, 1::2].any()


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4), ()])
def test_zero_size_and_zero_dim(backend, shape, rng):
    x = make(_values(rng, shape), backend, "float32")
    y = _arrays.convert(x, "float64")
    assert tuple(y.shape) == shape
    np.testing.assert_array_equal(to_numpy(y), to_numpy(x))


def _mixed_values(rng):
    return np.concatenate([_values(rng, 2000), rng.uniform(-1, 1, 200) * 2.0**-20, [7e4, -1e5, 0.0, -0.0, np.inf]])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_float64_to_half_and_single_rounds_as_numpy(backend, rng):
    # float64 -> float16 against NumPy's correctly rounded cast, subnormals and overflow included
    v = _mixed_values(rng)
    x = make(v, backend, "float64")
    np.testing.assert_array_equal(raw_bits(_arrays.convert(x, "float16")), raw_bits(v.astype(np.float16)))
    np.testing.assert_array_equal(to_numpy(_arrays.convert(x, "float32")), v.astype(np.float32))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("backend, src, dst", [
    pytest.param(*p.values, dst, id=f"{p.id}-{dst}", marks=p.marks) for p in backend_dtypes() for dst in DTYPES
    if dst != "bfloat16" or p.values[0][0] == "torch"])
def test_every_dtype_pair_rounds_once_to_nearest_even(backend, src, dst, rng):
    xs = _arrays.convert(make(_mixed_values(rng), backend, "float64"), src)
    y = _arrays.convert(xs, dst)
    expected = to_numpy(xs)
    if dst == "bfloat16":
        np.testing.assert_array_equal(raw_bits(y), reference.round_to_bfloat16_bits(expected))
    else:
        np.testing.assert_array_equal(to_numpy(y), expected.astype(dst).astype(np.float64))


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_nan_survives_conversion(backend, dtype):
    x = make(np.array([np.nan, 1.0, -np.nan]), backend, "float64")
    assert np.isnan(to_numpy(_arrays.convert(x, dtype))[[0, 2]]).all()


def test_import_paths():
    x = np.arange(6.0).reshape(2, 3)
    assert _core._testing.array_info(x)["path"] == "dlpack_versioned"

    class LegacyOnly:  # a producer that predates DLPack 1.0
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, stream=None):
            return self.a.__dlpack__(stream=stream)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    info = _core._testing.array_info(LegacyOnly(x))
    assert info["path"] == "dlpack" and info["shape"] == (2, 3)
    out = np.empty(6)
    _core.convert(LegacyOnly(x.ravel()), out)
    np.testing.assert_array_equal(out, x.ravel())

    mv = memoryview(x)
    assert _core._testing.array_info(mv)["path"] == "buffer"
    buf = array.array("f", [1.0, 2.0, 3.0])
    info = _core._testing.array_info(buf)
    assert info["path"] == "buffer" and info["dtype"] == "float32" and info["shape"] == (3,)
    _core.convert(np.array([4.0, 5.0, 6.0]), buf)
    assert list(buf) == [4.0, 5.0, 6.0]

    # a capsule exported ahead (the Python layer's path for lists of torch tensors), read once
    capsule = x.__dlpack__()
    info = _core._testing.array_info(capsule)
    assert info["path"] == "dlpack" and info["shape"] == (2, 3) and info["data"] == x.ctypes.data
    with pytest.raises(TypeError, match="argument 'x' is a capsule that holds no unused DLPack tensor"):
        _core._testing.array_info(capsule)


def test_read_only_inputs_are_accepted_read_only_outputs_refused():
    x = np.arange(4.0)
    x.flags.writeable = False
    assert _core._testing.array_info(x)["writable"] is False
    np.testing.assert_array_equal(_arrays.convert(x), x)
    with pytest.raises(ValueError, match="'out' is read-only"):
        _core.convert(np.zeros(4), x)


@needs_torch
def test_torch_tensors_requiring_grad_and_bfloat16():
    import torch

    w = torch.randn(3, 4, requires_grad=True)
    y = _arrays.convert(w, "float64")
    assert y.dtype == torch.float64 and not y.requires_grad
    np.testing.assert_array_equal(y.numpy(), w.detach().double().numpy())
    b = torch.randn(5, 7).to(torch.bfloat16)
    assert _core._testing.array_info(b)["dtype"] == "bfloat16"
    np.testing.assert_array_equal(_arrays.convert(b, "float32").numpy(), b.float().numpy())


@needs_torch
def test_cpu_tensors_take_torchs_exporter_and_unsafe_views_are_refused():
    import torch

    x = torch.arange(6.0).reshape(2, 3)
    info = _core._testing.array_info(x.T)
    assert info["path"] == "torch" and info["strides"] == (1, 3) and info["data"] == x.data_ptr()
    assert _core._testing.array_info(torch.nn.Parameter(x, requires_grad=False))["path"] == "torch"  # subclass
    with pytest.raises(TypeError, match="argument 'x' is a tensor that requires grad"):
        _core._testing.array_info(x.clone().requires_grad_())
    # DLPack has no neg bit: a negated view would be read unnegated
    negated = torch.complex(x, x).conj().imag
    assert negated.is_neg()
    with pytest.raises(TypeError, match="argument 'src' is a negated view"):
        _core.convert(negated, np.empty((2, 3)))
    np.testing.assert_array_equal(_arrays.prepare(negated, "x").numpy(), -x.numpy())  # inputs are resolved


def test_work_is_ordered_on_the_callers_cuda_stream(cuda_backend, rng):
    fw, _ = cuda_backend
    v = _values(rng, (1 << 20,))
    if fw == "torch":
        import torch

        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            x = torch.from_numpy(v).cuda() * 2  # queued on s
            y = _arrays.convert(x, "float32")     # must run after it, on s
            z = y * 1
        s.synchronize()
    else:
        import cupy

        s = cupy.cuda.Stream(non_blocking=True)
        with s:
            x = cupy.asarray(v) * 2
            y = _arrays.convert(x, "float32")
            z = y * 1
        s.synchronize()
    np.testing.assert_array_equal(to_numpy(z), (v * 2).astype(np.float32))


def test_device_mix_is_refused(cuda_backend):
    fw, _ = cuda_backend
    gpu = make(np.zeros(3), cuda_backend, "float32")
    with pytest.raises(ValueError, match="same device"):
        _core.convert(np.zeros(3), gpu, _arrays.stream_of(gpu))


class _Hooked:
    """An array whose DLPack export first runs `hook`: curvkit calls it while importing its
    arguments, inside the native call and before the computation starts."""

    def __init__(self, a, hook):
        self.a, self.hook = a, hook

    def __dlpack__(self, **kwargs):
        self.hook()
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def _spd(n):
    B = np.random.default_rng(n).standard_normal((n, n))
    return B @ B.T / n + np.eye(n)


# One native call of every family, with its first array hooked (the array and the call).
_NO_WORKSPACE = {"stream": 0, "workspace": None}
GIL_CALLS = {
    "probes": lambda h: _core.probes(h(np.empty(4_000_000)), kind="gaussian", seed=0, offset=0, **_NO_WORKSPACE),
    "convert": lambda h: _core.convert(h(np.ones(8_000_000)), np.empty(8_000_000, dtype=np.float32)),
    "polar": lambda h: _core.polar(
        [h(np.ones((400, 400)) + np.eye(400))], [np.empty((400, 400))], steps=[(3.4445, -4.775, 2.0315)] * 5,
        norm_scale=1.0, norm_eps=1e-7, method="standard", alpha=[1.0], beta=[0.0], normalize=True, check_finite=True,
        **_NO_WORKSPACE),
    "matrix_sqrt": lambda h: _core.matrix_sqrt([h(_spd(300))], [np.empty((300, 300))], [], method="newton_schulz",
                                               max_iters=100, tol=1e-8, fallback=False, **_NO_WORKSPACE),
    "solve_lyapunov": lambda h: _core.solve_lyapunov([h(_spd(200))], [np.eye(200)], [np.empty((200, 200))],
                                                     max_iters=100, **_NO_WORKSPACE),
    "matrix_inverse_root": lambda h: _core.matrix_inverse_root(
        [h(_spd(300))], [np.empty((300, 300))], [None], [None], p=4, eps=0.0, method="newton", max_iters=100,
        tol=None, fallback=True, compute_residual=False, **_NO_WORKSPACE),
    "eigh": lambda h: _core.eigh([h(_spd(400))], [np.empty(400)], [np.empty((400, 400))], [None], **_NO_WORKSPACE),
    "orthonormalize_qr": lambda h: _core.orthonormalize_qr([h(np.random.default_rng(0).standard_normal((2000, 300)))],
                                                           **_NO_WORKSPACE),
    "eigenbasis_update": lambda h: _core.eigenbasis_update(
        [h(_spd(500))], [np.eye(500)], [np.empty((500, 500))], [np.empty(500)], [np.empty(500, dtype=np.int64)],
        **_NO_WORKSPACE),
}


@pytest.mark.parametrize("name", list(GIL_CALLS))
def test_gil_is_released_during_compute(name):
    # Thread B waits until curvkit (in this thread) has entered the native call, then runs
    # Python code. Python's own thread switching is switched off (an interval of 1000 s), so
    # B can run before this thread returns only if the native call released the GIL; if it
    # held it, B would run after the return and the order would be ["A", "B"]. Every family's
    # binding is called, since each one releases the GIL itself (CallScope).
    entered, order = threading.Event(), []

    def b():
        entered.wait()
        order.append("B")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        thread = threading.Thread(target=b)
        thread.start()  # B runs until it blocks in entered.wait()
        GIL_CALLS[name](lambda a: _Hooked(a, entered.set))
        order.append("A")
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert entered.is_set() and order == ["B", "A"]


class _Blocks:
    """A NumPy stand-in for a framework's allocator: 256-byte aligned blocks, with a record of
    what was asked, how many blocks were alive at each request, and which are alive now."""

    def __init__(self, fail_at=None, misalign=False):
        self.asked, self.alive_when_asked, self.alive = [], [], []
        self.fail_at, self.misalign = fail_at, misalign

    def __call__(self, nbytes):
        if len(self.asked) == self.fail_at:
            raise MemoryError("stand-in allocator: out of memory")
        self.alive_when_asked.append(self.live())
        self.asked.append(nbytes)
        block = np.empty(nbytes + 512, np.uint8)
        address = block.ctypes.data + (-block.ctypes.data) % 256 + (1 if self.misalign else 0)
        self.alive.append(weakref.ref(block))
        return block, address

    def live(self):
        return sum(r() is not None for r in self.alive)


MiB = 1 << 20


def test_small_workspaces_share_a_framework_block():
    blocks = _Blocks()
    pointers = _core._testing.workspace_trial(blocks, [8, 1000, 4096, 256])
    assert blocks.asked == [MiB] and blocks.live() == 0
    offsets = [p - pointers[0] for p in pointers]
    assert offsets == [0, 256, 1280, 5376]  # each rounded up to 256 bytes


def test_released_workspaces_are_reused_in_stack_order():
    blocks = _Blocks()
    # A = 3 MiB, released, then B = 3 MiB takes its place. C, D small (a chunk of their own);
    # C released under D stays taken, so E goes after D; once E and D are released too, C's
    # place is free again and F takes it.
    p = _core._testing.workspace_trial(blocks, [3 * MiB, -1, 3 * MiB, 100, 100, -3, 100, -5, -4, 100])
    A, B, C, D, E, F = p
    assert B == A and E == D + 256 and F == C
    assert blocks.asked == [3 * MiB, MiB] and blocks.live() == 0


def test_a_larger_workspace_returns_the_empty_blocks_first():
    blocks = _Blocks()
    _core._testing.workspace_trial(blocks, [2 * MiB, -1, 4 * MiB, 8 * MiB])
    # the empty 2 MiB block went back before 4 MiB was asked; 8 MiB is asked while 4 MiB is live
    assert blocks.asked == [2 * MiB, 4 * MiB, 8 * MiB]
    assert blocks.alive_when_asked == [0, 0, 1] and blocks.live() == 0


@pytest.mark.parametrize("fail_at", [0, 2])
def test_workspace_allocation_failure_raises_the_frameworks_error_and_releases_the_rest(fail_at):
    blocks = _Blocks(fail_at=fail_at)
    with pytest.raises(MemoryError, match="stand-in allocator"):
        _core._testing.workspace_trial(blocks, [2 * MiB, 2 * MiB, 2 * MiB])
    assert len(blocks.asked) == fail_at and blocks.live() == 0


def test_workspace_allocator_misaligned_block_is_refused():
    blocks = _Blocks(misalign=True)
    with pytest.raises(ValueError, match="256-byte aligned"):
        _core._testing.workspace_trial(blocks, [64])
    assert blocks.live() == 0
    with pytest.raises(ValueError, match="'allocate'"):
        _core._testing.workspace_trial(None, [64])


def test_workspace_allocator_is_none_on_the_cpu(backend):
    fw, dev = backend
    x = make(np.zeros(3), backend)
    assert (_arrays.workspace_of(x) is None) == (dev == "cpu")


WORKSPACE_CALLS = {
    "polar": lambda A: [curvkit.polar(A)],
    "inverse_root_newton": lambda A: [curvkit.matrix_inverse_root(A, 4, method="newton")],
    "inverse_root_eigh": lambda A: [curvkit.matrix_inverse_root(A, 4, method="eigh")],
    "eigh": lambda A: list(curvkit.eigh(A)),
    "matrix_sqrt": lambda A: [curvkit.matrix_sqrt(A, method="newton_schulz")],
}


@pytest.mark.parametrize("call", list(WORKSPACE_CALLS))
def test_workspaces_come_from_the_callers_cuda_framework(cuda_backend, call, rng):
    # Every CUDA family iterates in n x n workspaces (at least three of them for any of these
    # calls); they must be the framework's memory, and all of it handed back after the call.
    fw, _ = cuda_backend
    n = 512
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = make((Q * np.logspace(0, -2, n)) @ Q.T, cuda_backend, "float32")
    workspace = 3 * n * n * 4
    if fw == "torch":
        import torch

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        outputs = WORKSPACE_CALLS[call](A)
        torch.cuda.synchronize()
        kept = sum(x.untyped_storage().nbytes() for x in outputs)
        assert torch.cuda.max_memory_allocated() - base >= kept + workspace
        assert torch.cuda.memory_allocated() - base == kept
    else:
        import cupy

        pool = cupy.cuda.MemoryPool()
        with cupy.cuda.using_allocator(pool.malloc):
            outputs = WORKSPACE_CALLS[call](A)
        cupy.cuda.get_current_stream().synchronize()
        kept = sum(x.nbytes for x in outputs)
        assert pool.total_bytes() >= kept + workspace
        assert pool.used_bytes() == kept
    assert all(np.isfinite(to_numpy(x)).all() for x in outputs)


@pytest.mark.parametrize("cuda_backend", backends("cupy", "cuda"))
def test_workspace_out_of_memory_is_cupys_error(cuda_backend, rng):
    # a deterministic allocation limit needs CuPy's pool
    import cupy

    G = make(rng.standard_normal((512, 512)), cuda_backend, "float32")
    pool = cupy.cuda.MemoryPool()
    pool.set_limit(size=2 * G.nbytes)  # the output fits, the workspaces do not
    with cupy.cuda.using_allocator(pool.malloc):
        with pytest.raises(cupy.cuda.memory.OutOfMemoryError):
            curvkit.polar(G)
    gc.collect()
    cupy.cuda.get_current_stream().synchronize()
    assert pool.used_bytes() == 0
