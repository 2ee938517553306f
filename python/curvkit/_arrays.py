"""Which framework an array belongs to, allocation with that framework, and its stream.

curvkit's extension never links PyTorch or CuPy: it reads arrays through DLPack or the
buffer protocol. This module is the only place that knows the frameworks. It imports
torch or cupy only when handed one of their objects (or asked for a CUDA device), so
``import curvkit`` stays cheap and NumPy is the only hard dependency.
"""
from __future__ import annotations

import functools

import numpy as np

from . import _core
from ._errors import ArgumentError, ArgumentTypeError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


_FRAMEWORK_OF_TYPE: dict = {}  # array types seen so far -> their framework (a lookup per array)


def framework_of(x, name="x"):
    """'numpy', 'torch' or 'cupy' for an array; TypeError naming `name` otherwise."""
    known = _FRAMEWORK_OF_TYPE.get(type(x))
    if known is not None:
        return known
    module = type(x).__module__.split(".", 1)[0]
    if module in ("numpy", "torch", "cupy") and hasattr(x, "shape") and hasattr(x, "dtype"):
        _FRAMEWORK_OF_TYPE[type(x)] = module
        return module
    raise ArgumentTypeError(
        f"argument '{name}' must be a NumPy array, PyTorch tensor or CuPy array, "
        f"got {type(x).__module__}.{type(x).__qualname__}"
    )


def device_of(x, name="x"):
    """('cpu', 0) or ('cuda', index) for an array of any supported framework."""
    fw = framework_of(x, name)
    if fw == "numpy":
        return ("cpu", 0)
    if fw == "torch":
        dev = x.device
        if dev.type == "cpu":
            return ("cpu", 0)
        if dev.type == "cuda":
            return ("cuda", dev.index if dev.index is not None else 0)
        raise ArgumentError(f"argument '{name}' must be a CPU or CUDA tensor, got a tensor on {dev}")
    return ("cuda", x.device.id)


def dtype_name(dtype, name="dtype"):
    """Canonical name ('float32', ...) of a NumPy, PyTorch or CuPy dtype, or of a string."""
    if isinstance(dtype, str):
        s = dtype
    elif type(dtype).__module__.startswith("torch"):
        s = str(dtype).replace("torch.", "")
    else:
        try:
            s = np.dtype(dtype).name
        except TypeError:
            raise ArgumentTypeError(f"argument '{name}' is not a dtype: {dtype!r}") from None
    aliases = {"half": "float16", "float": "float32", "double": "float64", "bf16": "bfloat16"}
    return aliases.get(s, s)


def native_dtype(name, framework):
    """The framework's dtype object for a canonical float dtype name."""
    if name not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got '{name}'")
    if framework == "torch":
        import torch

        return getattr(torch, name)
    if name == "bfloat16":
        raise ArgumentTypeError(f"{'NumPy' if framework == 'numpy' else 'CuPy'} has no bfloat16; use a PyTorch tensor")
    return np.dtype(name)


def parse_device(device):
    """(kind, index) from 'cpu', 'cuda', 'cuda:1', an int (a CUDA index), or a torch/cupy device."""
    if device is None:
        return ("cpu", 0)
    if isinstance(device, int) and not isinstance(device, bool):
        return ("cuda", device)
    module = type(device).__module__.split(".", 1)[0]
    if module == "torch":
        if device.type not in ("cpu", "cuda"):
            raise ArgumentError(f"argument 'device' must be a CPU or CUDA device, got {device}")
        return (device.type, device.index or 0)
    if module == "cupy":
        return ("cuda", device.id)
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        if kind in ("cpu", "cuda") and (index == "" or index.isdigit()) and not (kind == "cpu" and index):
            return (kind, int(index) if index else 0)
    raise ArgumentError(f"argument 'device' must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def cuda_framework():
    """The framework that allocates CUDA arrays when the caller names none: torch, else cupy."""
    for fw in ("torch", "cupy"):
        try:
            module = __import__(fw)
        except ImportError:
            continue
        if fw == "torch" and not module.cuda.is_available():
            continue
        return fw
    raise ArgumentError("a CUDA device was asked for, but neither PyTorch with CUDA nor CuPy is available")


def empty(shape, dtype, framework, device=("cpu", 0)):
    """Uninitialized array of canonical `dtype` with `framework` on `device` ((kind, index))."""
    kind, index = device
    native = native_dtype(dtype, framework)
    if framework == "numpy":
        if kind != "cpu":
            raise ArgumentError("NumPy arrays live on the CPU; pass a torch or cupy array or device for CUDA")
        return np.empty(shape, dtype=native)
    if framework == "torch":
        import torch

        return torch.empty(shape, dtype=native, device=f"cuda:{index}" if kind == "cuda" else "cpu")
    import cupy

    if kind != "cuda":
        raise ArgumentError("CuPy arrays live on a CUDA device")
    with cupy.cuda.Device(index):
        return cupy.empty(shape, dtype=native)


def current_stream(framework, device):
    """The framework's current CUDA stream on `device` as a DLPack stream integer (0 for CPU)."""
    kind, index = device
    if kind != "cuda":
        return 0
    if framework == "torch":
        import torch

        return torch.cuda.current_stream(index).cuda_stream
    if framework == "cupy":
        import cupy

        with cupy.cuda.Device(index):
            return cupy.cuda.get_current_stream().ptr
    return 0


def stream_of(x):
    """Current stream of x's framework on x's device (0 for CPU arrays)."""
    return current_stream(framework_of(x), device_of(x))


def workspace_allocator(framework, device):
    """The allocator of a CUDA call's device workspaces, from the caller's framework: a
    function ``nbytes -> (array, device pointer)`` that PyTorch's caching allocator or CuPy's
    pool serves on the current stream (None for the CPU, whose kernels allocate their own, and
    during a CuPy stream capture). Under torch.cuda.graph the graph's private pool serves it."""
    kind, index = device
    if kind != "cuda":
        return None
    if framework == "torch":
        import torch

        target = torch.device("cuda", index)

        def allocate(nbytes):
            block = torch.empty(nbytes, dtype=torch.uint8, device=target)
            return block, block.data_ptr()

        return allocate
    import cupy

    with cupy.cuda.Device(index):
        stream = cupy.cuda.get_current_stream()
    if getattr(stream, "is_capturing", lambda: False)():
        # CuPy's pool would hand the addresses a graph records to other arrays after the call;
        # cudaMallocAsync in the capture makes them the graph's own memory nodes instead.
        return None

    def allocate_cupy(nbytes):
        with cupy.cuda.Device(index):
            block = cupy.empty(nbytes, dtype=cupy.uint8)
        return block, block.data.ptr

    return allocate_cupy


def workspace_of(x):
    """workspace_allocator for x's framework and device."""
    return workspace_allocator(framework_of(x), device_of(x))


def convert(x, dtype=None, out=None, name="x"):
    """Copy `x` into a new C-contiguous array of its own framework and device (or into
    `out`), converting to `dtype` with one rounding to nearest-even. Any strides are read.

    >>> import numpy as np
    >>> from curvkit._arrays import convert
    >>> x = np.arange(6.0).reshape(2, 3)[:, ::2]
    >>> convert(x, "float32")
    array([[0., 2.],
           [3., 5.]], dtype=float32)
    """
    fw = framework_of(x)
    device = device_of(x)
    if fw == "torch" and x.requires_grad:
        x = x.detach()  # DLPack refuses tensors that require grad; the copy carries no graph
    if out is None:
        target = dtype_name(dtype if dtype is not None else x.dtype)
        out = empty(tuple(x.shape), target, fw, device)
    _core.convert(x, out, current_stream(fw, device), name)
    return out


def is_c_contiguous(x):
    """Whether x is C-contiguous, as its framework says (dimensions of size 1 ignored)."""
    if framework_of(x) == "torch":
        return x.is_contiguous()
    return bool(x.flags.c_contiguous)


def contiguous(x, name="x", dtype=None):
    """x itself when already C-contiguous (and of `dtype` when given), else an explicit copy.
    Arrays of a non-float dtype pass unchanged: the native call then names them in its error."""
    current = dtype_name(x.dtype)
    target = dtype_name(dtype) if dtype is not None else current
    if current not in FLOAT_DTYPES or (target == current and is_c_contiguous(x)):
        return x
    return convert(x, target, name=name)


def detached(x, name="x"):
    """x itself, or for a torch tensor a view without autograd history (same storage: DLPack
    refuses tensors that require grad, such as the parameters polar_update_ writes)."""
    if framework_of(x, name) != "torch":
        return x
    if not (x.is_cpu or x.is_cuda):
        device_of(x, name)  # a tensor on another device (meta, mps, ...) is refused by name
    return x.detach()


def exported(*lists):
    """Lists of arrays for a native call on CUDA, their torch tensors as DLPack capsules from
    torch's C exporter: 0.4 us a tensor against 6 us for the __dlpack__ / __dlpack_device__
    protocol calls, which made most of a call's time for the fused steps' hundreds of small
    tensors (and a Muon step's list of parameters on a GPU). The capsule skips the stream
    handshake of __dlpack__(stream=), so it is taken only when the call runs on torch's current
    stream: when the first array of the first list, the one call_context chose the stream by, is
    a CUDA torch tensor. (CPU tensors take the same exporter in the native layer.) Other arrays
    (and None) pass unchanged. Returns the lists in the same order."""
    lead = lists[0][0] if lists and lists[0] else None
    if lead is None or framework_of(lead) != "torch" or not lead.is_cuda:
        return [list(items) for items in lists]
    return [[_torch_to_dlpack()(x) if x is not None and framework_of(x) == "torch" else x for x in items]
            for items in lists]


@functools.cache
def _torch_to_dlpack():
    """torch's C exporter, looked up once (torch is imported by then: a tensor was handed in)."""
    from torch.utils.dlpack import to_dlpack

    return to_dlpack


def all_written_in_place(items):
    """written_in_place for every array of a list (None skipped), torch tensors in one call."""
    tensors = [x for x in items if x is not None and framework_of(x) == "torch"]
    if tensors:
        import torch

        torch.autograd.graph.increment_version(tensors)
    return items


def to_host(x):
    """x as a NumPy array on the host (a view where it already is one); a torch bfloat16 tensor
    as float32 (exact: NumPy has no bfloat16)."""
    fw = framework_of(x)
    if fw == "torch":
        x = x.detach().cpu()
        return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    return x.get() if fw == "cupy" else np.asarray(x)


def prepare(x, name):
    """An input as the native call takes it: detached and C-contiguous (copied if not), a torch
    negated view resolved (DLPack cannot carry the neg bit)."""
    x = detached(x, name)
    if framework_of(x) == "torch" and x.is_neg():
        x = x.resolve_neg()
    return contiguous(x, name)


def as_list(x):
    """(list of arrays, whether x was a single array): list input gives list output."""
    if isinstance(x, (list, tuple)):
        return list(x), False
    return [x], True


def matching(x, single, count, name, input_name="A"):
    """An optional per-input argument (init, basis, out) as a list: None for each input when x is
    None; else one array for an array input, a list for a list input (the native call checks
    the count, shapes and dtypes)."""
    if x is None:
        return [None] * count
    if single and isinstance(x, (list, tuple)) and not all(hasattr(e, "shape") for e in x):
        raise ArgumentTypeError(f"argument '{name}' must be an array (NumPy, PyTorch or CuPy), got a "
                                f"{type(x).__name__}")
    if single == isinstance(x, (list, tuple)):
        raise ArgumentError(f"argument '{name}' must match '{input_name}': one array for an array, "
                            "a list for a list")
    return [x] if single else list(x)


def given_outputs(out, single, name="out", input_name="A"):
    """The caller's `out` as a list of arrays (detached torch tensors), structured like the input.
    They are marked written (see written_in_place)."""
    return [written_in_place(detached(o, name)) for o in matching(out, single, 0, name, input_name)]


def written_in_place(x):
    """x, with torch's version counter bumped when it is a tensor the native call will write: the
    write goes through DLPack, which autograd cannot see, so a graph that saved the tensor would
    otherwise backpropagate through the new values silently; bumped, backward raises torch's
    usual "modified by an inplace operation" error. Bumped before the call, so a call that then
    fails also counts as a write (the safe side)."""
    all_written_in_place([x])
    return x


def outputs_for(out, inputs, single, name="out", input_name="A"):
    """The caller's `out` as a list (see given_outputs), or new arrays like the inputs."""
    if out is None:
        return [empty_like(x) for x in inputs]
    return given_outputs(out, single, name, input_name)


def output_parts(out, count, what):
    """The parts of an `out` that holds several results (a pair (S, R), a triple, ...)."""
    if not (isinstance(out, (list, tuple)) and len(out) == count):
        raise ArgumentTypeError(f"argument 'out' must be {what}")
    return list(out)


def empty_like(x, shape=None, dtype=None):
    """A new array with x's framework and device, of x's shape and dtype unless given."""
    fw = framework_of(x)
    shape = tuple(x.shape) if shape is None else tuple(shape)
    if dtype is None:
        if fw == "numpy":
            return np.empty(shape, dtype=x.dtype)
        if fw == "torch":
            import torch

            return torch.empty(shape, dtype=x.dtype, device=x.device)
        import cupy

        with x.device:
            return cupy.empty(shape, dtype=x.dtype)
    return empty(shape, dtype_name(dtype), fw, device_of(x))


def call_context(arrays):
    """(stream, workspace allocator) for a native call on these arrays: the first one's framework
    and device decide (the native call checks that the others share its device)."""
    if not arrays:
        return 0, None
    return stream_of(arrays[0]), workspace_of(arrays[0])
