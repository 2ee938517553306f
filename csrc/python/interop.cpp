#include "python/interop.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "core/check.h"
#include "core/convert.h"
#include "python/binding.h"
#include "python/dlpack.h"

namespace curvkit::interop {

ImportedArray::Owner::~Owner() {
  if (legacy && legacy->deleter) legacy->deleter(legacy);
  if (versioned && versioned->deleter) versioned->deleter(versioned);
  if (has_buffer) PyBuffer_Release(&buffer);
}

FrameworkWorkspace::FrameworkWorkspace(py::object allocate)
    : allocate_(std::move(allocate)), scope_(allocate_.is_none() ? nullptr : this) {}

void* FrameworkWorkspace::allocate(size_t bytes) {
  const size_t size = (std::max<size_t>(bytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
  auto carve = [size](Chunk& c) {
    const size_t begin = c.used();
    c.blocks.push_back({begin, begin + size, false});
    return static_cast<void*>(c.base + begin);
  };
  for (Chunk& c : chunks_)
    if (c.size - c.used() >= size) return carve(c);
  py::gil_scoped_acquire gil;
  chunks_.erase(std::remove_if(chunks_.begin(), chunks_.end(), [](const Chunk& c) { return c.blocks.empty(); }),
                chunks_.end());
  const size_t chunk_bytes = std::max(size, kMinChunk);
  const py::tuple block = allocate_(chunk_bytes);
  const uintptr_t address = block[1].cast<uintptr_t>();
  CK_CHECK_VALUE(address % kAlignment == 0, "the workspace allocator returned address ", address,
                 ", not 256-byte aligned");
  chunks_.push_back({block[0], reinterpret_cast<char*>(address), chunk_bytes, {}});
  return carve(chunks_.back());
}

void FrameworkWorkspace::release(void* ptr) noexcept {
  for (Chunk& c : chunks_) {
    if (ptr < c.base || ptr >= c.base + c.size) continue;
    for (Block& b : c.blocks)
      if (c.base + b.begin == ptr) b.released = true;
    while (!c.blocks.empty() && c.blocks.back().released) c.blocks.pop_back();
    return;
  }
}

namespace {

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__qualname__")); }

DType dtype_from_dlpack(const dlpack::DLDataType& t, const char* name) {
  CK_CHECK_TYPE(t.lanes == 1, "argument '", name, "' has a vector dtype (", int(t.lanes),
                " lanes), which is not supported");
  switch (t.code) {
    case dlpack::kDLInt: return {DTypeCode::Int, t.bits};
    case dlpack::kDLUInt: return {DTypeCode::UInt, t.bits};
    case dlpack::kDLFloat: return {DTypeCode::Float, t.bits};
    case dlpack::kDLBfloat: return {DTypeCode::BFloat, t.bits};
    case dlpack::kDLComplex: return {DTypeCode::Complex, t.bits};
    case dlpack::kDLBool: return {DTypeCode::Bool, t.bits};
    default: return {DTypeCode::Other, t.bits};
  }
}

ArrayView view_from_dltensor(const dlpack::DLTensor& t, const char* name) {
  ArrayView v;
  v.dtype = dtype_from_dlpack(t.dtype, name);
  switch (t.device.device_type) {
    case dlpack::kDLCPU:
    case dlpack::kDLCUDAHost: v.device = {DeviceKind::CPU, 0}; break;
    case dlpack::kDLCUDA: v.device = {DeviceKind::CUDA, t.device.device_id}; break;
    default:
      throw ValueError(cat("argument '", name, "' lives on an unsupported device (DLPack device type ",
                           t.device.device_type, "); curvkit takes CPU and CUDA arrays"));
  }
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.shape.assign(t.shape, t.shape + t.ndim);
  v.strides.resize(t.ndim);
  int64_t expected = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    v.strides[d] = t.strides ? t.strides[d] : expected;
    expected *= t.shape[d];
  }
  return v;
}

// A Python exception of the given type (e.g. PyExc_TypeError) is pending in `e`.
bool is_error(const py::error_already_set& e, PyObject* type) { return e.matches(type); }

// Reads a DLPack capsule (versioned or legacy) into `out` and marks it used; false if `cap` is no
// unused DLPack capsule.
bool import_capsule(PyObject* cap, const char* name, ImportedArray& out) {
  auto owner = std::make_unique<ImportedArray::Owner>();
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* t = static_cast<dlpack::DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
    PyCapsule_SetName(cap, "used_dltensor_versioned");
    owner->versioned = t;
    CK_CHECK_VALUE(t->version.major == 1, "argument '", name, "' was exported with DLPack ", t->version.major, ".",
                   t->version.minor, "; curvkit reads DLPack 1.x");
    out.view = view_from_dltensor(t->dl_tensor, name);
    out.view.writable = !(t->flags & dlpack::kFlagReadOnly);
    out.path = "dlpack_versioned";
  } else if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* t = static_cast<dlpack::DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    PyCapsule_SetName(cap, "used_dltensor");
    owner->legacy = t;
    out.view = view_from_dltensor(t->dl_tensor, name);
    out.path = "dlpack";
  } else {
    return false;
  }
  out.owner = std::move(owner);
  return true;
}

bool import_dlpack(py::handle obj, const char* name, StreamHandle stream, ImportedArray& out) {
  py::object dev = obj.attr("__dlpack_device__")();
  const int device_type = dev[py::int_(0)].cast<int>();
  py::object stream_arg = py::none();
  if (device_type == dlpack::kDLCUDA) stream_arg = py::int_(stream == 0 ? 1 : stream);  // 0 is not valid DLPack

  py::object capsule;
  try {
    capsule = obj.attr("__dlpack__")(py::arg("stream") = stream_arg, py::arg("max_version") = py::make_tuple(1, 0));
  } catch (py::error_already_set& e) {
    if (is_error(e, PyExc_BufferError)) return false;  // e.g. a read-only NumPy array on old NumPy
    if (!is_error(e, PyExc_TypeError)) {
      throw ValueError(cat("argument '", name, "' could not be exported through DLPack: ", e.what()));
    }
    try {  // producer predates DLPack 1.0 (no max_version): legacy capsule
      capsule = obj.attr("__dlpack__")(py::arg("stream") = stream_arg);
    } catch (py::error_already_set& e2) {
      if (is_error(e2, PyExc_BufferError)) return false;
      throw ValueError(cat("argument '", name, "' could not be exported through DLPack: ", e2.what()));
    }
  }
  CK_CHECK_TYPE(import_capsule(capsule.ptr(), name, out), "argument '", name, "': __dlpack__ of ", type_name(obj),
                " returned something other than a DLPack capsule");
  return true;
}

// torch's C exporter, once torch is loaded: (torch.Tensor, torch.utils.dlpack.to_dlpack), or two
// null handles while it is not (a process without torch never imports it). Kept for the life of
// the process (not released at exit, when the interpreter may be gone).
std::pair<py::handle, py::handle> torch_exporter() {
  static py::handle tensor_type, to_dlpack;
  if (!tensor_type) {
    PyObject* torch = PyImport_GetModule(py::str("torch").ptr());
    if (!torch) {
      PyErr_Clear();
      return {};
    }
    py::object module = py::reinterpret_steal<py::object>(torch);
    if (!py::hasattr(module, "Tensor") || !py::hasattr(module, "utils")) return {};  // torch still importing
    to_dlpack = py::object(module.attr("utils").attr("dlpack").attr("to_dlpack")).release();
    tensor_type = py::object(module.attr("Tensor")).release();
  }
  return {tensor_type, to_dlpack};
}

// A CPU torch tensor through torch's C exporter: ~0.3 us against ~5 us for the __dlpack_device__
// and __dlpack__ calls of the protocol (Python methods), which made most of a small call's time
// (an M-FAC window step at d = 1e4 passes six arrays). CUDA tensors take the protocol, for its
// stream handshake; tensors that require grad or are negated views are refused by name.
bool import_torch(py::handle obj, const char* name, ImportedArray& out) {
  const auto [tensor_type, to_dlpack] = torch_exporter();
  if (!tensor_type || !PyObject_TypeCheck(obj.ptr(), reinterpret_cast<PyTypeObject*>(tensor_type.ptr()))) return false;
  CK_CHECK_TYPE(!obj.attr("requires_grad").cast<bool>(), "argument '", name,
                "' is a tensor that requires grad; pass it detached (curvkit's Python functions do)");
  // DLPack has no negation flag: both exporters would hand over the stored values unnegated.
  CK_CHECK_TYPE(!obj.attr("is_neg")().cast<bool>(), "argument '", name,
                "' is a negated view (torch's neg bit, e.g. the imaginary part of a conjugate); pass ",
                "it resolved (x.resolve_neg())");
  if (!obj.attr("is_cpu").cast<bool>()) return false;
  const py::object capsule = to_dlpack(obj);
  CK_CHECK_TYPE(import_capsule(capsule.ptr(), name, out), "argument '", name,
                "': torch's to_dlpack returned something other than a DLPack capsule");
  out.path = "torch";
  return true;
}

DType dtype_from_format(const char* format, Py_ssize_t itemsize, const char* name) {
  std::string f = format ? format : "B";
  if (!f.empty() && (f[0] == '@' || f[0] == '=' || f[0] == '<')) f = f.substr(1);
  CK_CHECK_TYPE(!f.empty() && f[0] != '>' && f[0] != '!', "argument '", name,
                "' is not in native byte order; convert it first (e.g. numpy.asarray(x, dtype='=f8'))");
  const uint8_t bits = uint8_t(itemsize * 8);
  if (f == "e" || f == "f" || f == "d") return {DTypeCode::Float, bits};
  if (f == "Zf" || f == "Zd") return {DTypeCode::Complex, bits};
  if (f == "?") return {DTypeCode::Bool, bits};
  if (f.size() == 1 && std::strchr("bhilq", f[0])) return {DTypeCode::Int, bits};
  if (f.size() == 1 && std::strchr("BHILQ", f[0])) return {DTypeCode::UInt, bits};
  return {DTypeCode::Other, bits};
}

void import_buffer(py::handle obj, const char* name, ImportedArray& out) {
  auto owner = std::make_unique<ImportedArray::Owner>();
  if (PyObject_GetBuffer(obj.ptr(), &owner->buffer, PyBUF_RECORDS_RO) != 0) {
    PyErr_Clear();
    throw TypeError(cat("argument '", name, "' must be an array (NumPy, PyTorch or CuPy), got ", type_name(obj)));
  }
  owner->has_buffer = true;
  const Py_buffer& b = owner->buffer;
  ArrayView& v = out.view;
  v.dtype = dtype_from_format(b.format, b.itemsize, name);
  v.device = {DeviceKind::CPU, 0};
  v.data = b.buf;
  v.writable = !b.readonly;
  v.shape.assign(b.shape, b.shape + b.ndim);
  v.strides.resize(b.ndim);
  for (int d = 0; d < b.ndim; ++d) {
    CK_CHECK_VALUE(b.strides[d] % b.itemsize == 0, "argument '", name,
                   "' has strides that are not a multiple of its item size");
    v.strides[d] = b.strides[d] / b.itemsize;
  }
  out.path = "buffer";
  out.owner = std::move(owner);
}

}  // namespace

ImportedArray import_array(py::handle obj, const char* name, StreamHandle stream) {
  ImportedArray out;
  if (PyCapsule_CheckExact(obj.ptr())) {  // exported by the Python layer (_arrays.exported)
    CK_CHECK_TYPE(import_capsule(obj.ptr(), name, out), "argument '", name,
                  "' is a capsule that holds no unused DLPack tensor");
    return out;
  }
  if (import_torch(obj, name, out)) return out;
  if (py::hasattr(obj, "__dlpack__") && py::hasattr(obj, "__dlpack_device__") &&
      import_dlpack(obj, name, stream, out)) {
    return out;
  }
  import_buffer(obj, name, out);
  return out;
}

ImportedArray import_output(py::handle obj, const char* name, StreamHandle stream) {
  ImportedArray out = import_array(obj, name, stream);
  check_writable(out.view, name);
  return out;
}

void register_interop(py::module_& m, py::module_& testing) {
  testing.def(
      "array_info",
      [](py::handle x, const std::string& name, StreamHandle stream) {
        ImportedArray a = import_array(x, name.c_str(), stream);
        py::dict d;
        d["path"] = a.path;
        d["dtype"] = a.view.dtype.name();
        d["device"] = a.view.device.name();
        d["shape"] = py::tuple(py::cast(a.view.shape));
        d["strides"] = py::tuple(py::cast(a.view.strides));
        d["writable"] = a.view.writable;
        d["contiguous"] = a.view.is_contiguous();
        d["data"] = reinterpret_cast<uintptr_t>(a.view.data);
        return d;
      },
      py::arg("x"), py::arg("name") = "x", py::arg("stream") = -1,
      "How curvkit sees an array: the intake path taken, dtype, device, shape, strides "
      "(elements), writability and data pointer. For tests, debugging and layout checks. "
      "The default stream -1 asks the producer for no stream ordering: only metadata is read, "
      "and any other stream would make the legacy default stream wait, which a CUDA graph "
      "capture refuses.");
  testing.def(
      "workspace_trial",
      [](py::object allocate, const std::vector<int64_t>& script) {
        FrameworkWorkspace workspace(std::move(allocate));
        WorkspaceAllocator* allocator = workspace_allocator();
        CK_CHECK_VALUE(allocator, "argument 'allocate' must be a callable, got None");
        std::vector<void*> blocks;
        blocks.reserve(script.size());
        py::gil_scoped_release release;
        struct ReleaseRest {  // on scope exit, as cuda::DeviceBuffer does
          WorkspaceAllocator* allocator;
          std::vector<void*>& blocks;
          ~ReleaseRest() {
            for (auto it = blocks.rbegin(); it != blocks.rend(); ++it)
              if (*it) allocator->release(*it);
          }
        } release_rest{allocator, blocks};
        std::vector<uintptr_t> pointers;
        for (int64_t step : script) {
          if (step >= 0) {
            blocks.push_back(allocator->allocate(size_t(step)));
            pointers.push_back(reinterpret_cast<uintptr_t>(blocks.back()));
          } else {
            const size_t k = size_t(-step - 1);
            CK_CHECK_VALUE(k < blocks.size() && blocks[k], "script releases block ", k, ", not allocated and live");
            allocator->release(blocks[k]);
            blocks[k] = nullptr;
          }
        }
        return pointers;
      },
      py::arg("allocate"), py::arg("script"),
      "Runs a script of workspace allocations (n >= 0: n bytes) and releases (-k: the k-th "
      "allocation, from 1) through a workspace allocator, from a thread without the GIL as the "
      "CUDA kernels do; what is left is released at the end. Returns the pointers. For tests.");
  m.def(
      "convert",
      [](py::handle src, py::handle dst, StreamHandle stream, const std::string& name) {
        ImportedArray s = import_array(src, name.c_str(), stream);
        ImportedArray d = import_output(dst, "out", stream);
        binding::CallScope scope{py::none()};
        convert(s.view, d.view, stream, name.c_str(), "out");
      },
      py::arg("src"), py::arg("dst"), py::arg("stream") = 0, py::arg("name") = "src",
      "dst[...] = src[...] for any strides and float16/bfloat16/float32/float64 dtypes, rounding "
      "once to nearest-even. Runs on the arrays' device (CUDA: on `stream`).");
}

}  // namespace curvkit::interop
